"""Hadamard rotations (QuaRot, leanlm.quantization.rotate) on SmolLM2-135M, per PROTOCOL.md.

Each scheme is quantized twice from the float32 model on the same 64 x 512 calibration tokens (the first
40 wiki articles): without a rotation and with ``rotate="hadamard"`` (residual stream, value heads and the
online Hadamard before down_proj), and scored on two texts calibration never saw: the wiki evaluation
split and the news domain (40 x 512 tokens each, by default). PTQ only, no training.

    python bench/rotations.py                       # every row, 40 windows per domain (the protocol)
    python bench/rotations.py --windows 8 --only nvfp4,w4a8-rtn   # what was run (machine loaded); rows already in the
                                                                  # results file are kept, parallel runs merge their rows
    python bench/rotations.py --only nvfp4-awq-autoround --rotate hadamard --name rotations_nvfp4   # one rotated row

Rows are written to bench/results/rotations.json after each one, so an interrupted run keeps what it
measured and a rerun skips rows already there (``--redo`` measures them again).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch
from common import RESULTS, command_line, md_table, setup_threads, write_results

import leanlm
from leanlm.core.data import calibration_batches
from leanlm.evaluation import perplexity
from leanlm.quantization import GPTQ, QuantConfig, QuantizerConfig, preset

W = "*weight_quantizer"
A = "*input_quantizer"
HEAD = ("*lm_head*", None)


def _cfg(weights: str, acts: str | None, algorithms=()) -> QuantConfig:
    rules = [(W, QuantizerConfig(weights))] + ([(A, QuantizerConfig(acts, dynamic=True))] if acts else []) + [HEAD]
    return QuantConfig(rules, list(algorithms))


# name -> (config factory, what it is). The presets are the ones bench/ptq.py measures without a rotation.
SCHEMES = {   # in the order they run: the targets first
    "nvfp4": (lambda: preset("nvfp4"), "preset nvfp4: NVFP4 W4A4 (16-element blocks, FP8 scales), round to nearest"),
    "w4a8": (lambda: preset("w4a8-gptq"), "preset w4a8-gptq (preset w4a8 until issue 22's W4A8 work): int4 g64 weights, int8 "
             "per-token dynamic activations, SmoothQuant 0.5 + GPTQ"),
    "nvfp4-awq-autoround": (lambda: preset("nvfp4-awq-autoround"), "preset nvfp4-awq-autoround: NVFP4 W4A4, AWQ then AutoRound "
                            "trained with the NVFP4 activation quantizers"),
    "w4a8-awq-autoround": (lambda: preset("w4a8-awq-autoround"), "preset w4a8-awq-autoround: int4 g64 weights, int8 per-token activations, AWQ then "
                           "AutoRound trained with the activation quantizers"),
    "w4a8-rtn": (lambda: _cfg("int4_g64", "int8_token"), "int4 g64 weights, int8 per-token dynamic activations, round to nearest"),
    "w4a16-rtn": (lambda: preset("w4a16-rtn"), "W4A16 int4 g64 symmetric, round to nearest"),
    "w4a4-int": (lambda: _cfg("int4_g64", "int4_token"), "int4 g64 weights, int4 per-token dynamic activations, round to nearest"),
    "mxfp4": (lambda: preset("mxfp4"), "preset mxfp4: MXFP4 W4A4 (32-element blocks, E8M0 scales), round to nearest"),
    "w4a16-awq": (lambda: preset("w4a16-awq"), "W4A16 int4 g64 symmetric, AWQ (scales + clipping)"),
    "w4a16-gptq": (lambda: preset("w4a16-gptq"), "W4A16 int4 g64 symmetric, GPTQ (act_order)"),
    "nvfp4-gptq": (lambda: _cfg("nvfp4", "nvfp4", [GPTQ()]), "NVFP4 W4A4, GPTQ weights (with the rotation: the nvfp4-quarot preset)"),
    "w4a8-gptq": (lambda: _cfg("int4_g64", "int8_token", [GPTQ()]), "int4 g64 weights, int8 per-token activations, GPTQ only "
                  "(with the rotation: the w4a8-quarot preset)"),
    "w4a4-int-gptq": (lambda: _cfg("int4_g64", "int4_token", [GPTQ()]), "int4 g64 weights, int4 per-token activations, GPTQ"),
    "mxfp4-gptq": (lambda: _cfg("mxfp4", "mxfp4", [GPTQ()]), "MXFP4 W4A4, GPTQ weights"),
}
ROTATIONS = (None, "hadamard")
DOMAINS = ("wiki", "news")
NAME = "rotations"  # the results file (--name)


def machine() -> dict:
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads()}


def evaluate(model, tok, windows: int) -> dict:
    return {d: perplexity(model, tok, source=d, max_windows=windows, progress=False).perplexity for d in DOMAINS}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", help=f"comma-separated schemes (default: all of {', '.join(SCHEMES)})")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--redo", action="store_true", help="measure rows again that the results file already has")
    ap.add_argument("--rotate", default="none,hadamard",
                    help="comma-separated rotations to run per scheme: none, hadamard (default: both)")
    ap.add_argument("--name", default="rotations", help="results file: bench/results/NAME.md and .json (default rotations)")
    a = ap.parse_args()
    global NAME
    NAME = a.name
    rots = [None if r == "none" else r for r in a.rotate.split(",")]
    if any(r not in ROTATIONS for r in rots):
        raise SystemExit(f"unknown rotation in --rotate {a.rotate!r}; choose from none, hadamard")
    setup_threads()
    names = a.only.split(",") if a.only else list(SCHEMES)
    unknown = [n for n in names if n not in SCHEMES]
    if unknown:
        raise SystemExit(f"unknown scheme(s) {unknown}; choose from {', '.join(SCHEMES)}")
    path = RESULTS / f"{NAME}.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    setup = {"samples": a.samples, "seq_len": a.seq_len, "windows": a.windows}
    if old.get("setup") != setup:
        old = {}
    # rotated rows from before massive channels were kept out of the rotation (no "keep") measured the old rotation
    rows = {k: r for k, r in old.get("rows", {}).items() if not r["rotate"] or "keep" in r}
    data = {"machine": machine(), "setup": setup, "float": old.get("float"), "rows": rows}

    model, tok = leanlm.load("smollm2-135m")
    ids = calibration_batches(tok, a.samples, a.seq_len)
    if data["float"] is None:
        data["float"] = evaluate(model, tok, a.windows)
        save(data)
    for name in names:
        for rot in rots:
            key = f"{name} + {rot}" if rot else name
            if key in data["rows"] and not a.redo:
                continue
            m, _ = leanlm.load("smollm2-135m")
            cfg = SCHEMES[name][0]()
            cfg.rotate = rot
            load_before = os.getloadavg()[0]
            t0 = time.perf_counter()
            leanlm.quantize(m, cfg, ids, progress=False)
            secs = time.perf_counter() - t0
            ppl = evaluate(m, tok, a.windows)
            data["rows"][key] = {"scheme": name, "rotate": rot, "calib_seconds": secs, "perplexity": ppl,
                                 "load_average_1min": [load_before, os.getloadavg()[0]], "command": command_line(),
                                 **({"keep": m.leanlm_rotation.get("keep", [])} if rot else {}),
                                 "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
            print(key, {d: f"{p:.3f} ({p / data['float'][d] - 1:+.1%})" for d, p in ppl.items()}, f"{secs:.0f} s", flush=True)
            save(data)
            del m


def save(data: dict) -> None:
    """Write the results, keeping rows another run of this script (a parallel --only) wrote meanwhile."""
    path = RESULTS / f"{NAME}.json"
    if path.is_file():
        disk = json.loads(path.read_text())
        if disk.get("setup") == data["setup"]:
            fresh = {k: r for k, r in disk.get("rows", {}).items() if not r["rotate"] or "keep" in r}
            data["rows"] = {**fresh, **data["rows"]}
    base = data["float"]
    rows = []
    for name, (_, what) in SCHEMES.items():
        got = {r["rotate"]: r for r in data["rows"].values() if r["scheme"] == name}
        if not got:
            continue
        cells = [name]
        for d in DOMAINS:
            for rot in ROTATIONS:
                r = got.get(rot)
                cells.append(f"{r['perplexity'][d]:.3f} ({r['perplexity'][d] / base[d] - 1:+.1%})" if r else "-")
        for rot in ROTATIONS:
            r = got.get(rot)
            cells.append(f"{r['calib_seconds']:.0f}" if r else "-")
        rows.append(cells)
    s = data["setup"]
    md = (f"# Hadamard rotations (QuaRot) on SmolLM2-135M\n\n"
          f"Float32 perplexity: wiki {base['wiki']:.3f}, news {base['news']:.3f} ({s['windows']} x 512 tokens each, held out). "
          f"Calibration: {s['samples']} x {s['seq_len']} wiki tokens, the same for every row. PTQ only. "
          f"Machine: {data['machine']['cpu']}, {data['machine']['cores']} cores, torch {data['machine']['torch']}; "
          "**the machine was loaded by other jobs** (1-minute load averages in the JSON), so calibration seconds are "
          "indicative only; perplexities do not depend on load.\n\n"
          + md_table(["scheme", "wiki", "wiki + hadamard", "news", "news + hadamard", "calib s", "calib s + hadamard"], rows)
          + "\n\n" + "\n".join(f"- `{n}`: {w}" for n, (_, w) in SCHEMES.items()
                               if any(r["scheme"] == n for r in data["rows"].values())))
    write_results(NAME, data, md)


if __name__ == "__main__":
    main()
