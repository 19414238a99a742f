"""Where a batch-1 decode step of the leanlm runtime spends its time (torch.profiler), SmolLM2-135M,
int4 weights + int8 head, eager (fused kernels, and PyTorch's) and compiled, 2 threads (PROTOCOL.md: all cores).

    python bench/decode_profile.py [--steps 20] [--no-compile]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

os.environ.setdefault("LEANLM_KERNELS", "1")  # the fused kernels are opt-in; the benchmark times them next to PyTorch's
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import md_table, setup_threads, write_results  # noqa: E402


def profile(eng, ids, steps):
    from torch.profiler import profile as prof

    eng.reset()
    eng.forward(ids)
    tok = torch.tensor([[1]])
    for _ in range(5):
        eng.forward(tok)
    eng.rewind(ids.shape[1])
    t0 = time.perf_counter()
    for _ in range(steps):
        eng.forward(tok)
    wall = (time.perf_counter() - t0) / steps
    eng.rewind(ids.shape[1])
    with prof() as p:
        for _ in range(steps):
            eng.forward(tok)
    rows = sorted(p.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in rows)
    calls = sum(e.count for e in rows if e.key.startswith("aten::"))
    top = [[e.key, e.count // steps, f"{e.self_cpu_time_total / steps / 1e3:.3f}", f"{e.self_cpu_time_total / total:.0%}"] for e in rows[:12]]
    return {"step_ms_unprofiled": wall * 1e3, "self_cpu_ms_per_step": total / steps / 1e3, "aten_calls_per_step": calls / steps, "top": top}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--name", default="decode_profile")
    a = ap.parse_args()
    setup_threads()
    import leanlm
    from leanlm.evaluation.speed import protocol_prompts
    from leanlm.runtime import Engine

    model, tok = leanlm.load("smollm2-135m")
    q = leanlm.quantize(model, "w4a16-rtn", progress=False)
    ids = protocol_prompts(tok)
    res = {"eager, fused kernels (default)": profile(Engine(q, head="int8", max_seq_len=512), ids, a.steps),
           "eager, PyTorch kernels": profile(Engine(q, head="int8", max_seq_len=512, kernels=False), ids, a.steps)}
    if not a.no_compile:
        res["compiled"] = profile(Engine(q, head="int8", max_seq_len=512, compile=True), ids, a.steps)
    md = [f"# Decode-step profile, leanlm runtime, SmolLM2-135M int4 + int8 head, batch 1, {torch.get_num_threads()} threads\n",
          f"torch.profiler over {a.steps} one-token steps after the 128-token protocol prompt (self CPU time per step; "
          "the profiler itself adds overhead to every call, so the unprofiled step time is given too).\n"]
    for k, r in res.items():
        md.append(f"## {k}: {r['step_ms_unprofiled']:.2f} ms per step unprofiled ({1e3 / r['step_ms_unprofiled']:.0f} tok/s), "
                  f"{r['self_cpu_ms_per_step']:.2f} ms self CPU profiled, {r['aten_calls_per_step']:.0f} aten calls per step\n")
        md.append(md_table(["op", "calls per step", "self CPU ms per step", "share"], r["top"]) + "\n")
    print("\n".join(md))
    print("wrote", write_results(a.name, res, "\n".join(md)))


if __name__ == "__main__":
    main()
