"""Where a batch-1 decode step of the leanlm runtime spends its time, SmolLM2-135M (or --model), int4 weights +
int8 head, side by side in one run: the default one-call C++ step (its own clocks: weight GEMVs, attention,
the rest), the same float kernels called op by op from the Python step (torch.profiler), PyTorch's kernels (the
reference), optionally compiled; 2 threads (PROTOCOL.md: all cores). The engines' steps are timed
interleaved, so load from other jobs hits all alike: compare the ratios.

    python bench/decode_profile.py [--steps 20] [--rounds 5] [--compile] [--model gemma3-270m]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

os.environ.setdefault("LEANLM_KERNELS", "1")  # the fused float kernels (the default)
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import md_table, setup_threads, step_clocks, write_results  # noqa: E402


def step_ms(eng, ids, steps):
    """Mean ms of `steps` one-token decode steps after the prompt (the cache rewound after each round)."""
    tok = torch.tensor([[1]])
    eng.rewind(ids.shape[1])
    t0 = time.perf_counter()
    for _ in range(steps):
        eng.forward(tok)
    wall = (time.perf_counter() - t0) / steps
    eng.rewind(ids.shape[1])
    return wall * 1e3


def profile(eng, ids, steps):
    from torch.profiler import profile as prof

    tok = torch.tensor([[1]])
    eng.rewind(ids.shape[1])
    step = getattr(eng.model, "step", None)
    if step is not None:   # one opaque C++ call: its own clocks
        wall, g, att, inside = step_clocks(eng, tok, steps)
        eng.rewind(ids.shape[1])
        top = [["weight GEMVs (C++)", 4 * len(eng.model.layers) + 1, f"{g / steps * 1e3:.3f}", f"{g / wall:.0%}"],
               ["attention (C++)", 1, f"{att / steps * 1e3:.3f}", f"{att / wall:.0%}"],
               ["norms, RoPE, cache write, activation, residual (C++)", 1, f"{(inside - g - att) / steps * 1e3:.3f}", f"{(inside - g - att) / wall:.0%}"],
               ["Python, embedding lookup, dispatch", 1, f"{(wall - inside) / steps * 1e3:.3f}", f"{(wall - inside) / wall:.0%}"]]
        return {"self_cpu_ms_per_step": wall / steps * 1e3, "aten_calls_per_step": None, "top": top,
                "shares": {"kernels": g / wall, "attention": att / wall, "overhead": 1 - (g + att) / wall}}
    with prof() as p:
        for _ in range(steps):
            eng.forward(tok)
    eng.rewind(ids.shape[1])
    rows = sorted(p.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in rows)
    calls = sum(e.count for e in rows if e.key.startswith("aten::"))
    kern = sum(e.self_cpu_time_total for e in rows if "gemv" in e.key or "pack_mm" in e.key)
    att = sum(e.self_cpu_time_total for e in rows if e.key in ("aten::bmm", "aten::baddbmm", "aten::_softmax"))
    top = [[e.key, e.count // steps, f"{e.self_cpu_time_total / steps / 1e3:.3f}", f"{e.self_cpu_time_total / total:.0%}"] for e in rows[:12]]
    return {"self_cpu_ms_per_step": total / steps / 1e3, "aten_calls_per_step": calls / steps, "top": top,
            "shares": {"kernels": kern / total, "attention": att / total, "overhead": 1 - (kern + att) / total}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (median reported)")
    ap.add_argument("--compile", action="store_true", help="also the torch.compile'd step (minutes of compile on 2 cores)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--name", default="decode_profile")
    a = ap.parse_args()
    setup_threads()
    import statistics

    import leanlm
    from leanlm.evaluation.profile import machine_info
    from leanlm.evaluation.speed import protocol_prompts
    from leanlm.runtime import Engine

    model, tok = leanlm.load(a.model)
    q = leanlm.quantize(model, "w4a16-rtn", progress=False)
    ids = protocol_prompts(tok)
    engines = {"one-call C++ step, float kernels (default)": Engine(q, head="int8", max_seq_len=512),
               "per-op Python step, float kernels": Engine(q, head="int8", max_seq_len=512),
               "per-op Python step, PyTorch kernels (reference)": Engine(q, head="int8", max_seq_len=512, kernels=False)}
    engines["per-op Python step, float kernels"].model.step = None
    if a.compile:
        engines["compiled (torch.compile of the per-op step)"] = Engine(q, head="int8", max_seq_len=512, compile=True)
    for e in engines.values():
        e.reset()
        e.forward(ids)
        for _ in range(5):
            e.forward(torch.tensor([[1]]))
    times = {k: [] for k in engines}
    for _ in range(a.rounds):   # interleaved: A B C A B C ...
        for k, e in engines.items():
            times[k].append(step_ms(e, ids, a.steps))
    res = {k: {"step_ms": statistics.median(times[k]), "step_ms_rounds": times[k], **profile(e, ids, a.steps)} for k, e in engines.items()}
    base = res["per-op Python step, PyTorch kernels (reference)"]["step_ms"]
    mi = machine_info()
    load = os.getloadavg()
    md = [f"# Decode-step profile, leanlm runtime, {a.model} int4 + int8 head, batch 1, {torch.get_num_threads()} threads\n",
          f"Machine: {mi['cpu']}, {mi['cores']} cores; load average at the end {load[0]:.1f} (other engineers' jobs ran beside it: "
          "absolute times are inflated, the side-by-side ratios are the result). Step time: median of "
          f"{a.rounds} interleaved rounds of {a.steps} one-token steps after the 128-token protocol prompt. Split: the one-call step's own "
          "clocks, or torch.profiler's self CPU time (which adds overhead to every call) for the per-op steps.\n",
          md_table(["engine", "step ms", "tok/s", "speed-up vs reference", "weight kernels", "attention", "overhead", "aten calls per step"],
                   [[k, f"{r['step_ms']:.2f}", f"{1e3 / r['step_ms']:.0f}", f"{base / r['step_ms']:.2f}x", f"{r['shares']['kernels']:.0%}",
                     f"{r['shares']['attention']:.0%}", f"{r['shares']['overhead']:.0%}",
                     "-" if r["aten_calls_per_step"] is None else f"{r['aten_calls_per_step']:.0f}"] for k, r in res.items()]), ""]
    for k, r in res.items():
        md.append(f"## {k}\n")
        md.append(md_table(["op", "calls per step", "ms per step", "share"], r["top"]) + "\n")
    print("\n".join(md))
    print("wrote", write_results(a.name, {"machine": mi, "load_average": load, "settings": vars(a), "engines": res}, "\n".join(md)))


if __name__ == "__main__":
    main()
