"""`leanlm optimize` on SmolLM2-135M: the cost objective at 16 concurrent requests and the latency objective.

    python bench/optimize.py --budget 10m                 # both objectives, each with this search budget
    python bench/optimize.py --budget 10m --latency-budget 6m --only cost

Reports, per objective: the chosen deployment, its $ per 1M tokens vs naive transformers bf16 serving
(one request at a time, measured interleaved in the same search; target >= 10x lower), its quality on
held-out windows the search never saw (the search scores candidates on the first 8 windows of the
evaluation split, the final check uses the next 8), and the search time vs the budget (target: within
budget + 10%). For the latency objective the chosen deployment's batch-1 decode is timed interleaved
with llama.cpp (llama-cpp-python in this venv) running a Q4_K_M GGUF of the same model exported by
leanlm, and both perplexities are measured on the same final-check windows.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import md_table, setup_threads, write_results  # noqa: E402


def run_objective(model: str, objective: str, budget_s: float, out: Path, concurrency: int, price: float, a) -> dict:
    from rich.console import Console

    from leanlm.optimize import OptimizeConfig, optimize

    cfg = OptimizeConfig(model, str(out), max_quality_loss=0.05, objective=objective, concurrency=concurrency, budget_s=budget_s,
                         price_per_hour=price, progress=True, window=a.window, search_windows=a.search_windows,
                         check_windows=a.check_windows, short_windows=a.short_windows, new_tokens=a.new_tokens, runs=a.speed_runs)
    t = time.perf_counter()
    r = optimize(cfg, console=Console(stderr=True))
    r["wall_s"] = time.perf_counter() - t
    return r


def from_folder(out: Path) -> dict:
    """A finished search's summary rebuilt from its files (trials.jsonl, deploy.json, report.html)."""
    import json
    import re

    trials = [json.loads(x) for x in (out / "trials.jsonl").read_text().splitlines()]
    dep = json.loads((out / "deploy.json").read_text())
    chosen = next(t for t in trials if t["type"] == "deploy" and t["candidate"] == dep["candidate"] and t["deployment"] == dep["deployment"])
    check = next(t for t in trials if t["type"] == "check" and t["candidate"] == dep["candidate"])
    took = float(re.search(r"search took (\d+) s", (out / "report.html").read_text()).group(1))
    return {"chosen": chosen, "check": check, "trials": trials, "wall_s": took}


def q4km_gguf(model: str, base, tok) -> Path:
    """llama.cpp's own Q4_K_M of the model: leanlm's F16 GGUF export quantized by `llama_cpp.llama_model_quantize`
    (llama.cpp's k-quant rules and code), cached under the leanlm cache (gguf/) by model and llama.cpp version."""
    import os

    import llama_cpp

    from leanlm.core.models import cache_dir
    from leanlm.export import export

    dest = cache_dir() / "gguf" / f"{Path(model).name}-Q4_K_M-llama.cpp-{llama_cpp.__version__}.gguf"
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        f16 = export(base, "gguf", Path(tmp) / "f16.gguf", overwrite=True, tokenizer=tok, quant="F16")
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
        params.nthread = os.cpu_count() or 1
        part = Path(tmp) / "q4km.gguf"
        rc = llama_cpp.llama_model_quantize(str(f16).encode(), str(part).encode(), params)
        if rc != 0 or not part.exists():
            raise RuntimeError(f"llama_model_quantize returned {rc}")
        os.replace(part, dest)   # atomic: a cut run leaves no half-written cache entry
    return dest


def engine_perplexity(eng, windows) -> float:
    """Perplexity of a runtime engine fed one token per step (teacher forcing), so every matmul takes the batch-1
    path the decode uses (the fused kernels when they are on): the deployment's own quality, not the fake-quantized model's."""
    import math

    import torch

    nll, n = 0.0, 0
    with torch.inference_mode():
        for w in windows:
            eng.reset()
            for i in range(w.numel() - 1):
                logp = torch.log_softmax(eng.forward(w[None, i:i + 1], last_only=True)[0].float(), -1)
                nll -= logp[w[i + 1]].item()
                n += 1
    eng.reset()
    return math.exp(nll / n)


def llamacpp_vs_chosen(model: str, r: dict, out: Path, runs: int, a) -> dict:
    """Interleaved batch-1 decode of the chosen deployment and llama.cpp Q4_K_M (made by llama.cpp's quantizer from
    leanlm's F16 export); perplexity of both on the check windows."""
    import decode as dec  # bench/decode.py: the llama.cpp worker client

    import leanlm
    from leanlm.evaluation.speed import compare_speed, protocol_prompts
    from leanlm.optimize.measure import Deployment, _runtime_generator
    from leanlm.optimize.quality import QualityProbe
    from leanlm.runtime import Engine

    base, tok = leanlm.load(model)
    gguf = q4km_gguf(model, base, tok)
    probe = QualityProbe(base, tok, None, a.window, a.search_windows, a.check_windows)   # the search's own windows
    q_gguf = probe.measure(leanlm.load(str(gguf))[0], None, split="check")
    chosen, _ = leanlm.load(str(out / "model"))
    dep = Deployment(**r["chosen"]["deployment"])
    prompts = protocol_prompts(tok, 1, 128)
    eng = Engine(chosen, max_seq_len=max(a.window, 128 + a.new_tokens + dep.k + 1), allow_fallback=True, kernels=dep.kernels)
    ppl_engine = engine_perplexity(eng, probe.check)
    llama = dec.LlamaCpp(Path(sys.executable), str(gguf), dec.os.cpu_count(), 512)
    gens = {"leanlm": _runtime_generator(eng, dep), "llama.cpp Q4_K_M": llama.generator()}
    llama_pl = None
    if dep.prompt_lookup:   # the same speculation on llama.cpp's side too (llama-cpp-python's prompt-lookup drafts), for a fair pair
        llama_pl = dec.LlamaCpp(Path(sys.executable), str(gguf), dec.os.cpu_count(), 512)
        llama_pl._ask({"cmd": "load", "path": str(gguf), "threads": dec.os.cpu_count(), "n_ctx": 512, "prompt_lookup": dep.k})
        gens[f"llama.cpp Q4_K_M + prompt lookup k={dep.k}"] = llama_pl.generator()
    try:
        res = compare_speed(gens, prompts, a.new_tokens, runs, 1)
    finally:
        for w in (llama, llama_pl):
            if w is not None:
                w.close()
    pl = {k: v.decode_tps for k, v in res.items() if "prompt lookup" in k}
    return {"leanlm_decode_tps": res["leanlm"].decode_tps, "llamacpp_decode_tps": res["llama.cpp Q4_K_M"].decode_tps,
            "ratio": res["leanlm"].decode_tps / res["llama.cpp Q4_K_M"].decode_tps, "llamacpp_version": llama.version,
            "llamacpp_prompt_lookup_decode_tps": next(iter(pl.values()), None),
            "deployment": dep.label(), "kernels": eng.kernels, "gguf": str(gguf), "gguf_bytes": gguf.stat().st_size,
            "perplexity_llamacpp_q4km_check": q_gguf.perplexity, "perplexity_chosen_check": r["check"]["quality"]["perplexity"],
            "perplexity_float_check": q_gguf.perplexity_base, "perplexity_chosen_engine_check": ppl_engine}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--budget", default="10m")
    ap.add_argument("--latency-budget", default=None, help="search budget of the latency objective (default: --budget)")
    ap.add_argument("--only", choices=["cost", "latency"], default=None)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--price-per-hour", type=float, default=0.10)
    ap.add_argument("--runs", type=int, default=5, help="interleaved runs of the llama.cpp comparison")
    ap.add_argument("--reuse", action="store_true", help="reuse a finished search found in --keep instead of running it again")
    ap.add_argument("--keep", default=None, help="keep the optimize folders here")
    ap.add_argument("--window", type=int, default=512, help="tokens per quality window")
    ap.add_argument("--search-windows", type=int, default=8)
    ap.add_argument("--check-windows", type=int, default=8)
    ap.add_argument("--short-windows", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--speed-runs", type=int, default=3)
    ap.add_argument("--no-kernels", action="store_true", help="leave the fused batch-1 kernels off (default: LEANLM_KERNELS=1, so "
                    "the latency search also measures them)")
    ap.add_argument("--load", default=None, help="how loaded the machine was, stated in the results (default: the load averages "
                    "measured at the start and the end)")
    a = ap.parse_args()
    import os

    if not a.no_kernels:   # before leanlm loads: the kernels' switch is read once per process
        os.environ.setdefault("LEANLM_KERNELS", "1")
    load0 = os.getloadavg()[0]
    setup_threads()
    from leanlm.runtime import kernels

    kernels.load()   # built (once, cached) before any search clock starts: a compile is not search time
    from leanlm.core.errors import LeanLMError
    from leanlm.optimize import parse_search_budget

    work = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="bench-optimize."))
    results, rows = {}, []
    for objective in ("cost", "latency"):
        if a.only and a.only != objective:
            continue
        budget = parse_search_budget(a.latency_budget if objective == "latency" and a.latency_budget else a.budget)
        out = work / objective
        try:
            if a.reuse and (out / "deploy.json").exists():
                r = from_folder(out)
                print(f"{objective}: reusing the finished search in {out}", flush=True)
            else:
                shutil.rmtree(out, ignore_errors=True)
                r = run_objective(a.model, objective, budget, out, a.concurrency, a.price_per_hour, a)
        except LeanLMError as e:   # e.g. a budget too small on a loaded machine: reported, and the other objective still runs
            results[objective] = {"budget_s": budget, "error": str(e)}
            rows.append([objective, f"{budget:.0f}", "-", "-", "-", "-", "-", "-", "-", "-", f"error: {e}"])
            print(rows[-1], flush=True)
            continue
        c, s, q = r["chosen"], r["chosen"]["speed"], r["check"]["quality"]
        d = {"budget_s": budget, "search_s": r["wall_s"], "within_budget_plus_10pct": r["wall_s"] <= 1.1 * budget,
             "chosen": c["candidate"], "deployment": c["label"], "tokens_per_s": s["tokens_per_s"], "decode_tps": s.get("decode_tps"),
             "usd_per_mtok": s["usd_per_mtok"], "baseline_usd_per_mtok": s["baseline_usd_per_mtok"], "cost_ratio": s["cost_ratio"],
             "search_loss": c["quality"]["loss"], "check_loss": q["loss"], "check_perplexity": q["perplexity"],
             "check_perplexity_float": q["perplexity_base"], "check_windows": q["windows"], "agreement": q["agreement"], "kl": q["kl"],
             "trials": [t for t in r["trials"]]}
        if objective == "latency":
            try:
                d["llamacpp"] = llamacpp_vs_chosen(a.model, r, out, a.runs, a)
            except Exception as e:  # reported, not hidden
                d["llamacpp"] = {"error": f"{type(e).__name__}: {e}"}
        results[objective] = d
        rows.append([objective, f"{budget:.0f}", f"{r['wall_s']:.0f}", c["candidate"], c["label"], f"{s['tokens_per_s']:.1f}",
                     f"{s['usd_per_mtok']:.4f}", f"{s['baseline_usd_per_mtok']:.4f}", f"{s['cost_ratio']:.1f}x",
                     f"{c['quality']['loss']:+.2%}", f"{q['loss']:+.2%}"])
        print(rows[-1], flush=True)
    from leanlm.evaluation.profile import machine_info

    m = machine_info()
    load1 = os.getloadavg()[0]
    load = a.load or f"1-minute load average {load0:.1f} at the start, {load1:.1f} at the end" + (
        " (**machine loaded**: other jobs shared the cores)" if max(load0, load1) > 1.5 * (os.cpu_count() or 1) else "")
    md = [f"# leanlm optimize, {a.model}: max quality loss 5%\n",
          f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}; {load}. Every speed figure is a ratio against naive "
          "transformers bfloat16 generate (one request at a time) "
          f"measured interleaved in the same search. Price ${a.price_per_hour}/h. Fused batch-1 kernels: "
          f"{'on (LEANLM_KERNELS=1)' if os.environ.get('LEANLM_KERNELS') == '1' else 'off'}. Quality: perplexity increase vs the float32 "
          f"model; the search scores on evaluation windows 1-{a.search_windows} ({a.window} tokens each), the final check on "
          f"windows {a.search_windows + 1}-{a.search_windows + a.check_windows}, which the search never saw. Speed trials: "
          f"{a.new_tokens} new tokens, {a.speed_runs} interleaved runs at batch 1 ({max(1, a.speed_runs - 1)} serving rounds of "
          f"{2 * a.concurrency} requests at concurrency {a.concurrency}).\n",
          md_table(["objective", "budget s", "search s", "chosen", "deployment", "tokens/s", "$ / 1M tok", "baseline $ / 1M tok",
                    "cheaper", "loss (search windows)", "loss (held-out check windows)"], rows)]
    cost = results.get("cost", {})
    if "cost_ratio" in cost:
        md.append(f"\nCost target (>= 10x cheaper than naive transformers bf16 serving, quality loss within 5% on the held-out "
                  f"check windows): {cost['cost_ratio']:.1f}x at {cost['check_loss']:+.2%}: "
                  + ("**met**." if cost["cost_ratio"] >= 10 and cost["check_loss"] <= 0.05 else "**not met**."))
    for objective, d in results.items():
        if "search_s" in d:
            md.append(f"\n{objective}: search {d['search_s']:.0f} s of a {d['budget_s']:.0f} s budget "
                      f"({'within' if d['within_budget_plus_10pct'] else 'over'} budget + 10%).")
    lat = results.get("latency", {}).get("llamacpp")
    if lat and "error" not in lat:
        md.append(f"\nLatency objective vs llama.cpp {lat['llamacpp_version']} Q4_K_M (made by llama.cpp's llama_model_quantize from "
                  f"leanlm's F16 GGUF export, {lat['gguf_bytes'] / 1e6:.0f} MB), interleaved, batch 1, {a.new_tokens} new tokens, "
                  f"{a.runs} runs: leanlm ({lat['deployment']}, kernels {lat['kernels']}) {lat['leanlm_decode_tps']:.1f} decode tok/s, "
                  f"llama.cpp {lat['llamacpp_decode_tps']:.1f} "
                  f"({lat['ratio']:.2f}x)"
                  + (f"; llama.cpp Q4_K_M with the same prompt-lookup speculation {lat['llamacpp_prompt_lookup_decode_tps']:.1f} "
                     f"({lat['leanlm_decode_tps'] / lat['llamacpp_prompt_lookup_decode_tps']:.2f}x)"
                     if lat.get("llamacpp_prompt_lookup_decode_tps") else "")
                  + f"; perplexity on the check windows: chosen {lat['perplexity_chosen_check']:.3f} (through its "
                  f"deployment's engine one token per step: {lat['perplexity_chosen_engine_check']:.3f}), "
                  f"Q4_K_M {lat['perplexity_llamacpp_q4km_check']:.3f}, float {lat['perplexity_float_check']:.3f}. Target (decode "
                  "faster than llama.cpp Q4_K_M at no worse perplexity): "
                  + ("**met**." if lat["ratio"] > 1 and max(lat["perplexity_chosen_check"], lat["perplexity_chosen_engine_check"])
                     <= lat["perplexity_llamacpp_q4km_check"] else "**not met**."))
    elif lat:
        md.append(f"\nllama.cpp comparison failed: {lat['error']}")
    for objective, d in results.items():
        if "trials" not in d:
            continue
        md.append(f"\n## {objective}: trials\n")
        trows = []
        for t in d["trials"]:
            if t.get("type") == "deploy":
                trows.append([t["candidate"], t["label"], f"{t['quality']['loss']:+.2%}", f"{t['speed']['tokens_per_s']:.1f}",
                              f"{t['speed']['speedup']:.2f}x", f"{t['speed']['usd_per_mtok']:.4f}", f"{t['speed']['memory_bytes'] / 1e6:.0f}"
                              + deploy_note(t["speed"])])
            elif t.get("type") in ("skip", "pruned", "failed"):
                trows.append([t["candidate"], "-", f"{t['loss']:+.2%}" if "loss" in t else "-", "-", "-", "-", t["type"] + ": " + t["reason"][:140]])
        md.append(md_table(["candidate", "deployment", "loss", "tokens/s", "vs baseline", "$ / 1M tok", "memory MB / note"], trows))
    write_results("optimize", {"machine": m, "load": load, "load_average": [load0, load1], "results": results}, "\n".join(md))
    for objective in results:
        rep = work / objective / "report.html"
        if rep.exists():
            dest = Path(__file__).resolve().parent / "results" / f"optimize_{objective}_report.html"
            shutil.copy(rep, dest)
            screenshot(dest, dest.with_suffix(".png"))


def deploy_note(sp: dict) -> str:
    """Speculation's figures of a deploy trial, when it has them."""
    parts = []
    if "draft_acceptance" in sp:
        parts.append(f"{sp['draft_acceptance']:.0%} of drafts accepted")
    if "same_outputs_as_plain" in sp:
        parts.append(f"{sp['same_tokens_as_plain']:.1%} of tokens as without speculation")
    if sp.get("kernels"):
        parts.append(f"kernels {sp['kernels']}")
    return ("; " + ", ".join(parts)) if parts else ""


def screenshot(page: Path, png: Path) -> None:
    """A headless Chromium screenshot of the report (skipped without chromium)."""
    import subprocess

    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        print("chromium not found: no screenshot", flush=True)
        return
    with tempfile.TemporaryDirectory() as prof:
        subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                        "--disable-component-update", "--disable-sync", f"--user-data-dir={prof}", "--window-size=1300,2200",
                        f"--screenshot={png}", page.resolve().as_uri()], capture_output=True, timeout=120)


if __name__ == "__main__":
    main()
