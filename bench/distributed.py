"""Wall time of a short distillation of SmolLM2-135M in 1 process against 2 data-parallel processes (gloo).

--what distill (default): `leanlm distill MODEL --teacher MODEL --lm-weight 1` (self-distillation with the LM
loss next to the KL). --what qad: `leanlm qat MODEL --scheme w4a16-rtn --teacher self` (the RTN-quantized model
learns from its float self: a KL that is not 0 at the start). The same command line is run as a subprocess
without and with `--nproc 2` (the same global batch, so the same steps and, to float tolerance, the same
model), alternating 1, 2, 1, 2, ... for --runs pairs. Reported per run: the command's wall time (start-up and
model loads included), the trainer's own seconds, their medians and the 2-process / 1-process ratio, and the
first and last loss (distill) or the held-out perplexity before and after (qad), which the two runs share.

    python bench/distributed.py --tokens 4096 --batch 4 --seq-len 256 --runs 1
    python bench/distributed.py --rerender      # rewrite the report from bench/results/distributed.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import RESULTS, md_table, write_results

ROOT = Path(__file__).resolve().parents[1]


def run(nproc: int, a, tmp: Path) -> dict:
    out = tmp / f"out-{nproc}-{time.monotonic_ns()}"
    cmd = [sys.executable, "-m", "leanlm", *COMMAND(a), "--json", "--out", str(out)]
    if nproc > 1:
        cmd += ["--nproc", str(nproc)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    d = json.loads(r.stdout)
    if a.what == "distill":
        d = d["distill"]
        quality = {"loss_first": d["loss_first"], "loss_last": d["loss_last"]}
    else:
        quality = {"perplexity_start": d["start_perplexity"], "perplexity_end": d["final_perplexity"]}
    return {"nproc": nproc, "wall_s": wall, "train_s": d["seconds"], "steps": d["steps"], "tokens": d["tokens"], **quality}


def COMMAND(a) -> list[str]:
    shape = ["--batch-size", str(a.batch), "--seq-len", str(a.seq_len), "--eval-windows", "1"]
    if a.what == "distill":
        return ["distill", a.model, "--teacher", a.model, "--lm-weight", "1", "--tokens", str(a.tokens), *shape]
    return ["qat", a.model, "--scheme", "w4a16-rtn", "--teacher", "self", "--budget", str(a.tokens), "--grad-accum", "1", *shape,
            "--no-compile"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--runs", type=int, default=1, help="pairs of (1-process, 2-process) runs, alternated")
    ap.add_argument("--what", choices=["distill", "qad"], default="distill")
    ap.add_argument("--rerender", action="store_true", help="rewrite the report from bench/results/distributed.json (no runs)")
    a = ap.parse_args()
    measured_by = None
    if a.rerender:
        old = json.loads((RESULTS / "distributed.json").read_text())
        runs, machine, a = old["runs"], old["machine"], argparse.Namespace(**{"what": "distill", **old["settings"]})
        measured_by = old.get("measured_by") or f"{old['command']} on {old['date']}"
    else:
        runs = []
        with tempfile.TemporaryDirectory() as tmp:
            for i in range(a.runs):
                for n in (1, 2):
                    runs.append(run(n, a, Path(tmp)))
                    print(json.dumps(runs[-1]), flush=True)
        cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
        machine = {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "load_average_1_5_15": os.getloadavg()}
    cpu, load = machine["cpu"], machine["load_average_1_5_15"]
    med = {n: {k: statistics.median(r[k] for r in runs if r["nproc"] == n) for k in ("wall_s", "train_s")} for n in (1, 2)}
    q = ("loss_first", "loss_last") if a.what == "distill" else ("perplexity_start", "perplexity_end")
    rows = [[r["nproc"], f"{r['wall_s']:.1f}", f"{r['train_s']:.1f}", r["steps"], f"{r[q[0]]:.5f}", f"{r[q[1]]:.5f}"] for r in runs]
    ratio_train = med[2]["train_s"] / med[1]["train_s"]
    ratio_wall = med[2]["wall_s"] / med[1]["wall_s"]
    md = (f"# Data-parallel distillation: 1 process against 2 (gloo)\n\n"
          f"`leanlm {' '.join(COMMAND(a))}` without and with `--nproc 2` (the same global batch of {a.batch} "
          f"sequences of {a.seq_len} tokens per step: {a.batch // 2} per process), alternated, {a.runs} pair(s).\n\n"
          + (f"Measured by `{measured_by}`.\n\n" if measured_by else "")
          + f"Machine: {cpu}, {machine['cores']} cores, torch {machine['torch']}. **Machine loaded**: other engineers' jobs share "
          f"these cores (load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} at the end), so the absolute times are "
          f"noisy; the lead reruns this on a quiet machine.\n\n"
          + md_table(["processes", "command wall s", "training s", "steps",
                      *(["first loss", "last loss"] if a.what == "distill" else ["perplexity before", "perplexity after"])], rows)
          + f"\n\nMedian training time 2 processes / 1 process: **{ratio_train:.2f}x**; whole command: **{ratio_wall:.2f}x** "
          f"(above 1 means slower; with the machine this loaded the ratio follows the other jobs more than leanlm). "
          f"Both runs train under bfloat16 autocast (the default on this CPU), so they agree to bfloat16 rounding, not to "
          f"float32 tolerance; tests/test_distributed.py checks float32 equality on a tiny model. "
          + ("The loss is the trainer's total, KL and LM each divided by its running mean (the default balancing): a model "
             "distilled from itself starts at KL = 0, and dividing the tiny KL by its tiny running mean magnifies rounding, so "
             "this figure is a poor equality check. " if a.what == "distill" else "")
          + "\n\n"
          "No speed-up is expected here: one process already uses both cores for its matrix products (2 torch threads), two "
          "processes get one core each for half the batch, so the arithmetic per step is the same while each step adds a "
          "gradient all-reduce of the 135M parameters over gloo (about 0.5 GB of float32 through loopback) and each process "
          "loads its own student and teacher. Data parallelism pays off when every process has its own cores or GPU "
          "(docs/scale.md).\n")
    path = write_results("distributed", {"measured_by": measured_by, "machine": machine, "settings": vars(a), "runs": runs, "median": med,
                                         "ratio_train_2_over_1": ratio_train, "ratio_wall_2_over_1": ratio_wall}, md)
    print(path.read_text())


if __name__ == "__main__":
    main()
