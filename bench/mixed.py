"""Mixed-precision search on SmolLM2-135M: search time (split into its parts) and quality against uniform W4A16.

The search (quantization/mixed.py): diagonal-Fisher sensitivity of every linear layer in every menu format
from one forward and backward over --probe rows of the calibration tokens, then an exact 0/1 program under
the budget. The chosen formats are then calibrated with the same algorithm as the uniform baselines (AWQ by
default, on the same 64 x 512 calibration tokens as bench/ptq.py) and scored on the protocol's evaluation
split and on the news domain (40 x 512 tokens each, neither calibrated on).

Rows: mixed precision at --budget bits/weight; uniform int4_g64 (4.25 bits/weight, the protocol's W4A16
scheme) and uniform int4_g32 (4.5 bits/weight: uniform W4A16 at the same bits) with the same algorithm. The
search is also run with the bytes and latency cost models (choice and time only). Rows are cached in
bench/.work/mixed/ (delete a file to redo it), so an interrupted run resumes.

    python bench/mixed.py                            # everything, AWQ, PROTOCOL settings (run it on a quiet machine)
    python bench/mixed.py --only search              # the search time alone (the 3-minute target)
    python bench/mixed.py --threads 1 --probe 2 --algorithm rtn --windows 4   # what fitted on an oversubscribed machine
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections import Counter
from pathlib import Path

import torch
from common import md_table, setup_threads, write_results

import leanlm
from leanlm.core.data import calibration_batches
from leanlm.evaluation import perplexity
from leanlm.quantization import QuantConfig, QuantizerConfig, average_bits, mixed_precision
from leanlm.quantization.mixed import ALGORITHMS, MENU

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench" / ".work" / "mixed"

def machine() -> dict:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads()}


def cached(key: str, fn):
    p = WORK / f"{key}.json"
    if p.exists():
        return {**json.loads(p.read_text()), "cached": True}
    r = fn()
    WORK.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(r))
    return r


def evaluate(cfg: QuantConfig, ids, windows: int) -> dict:
    model, tok = leanlm.load("smollm2-135m")
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    leanlm.quantize(model, cfg, ids, progress=False)
    secs = time.perf_counter() - t0
    return {"calib_seconds": secs, "load_average_1min": [load0, os.getloadavg()[0]], "average_bits": average_bits(model),
            "perplexity": perplexity(model, tok, max_windows=windows, progress=False).perplexity,
            "perplexity_news": perplexity(model, tok, source="news", max_windows=windows, progress=False).perplexity}


def search(ids, budget: float, cost: str, probe: int, menu: tuple[str, ...], algorithm: str, sensitivity=None) -> dict:
    model, _ = leanlm.load("smollm2-135m")
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    res = mixed_precision(model, ids[:probe], budget, menu, cost=cost, progress=False, sensitivity=sensitivity, algorithm=algorithm)
    total = time.perf_counter() - t0
    return {"budget": budget, "cost": cost, "probe_tokens": list(ids[:probe].shape), "search_seconds": total, "split_seconds": res.seconds,
            "split_cpu_seconds": res.cpu_seconds, "search_cpu_seconds": sum(res.cpu_seconds.values()),
            "load_average_1min": [load0, os.getloadavg()[0]], "average_bits": res.average_bits, "spent": res.spent, "limit": res.limit,
            "choice": res.choice, "choice_counts": dict(Counter(res.choice.values())), "sensitivity": res.sensitivity}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", type=float, default=4.5)
    ap.add_argument("--algorithm", choices=list(ALGORITHMS), default="awq")
    ap.add_argument("--menu", default=",".join(MENU), help=f"formats the search chooses from (default {','.join(MENU)})")
    ap.add_argument("--sensitivity", choices=list(ALGORITHMS), help="the error the search scores: that algorithm's (default: --algorithm's; "
                    "rtn reproduces the search before session 33)")
    ap.add_argument("--probe", type=int, default=8, help="calibration rows (of 512 tokens) the sensitivity pass reads")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--only", help="comma-separated rows: search,search-bytes,search-latency,mixed,uniform-int4_g64,uniform-int4_g32")
    ap.add_argument("--load", required=True, help="how loaded the machine was, stated in the results (e.g. \"quiet machine\")")
    ap.add_argument("--threads", type=int, help="torch threads (default: all cores, per PROTOCOL.md; 1 on an oversubscribed machine, "
                    "where two threads mostly wait for each other)")
    ap.add_argument("--name", default="mixed", help="results name: bench/results/NAME.md and NAME.json")
    a = ap.parse_args()
    a.menu = tuple(a.menu.split(","))
    a.sensitivity = a.sensitivity or a.algorithm
    setup_threads()
    if a.threads:
        torch.set_num_threads(a.threads)
    only = set(a.only.split(",")) if a.only else None
    want = lambda k: only is None or k in only  # noqa: E731
    _, tok = leanlm.load("smollm2-135m")
    ids = calibration_batches(tok, a.samples, a.seq_len)
    fcache = ROOT / "bench" / ".work" / "ptq" / f"float-w{a.windows}.json"   # shared with bench/ptq.py
    if fcache.exists():
        base, base_news = json.loads(fcache.read_text())
    else:
        model, _ = leanlm.load("smollm2-135m")
        base = perplexity(model, tok, max_windows=a.windows, progress=False).perplexity
        base_news = perplexity(model, tok, source="news", max_windows=a.windows, progress=False).perplexity
        fcache.parent.mkdir(parents=True, exist_ok=True)
        fcache.write_text(json.dumps([base, base_news]))
    print(f"float32 perplexity {base:.4f} (news {base_news:.4f})", flush=True)
    tag = f"b{a.budget}-p{a.probe}x{a.seq_len}-{'+'.join(a.menu)}-s{a.sensitivity}"
    searches = {}
    for cost in ("bits", "bytes", "latency"):   # bytes and latency re-solve with the bits search's sensitivity (no second pass)
        key = "search" if cost == "bits" else f"search-{cost}"
        if want(key) or (cost == "bits" and want("mixed")):
            sens = searches["bits"]["sensitivity"] if cost != "bits" and "bits" in searches else None
            s = searches[cost] = cached(f"{key}-{tag}", lambda cost=cost, sens=sens: search(ids, a.budget, cost, a.probe, a.menu, a.sensitivity, sens))
            print(f"{key}: {s['search_seconds']:.1f} s {s['split_seconds']} -> {s['choice_counts']}, {s['average_bits']:.3f} bits", flush=True)
    alg = ALGORITHMS[a.algorithm]
    algs = [alg()] if alg else []
    rows = {}
    if want("mixed"):
        s = searches["bits"]
        cfg = QuantConfig([(f"{n}.weight_quantizer", QuantizerConfig(f)) for n, f in s["choice"].items()] + [("*lm_head*", None)], algs)
        rows[f"mixed {a.budget} bits ({a.algorithm})"] = cached(f"mixed-{tag}-{a.algorithm}-c{a.samples}-w{a.windows}", lambda: evaluate(cfg, ids, a.windows))
    for fmt in ("int4_g32", "int4_g64"):
        if want(f"uniform-{fmt}"):
            cfg = QuantConfig([("*weight_quantizer", QuantizerConfig(fmt)), ("*lm_head*", None)], algs)
            rows[f"uniform {fmt} ({a.algorithm})"] = cached(f"uniform-{fmt}-{a.algorithm}-c{a.samples}x{a.seq_len}-w{a.windows}", lambda cfg=cfg: evaluate(cfg, ids, a.windows))
    for k, r in rows.items():
        r["increase"], r["increase_news"] = r["perplexity"] / base - 1, r["perplexity_news"] / base_news - 1
        print(f"{k:32s} {r['average_bits']:.3f} bits  ppl {r['perplexity']:.4f} ({r['increase']:+.2%})  news {r['perplexity_news']:.4f} "
              f"({r['increase_news']:+.2%})  calib {r['calib_seconds']:.0f} s", flush=True)
    report(a, base, base_news, searches, rows)


def report(a, base, base_news, searches, rows) -> None:
    md = [f"# Mixed-precision search, SmolLM2-135M (budget {a.budget} bits/weight over {' / '.join(a.menu)}; "
          f"the search scores {a.sensitivity}'s error)\n",
          f"Machine: {machine()['cpu']}, {machine()['cores']} cores, torch {torch.__version__}. Machine load during the run: "
          f"**{a.load}** (times depend on it; perplexities do not).\n",
          "## Search time (diagonal-Fisher sensitivity from one forward + backward, then an exact 0/1 program)\n",
          "The bytes and latency rows re-solve with the bits row's sensitivity (their time: the cost model and the solve).\n"]
    trows = []
    for cost, s in searches.items():
        sp = s["split_seconds"]
        trows.append([cost, f"{s['probe_tokens'][0]} x {s['probe_tokens'][1]}", f"{s['search_seconds']:.1f}", f"{s['search_cpu_seconds']:.1f}", f"{sp['costs']:.1f}",
                      f"{sp['sensitivity']:.1f}", f"{sp['solve']:.2f}", f"{s['average_bits']:.3f}",
                      ", ".join(f"{k}: {v}" for k, v in sorted(s["choice_counts"].items()))])
    md.append(md_table(["cost model", "probe tokens", "search s (wall)", "search CPU s (all threads)", "cost model s", "sensitivity s", "solve s", "bits/weight", "choice (layers)"], trows))
    md.append("\nWall seconds under the load stated above; CPU seconds are the process's own (all its threads), a rough bound for a quiet "
              f"{machine()['cores']}-core run: wall near CPU / {machine()['threads']} when nothing else runs.\n")
    md.append("\nThe previous search (one full-model forward per layer and format, KL on 4 x 256 tokens; bench/results/ptq.md) took 1556 s.\n")
    md.append(f"## Quality (calibration {a.samples} x {a.seq_len} tokens, {a.algorithm}; perplexity on {a.windows} x 512 tokens)\n")
    qrows = [["float32", "32", f"{base:.4f}", "-", f"{base_news:.4f}", "-", "-"]]
    for k, r in rows.items():
        qrows.append([k, f"{r['average_bits']:.3f}", f"{r['perplexity']:.4f}", f"{r['increase']:+.2%}", f"{r['perplexity_news']:.4f}",
                      f"{r['increase_news']:+.2%}", f"{r['calib_seconds']:.0f}"])
    md.append(md_table(["model", "bits/weight", "wiki eval ppl", "increase", "news ppl", "increase", "calib s (wall)"], qrows))
    md.append("\nbits/weight: `leanlm.quantization.average_bits` of the quantized model, over every linear weight with the float "
              "output head (28M of its weights) included, scales included; over the quantized layers alone uniform int4_g64 is 4.25, "
              "int4_g32 4.5 and the mixed choice the search's figure above.\n")
    if (a.algorithm, a.windows, a.probe) != ("awq", 40, 8):
        md.append(f"\nThis run departs from the defaults ({a.algorithm} instead of awq, {a.windows} instead of 40 evaluation windows, "
                  f"a {a.probe}-row instead of an 8-row probe) to finish sooner; the full comparison is "
                  "`python bench/mixed.py` on a quiet one.\n")
    write_results(a.name, {"machine": machine(), "load": a.load, "budget": a.budget, "menu": list(a.menu), "sensitivity": a.sensitivity, "algorithm": a.algorithm,
                            "float_perplexity": base, "float_perplexity_news": base_news,
                            "searches": {k: {kk: vv for kk, vv in v.items() if kk != "sensitivity"} for k, v in searches.items()},
                            "rows": rows}, "\n".join(md))


if __name__ == "__main__":
    main()
