#!/usr/bin/env python
"""Post-training quantization with NVIDIA Model Optimizer (nvidia-modelopt), on CPU, side by side.

Run it with the interpreter of bench/.venvs/modelopt (made by bench/peers/setup_peers.sh):

    bench/.venvs/modelopt/bin/python bench/peers/modelopt_ptq.py \
        --model /tmp/smollm2-float --scheme w4a16-awq --calib-file calib.json \
        --eval-file eval.json --samples 32 --seq-len 512 --out bench/.work/modelopt-w4a16-awq

It loads the float checkpoint, runs ``modelopt.torch.quantization.quantize`` with one of the tool's
stock configs on `--samples` x `--seq-len` calibration tokens (forward loop, batch 1), then
  1. scores the fake-quantized model *as modelopt simulates it* (its TensorQuantizers on weights and,
     for int8/fp8, on the Linear inputs) on the held-out text (--eval-file), with leanlm's
     perplexity when importable;
  2. folds the weight quantizers into the weights (``mtq.fold_weight``) and multiplies each Linear's
     input pre-quant scale (SmoothQuant / AWQ smoothing) into its weight columns, which gives a
     plain float32 Hugging Face checkpoint in OUT/ with the peer's effective dequantized weights;
     the static activation quantization of int8/fp8 cannot live in it (peer.json says so);
  3. writes OUT/peer.json (tool, versions, scheme, config, calibration seconds, perplexities).

Schemes: int8 = INT8_SMOOTHQUANT_CFG; w4a16-awq = INT4_AWQ_CFG (awq_lite) with the weight block
size changed from 128 to --block-size (default 64: hidden size 576 is not a multiple of 128);
fp8 = FP8_DEFAULT_CFG (per-tensor static e4m3 weights and activations, max calibration).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import copy
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import _ppl  # noqa: E402

SCHEMES = {
    "int8": ("INT8_SMOOTHQUANT_CFG", "SmoothQuant + int8 per-channel weights, static per-tensor int8 activations"),
    "w4a16-awq": ("INT4_AWQ_CFG", "AWQ-lite, int4 (symmetric, max-scaled) weights in blocks of --block-size"),
    "w4a16-rtn": ("INT4_BLOCKWISE_WEIGHT_ONLY_CFG", "int4 (symmetric, max-scaled) weights in blocks of --block-size, round to nearest"),
    "nvfp4": ("NVFP4_DEFAULT_CFG", "nvfp4 weights and dynamic nvfp4 activations (W4A4)"),
    "fp8": ("FP8_DEFAULT_CFG", "fp8 e4m3 per-tensor weights and static per-tensor activations"),
}


def build_config(scheme: str, block_size: int, sq_alpha: float | None):
    import modelopt.torch.quantization as mtq

    name = SCHEMES[scheme][0]
    cfg = copy.deepcopy(getattr(mtq, name))
    changes = []
    if scheme in ("w4a16-awq", "w4a16-rtn"):
        n = 0
        for entry in cfg["quant_cfg"]:
            if entry.get("quantizer_name") == "*weight_quantizer" and "cfg" in entry:
                bs = entry["cfg"].get("block_sizes")
                for key in (-1, "-1"):
                    if bs is not None and key in bs:
                        bs[key] = block_size
                        n += 1
        if n < 1:
            raise SystemExit(f"could not find the weight block size in {name}; modelopt changed its config layout")
        changes.append(f"weight block_sizes[-1]: 128 -> {block_size}")
    if scheme == "int8" and sq_alpha is not None:
        algo = cfg["algorithm"]
        cfg["algorithm"] = {"method": algo if isinstance(algo, str) else algo["method"], "alpha": sq_alpha}
        changes.append(f"smoothquant alpha: {sq_alpha}")
    return name, cfg, changes


def export_state(model) -> tuple[dict, dict]:
    """Fold weight fake-quant into the weights (modelopt's own fold_weight) and bake any input
    pre-quant scale (smoothing) into the weight columns; return the float state dict."""
    import torch
    import modelopt.torch.quantization as mtq

    info = {"linear_modules": 0, "weight_quantized": 0, "input_quantized": 0, "pre_quant_scaled": 0}
    pqs = {}
    for name, mod in model.named_modules():
        wq, iq = getattr(mod, "weight_quantizer", None), getattr(mod, "input_quantizer", None)
        if wq is None or not isinstance(getattr(mod, "weight", None), torch.Tensor):
            continue
        info["linear_modules"] += 1
        info["weight_quantized"] += int(bool(getattr(wq, "is_enabled", False)))
        info["input_quantized"] += int(bool(iq is not None and getattr(iq, "is_enabled", False)))
        s = getattr(iq, "pre_quant_scale", None) if iq is not None else None
        if s is not None:
            pqs[name] = s.detach().float().reshape(-1)
    mtq.fold_weight(model)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for name, s in pqs.items():
            w = state[f"{name}.weight"].float()
            state[f"{name}.weight"] = w * s[None, :].to(w.device)
            info["pre_quant_scaled"] += 1
    return state, info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    _ppl.common_args(ap)
    ap.add_argument("--scheme", required=True, choices=sorted(SCHEMES))
    ap.add_argument("--block-size", type=int, default=64, help="int4 AWQ weight block (group) size")
    ap.add_argument("--sq-alpha", type=float, default=None, help="override SmoothQuant alpha (tool default 1.0)")
    args = ap.parse_args(argv)

    import modelopt
    import modelopt.torch.quantization as mtq
    import torch
    import transformers

    report: dict = {
        "tool": "nvidia-modelopt",
        "version": modelopt.__version__,
        "versions": {"nvidia-modelopt": modelopt.__version__, "transformers": transformers.__version__,
                     "torch": torch.__version__},
        "scheme": args.scheme,
        "scheme_description": SCHEMES[args.scheme][1],
    }
    tok, model, ids, eval_texts = _ppl.prepare(args, report)
    cfg_name, cfg, changes = build_config(args.scheme, args.block_size, args.sq_alpha)
    report["algorithm"] = {
        "config": cfg_name,
        "changes_from_stock_config": changes,
        "algorithm": cfg.get("algorithm"),
        "quant_cfg_enabled": [e for e in cfg["quant_cfg"] if e.get("enable", True) is not False],
        "disabled_patterns": [e["quantizer_name"] for e in cfg["quant_cfg"] if e.get("enable", True) is False
                              and "parent_class" not in e],
    }
    report["calibration"]["forward_batch"] = 1

    def forward_loop(m):
        with torch.no_grad():
            for row in ids:
                m(input_ids=row.unsqueeze(0), use_cache=False)

    model = _ppl.timed_calibration(report, lambda: mtq.quantize(model, cfg, forward_loop)) or model
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            mtq.print_quant_summary(model)
        (Path(args.out) / "quant_summary.txt").write_text(buf.getvalue(), encoding="utf-8")
    except Exception as e:  # summary is a convenience only
        print(f"warning: print_quant_summary failed: {e}", file=sys.stderr)

    state, qinfo = export_state(model)
    act_quant = qinfo["input_quantized"] > 0
    report["quantized_modules"] = qinfo
    _ppl.score_and_export(
        args, report, model, tok, eval_texts, state, act_quant,
        what="modelopt's in-process fake-quant model: quantized weights"
             + (" + static activation quantization" if act_quant else ""),
        note="weights are the peer's dequantized weights (pre-quant smoothing scales multiplied in); activation "
             "quantization is NOT in this checkpoint: use 'perplexity' (in-process) for the peer's full scheme"
             if act_quant else "weight-only scheme: the checkpoint reproduces the peer's model "
                               "(AWQ pre-quant scales multiplied into the weight columns)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
