"""The fused batch-1 GEMV kernels (leanlm.runtime.kernels: the default float-activation ones and the opt-in
int8-activation ones) vs PyTorch's int4/int8 kernels on the matrices of
a SmolLM2-135M / Gemma-3-270M / 1B-Llama decode step, timed interleaved in one run (best of --rounds rounds of
--reps calls each, so noise from other jobs hits both alike), with the bytes each call reads per second.

    python bench/decode_kernels.py [--rounds 7] [--reps 50]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

os.environ.setdefault("LEANLM_KERNELS", "1")  # the fused float kernels (the default), timed next to PyTorch's
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import md_table, setup_threads, write_results  # noqa: E402

# (what, out_features, in_features, format)
SHAPES = [("SmolLM2 q/k/v", 960, 576, "int4"), ("SmolLM2 gate/up", 3072, 576, "int4"), ("SmolLM2 down", 576, 1536, "int4"),
          ("SmolLM2 head", 49152, 576, "int8"), ("Gemma-3 gate/up", 4096, 640, "int4"), ("Gemma-3 head", 262144, 640, "int8"),
          ("1B gate/up", 11264, 2048, "int4"), ("1B down", 2048, 5632, "int4"), ("1B head", 49152, 2048, "int8")]


def best(fn, rounds, reps):
    fn()
    out = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        out.append((time.perf_counter() - t) / reps)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--name", default="decode_kernels")
    a = ap.parse_args()
    setup_threads()
    import os

    from leanlm.evaluation.profile import machine_info
    from leanlm.runtime import kernels
    from leanlm.runtime.layouts import Int4Weight, Int8Weight

    if not kernels.load():
        raise SystemExit(f"the fused kernels are not built: {kernels.path()}")
    rows, data = [], []
    for what, n, k, fmt in SHAPES:
        w = torch.randn(n, k)
        lay = Int4Weight.from_float(w, 64, torch.bfloat16) if fmt == "int4" else Int8Weight.from_float(w, torch.bfloat16)
        del w
        x = torch.randn(1, k).bfloat16()
        xf = x.float().reshape(-1)
        if fmt == "int4":
            q8 = lambda: torch.ops.leanlm.int4_gemv_q8(xf, lay.tiled, lay.scales_zeros, 64, n)  # noqa: E731
        else:
            q8 = lambda: torch.ops.leanlm.int8_gemv_q8(xf, lay.qweight, lay.scale)  # noqa: E731
        nbytes = n * k // 2 + n * k // 64 * 4 if fmt == "int4" else n * k + n * 2
        reps = max(3, min(a.reps, int(2e8 // nbytes)))
        fast, ref, qq = [], [], []
        for _ in range(a.rounds):   # interleaved: one round of each, repeated
            fast += best(lambda: lay(xf), 1, reps)
            ref += best(lambda: lay.reference(x), 1, reps)
            qq += best(q8, 1, reps)
        f, r, q = min(fast), min(ref), min(qq)
        rows.append([what, f"{n} x {k}", fmt, f"{r * 1e6:.0f}", f"{f * 1e6:.0f}", f"{r / f:.2f}x", f"{nbytes / f / 1e9:.1f}",
                     f"{q * 1e6:.0f}", f"{r / q:.2f}x"])
        data.append({"what": what, "shape": [n, k], "format": fmt, "pytorch_us": r * 1e6, "fused_us": f * 1e6, "q8_us": q * 1e6,
                     "bytes": nbytes})
        print(rows[-1], flush=True)
    mi = machine_info()
    load = os.getloadavg()
    md = ["# Fused batch-1 GEMV kernels vs PyTorch's (one activation row; float kernels: float32 in and out with the "
          "reference's bfloat16 roundings; PyTorch: bfloat16 in and out)\n",
          f"Machine: {mi['cpu']}, {mi['cores']} cores, {mi['torch_threads']} torch threads, torch {mi['torch']}, kernel path "
          f"{kernels.path()}; load average at the end {load[0]:.1f} (other jobs ran beside it: compare the side-by-side ratios). "
          f"Best of {a.rounds} interleaved rounds; int4 group 64.\n",
          md_table(["matrix", "out x in", "format", "PyTorch us", "fused float us", "speed-up", "fused float GB/s read",
                    "int8-activation (q8) us", "q8 speed-up"], rows), ""]
    print("\n".join(md))
    print("wrote", write_results(a.name, {"machine": mi, "load_average": load, "kernel_path": kernels.path(), "rows": data,
                                          "settings": vars(a)}, "\n".join(md)))


if __name__ == "__main__":
    main()
