"""Where a `LLMEngine` decode step spends its time with N sequences in the batch (in process, no HTTP).

    python bench/serve_profile.py --seqs 1 16 64 --weights int4 --dense-rows 0,16
    python bench/serve_profile.py --src /path/to/other/checkout/src --name serve_profile_before   # another engine

Admits N requests (prompts: evaluation-text paragraphs cut at 128 tokens), runs their prefill, then times decode
steps (all N decoding; median of `--steps` steps) for each `dense_rows` setting (0: int4 kernels at every batch size;
16: int4/int8 layers run from bfloat16 copies in steps of >= 16 token rows), interleaved A B A B, and groups
torch.profiler's self CPU time by kind: weight GEMMs, attention matmuls, KV gather, copies and casts, sampling,
other ops, and the rest of the step's wall time (Python: scheduler, block tables, detokenizing). Writes
bench/results/NAME.md and NAME.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

KINDS = {   # profiler op name -> kind
    "aten::_weight_int4pack_mm_for_cpu": "weight GEMM", "aten::_weight_int8pack_mm": "weight GEMM", "aten::mm": "weight GEMM",
    "aten::addmm": "weight GEMM", "aten::linear": None, "aten::matmul": None,
    "aten::baddbmm": "attention", "aten::bmm": "attention", "aten::_softmax": "attention",
    "aten::index_select": "KV gather + write", "aten::index_copy_": "KV gather + write", "aten::index": "KV gather + write",
    "aten::copy_": "copies / casts", "aten::argmax": "sampling",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqs", type=int, nargs="*", default=[1, 16, 64])
    ap.add_argument("--weights", default="int4")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--dense-rows", default="0,16", help="comma-separated dense_rows settings to compare")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--baseline-src", default=None,
                    help="another checkout's src/ (e.g. main's): its LLMEngine runs as one more setting, interleaved, in this process")
    ap.add_argument("--layout-rows", default="1,2,4,8,12,16,32,64",
                    help="token-row counts at which one layer's matmuls and the head are timed, packed vs bfloat16 copy ('' skips)")
    ap.add_argument("--spec-prompts", type=int, default=6,
                    help="1-client check: prompts decoded alone with and without prompt-lookup speculation (0: skip)")
    ap.add_argument("--loaded", action="store_true", help="say in the result that the machine was shared")
    ap.add_argument("--name", default="serve_profile")
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    import torch

    from common import md_table, write_results
    from leanlm.core.data import evaluation_texts
    from leanlm.core.models import load
    from leanlm.serving import LLMEngine, SamplingParams

    torch.set_num_threads(a.threads)
    settings = {f"dense_rows={x}": (LLMEngine, {"dense_rows": int(x)}) for x in a.dense_rows.split(",")}
    if a.baseline_src:
        settings = {"baseline": (baseline_engine(a.baseline_src), {}), **settings}
    model, tok = load("smollm2-135m")
    paras = [p for art in evaluation_texts() for p in art.split("\n") if len(p) >= 200]
    rows, data = [], []
    for n in a.seqs:
        engines = {}
        for dr, (cls, kw) in settings.items():
            eng = cls(model, tok, a.weights, kv_cache_mb=1024, max_num_seqs=n, max_num_batched_tokens=2048, **kw)
            for j in range(n):
                eng.add_request(str(j), tok(paras[j])["input_ids"][:128],
                                SamplingParams(max_tokens=4 * a.steps + 8, ignore_eos=True))
            while any(s.computed < len(s.prompt) for s in eng.seqs.values()):
                eng.step()
            eng.step()
            engines[dr] = eng
        times = {dr: [] for dr in settings}
        for _ in range(a.steps):   # interleaved: one step of each setting in turn
            for dr, eng in engines.items():
                t = time.perf_counter()
                eng.step()
                times[dr].append(time.perf_counter() - t)
        for dr, eng in engines.items():
            steps = max(2, a.steps // 2)
            with torch.profiler.profile() as prof:
                t = time.perf_counter()
                for _ in range(steps):
                    eng.step()
                wall = (time.perf_counter() - t) / steps
            kinds: dict[str, float] = {}
            for ev in prof.key_averages():
                kind = KINDS.get(ev.key, "other ops") if ev.key.startswith("aten::") else None
                if kind:
                    kinds[kind] = kinds.get(kind, 0.0) + ev.self_cpu_time_total / 1e6 / steps
            kinds["python + rest"] = max(0.0, wall - sum(kinds.values()))
            med = statistics.median(times[dr])
            first = statistics.median(next(iter(times.values())))   # the first setting (the baseline when given)
            share = {k: round(100 * v / wall, 1) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])}
            rows.append([n, dr, round(1000 * med, 1), round(n / med, 1), f"{first / med:.2f}x",
                         ", ".join(f"{k} {v}%" for k, v in share.items())])
            data.append({"seqs": n, "engine": dr, "speedup_vs_first": round(first / med, 3), "step_ms_median": round(1000 * med, 2), "tok_per_s": round(n / med, 1),
                         "step_ms_all": [round(1000 * x, 2) for x in times[dr]], "profiled_step_ms": round(1000 * wall, 2),
                         "share_pct": share, "dense_copy_mb": round(getattr(eng, "dense_copy_bytes", 0) / 2**20, 1)})
            print(f"{n:3d} seqs, {dr}: {1000 * med:.1f} ms per decode step, {n / med:.1f} tok/s; {share}", flush=True)
        del engines
    layouts = layout_check(model, tok, a, LLMEngine) if a.layout_rows else None
    spec = spec_check(model, tok, paras, a, LLMEngine, SamplingParams) if a.spec_prompts else None
    import platform

    mach = {"cpu": next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")),
                        platform.processor()), "cores": os.cpu_count(), "threads": a.threads, "torch": torch.__version__}
    copy_mb = next((d["dense_copy_mb"] for d in data if d["dense_copy_mb"]), 0)
    md = [f"# Serving engine: one decode step with N sequences (SmolLM2-135M, {a.weights} weights)\n",
          f"Machine: {mach['cpu']}, {mach['cores']} cores, {a.threads} thread(s), torch {mach['torch']}. "
          + ("**Measured on a loaded machine (other jobs shared the cores): compare the settings within a row group, not "
             "absolute times.** " if a.loaded else "")
          + (f"'baseline' = the engine of `{a.baseline_src}` (imported under another name). " if a.baseline_src else "")
          + "Prompts: evaluation-text paragraphs cut at 128 tokens; the "
          f"median of {a.steps} decode steps per setting, settings interleaved. `dense_rows` = the number of token rows "
          f"from which int4/int8 layers run from bfloat16 copies (0 = never; the copies take {copy_mb} MB). Shares: "
          "torch.profiler self CPU time by kind over the step's wall time; 'python + rest' is the wall time no op "
          "accounts for (scheduler, block tables, sampling loop, detokenizing).\n",
          md_table(["sequences", "engine", "ms / step", "tok/s", "speed vs the first row", "where the step's time goes"], rows)]
    if layouts:
        md += ["\n## Packed int4/int8 kernels vs the bfloat16 copy, by token rows in the step\n",
               "One transformer layer's four matmuls (qkv, o, gate_up, down: PyTorch's int4 kernel) and the output head "
               "(int8 kernel), each against `RowSwitch`'s bfloat16 copy (oneDNN GEMM), interleaved, median of 5 "
               "(microseconds). Where the copy starts to win is what the engine's `dense_rows` should be.\n",
               md_table(["rows", "layer int4 us", "layer bf16 us", "bf16 / int4", "head int8 us", "head bf16 us", "bf16 / int8"],
                        [[r["rows"], r["layer_packed_us"], r["layer_dense_us"], r["layer_ratio"], r["head_packed_us"],
                          r["head_dense_us"], r["head_ratio"]] for r in layouts])]
    if spec:
        md += [f"\n## One client: prompt-lookup speculation (in process, {spec['prompts']} prompts one at a time, "
               f"{spec['new_tokens']} greedy tokens each)\n",
               md_table(["engine", "tok/s", "vs plain", "greedy tokens equal plain"],
                        [["plain", spec["plain_tok_s"], "1.00x", "-"],
                         ["prompt-lookup, 4 drafts", spec["spec_tok_s"], f"{spec['spec_tok_s'] / spec['plain_tok_s']:.2f}x",
                          f"{spec['equal']} / {spec['prompts']}"]]),
               f"\nDraft tokens {spec['draft']}, accepted {spec['accepted']}.\n"]
    out = {"machine": mach, "loaded_machine": a.loaded, "results": data, "layouts": layouts, "one_client_speculation": spec}
    print(f"wrote {write_results(a.name, out, chr(10).join(md))}")


def baseline_engine(src: str):
    """The LLMEngine class of another checkout's src/leanlm, imported as package `leanlm_baseline` (its imports are relative)."""
    import importlib
    import shutil
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix="leanlm-baseline-"))
    shutil.copytree(Path(src) / "leanlm", tmp / "leanlm_baseline", ignore=shutil.ignore_patterns("__pycache__"))
    sys.path.insert(0, str(tmp))
    return importlib.import_module("leanlm_baseline.serving").LLMEngine


def layout_check(model, tok, a, LLMEngine) -> list[dict]:
    """Time layer 0's packed matmuls and the head against their bfloat16 copies at each row count."""
    import time

    import torch

    eng = LLMEngine(model, tok, a.weights, kv_cache_mb=16, dense_rows=1)
    L, head = eng.model.layers[0], eng.model.head
    layer = [getattr(L, n) for n in ("qkv", "o", "gate_up", "down")]

    def timed(mods, which, rows, reps=10):
        xs = [torch.randn(rows, m.in_features).bfloat16() for m in mods]
        fns = [getattr(m, which) for m in mods]
        for f, x in zip(fns, xs):
            f(x)
        t = time.perf_counter()
        for _ in range(reps):
            for f, x in zip(fns, xs):
                f(x)
        return (time.perf_counter() - t) / reps * 1e6

    out = []
    for rows in (int(x) for x in a.layout_rows.split(",")):
        ts = {k: [] for k in ("lp", "ld", "hp", "hd")}
        for _ in range(5):
            ts["lp"].append(timed(layer, "packed", rows))
            ts["ld"].append(timed(layer, "dense", rows))
            ts["hp"].append(timed([head], "packed", rows, 3))
            ts["hd"].append(timed([head], "dense", rows, 3))
        m = {k: statistics.median(v) for k, v in ts.items()}
        r = {"rows": rows, "layer_packed_us": round(m["lp"]), "layer_dense_us": round(m["ld"]),
             "layer_ratio": round(m["ld"] / m["lp"], 2), "head_packed_us": round(m["hp"]), "head_dense_us": round(m["hd"]),
             "head_ratio": round(m["hd"] / m["hp"], 2)}
        print(f"rows {rows}: {r}", flush=True)
        out.append(r)
    return out


def spec_check(model, tok, paras, a, LLMEngine, SamplingParams, new_tokens: int = 64) -> dict:
    """Each prompt alone through a plain engine and a prompt-lookup one (alternating): tok/s and greedy equality."""
    import time

    plain = LLMEngine(model, tok, a.weights, kv_cache_mb=256)
    spec = LLMEngine(model, tok, a.weights, kv_cache_mb=256, speculative="prompt-lookup", num_draft=4)
    secs, outs = {"plain": 0.0, "spec": 0.0}, {"plain": [], "spec": []}
    for j in range(a.spec_prompts):
        p = tok(paras[100 + j])["input_ids"][:128]
        for name, eng in (("plain", plain), ("spec", spec)):
            eng.add_request(str(j), p, SamplingParams(max_tokens=new_tokens, ignore_eos=True))
            got, t = [], time.perf_counter()
            while eng.has_unfinished():
                got += [x for o in eng.step() for x in o.token_ids]
            secs[name] += time.perf_counter() - t
            outs[name].append(got)
    n = a.spec_prompts * new_tokens
    r = {"prompts": a.spec_prompts, "new_tokens": new_tokens, "plain_tok_s": round(n / secs["plain"], 1),
         "spec_tok_s": round(n / secs["spec"], 1), "equal": sum(x == y for x, y in zip(outs["plain"], outs["spec"])),
         "draft": spec.stats.spec_draft_tokens, "accepted": spec.stats.spec_accepted_tokens}
    print(f"one client: plain {r['plain_tok_s']} tok/s, prompt-lookup {r['spec_tok_s']} tok/s, greedy equal "
          f"{r['equal']}/{r['prompts']}", flush=True)
    return r


if __name__ == "__main__":
    main()
