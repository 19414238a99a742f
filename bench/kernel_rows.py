"""How long a forward of T tokens takes on the leanlm runtime, against one one-token decode step: the cost of a
speculative verification (T = drafts + 1) or of a small decode batch.

Rows: the int4 engine (int8 head) running T <= 16 tokens as one call of its C++ step (`Step.rows`, the default: the
whole forward in C++, each row's bits those of a one-token step), the same engine's per-op forward with the fused
kernels taking the T rows (each row as a one-row call computes it, the weight read once for all rows;
`kernels.MAX_ROWS`), with PyTorch's int4/int8 GEMM for every multi-row forward, and the float32 engine with the
fused float32 kernel and with MKL on transposed storage. Every figure is the median of `--repeats` forwards of
T tokens after a `--context`-token prefill (the cache is rewound after each), in one process, interleaved.
The crossover between the two int4 rows is what sets `kernels.MAX_ROWS`.

    python bench/kernel_rows.py [--model smollm2-135m] [--context 256] [--repeats 30] [--name kernel_rows]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from common import md_table, setup_threads, write_results

import leanlm
from leanlm.evaluation.profile import machine_info
from leanlm.runtime import Engine, kernels
from leanlm.runtime import model as runtime_model


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--tokens", default="1,2,3,4,5,6,8,12,16,24,32")
    ap.add_argument("--name", default="kernel_rows")
    a = ap.parse_args()
    setup_threads()
    model, _ = leanlm.load(a.model)
    Ts = [int(t) for t in a.tokens.split(",")]
    engines = {"int4": Engine(model, "int4", max_seq_len=a.context + max(Ts) + 1),
               "fp32": Engine(model, "fp32", max_seq_len=a.context + max(Ts) + 1),
               "fp32-mkl": Engine(model, "fp32", max_seq_len=a.context + max(Ts) + 1)}
    from leanlm.runtime.layouts import DenseWeight

    for m in engines["fp32-mkl"].model.modules():   # the layout without the fused kernel: MKL on [in, out] storage
        if isinstance(m, DenseWeight) and m.f32_rows:
            m.stored, m.transposed, m.f32_rows = m.stored.t().contiguous(), True, False
    ids = torch.randint(100, 20000, (1, a.context + max(Ts)), generator=torch.Generator().manual_seed(0))
    for e in engines.values():
        e.reset()
        e.forward(ids[:, :a.context], last_only=True)
    rows_max, step_max = kernels.MAX_ROWS, runtime_model.MAX_STEP_ROWS
    # (engine, kernels.MAX_ROWS, Decoder's MAX_STEP_ROWS)
    variants = {"int4, one-call step": ("int4", rows_max, step_max),
                "int4, per-op, fused kernels row by row": ("int4", 10 ** 9, 0),
                "int4, PyTorch's GEMM for T > 1": ("int4", 0, 0),
                "fp32, fused kernel row by row": ("fp32", rows_max, 0),
                "fp32, MKL on [in, out] storage": ("fp32-mkl", rows_max, 0)}
    times = {(v, T): [] for v in variants for T in Ts}
    load = [os.getloadavg()[0]]
    with torch.inference_mode():
        for _ in range(2):   # warm-up
            for v, (e, m, sm) in variants.items():
                kernels.MAX_ROWS, runtime_model.MAX_STEP_ROWS = m, sm
                for T in Ts:
                    engines[e].forward(ids[:, a.context:a.context + T])
                    engines[e].rewind(a.context)
        for r in range(a.repeats):
            for v, (e, m, sm) in variants.items():
                kernels.MAX_ROWS, runtime_model.MAX_STEP_ROWS = m, sm
                eng = engines[e]
                for T in Ts:
                    t0 = time.perf_counter()
                    eng.forward(ids[:, a.context:a.context + T])
                    times[(v, T)].append(time.perf_counter() - t0)
                    eng.rewind(a.context)
        load.append(os.getloadavg()[0])
    kernels.MAX_ROWS, runtime_model.MAX_STEP_ROWS = rows_max, step_max
    med = {k: statistics.median(t) * 1000 for k, t in times.items()}
    table = []
    for T in Ts:
        row = [T]
        for v in variants:
            one = med[(v, 1)]
            row += [f"{med[(v, T)]:.2f}", f"{med[(v, T)] / one:.2f}x"]
        table.append(row)
    cols = ["tokens T"] + [c for v in variants for c in (f"{v} ms", "vs 1-token step")]
    mi = machine_info()
    md = (f"# A forward of T tokens on the leanlm runtime, {a.model}, after a {a.context}-token prefill\n\n"
          f"Machine: {mi.get('cpu', '?')}, {torch.get_num_threads()} torch threads, torch {torch.__version__}; 1-minute load "
          f"average {load[0]:.1f} before, {load[1]:.1f} after. Median of {a.repeats} interleaved forwards per cell. "
          "'vs 1-token step' divides by the same row's T = 1 time (the int4 engine's is its one-call C++ decode step; the "
          "embedding is tied to the head, so the MKL row's tied lookup reads the transposed table).\n\n"
          + md_table(cols, table) + "\n\n"
          f"`kernels.MAX_ROWS` = {rows_max}: up to that many rows run the fused kernels; `MAX_STEP_ROWS` = {step_max}: up to "
          "that many tokens of the int4 engine run as one call of its C++ step.\n")
    path = write_results(a.name, {"model": a.model, "context": a.context, "repeats": a.repeats, "machine": mi, "load_average_1min": load,
                                  "median_ms": {f"{v}|{T}": med[(v, T)] for v in variants for T in Ts}, "max_rows": rows_max, "max_step_rows": step_max}, md)
    print(path.read_text())


if __name__ == "__main__":
    main()
