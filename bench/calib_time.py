"""Calibration wall time of one algorithm, leanlm against a peer, interleaved (A B A B ...), same calibration tokens.

    python bench/calib_time.py --scheme w4a16-awq --tool modelopt --repeats 1 --name calib_time_awq
    python bench/calib_time.py --scheme w4a16-autoround --variant "w4a16-autoround (bfloat16 training)" --tool llmcompressor
    python bench/calib_time.py --scheme w8a8-static --peer-scheme int8 --tool modelopt --repeats 3 --name calib_time_sq_modelopt

The peer runs in its own environment (bash bench/peers/setup_peers.sh TOOL) through bench/ptq.py's `run_peer`,
with no evaluation (its script times its calibration alone); leanlm times `leanlm.quantize` with the preset of the
same name on SmolLM2-135M. Run it on a quiet machine: the result file records the load average of each run.
GPTQ against llm-compressor has its own interleaved timing in bench/ptq.py (`--timing-repeats`).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from common import md_table, setup_threads, write_results
from ptq import ROOT, VARIANTS, run_peer

import leanlm
from leanlm.core.data import calibration_batches
from leanlm.quantization import preset


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scheme", default="w4a16-awq", help="a leanlm preset that the peer script also knows")
    ap.add_argument("--tool", default="modelopt", choices=["modelopt", "llmcompressor"])
    ap.add_argument("--variant", choices=list(VARIANTS), help="time this bench/ptq.py variant on leanlm's side instead of the "
                    "preset --scheme (the peer still runs --scheme), e.g. \"w4a16-autoround (bfloat16 training)\"")
    ap.add_argument("--peer-scheme", help="the peer script's scheme when its name differs from --scheme, e.g. modelopt's "
                    "\"int8\" (INT8_SMOOTHQUANT_CFG: SmoothQuant, static per-tensor int8 activations) against w8a8-static")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--name", default="calib_time")
    a = ap.parse_args()
    setup_threads()
    model, tok = leanlm.load("smollm2-135m")
    float_dir = Path(model.config._name_or_path)
    ids = calibration_batches(tok, a.samples, a.seq_len)
    del model
    ours_name = a.variant or a.scheme
    runs = []
    for i in range(a.repeats):
        model, _ = leanlm.load("smollm2-135m")
        load0 = os.getloadavg()[0]
        t0 = time.perf_counter()
        leanlm.quantize(model, VARIANTS[a.variant]() if a.variant else preset(a.scheme), ids, progress=False)
        ours = time.perf_counter() - t0
        del model
        print(f"run {i + 1}: leanlm {ours_name} {ours:.2f} s", flush=True)
        load1 = os.getloadavg()[0]
        r = run_peer(a.tool, a.peer_scheme or a.scheme, float_dir, a.samples, a.seq_len, ROOT / "bench" / ".work" / "calib_time",
                     timeout=3600, reuse=False, windows=None)
        if "error" in r:
            raise SystemExit(f"{a.tool} {a.peer_scheme or a.scheme}: {r['error']}")
        print(f"run {i + 1}: {a.tool} {a.peer_scheme or a.scheme} {r['calib_seconds']:.2f} s", flush=True)
        runs.append({"leanlm_s": ours, "peer_s": r["calib_seconds"], "load_before_leanlm": load0, "load_before_peer": load1,
                     "peer_version": r.get("version")})
    med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
    ratio = med([r["leanlm_s"] for r in runs]) / med([r["peer_s"] for r in runs])
    rows = [[i + 1, f"{r['leanlm_s']:.2f}", f"{r['peer_s']:.2f}", f"{r['load_before_leanlm']:.1f} / {r['load_before_peer']:.1f}"]
            for i, r in enumerate(runs)]
    md = "\n".join([
        f"# Calibration time: leanlm `{ours_name}` vs {a.tool} {runs[0]['peer_version'] or ''}"
        f"{f' `{a.peer_scheme}`' if a.peer_scheme else ''}, interleaved\n",
        f"SmolLM2-135M, {a.samples} x {a.seq_len} calibration tokens of the wiki calibration split for both, 2 threads; "
        "the peer's own script times its calibration alone (model load and export excluded), leanlm times "
        "`leanlm.quantize`. Load: 1-minute load average before each timed run.\n",
        md_table(["run", "leanlm s", f"{a.tool} s", "load (leanlm / peer)"], rows),
        f"\nleanlm / {a.tool}, ratio of medians: **{ratio:.2f}**",
    ])
    print(md)
    write_results(a.name, {"scheme": a.scheme, "peer_scheme": a.peer_scheme or a.scheme, "leanlm": ours_name, "tool": a.tool, "runs": runs, "ratio_of_medians": ratio}, md)


if __name__ == "__main__":
    main()
