"""Post-training quantization benchmark on SmolLM2-135M, per PROTOCOL.md, with peers side by side.

For every leanlm preset and algorithm variant: held-out perplexity (wiki eval split, 40 x 512
tokens) next to float32, and calibration wall time, on the same 32 x 512 calibration tokens (first 40
articles). Then the same schemes through llm-compressor and NVIDIA Model Optimizer, each in its own
virtual environment (bash bench/peers/setup_peers.sh), on the same calibration tokens, scored by the
same leanlm perplexity code on the same text. Finally GPTQ calibration time, leanlm and
llm-compressor interleaved (A B A B) on a quiet machine.

A peer run that exceeds --peer-timeout is stopped and reported with its last progress line (AWQ in
both peers runs for hours on CPU). Peer results are cached in bench/.work/ptq/<tool>-<scheme>-<samples>x<seq_len>-w<windows>/
and reused; delete that folder to rerun one.

    python bench/ptq.py                       # everything (about 1.5 hours on 2 cores)
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
from pathlib import Path

from common import RESULTS, command_line, md_table, setup_threads, write_results

import leanlm
from leanlm.core.data import calibration_batches
from leanlm.evaluation import perplexity
from leanlm.quantization import GPTQ, PRESETS, QuantConfig, QuantizerConfig, average_bits, mixed_precision, preset

ROOT = Path(__file__).resolve().parents[1]

# Algorithm variants on the reference 4-bit scheme (symmetric INT4, groups of 64).
G64 = [("*weight_quantizer", QuantizerConfig("int4_g64")), ("*lm_head*", None)]
G64_MSE = [("*weight_quantizer", QuantizerConfig("int4_g64", method="mse")), ("*lm_head*", None)]
# (The presets already cover rtn, mse clip, awq, gptq and awq + gptq on this scheme.)
VARIANTS = {
    "int4_g64 gptq without act_order": lambda: QuantConfig(G64, [GPTQ(act_order=False)]),
    "int4_g64 gptq (mse clip)": lambda: QuantConfig(G64_MSE, [GPTQ()]),
    "w4a16-gptq (bfloat16 forwards)": lambda: QuantConfig(G64, [GPTQ(forward_dtype="bfloat16")]),
}

# (peer tool, leanlm preset it is compared with, peer scheme name)
PEERS = [
    ("llmcompressor", "w4a16-gptq", "w4a16-gptq"),
    ("llmcompressor", "w4a16-rtn", "w4a16-rtn"),
    ("llmcompressor", "w4a16-awq", "w4a16-awq"),
    ("llmcompressor", "w8a8-smoothquant", "w8a8-smoothquant"),
    ("llmcompressor", "fp8", "fp8"),
    ("modelopt", "w8a8-smoothquant", "int8"),
    ("modelopt", "w4a16-awq", "w4a16-awq"),
    ("modelopt", "fp8", "fp8"),
]


RUN = {"command": command_line(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def run_leanlm(name, cfg, ids, windows):
    model, tok = leanlm.load("smollm2-135m")
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    leanlm.quantize(model, cfg, ids, progress=False)
    secs = time.perf_counter() - t0
    load = {"before_calibration": load_before, "after_calibration": os.getloadavg()[0]}
    ppl = perplexity(model, tok, max_windows=windows, progress=False).perplexity
    return {"calib_seconds": secs, "perplexity": ppl, "average_bits": average_bits(model), "load_average_1min": load, "run": RUN}


def _last_line(log: Path) -> str:
    """The last non-empty line of a log, tqdm's carriage-return updates included."""
    lines = [ln.strip() for ln in log.read_text(errors="replace").replace("\r", "\n").splitlines() if ln.strip()]
    return lines[-1][:240] if lines else "(no output)"


def run_peer(tool, scheme, float_dir, samples, seq_len, work: Path, timeout: float, reuse: bool = True, windows: int | None = 40):
    """Run one peer script in its own environment; cached in work/<tool>-<scheme>-<samples>x<seq_len>-w<windows>/peer.json."""
    py = ROOT / "bench" / ".venvs" / tool / "bin" / "python"
    if not py.exists():
        return {"error": f"{tool} environment missing: run bash bench/peers/setup_peers.sh"}
    work.mkdir(parents=True, exist_ok=True)
    out = work / f"{tool}-{scheme}-{samples}x{seq_len}-w{windows}"
    if reuse and (out / "peer.json").exists():
        return {**json.loads((out / "peer.json").read_text()), "reused": True}
    script = ROOT / "bench" / "peers" / ("llmcompressor_ptq.py" if tool == "llmcompressor" else "modelopt_ptq.py")
    cmd = [str(py), str(script), "--model", str(float_dir), "--scheme", scheme, "--samples", str(samples),
           "--seq-len", str(seq_len), "--calib-file", "wiki", "--out", str(out)]
    if windows:
        cmd += ["--eval-file", "wiki", "--windows", str(windows)]
    log = work / f"{tool}-{scheme}-{samples}.log"
    t0 = time.perf_counter()
    with open(log, "w") as f:
        try:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            return {"error": f"stopped after {time.perf_counter() - t0:.0f} s (--peer-timeout); last progress: {_last_line(log)}"}
    if rc != 0 or not (out / "peer.json").exists():
        return {"error": f"exit {rc}: {_last_line(log)}"}
    return json.loads((out / "peer.json").read_text())


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
    ap.add_argument("--order", help="comma-separated names to run first (the rest follow)")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--peer-timeout", type=float, default=1800, help="seconds before a peer run is stopped")
    ap.add_argument("--awq-peer-timeout", type=float, default=300,
                    help="the same for the peers' AWQ, which runs for hours on CPU (its progress rate is reported)")
    ap.add_argument("--timing-repeats", type=int, default=2, help="interleaved GPTQ timing runs per tool (0: skip)")
    ap.add_argument("--merge", action="store_true", help="keep what this run does not redo from the existing results file")
    ap.add_argument("--name", default="ptq", help="results file: bench/results/NAME.md and .json (default ptq)")
    a = ap.parse_args()
    old = json.loads((RESULTS / f"{a.name}.json").read_text()) if a.merge and (RESULTS / f"{a.name}.json").exists() else {}
    old_run = {"command": old.get("command"), "date": old.get("date")}
    setup_threads()
    model, tok = leanlm.load("smollm2-135m")
    float_dir = Path(model.config._name_or_path)
    ids = calibration_batches(tok, a.samples, a.seq_len)
    base = perplexity(model, tok, max_windows=a.windows, progress=False).perplexity
    print(f"float32 perplexity {base:.4f}", flush=True)
    only = set(a.only.split(",")) if a.only else None
    rows = {k: {"run": old_run, **v} for k, v in old.get("leanlm", {}).items()}
    mixed = {"run": old_run, **old["mixed"]} if old.get("mixed") else None
    peers = {k: {"run": old_run, **v} for k, v in old.get("peers", {}).items()}
    timing = {"run": old_run, **old["gptq_timing"]} if old.get("gptq_timing") else None
    order = a.order.split(",") if a.order else []
    jobs = [(n, (lambda n=n: preset(n))) for n in PRESETS] + list(VARIANTS.items())
    jobs.sort(key=lambda j: order.index(j[0]) if j[0] in order else len(order))
    jobs.append(("w8a8-smoothquant + int8 KV cache", lambda: preset("w8a8-smoothquant", "int8")))
    for name, make in jobs:
        if only and name not in only:
            continue
        r = run_leanlm(name, make(), ids, a.windows)
        r["increase"] = r["perplexity"] / base - 1
        rows[name] = r
        print(f"{name:36s} ppl {r['perplexity']:.4f} ({r['increase']:+.2%})  calib {r['calib_seconds']:.1f}s", flush=True)
        report(a, base, rows, mixed, peers, timing, final=False)

    if not only or "mixed" in only:
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
        for tool, ours, scheme in PEERS:
            if only and ours not in only:
                continue
            r = run_peer(tool, scheme, float_dir, a.samples, a.seq_len, work,
                         a.awq_peer_timeout if "awq" in scheme else a.peer_timeout, windows=a.windows)
            peers[f"{tool} {scheme}"] = {"compare_with": ours, **r, "run": RUN}
            print(f"{tool} {scheme}: {r.get('perplexity', r.get('error'))}", flush=True)
            report(a, base, rows, mixed, peers, timing, final=False)

    if a.timing_repeats and not a.no_peers:
        timing = {**gptq_timing(float_dir, ids, a.samples, a.seq_len, a.timing_repeats, ROOT / "bench" / ".work" / "ptq"), "run": RUN}
    report(a, base, rows, mixed, peers, timing, final=True)


def report(a, base, rows, mixed, peers, timing, final):
    import torch

    md = [("" if final else "**Partial results: the run was still going when this was written.**\n\n")
          + f"# Post-training quantization, SmolLM2-135M\n\nfloat32 perplexity {base:.4f} (wiki eval split, {a.windows} x 512 tokens); "
          f"calibration {a.samples} x {a.seq_len} tokens from the first 40 articles; torch {torch.__version__}, {os.cpu_count()} cores. "
          "lm_head kept in float (tied to the embedding) in every scheme; \"avg bits\" averages over all linear weights "
          "including that float32 head.\n"]
    def load(v):
        la = v.get("load_average_1min")
        return f"{la['before_calibration']:.1f} / {la['after_calibration']:.1f}" if la else "-"

    md.append("## leanlm presets and algorithms\n\nCalibration seconds are only comparable between rows run at a similar load "
              "(the machine's 1-minute load average before / after calibration; 2 cores).\n\n" + md_table(
        ["scheme", "perplexity", "vs float32", "calibration s", "load", "avg bits (linears)"],
        [[k, f"{v['perplexity']:.4f}", f"{v['increase']:+.2%}", f"{v['calib_seconds']:.1f}", load(v), f"{v['average_bits']:.2f}"]
         for k, v in rows.items()]))
    if mixed:
        md.append(f"## Mixed precision (budget 4.5 bits/weight over int3_g64 / int4_g64 / int8, KL sensitivity on 4 x 256 tokens, then GPTQ)\n\n"
                  f"Choice: {mixed['choice_counts']}, {mixed['achieved_bits']:.3f} bits/weight over the quantized layers; search {mixed['search_seconds']:.0f} s; "
                  f"perplexity {mixed['perplexity']:.4f} ({mixed['increase']:+.2%}).")
    if peers:
        prow = []
        for k, v in peers.items():
            ours = rows.get(v["compare_with"])
            if "error" in v:
                prow.append([k, v["compare_with"], "-", "-", f"failed: {v['error']}", "-"])
                continue
            inc = v["perplexity"] / base - 1
            prow.append([f"{k} {v.get('version', '?')}", v["compare_with"], f"{v['perplexity']:.4f}", f"{inc:+.2%}", f"{v.get('calib_seconds', float('nan')):.1f}",
                         f"{ours['perplexity']:.4f} ({ours['increase']:+.2%}), {ours['calib_seconds']:.1f} s" if ours else "-"])
        md.append("## Peers, same model, text and calibration tokens\n\n" + md_table(
            ["peer scheme", "leanlm preset", "peer perplexity", "vs float32", "peer calibration s", "leanlm (perplexity, calibration)"], prow))
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
    path = write_results(a.name, {"complete": final, "float_perplexity": base, "leanlm": rows, "mixed": mixed, "peers": peers,
                                 "gptq_timing": timing},
                         "\n\n".join(md))
    if final:
        print(path.read_text())


if __name__ == "__main__":
    main()
