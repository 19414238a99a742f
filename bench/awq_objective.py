"""AWQ's search objective on SmolLM2-135M's layer shapes: per-sample (the former implementation) against the
Gram-matrix form leanlm uses now, timed side by side (interleaved, median of 5 after a warm-up).

Both compute ``sum_rows ||x (W - Q(W))^T||^2`` for one candidate of AWQ's scale search on 4096 input rows
(``algorithms.awq_search``): directly it costs ``rows x out x in`` flops per candidate, through
``G = x^T x`` (computed once per input) ``out x in x in``. Random rows and SmolLM2's real weights (the cost
does not depend on the values; the two results are checked equal).

Timed as CPU time of one thread (``time.process_time``, ``torch.set_num_threads(1)``), not wall time on all
cores as PROTOCOL.md asks: on a loaded machine the wall time of many small two-thread ops is set by the
scheduler (each op waits for both threads), not by the work, and both forms then time the same. The CPU time
of one thread measures the work itself.

    python bench/awq_objective.py          # writes bench/results/awq_objective.md / .json
"""

from __future__ import annotations

import os
import platform
import statistics
import time

import torch
from common import md_table, write_results

import leanlm
from leanlm.quantization import algorithms as alg
from leanlm.quantization.formats import fake_quantize, parse_format

ROWS, GRID = 4096, 20


def direct(x, ws, fmt):
    tot = 0.0
    for w in ws:
        d = w - fake_quantize(w, fmt, alg.weight_qparams(w, fmt))
        tot += float((x @ d.T).pow(2).sum(dtype=torch.float64))
    return tot


def main() -> None:
    torch.set_num_threads(1)
    model, _ = leanlm.load("smollm2-135m")
    lay = model.model.layers[0]
    groups = {"q/k/v": [lay.self_attn.q_proj, lay.self_attn.k_proj, lay.self_attn.v_proj],
              "o": [lay.self_attn.o_proj], "gate/up": [lay.mlp.gate_proj, lay.mlp.up_proj], "down": [lay.mlp.down_proj]}
    fmt = parse_format("int4_g64")
    g = torch.Generator().manual_seed(0)
    rows, data = [], {}
    for name, lins in groups.items():
        ws = [m.weight.detach().float() for m in lins]
        x = torch.randn(ROWS, ws[0].shape[1], generator=g)
        t_d, t_g, t_gram = [], [], []
        for i in range(6):  # A B A B ..., the first pair is a warm-up
            t0 = time.process_time(); a = direct(x, ws, fmt); t1 = time.process_time()
            G = alg._gram(x); t2 = time.process_time()
            b = alg._awq_err(G, ws, fmt, None, "max"); t3 = time.process_time()
            if i:
                t_d.append(t1 - t0); t_gram.append(t2 - t1); t_g.append(t3 - t2)
            assert abs(a - b) <= 1e-3 * abs(a), (name, a, b)
        d, gg, gm = statistics.median(t_d), statistics.median(t_g), statistics.median(t_gram)
        # a layer's search: GRID candidates, one Gram matrix
        rows.append([name, f"{d * 1e3:.1f}", f"{gg * 1e3:.1f}", f"{gm * 1e3:.1f}", f"{d / gg:.1f}x",
                     f"{GRID * d / (GRID * gg + gm):.1f}x"])
        data[name] = {"direct_s": d, "gram_candidate_s": gg, "gram_build_s": gm}
        print(rows[-1], flush=True)
    load = os.getloadavg()[0]
    md = (f"# AWQ search objective: per-sample against Gram matrix, SmolLM2-135M layer shapes\n\n"
          f"{ROWS} rows, int4_g64, CPU time of one thread (process_time, 1 torch thread), medians of 5 interleaved "
          f"runs after a warm-up; {platform.processor() or 'CPU'}, {os.cpu_count()} cores, torch {torch.__version__}. "
          f"**Machine loaded** (1-minute load average {load:.1f} on {os.cpu_count()} cores at the end): CPU time is "
          f"less sensitive to load than wall time, but caches are shared; the ratios were measured side by side.\n\n"
          + md_table(["input", "direct CPU ms / candidate", "Gram CPU ms / candidate", "Gram build CPU ms (once)",
                      "per candidate", f"whole search ({GRID} candidates + build)"], rows))
    print(write_results("awq_objective", {"rows": ROWS, "grid": GRID, "load_average_1min": load, "groups": data}, md).read_text())


if __name__ == "__main__":
    main()
