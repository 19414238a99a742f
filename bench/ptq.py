"""Post-training quantization benchmark on SmolLM2-135M, per PROTOCOL.md, with peers side by side.

For every leanlm preset and algorithm variant: held-out perplexity on two texts neither calibrated
on (the wiki evaluation split and the news domain's held-out articles, 40 x 512 tokens each) next to
float32, and calibration wall time, on the same 64 x 512 calibration tokens (first 40 wiki
articles). Then the same schemes through llm-compressor and NVIDIA Model Optimizer, each in its own
virtual environment (bash bench/peers/setup_peers.sh), on the same calibration tokens, scored by the
same leanlm perplexity code on the same texts, and a table of the best leanlm result against the
best peer result per scheme (ratio of perplexity increases). Finally GPTQ calibration time, leanlm
and llm-compressor interleaved (A B A B).

Every peer scheme runs to completion under a one-hour limit (--peer-timeout; AWQ included: ModelOpt's
takes about 13 minutes on a quiet 2-core CPU); a run past it is reported with its last progress line,
a failed one with its error. Peer results are cached in
bench/.work/ptq/<tool>-<scheme>-<samples>x<seq_len>-w<windows>-news/ and reused; delete that folder
to rerun one. The float baselines are cached in bench/.work/ptq/float-w<windows>.json.

    python bench/ptq.py                       # everything (several hours on 2 cores: run it on a quiet machine)
    python bench/ptq.py --peer-tool modelopt  # fill one tool's peer cache (side by side with another run)
    python bench/ptq.py --only w4a16-gptq,w4a16-awq --no-peers --timing-repeats 0
    python bench/ptq.py --only w4a16-gptq --no-peers --merge   # redo rows, keep the rest of ptq.json

Every row records the command and date that produced it and the 1-minute load average around its
calibration; with --merge the rows, mixed-precision result, peers and timing that this run does not
redo are kept from the existing bench/results/ptq.json, and the report lists which run made which row.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from dataclasses import replace
from pathlib import Path

from common import RESULTS, command_line, md_table, setup_threads, write_results

import leanlm
from leanlm.core.data import calibration_batches
from leanlm.evaluation import perplexity
from leanlm.quantization import AWQ, GPTQ, PRESETS, AutoRound, QuantConfig, QuantizerConfig, average_bits, mixed_precision, preset

ROOT = Path(__file__).resolve().parents[1]

# Algorithm variants on the reference 4-bit scheme (symmetric INT4, groups of 64).
G64 = [("*weight_quantizer", QuantizerConfig("int4_g64")), ("*lm_head*", None)]
G64_MSE = [("*weight_quantizer", QuantizerConfig("int4_g64", method="mse")), ("*lm_head*", None)]
G64_FULL = [("*weight_quantizer", QuantizerConfig("int4_g64", method="full")), ("*lm_head*", None)]
# (The presets already cover rtn, mse clip, awq, gptq and awq + gptq on this scheme.)
VARIANTS = {
    "int4_g64 gptq without act_order": lambda: QuantConfig(G64, [GPTQ(act_order=False)]),
    "int4_g64 gptq (mse clip)": lambda: QuantConfig(G64_MSE, [GPTQ()]),
    "w4a16-gptq (bfloat16 forwards)": lambda: QuantConfig(G64, [GPTQ(forward_dtype="bfloat16")]),
    "w4a16-gptq sink token out of the Hessian": lambda: QuantConfig(G64, [GPTQ(sink_tokens=1)]),
    "w4a16-gptq sink token out + mse clip": lambda: QuantConfig(G64_MSE, [GPTQ(sink_tokens=1)]),
    # AWQ variants (bench/results/ptq_w4.md)
    "awq clip on 4096 rows": lambda: QuantConfig(G64, [AWQ(clip_samples=4096)]),
    "awq duo+x scales": lambda: QuantConfig(G64, [AWQ(scales="both")]),
    "awq signed clip": lambda: QuantConfig(G64, [AWQ(clip_signed=True, clip_samples=4096)]),
    "awq duo+x scales + signed clip": lambda: QuantConfig(G64, [AWQ(scales="both", clip_signed=True, clip_samples=4096)]),
    # AutoRound's targets: the float layer on its quantized inputs (float_targets=False, the first version) or the
    # float model's outputs (the default since bench/results/ptq_w4.md; = preset w4a16-awq-autoround after AWQ).
    "awq + autoround": lambda: QuantConfig(G64, [AWQ(), AutoRound(float_targets=False)]),
    "awq signed clip + autoround": lambda: QuantConfig(G64, [AWQ(clip_signed=True, clip_samples=4096), AutoRound(float_targets=False)]),
    "awq + autoround (float targets)": lambda: QuantConfig(G64, [AWQ(), AutoRound(float_targets=True)]),
    "autoround (quantized-stream targets)": lambda: QuantConfig(G64, [AutoRound(float_targets=False)]),
    "w4a16-autoround (bfloat16 training)": lambda: QuantConfig(G64, [AutoRound(train_dtype="bfloat16")]),
    "w4a16 = awq + autoround (bfloat16 training)": lambda: QuantConfig(G64, [AWQ(), AutoRound(train_dtype="bfloat16")]),
    # The full-range grid (range method "full": scale = signed extreme / -8, codes -8..7; llama.cpp's Q4_0, the
    # reference AutoRound's int_sym), bench/results/w4_full.md.
    "rtn (full range)": lambda: QuantConfig(G64_FULL, []),
    "awq (full range)": lambda: QuantConfig(G64_FULL, [AWQ()]),
    "gptq (full range)": lambda: QuantConfig(G64_FULL, [GPTQ()]),
    "autoround (full range)": lambda: QuantConfig(G64_FULL, [AutoRound()]),
    "awq + autoround (full range)": lambda: QuantConfig(G64_FULL, [AWQ(), AutoRound()]),
    "awq + autoround (full-range rounding)": lambda: QuantConfig(G64, [AWQ(), AutoRound(full_range=True)]),
    "awq + autoround (full-range rounding, keep last)": lambda: QuantConfig(G64, [AWQ(), AutoRound(full_range=True, keep="last")]),
    "w4a16 (4 rows a step)": lambda: QuantConfig(G64, [AWQ(), AutoRound(full_range=True, keep="last", batch=4)]),
    "w4a16 (seed 1)": lambda: QuantConfig(G64, [AWQ(), AutoRound(full_range=True, keep="last", seed=1)]),
    "nvfp4-awq-autoround (keep last)": lambda: replace(preset("nvfp4-awq-autoround"), algorithms=[AWQ(), AutoRound(keep="last")]),
    # the amax / 7 grid throughout (the presets before bench/results/w4_full.md)
    "rtn (amax/7)": lambda: QuantConfig(G64, []),
    "awq (amax/7)": lambda: QuantConfig(G64, [AWQ()]),
    "gptq (amax/7)": lambda: QuantConfig(G64, [GPTQ()]),
    "awq signed clip + autoround (float targets)": lambda: QuantConfig(G64, [AWQ(clip_signed=True, clip_samples=4096), AutoRound(float_targets=True)]),
}


def _ar_args(ar: AutoRound, seed: int | None = None) -> list[str]:
    """The peer's AutoRound arguments for leanlm's settings (its own seed, 42, unless `seed` is given)."""
    return ["--ar-iters", str(ar.iters), "--ar-batch", str(ar.batch)] + ([] if seed is None else ["--ar-seed", str(seed)])


# The peer's AutoRound runs with the AutoRound settings (iterations, rows a step) of the leanlm row it is compared with:
# its own defaults (200 x 8 rows) take hours per model on a 2-core CPU. Everything else runs with the tool's own settings.
# (peer tool, leanlm preset or variant it is compared with, peer scheme name, extra peer arguments), most important first.
PEERS = [
    ("modelopt", "w4a16-awq", "w4a16-awq", []),
    ("llmcompressor", "w4a16-awq", "w4a16-awq", []),
    ("llmcompressor", "w4a16-gptq", "w4a16-gptq", []),
    ("llmcompressor", "w4a16-rtn", "w4a16-rtn", []),
    ("modelopt", "w4a16-rtn", "w4a16-rtn", []),
    ("llmcompressor", "w4a16-autoround", "w4a16-autoround", _ar_args(AutoRound())),
    ("llmcompressor", "w4a16 (4 rows a step)", "w4a16-autoround", _ar_args(AutoRound(batch=4))),
    ("modelopt", "nvfp4", "nvfp4", []),
    ("llmcompressor", "w8a8-smoothquant", "w8a8-smoothquant", []),
    ("modelopt", "w8a8-smoothquant", "int8", []),
    ("llmcompressor", "fp8", "fp8", []),
    ("modelopt", "fp8", "fp8", []),
]


def _ar_tag(extra: list[str]) -> str:
    """'' for no extra arguments or leanlm's default AutoRound settings, else e.g. 'ar50x4' or 'ar50x2s1' (seed 1)."""
    kv = dict(zip(extra[::2], extra[1::2]))
    if not kv or (kv == dict(zip(_ar_args(AutoRound())[::2], _ar_args(AutoRound())[1::2]))):
        return ""
    return f"ar{kv['--ar-iters']}x{kv['--ar-batch']}" + (f"s{kv['--ar-seed']}" if "--ar-seed" in kv else "")


def peer_key(tool: str, scheme: str, extra: list[str]) -> str:
    """The peer row's name; AutoRound settings other than leanlm's defaults are named in it (and in its cache folder)."""
    kv, tag = dict(zip(extra[::2], extra[1::2])), _ar_tag(extra)
    if not tag:
        return f"{tool} {scheme}"
    return f"{tool} {scheme} ({kv['--ar-iters']} x {kv['--ar-batch']} rows" + (f", seed {kv['--ar-seed']})" if "--ar-seed" in kv else ")")


SKIP_REASON = None  # --peers-cached-only: a peer without a cached result is reported with this reason, not run
RUN = {"command": command_line(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def run_leanlm(name, cfg, ids, windows):
    model, tok = leanlm.load("smollm2-135m")
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    leanlm.quantize(model, cfg, ids, progress=False)
    secs = time.perf_counter() - t0
    load = {"before_calibration": load_before, "after_calibration": os.getloadavg()[0]}
    ppl = perplexity(model, tok, max_windows=windows, progress=False).perplexity
    news = perplexity(model, tok, source="news", max_windows=windows, progress=False).perplexity
    return {"calib_seconds": secs, "perplexity": ppl, "perplexity_news": news, "average_bits": average_bits(model), "load_average_1min": load, "run": RUN}


def float_baselines(model, tok, windows: int) -> tuple[float, float]:
    """The float model's wiki and news perplexity; they do not change between runs, so they are cached per window
    count (delete the file to redo)."""
    fcache = ROOT / "bench" / ".work" / "ptq" / f"float-w{windows}.json"
    if fcache.exists():
        base, base_news = json.loads(fcache.read_text())
        return base, base_news
    base = perplexity(model, tok, max_windows=windows, progress=False).perplexity
    base_news = perplexity(model, tok, source="news", max_windows=windows, progress=False).perplexity
    fcache.parent.mkdir(parents=True, exist_ok=True)
    fcache.write_text(json.dumps([base, base_news]))
    return base, base_news


def _last_line(log: Path) -> str:
    """The last non-empty line of a log, tqdm's carriage-return updates included."""
    lines = [ln.strip() for ln in log.read_text(errors="replace").replace("\r", "\n").splitlines() if ln.strip()]
    return lines[-1][:240] if lines else "(no output)"


def run_peer(tool, scheme, float_dir, samples, seq_len, work: Path, timeout: float, reuse: bool = True, windows: int | None = 40,
             extra: list[str] = ()):
    """Run one peer script in its own environment; cached in work/<tool>-<scheme>[-arIxB]-<samples>x<seq_len>-w<windows>/peer.json
    (-arIxB: AutoRound iterations x rows a step other than leanlm's defaults)."""
    py = ROOT / "bench" / ".venvs" / tool / "bin" / "python"
    if not py.exists():
        return {"error": f"{tool} environment missing: run bash bench/peers/setup_peers.sh"}
    work.mkdir(parents=True, exist_ok=True)
    tag = f"-{_ar_tag(list(extra))}" if _ar_tag(list(extra)) else ""
    out = work / f"{tool}-{scheme}{tag}-{samples}x{seq_len}-w{windows}{'-news' if windows else ''}"
    if reuse and (out / "peer.json").exists():
        return {**json.loads((out / "peer.json").read_text()), "reused": True}
    if SKIP_REASON:
        return {"error": f"not run: {SKIP_REASON}"}
    script = ROOT / "bench" / "peers" / ("llmcompressor_ptq.py" if tool == "llmcompressor" else "modelopt_ptq.py")
    cmd = [str(py), str(script), "--model", str(float_dir), "--scheme", scheme, "--samples", str(samples),
           "--seq-len", str(seq_len), "--calib-file", "wiki", "--out", str(out)]
    if windows:
        cmd += ["--eval-file", "wiki", "--windows", str(windows), "--eval-news"]
    cmd += list(extra)
    log = work / f"{tool}-{scheme}{tag}-{samples}.log"
    t0 = time.perf_counter()
    with open(log, "w") as f:
        try:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            return {"error": f"stopped after {time.perf_counter() - t0:.0f} s (--peer-timeout); last progress: {_last_line(log)}"}
    if rc != 0 or not (out / "peer.json").exists():
        return {"error": f"exit {rc}: {_last_line(log)}"}
    r = {**json.loads((out / "peer.json").read_text()), "run": RUN}  # a later reuse still names the run that made it
    (out / "peer.json").write_text(json.dumps(r, indent=1))
    return r


def gptq_timing(float_dir, ids, samples, seq_len, repeats, work: Path) -> dict:
    """GPTQ calibration wall time, leanlm (float32 and bfloat16 forwards) and llm-compressor interleaved
    (A B C A B C ...), same tokens."""
    ours, ours_bf16, peer = [], [], []
    for _ in range(repeats):
        for cfg, out in ((preset("w4a16-gptq"), ours), (VARIANTS["w4a16-gptq (bfloat16 forwards)"](), ours_bf16)):
            model, _tok = leanlm.load("smollm2-135m")
            t0 = time.perf_counter()
            leanlm.quantize(model, cfg, ids, progress=False)
            out.append(time.perf_counter() - t0)
            del model
        r = run_peer("llmcompressor", "w4a16-gptq", float_dir, samples, seq_len, work / "timing", timeout=3600, reuse=False, windows=None)
        if "error" in r:
            return {"error": r["error"], "leanlm_seconds": ours}
        peer.append(r["calib_seconds"])
        print(f"gptq timing: leanlm {ours[-1]:.1f} s (bf16 forwards {ours_bf16[-1]:.1f} s), llm-compressor {peer[-1]:.1f} s", flush=True)
    med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
    return {"leanlm_seconds": ours, "leanlm_bf16_forward_seconds": ours_bf16, "llmcompressor_seconds": peer,
            "ratio_of_medians": med(ours) / med(peer), "ratio_of_medians_bf16_forwards": med(ours_bf16) / med(peer)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", help="comma-separated presets/variants to run (default: all)")
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--no-leanlm", action="store_true", help="run no leanlm row (with --merge: keep them from the results file)")
    ap.add_argument("--order", help="comma-separated names to run first (the rest follow)")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--peer-timeout", type=float, default=3600, help="seconds before a peer run is stopped (its last progress line is reported)")
    ap.add_argument("--peers-cached-only", metavar="REASON",
                    help="use only cached peer results; the others are reported as not run, for REASON")
    ap.add_argument("--peer-tool", help="run only this tool's peer schemes (cached for a later full run), no leanlm rows")
    ap.add_argument("--timing-repeats", type=int, default=2, help="interleaved GPTQ timing runs per tool (0: skip)")
    ap.add_argument("--merge", action="store_true", help="keep what this run does not redo from the existing results file")
    ap.add_argument("--merge-also", help="comma-separated results names whose leanlm rows are merged in too (runs made side by side)")
    ap.add_argument("--name", default="ptq", help="results file: bench/results/NAME.md and .json (default ptq)")
    ap.add_argument("--note", help="a paragraph added to the report after the leanlm table (e.g. where a peer figure comes from)")
    a = ap.parse_args()
    global SKIP_REASON
    SKIP_REASON = a.peers_cached_only
    old = json.loads((RESULTS / f"{a.name}.json").read_text()) if a.merge and (RESULTS / f"{a.name}.json").exists() else {}
    old_run = {"command": old.get("command"), "date": old.get("date")}
    setup_threads()
    model, tok = leanlm.load("smollm2-135m")
    float_dir = Path(model.config._name_or_path)
    if a.peer_tool:  # fill the peer cache only (e.g. one queue per tool, run side by side with the rest)
        for tool, ours, scheme, extra in PEERS:
            if tool == a.peer_tool and (not a.only or ours in a.only.split(",")):
                r = run_peer(tool, scheme, float_dir, a.samples, a.seq_len, ROOT / "bench" / ".work" / "ptq", a.peer_timeout,
                             windows=a.windows, extra=extra)
                print(f"{peer_key(tool, scheme, extra)}: {r.get('perplexity', r.get('error'))}", flush=True)
        return
    ids = calibration_batches(tok, a.samples, a.seq_len)
    base, base_news = float_baselines(model, tok, a.windows)
    print(f"float32 perplexity {base:.4f} (news {base_news:.4f})", flush=True)
    a.base_news = base_news
    only = set(a.only.split(",")) if a.only else None
    rows = {k: {"run": old_run, **v} for k, v in old.get("leanlm", {}).items()}
    for extra in (a.merge_also.split(",") if a.merge_also else []):  # rows of other runs' results files
        o = json.loads((RESULTS / f"{extra}.json").read_text())
        rows.update({k: {"run": {"command": o.get("command"), "date": o.get("date")}, **v} for k, v in o.get("leanlm", {}).items()})
    mixed = {"run": old_run, **old["mixed"]} if old.get("mixed") else None
    peers = {k: {"run": old_run, **v} for k, v in old.get("peers", {}).items()}
    timing = {"run": old_run, **old["gptq_timing"]} if old.get("gptq_timing") else None
    order = a.order.split(",") if a.order else []
    jobs = [(n, (lambda n=n: preset(n))) for n in PRESETS if n != "w4a16"] + list(VARIANTS.items())  # w4a16: an alias
    jobs.sort(key=lambda j: order.index(j[0]) if j[0] in order else len(order))
    jobs.append(("w8a8-smoothquant + int8 KV cache", lambda: preset("w8a8-smoothquant", "int8")))
    unknown = sorted((only or set()) - {n for n, _ in jobs} - {"w4a16"})
    if unknown:
        raise SystemExit(f"--only names no preset or variant: {', '.join(unknown)} (names with commas cannot be given)")
    for name, make in jobs:
        if (only and name not in only) or a.no_leanlm:
            continue
        r = run_leanlm(name, make(), ids, a.windows)
        r["increase"] = r["perplexity"] / base - 1
        r["increase_news"] = r["perplexity_news"] / base_news - 1
        rows[name] = r
        print(f"{name:36s} ppl {r['perplexity']:.4f} ({r['increase']:+.2%}), news {r['perplexity_news']:.4f} "
              f"({r['increase_news']:+.2%})  calib {r['calib_seconds']:.1f}s", flush=True)
        report(a, base, rows, mixed, peers, timing, final=False)

    if (not only or "mixed" in only) and not a.no_leanlm:
        model, tok = leanlm.load("smollm2-135m")
        t0 = time.perf_counter()
        res = mixed_precision(model, ids[:4, :256], budget=4.5, menu=("int3_g64", "int4_g64", "int8"), progress=False)
        search_s = time.perf_counter() - t0
        model, tok = leanlm.load("smollm2-135m")
        r = run_leanlm("mixed 4.5", res.config([GPTQ()], [("*lm_head*", None)]), ids, a.windows)
        from collections import Counter

        mixed = {"budget": 4.5, "achieved_bits": res.average_bits, "search_seconds": search_s, "choice_counts": dict(Counter(res.choice.values())),
                 "choice": res.choice, **r, "increase": r["perplexity"] / base - 1}
        print(f"mixed 4.5 bits: {mixed['choice_counts']} ppl {r['perplexity']:.4f}", flush=True)

    if not a.no_peers:
        work = ROOT / "bench" / ".work" / "ptq"
        work.mkdir(parents=True, exist_ok=True)
        for tool, ours, scheme, extra in PEERS:
            if only and ours not in only:
                continue
            r = run_peer(tool, scheme, float_dir, a.samples, a.seq_len, work,
                         a.peer_timeout, windows=a.windows, extra=extra)
            key = peer_key(tool, scheme, extra)
            peers[key] = {"compare_with": ours, "run": RUN, **r}
            print(f"{key}: {r.get('perplexity', r.get('error'))}", flush=True)
            report(a, base, rows, mixed, peers, timing, final=False)

    if a.timing_repeats and not a.no_peers:
        timing = {**gptq_timing(float_dir, ids, a.samples, a.seq_len, a.timing_repeats, ROOT / "bench" / ".work" / "ptq"), "run": RUN}
    report(a, base, rows, mixed, peers, timing, final=True)


def _pct(v: dict, key: str, base: float | None) -> str:
    return f"{v[key]:.4f} ({v[key] / base - 1:+.2%})" if v.get(key) is not None and base else "-"


def family(name: str) -> str:
    """The scheme a leanlm row or a peer's `compare_with` belongs to in the best-against-best table: every
    W4A16 symmetric g64 algorithm is one family, every NVFP4 W4A4 one (weights and activations), the rest their own."""
    if name.startswith(("w4a16", "int4_g64", "awq")) and name != "w4a16-rtn-asym":
        return "w4a16 g64, best algorithm"
    if name.startswith("nvfp4") and name != "nvfp4-w4a16":
        return "nvfp4 w4a4, best algorithm"
    return name


def best_peer_table(base, base_news, rows, peers) -> tuple[list[list], dict]:
    """For each leanlm scheme a peer ran: the best leanlm row of that scheme family against the best
    peer result, as a ratio of perplexity increases on each text (below 1: leanlm is better)."""
    out, summary = [], {}
    fam = family
    schemes = list(dict.fromkeys(fam(v["compare_with"]) for v in peers.values()))
    for sch in schemes:
        ok = {k: v for k, v in peers.items() if fam(v["compare_with"]) == sch and "error" not in v and v.get("perplexity")}
        ours = {k: v for k, v in rows.items() if fam(k) == sch and "awq-gptq" not in k}
        if not ok or not ours:
            continue
        for key, b, what in (("perplexity", base, "wiki"), ("perplexity_news", base_news, "news")):
            pk = {k: v for k, v in ok.items() if v.get(key) is not None}
            lk = {k: v for k, v in ours.items() if v.get(key) is not None}
            if not pk or not lk or not b:
                continue
            bp = min(pk, key=lambda k: pk[k][key])
            bl = min(lk, key=lambda k: lk[k][key])
            ratio = (lk[bl][key] / b - 1) / (pk[bp][key] / b - 1)
            summary[f"{sch} {what}"] = {"leanlm": bl, "peer": bp, "ratio": ratio}
            out.append([sch, what, f"{bl}: {_pct(lk[bl], key, b)}", f"{bp}: {_pct(pk[bp], key, b)}", f"{ratio:.2f}"])
    return out, summary


def report(a, base, rows, mixed, peers, timing, final):
    import torch

    bn = getattr(a, "base_news", None)
    md = [("" if final else "**Partial results: the run was still going when this was written.**\n\n")
          + f"# Post-training quantization, SmolLM2-135M\n\nfloat32 perplexity {base:.4f} on the wiki evaluation split"
          + (f" and {bn:.4f} on the news domain's held-out articles" if bn else "")
          + f" ({a.windows} x 512 tokens each); calibration {a.samples} x {a.seq_len} tokens from the first 40 wiki articles "
          f"(neither evaluation text is calibrated on); torch {torch.__version__}, {os.cpu_count()} cores. "
          "lm_head kept in float (tied to the embedding) in every scheme; \"avg bits\" averages over all linear weights "
          "including that float32 head.\n\nCalibration seconds are wall times at the 1-minute load average in the tables "
          "(before / after calibration; about 2 is one calibration alone on the 2 cores, more means other jobs shared them): "
          "compare them only between rows of similar load, or see bench/calib_time.py's interleaved runs. "
          "Perplexity is unaffected by load.\n"]
    def load(v):
        la = v.get("load_average_1min")
        return f"{la['before_calibration']:.1f} / {la['after_calibration']:.1f}" if la else "-"

    md.append("## leanlm presets and algorithms\n\n" + md_table(
        ["scheme", "wiki perplexity (vs float32)", "news perplexity (vs float32)", "calibration s", "load", "avg bits (linears)"],
        [[k, _pct(v, "perplexity", base), _pct(v, "perplexity_news", bn), f"{v['calib_seconds']:.1f}", load(v), f"{v['average_bits']:.2f}"]
         for k, v in rows.items()]))
    if getattr(a, "note", None):
        md.append(a.note)
    if mixed:
        md.append(f"## Mixed precision (budget 4.5 bits/weight over int3_g64 / int4_g64 / int8, KL sensitivity on 4 x 256 tokens, then GPTQ)\n\n"
                  f"Choice: {mixed['choice_counts']}, {mixed['achieved_bits']:.3f} bits/weight over the quantized layers; search {mixed['search_seconds']:.0f} s; "
                  f"perplexity {mixed['perplexity']:.4f} ({mixed['increase']:+.2%}).")
    if peers:
        prow = []
        for k, v in peers.items():
            ours = rows.get(v["compare_with"])
            if "error" in v:
                prow.append([k, v["compare_with"], "-", "-", f"failed: {v['error']}", "-", "-"])
                continue
            prow.append([f"{k} {v.get('version', '?')}", v["compare_with"], _pct(v, "perplexity", base), _pct(v, "perplexity_news", bn),
                         f"{v.get('calib_seconds', float('nan')):.1f}", load(v),
                         f"{_pct(ours, 'perplexity', base)}, news {_pct(ours, 'perplexity_news', bn)}, {ours['calib_seconds']:.1f} s" if ours else "-"])
        md.append("## Peers, same model, text and calibration tokens\n\nEach peer runs in its own environment "
                  "(bench/peers/setup_peers.sh) with no time limit short of an hour, scored by leanlm's perplexity code on the same "
                  "text. A failed row says why.\n\n" + md_table(
            ["peer scheme", "leanlm preset", "wiki perplexity", "news perplexity", "peer calibration s", "load", "leanlm (wiki, news, calibration)"], prow))
        best, summary = best_peer_table(base, bn, rows, peers)
        if best:
            md.append("## Best leanlm result against the best peer result, per scheme\n\nratio = leanlm's perplexity increase / "
                      "the peer's (below 1: leanlm better; the issue's target for W4A16 g64 is at most 0.8 on both texts). "
                      "For w4a16 the best of every leanlm W4A16 g64 row counts, for nvfp4 the best NVFP4 W4A4 row.\n\n"
                      + md_table(["scheme", "text", "best leanlm", "best peer", "ratio"], best))
    if timing:
        if "error" in timing:
            md.append(f"## GPTQ calibration time, interleaved\n\nllm-compressor failed: {timing['error']}")
        else:
            bf = timing.get("leanlm_bf16_forward_seconds") or [None] * len(timing["leanlm_seconds"])
            md.append("## GPTQ calibration time, leanlm and llm-compressor interleaved (A B C A B C), same tokens\n\n" + md_table(
                ["run", "leanlm s (float32 forwards)", "leanlm s (bfloat16 forwards)", "llm-compressor s"],
                [[i + 1, f"{x:.1f}", "-" if z is None else f"{z:.1f}", f"{y:.1f}"]
                 for i, (x, z, y) in enumerate(zip(timing["leanlm_seconds"], bf, timing["llmcompressor_seconds"]))])
                + f"\n\nleanlm / llm-compressor, ratio of medians: {timing['ratio_of_medians']:.2f} with float32 forwards"
                + (f", {timing['ratio_of_medians_bf16_forwards']:.2f} with bfloat16 forwards" if "ratio_of_medians_bf16_forwards" in timing else ""))
    runs: dict[tuple, list[str]] = {}
    for k, v in [*rows.items(), *peers.items(), ("mixed precision", mixed or {}), ("GPTQ timing", timing or {})]:
        if v.get("run"):
            runs.setdefault((v["run"]["command"], v["run"]["date"]), []).append(k)
    if len(runs) > 1:
        md.append("## Runs\n\nThe rows above come from more than one run (`--merge`):\n\n"
                  + "\n".join(f"- `{c}` on {d}: {', '.join(ks)}" for (c, d), ks in runs.items()))
    path = write_results(a.name, {"complete": final, "float_perplexity": base, "float_perplexity_news": bn,
                                 "best_vs_peer": best_peer_table(base, bn, rows, peers)[1], "leanlm": rows, "mixed": mixed, "peers": peers,
                                 "gptq_timing": timing},
                         "\n\n".join(md))
    if final:
        print(path.read_text())


if __name__ == "__main__":
    main()
