"""`leanlm qat MODEL --scheme NAME [--teacher MODEL|self] --budget 10m --out DIR` (leanlm/cli.py calls these)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..cli_args import COUNT, COUNT0, NONNEG, POSITIVE, SEED, SEQ_LEN
from ..core.errors import LeanLMError


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


def _pairs(s: str) -> list[tuple[int, int]]:
    try:
        return [tuple(int(x) for x in p.split(":")) for p in s.split(",") if p.strip()]
    except ValueError:
        raise LeanLMError(f"cannot read --hidden-layers {s!r}; write student:teacher pairs like 10:10,20:20") from None


def run_qat(a, load) -> dict:
    from ..distill.kd import DistillConfig
    from ..quantization import average_bits, save_quantized
    from ..quantization.config import QuantConfig
    from .api import QATConfig, check_trainable, default_train_config, parse_budget, qat

    if a.model.endswith(".onnx"):
        raise LeanLMError("QAT trains PyTorch models through fake quantization; an ONNX graph has no such path. "
                          "Pass the Hugging Face model (or a folder written by leanlm quantize) instead")
    out = Path(a.out)
    if out.exists() and not a.overwrite:
        raise LeanLMError(f"output {out} already exists; choose another --out or pass --overwrite")
    budget = parse_budget(a.budget)
    cfg = check_trainable(a.scheme) if a.scheme else None
    if isinstance(cfg, QuantConfig):
        cfg.calib_samples, cfg.calib_seq_len = a.samples, a.calib_seq_len
    qcfg = QATConfig(learn_scales=a.learn_scales, scale_lr_mult=a.scale_lr_mult, train=a.train, compile=a.compile)
    qcfg.check()
    dcfg = None
    if a.teacher:
        dcfg = DistillConfig(temperature=a.temperature, kl_weight=a.kl_weight, lm_weight=a.lm_weight,
                             hidden_layers=_pairs(a.hidden_layers))
        dcfg.check()
    tcfg = default_train_config(lr=a.lr, batch_size=a.batch_size, seq_len=a.seq_len, grad_accum=a.grad_accum, autocast_bf16=a.bf16,
                                eval_every=a.eval_every, eval_windows=a.eval_windows, checkpoint_dir=a.checkpoint_dir,
                                resume=not a.no_resume, seed=a.seed, progress=not a.json, **budget)
    tcfg.check()
    model, tok = load(a.model, a.dtype, a.trust_remote_code)
    if tok is None:
        raise LeanLMError(f"{a.model} has no tokenizer; QAT needs one to cut its training text")
    teacher = teacher_tok = None
    if a.teacher == "self":
        teacher = "self"
    elif a.teacher:
        teacher, teacher_tok = load(a.teacher, a.dtype, a.trust_remote_code)
    res = qat(model, cfg, tokenizer=tok, teacher=teacher, teacher_tokenizer=teacher_tok, config=qcfg, distill=dcfg,
              train_config=tcfg, train_data=a.text, progress=not a.json)
    save_quantized(model, out, tokenizer=tok, overwrite=a.overwrite)
    from ..evaluation.memory import checkpoint_bytes

    tr = res.train
    return {"model": a.model, "scheme": a.scheme, "mode": res.mode, "teacher": a.teacher, "out": str(out),
            "ptq_seconds": res.ptq_seconds, "steps": tr.steps, "tokens": tr.tokens, "seconds": tr.seconds,
            "start_perplexity": tr.start_perplexity, "final_perplexity": tr.final_perplexity, "evals": tr.evals,
            "eval_windows": a.eval_windows, "resumed_from": tr.resumed_from, "checkpoint": tr.checkpoint,
            "average_bits": average_bits(model), "checkpoint_bytes": checkpoint_bytes(out)}


def show_qat(r: dict, console) -> None:
    what = "QAD (teacher: " + ("the float model" if r["teacher"] == "self" else r["teacher"]) + ")" if r["mode"] == "qad" else "QAT"
    console.print(f"leanlm qat {r['model']} --scheme {r['scheme']}: {what}, {r['steps']} steps, {r['tokens']:,} tokens in "
                  f"{r['seconds']:.0f} s (PTQ calibration {r['ptq_seconds']:.0f} s) -> {r['out']}")
    if r["start_perplexity"] is not None:
        console.print(f"held-out perplexity ({r['eval_windows']} x 512 tokens): after PTQ {r['start_perplexity']:.4f} -> "
                      f"after {r['mode'].upper()} {r['final_perplexity']:.4f}")
    console.print(f"average {r['average_bits']:.2f} bits per linear weight; checkpoint {r['checkpoint_bytes'] / 1e9:.3f} GB")
