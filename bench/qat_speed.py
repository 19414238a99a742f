"""Seconds per QAT training step on SmolLM2-135M: eager fake quantization against the fused
(torch.compile) one, side by side in one process (PROTOCOL.md: interleaved, median after a warm-up).

A step is what the trainer does per batch without the optimizer: forward of the fake-quantized
model on 2 x 512 tokens under the trainer's autocast, LM loss, backward. Both copies start from the
same PTQ model (RTN calibration for every scheme here: only the step time is measured), prepared
with learned scales; the float32 model's step is the reference.

    python bench/qat_speed.py                     # nvfp4, w4a8, w4a16-rtn; 5 runs
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import time

import torch
from common import md_table, setup_threads, write_results

import leanlm
from leanlm.core.data import calibration_batches, calibration_texts, join_and_tokenize
from leanlm.distill.trainer import fast_bf16
from leanlm.qat import QATConfig, prepare_qat
from leanlm.quantization.config import preset


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--schemes", default="nvfp4,w4a8,w4a16-rtn")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--name", default="qat_speed")
    a = ap.parse_args()
    setup_threads()
    model, tok = leanlm.load("smollm2-135m")
    ids = join_and_tokenize(tok, calibration_texts("wiki"))
    x = ids[: a.batch_size * a.seq_len].reshape(a.batch_size, a.seq_len)
    bf16 = fast_bf16(torch.device("cpu"))

    def step(m) -> float:
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = m(input_ids=x, labels=x).loss
        loss.backward()
        m.zero_grad(set_to_none=True)
        return time.perf_counter() - t

    def median_steps(models: dict) -> dict:
        for m in models.values():
            step(m)  # warm-up (compiles the fused kernels)
        times = {k: [] for k in models}
        for _ in range(a.runs):
            for k, m in models.items():  # interleaved A B C A B C ...
                times[k].append(step(m))
        return {k: statistics.median(v) for k, v in times.items()}

    rows, data = [], {"runs": a.runs, "tokens_per_step": a.batch_size * a.seq_len, "bf16_autocast": bf16, "schemes": {}}
    calib = calibration_batches(tok, 4, 512)
    for scheme in a.schemes.split(","):
        cfg = preset(scheme)
        cfg.algorithms = []   # step time only: RTN weights (no GPTQ/AWQ/SmoothQuant), the same formats
        start = copy.deepcopy(model)
        leanlm.quantize(start, cfg, calib, progress=False)
        eager, fused = copy.deepcopy(start), start
        prepare_qat(eager, QATConfig(learn_scales=True, compile=False))
        prepare_qat(fused, QATConfig(learn_scales=True, compile=True))
        t = median_steps({"float32 model": model, "eager": eager, "fused": fused})
        data["schemes"][scheme] = t
        rows.append([scheme, f"{t['float32 model']:.2f}", f"{t['eager']:.2f}", f"{t['fused']:.2f}",
                     f"{t['eager'] / t['fused']:.2f}x", f"{t['fused'] / t['float32 model']:.2f}x"])
        print(scheme, {k: round(v, 3) for k, v in t.items()}, flush=True)
        del eager, fused, start
    table = md_table(["scheme", "float32 model s/step", "eager fake quant s/step", "fused fake quant s/step",
                      "fused speed-up", "fused vs float32 model"], rows)
    md = (f"# QAT step time: eager vs fused (torch.compile) fake quantization, SmolLM2-135M\n\n"
          f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), load average at the end {os.getloadavg()[0]:.1f}. One step = forward "
          f"and backward of {a.batch_size} x {a.seq_len} tokens with the LM loss, "
          f"{'bf16 autocast' if bf16 else 'float32'}, learned (LSQ) scales, no optimizer; median of {a.runs} interleaved "
          f"runs after a warm-up (the warm-up compiles). RTN weights for every scheme (only time is measured).\n\n{table}\n")
    write_results(a.name, data, md)


if __name__ == "__main__":
    main()
