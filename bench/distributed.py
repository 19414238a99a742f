"""Wall time of a short distillation of SmolLM2-135M in 1 process against 2 data-parallel processes (gloo).

The distillation is QAD (`leanlm qat MODEL --scheme w4a16-rtn --teacher self`: the RTN-quantized model learns
from its float self, logit KL; a student that starts equal to its teacher, as in plain self-distillation,
would have a KL of exactly 0 and nothing to learn). The same command line is run as a subprocess without and
with `--nproc 2` (the same global batch, so the same steps and, to float tolerance, the same model), alternating
1, 2, 1, 2, ... for --runs pairs. Reported per run: the command's wall time (start-up, model loads and RTN
included) and the trainer's own seconds, their medians and the 2-process / 1-process ratio, and the held-out
perplexity (one 512-token window) before and after training, which the two runs must share.

    python bench/distributed.py --tokens 4096 --batch 4 --seq-len 256 --runs 1
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
    return {"nproc": nproc, "wall_s": wall, "train_s": d["seconds"], "steps": d["steps"], "tokens": d["tokens"],
            "perplexity_start": d["start_perplexity"], "perplexity_end": d["final_perplexity"], "load_average_1m": os.getloadavg()[0]}


def COMMAND(a) -> list[str]:
    return ["qat", a.model, "--scheme", "w4a16-rtn", "--teacher", "self", "--budget", str(a.tokens), "--batch-size", str(a.batch),
            "--grad-accum", "1", "--seq-len", str(a.seq_len), "--eval-windows", "1", "--no-compile"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--runs", type=int, default=1, help="pairs of (1-process, 2-process) runs, alternated")
    ap.add_argument("--rerender", action="store_true", help="rewrite the report from bench/results/distributed.json (no runs)")
    a = ap.parse_args()
    measured_by = None
    if a.rerender:
        old = json.loads((RESULTS / "distributed.json").read_text())
        runs, machine, a = old["runs"], old["machine"], argparse.Namespace(**old["settings"])
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
    rows = [[r["nproc"], f"{r['wall_s']:.1f}", f"{r['train_s']:.1f}", r["steps"], f"{r['perplexity_start']:.4f}",
             f"{r['perplexity_end']:.4f}", f"{r['load_average_1m']:.1f}"] for r in runs]
    ratio_train = med[2]["train_s"] / med[1]["train_s"]
    ratio_wall = med[2]["wall_s"] / med[1]["wall_s"]
    md = (f"# Data-parallel distillation (QAD): 1 process against 2 (gloo)\n\n"
          f"`leanlm {' '.join(COMMAND(a))}` without and with `--nproc 2` (the same global batch of {a.batch} "
          f"sequences of {a.seq_len} tokens per step: {a.batch // 2} per process; the RTN-quantized model distilled from its "
          f"float self), alternated, {a.runs} pair(s).\n\n"
          + (f"Measured by `{measured_by}`.\n\n" if measured_by else "")
          + f"Machine: {cpu}, {machine['cores']} cores, torch {machine['torch']}. **Machine loaded**: other engineers' jobs share "
          f"these cores (load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} at the end), so the absolute times are "
          f"noisy; the lead reruns this on a quiet machine.\n\n"
          + md_table(["processes", "command wall s", "training s", "steps", "perplexity before", "perplexity after",
                      "load average (1 min) after"], rows)
          + f"\n\nMedian training time 2 processes / 1 process: **{ratio_train:.2f}x**; whole command: **{ratio_wall:.2f}x** "
          f"(above 1 means slower; with the machine this loaded the ratio follows the other jobs more than leanlm). "
          f"Both runs train under bfloat16 autocast (the default on this CPU), so the perplexities after training agree to "
          f"bfloat16 rounding, not bit for bit; tests/test_distributed.py checks float32 equality on a tiny model.\n\n"
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
