"""The options of `leanlm qat MODEL --scheme NAME [--teacher MODEL|self] --budget 10m --out DIR` (leanlm/cli.py parses
them into a `leanlm.recipe.QATStep`) and its report."""

from __future__ import annotations

import argparse

from ..cli_args import COUNT, COUNT0, NONNEG, POSITIVE, SEED, SEQ_LEN


def qat_args(sp) -> None:
    sp.add_argument("--scheme", help="quantization preset (e.g. w3a16-gptq, w4a8, nvfp4); omit when MODEL is a folder "
                    "written by leanlm quantize (training continues from it)")
    sp.add_argument("--teacher", help="QAD: 'self' (the float MODEL itself) or a model with the same tokenizer; omit for plain QAT")
    sp.add_argument("--budget", required=True, help="training budget: minutes (10m, 90s, 1h) or tokens (2M, 500k, 100000)")
    sp.add_argument("--out", required=True, help="output folder (leanlm's quantized format, written atomically)")
    sp.add_argument("--learn-scales", action="store_true", help="learn the weight scales too (LSQ)")
    sp.add_argument("--scale-lr-mult", type=POSITIVE, default=10.0, help="learning rate of the scales relative to --lr (default 10)")
    sp.add_argument("--train", choices=["all", "quantized", "scales"], default="all",
                    help="what trains: all parameters (default), only quantized layers, or only the learned scales")
    sp.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="fused torch.compile kernels for the fake quantization (same values, up to 1.5x faster steps; "
                         "default: on where torch.compile works)")
    sp.add_argument("--lm-weight", type=NONNEG, default=0.0, help="QAD: weight of the language-modelling loss next to the KL (default 0)")
    sp.add_argument("--kl-weight", type=NONNEG, default=1.0, help="QAD: weight of the logit KL (default 1)")
    sp.add_argument("--temperature", type=POSITIVE, default=1.0, help="QAD: KL temperature")
    sp.add_argument("--hidden-layers", default="", help="QAD: hidden-state pairs 'student:teacher,...' (e.g. 10:10,20:20)")
    sp.add_argument("--lr", type=POSITIVE, default=1e-3, help="learning rate")
    sp.add_argument("--batch-size", type=COUNT, default=2, help="sequences per batch")
    sp.add_argument("--seq-len", type=SEQ_LEN, default=512, help="tokens per training sequence")
    sp.add_argument("--grad-accum", type=COUNT, default=2, help="batches accumulated per optimizer step (default 2: 2 x 2 x 512 tokens)")
    sp.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                    help="bfloat16 autocast for training (default: on where the CPU/GPU has bf16 matmuls)")
    sp.add_argument("--text", default="wiki", help="training text: wiki (default; its calibration split), news, or a .txt/.jsonl file")
    sp.add_argument("--samples", type=COUNT, default=128, help="PTQ calibration sequences")
    sp.add_argument("--calib-seq-len", type=SEQ_LEN, default=512, help="tokens per PTQ calibration sequence")
    sp.add_argument("--eval-every", type=COUNT0, default=0, help="held-out perplexity every N steps (0: start and end)")
    sp.add_argument("--eval-windows", type=COUNT0, default=10, help="512-token windows for that perplexity")
    sp.add_argument("--checkpoint-dir", help="checkpoints (resume by running the same command again)")
    sp.add_argument("--no-resume", action="store_true", help="ignore checkpoints already in --checkpoint-dir")
    sp.add_argument("--seed", type=SEED, default=0, help="random seed")
    sp.add_argument("--overwrite", action="store_true")


def show_qat(r: dict, console) -> None:
    what = "QAD (teacher: " + ("the float model" if r["teacher"] == "self" else r["teacher"]) + ")" if r["mode"] == "qad" else "QAT"
    console.print(f"leanlm qat {r['model']} --scheme {r['scheme']}: {what}, {r['steps']} steps, {r['tokens']:,} tokens in "
                  f"{r['seconds']:.0f} s (PTQ calibration {r['ptq_seconds']:.0f} s) -> {r['out']}")
    if r["start_perplexity"] is not None:
        console.print(f"held-out perplexity ({r['eval_windows']} x 512 tokens): after PTQ {r['start_perplexity']:.4f} -> "
                      f"after {r['mode'].upper()} {r['final_perplexity']:.4f}")
    console.print(f"average {r['average_bits']:.2f} bits per linear weight; checkpoint {r['checkpoint_bytes'] / 1e9:.3f} GB")
