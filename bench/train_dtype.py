"""Training step time in float32 against bfloat16 autocast (the trainer's default where the hardware has
bf16 matmuls): one distillation step of SmolLM2-135M from a frozen float32 copy of itself (teacher
forward, student forward and backward, logit KL, AdamW step), batch --batch x 512 random tokens,
interleaved fp32, bf16, fp32, ... after one warm-up of each, median of --runs.

    python bench/train_dtype.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F
from common import md_table, setup_threads, write_results

import leanlm
from leanlm.distill.trainer import fast_bf16


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=512)
    a = ap.parse_args()
    setup_threads()
    student, _ = leanlm.load("smollm2-135m")
    teacher, _ = leanlm.load("smollm2-135m")
    teacher.eval()
    ids = torch.randint(0, student.config.vocab_size, (a.batch, a.seq_len), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(student.parameters(), lr=1e-6)

    def step(bf16: bool) -> float:
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            with torch.no_grad():
                t = teacher(ids).logits
            s = student(ids).logits
            loss = F.kl_div(F.log_softmax(s.float(), -1), F.log_softmax(t.float(), -1), log_target=True, reduction="batchmean")
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    step(False), step(True)
    times = {"float32": [], "bf16 autocast": []}
    for _ in range(a.runs):
        times["float32"].append(step(False))
        times["bf16 autocast"].append(step(True))
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["float32"] / med["bf16 autocast"]
    tokens = a.batch * a.seq_len
    rows = [[k, " / ".join(f"{x:.2f}" for x in v), f"{med[k]:.2f}", f"{tokens / med[k]:.0f}"] for k, v in times.items()]
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    md = (f"# Training step: float32 against bfloat16 autocast\n\nOne distillation step of SmolLM2-135M from a frozen float32 "
          f"copy of itself (teacher forward, student forward + backward, logit KL, AdamW), {a.batch} x {a.seq_len} tokens, "
          f"interleaved, median of {a.runs} after a warm-up. Machine: {cpu}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; trainer default here: {'bf16 autocast' if fast_bf16(torch.device('cpu')) else 'float32'}."
          f"\n\n{md_table(['dtype', 'step s (runs)', 'median s', 'tokens/s'], rows)}\n\n**bf16 autocast: {ratio:.2f}x float32** "
          f"(load average {os.getloadavg()[0]:.1f}).")
    write_results("train_dtype", {"times": times, "median": med, "ratio": ratio, "batch": a.batch, "seq_len": a.seq_len}, md)
    print(md)


if __name__ == "__main__":
    main()
