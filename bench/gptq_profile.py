"""Where leanlm's GPTQ calibration time goes on SmolLM2-135M (w4a16-gptq, 32 x 512 tokens): process CPU
time of each part with one thread, so the split does not depend on the machine's load.

    python bench/gptq_profile.py
"""

from __future__ import annotations

import time

import torch
from common import md_table, write_results

import leanlm
import leanlm.core.calibrate as engine
import leanlm.quantization.calibrate as cal
from leanlm.core.data import calibration_batches
from leanlm.quantization import algorithms as alg
from leanlm.quantization import preset

PARTS = [(alg, "gptq", "GPTQ solves"), (alg, "quant_error", "error statistics"), (alg.HessianAccumulator, "add", "Hessians"),
         (cal, "linear_groups", "tracing groups"), (engine, "capture_layer_inputs", "capturing inputs"),
         (cal, "_gptq_in_forward", "layer forwards incl. Hessians, solves, statistics")]


def main() -> None:
    torch.set_num_threads(1)
    model, tok = leanlm.load("smollm2-135m")
    ids = calibration_batches(tok, 32, 512)
    cpu: dict[str, float] = {}
    for owner, name, label in PARTS:
        f = getattr(owner, name)

        def timed(*a, _f=f, _label=label, **k):
            t = time.process_time()
            try:
                return _f(*a, **k)
            finally:
                cpu[_label] = cpu.get(_label, 0.0) + time.process_time() - t

        setattr(owner, name, timed)
    t0 = time.process_time()
    leanlm.quantize(model, preset("w4a16-gptq"), ids, progress=False)
    total = time.process_time() - t0
    rows = [[k, f"{v:.1f}"] for k, v in cpu.items()] + [["total", f"{total:.1f}"]]
    md = "# GPTQ CPU time by part, SmolLM2-135M, w4a16-gptq, 32 x 512 tokens, 1 thread\n\n" + md_table(["part", "CPU s"], rows)
    print(write_results("gptq_profile", {"cpu_seconds": cpu, "total": total}, md).read_text())


if __name__ == "__main__":
    main()
