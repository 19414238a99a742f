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
import copy
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import _ppl  # noqa: E402

SCHEMES = {
    "int8": ("INT8_SMOOTHQUANT_CFG", "SmoothQuant + int8 per-channel weights, static per-tensor int8 activations"),
    "w4a16-awq": ("INT4_AWQ_CFG", "AWQ-lite, int4 (symmetric, max-scaled) weights in blocks of --block-size"),
    "fp8": ("FP8_DEFAULT_CFG", "fp8 e4m3 per-tensor weights and static per-tensor activations"),
}


def build_config(scheme: str, block_size: int, sq_alpha: float | None):
    import modelopt.torch.quantization as mtq

    name = SCHEMES[scheme][0]
    cfg = copy.deepcopy(getattr(mtq, name))
    changes = []
    if scheme == "w4a16-awq":
        n = 0
        for entry in cfg["quant_cfg"]:
            if entry.get("quantizer_name") == "*weight_quantizer" and "cfg" in entry:
                bs = entry["cfg"].get("block_sizes")
                for key in (-1, "-1"):
                    if bs is not None and key in bs:
                        bs[key] = block_size
                        n += 1
        if n != 1:
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
    ap.add_argument("--model", required=True, help="float HF checkpoint folder")
    ap.add_argument("--scheme", required=True, choices=sorted(SCHEMES))
    ap.add_argument("--calib-file", required=True, help="JSON list of calibration strings (or 'wiki'/'news' via leanlm)")
    ap.add_argument("--eval-file", default=None, help="JSON list of held-out strings (or 'wiki'/'news' via leanlm); "
                    "omit to skip perplexity")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--out", required=True)
    ap.add_argument("--block-size", type=int, default=64, help="int4 AWQ weight block (group) size")
    ap.add_argument("--sq-alpha", type=float, default=None, help="override SmoothQuant alpha (tool default 1.0)")
    ap.add_argument("--eval-float", action="store_true", help="also score the float model before quantizing")
    ap.add_argument("--eval-export", choices=("auto", "yes", "no"), default="auto",
                    help="reload and score the exported float checkpoint (auto: only when activations are quantized)")
    ap.add_argument("--batch-size", type=int, default=4, help="evaluation batch (windows)")
    args = ap.parse_args(argv)

    _ppl.setup_threads()
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import modelopt
    import modelopt.torch.quantization as mtq

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    calib_texts = _ppl.load_texts(args.calib_file, "calibration")
    eval_texts = _ppl.load_texts(args.eval_file, "evaluation") if args.eval_file else None

    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model.eval()

    report: dict = {
        "tool": "nvidia-modelopt",
        "version": modelopt.__version__,
        "versions": {"nvidia-modelopt": modelopt.__version__, "transformers": transformers.__version__,
                     "torch": torch.__version__, "leanlm": _ppl.pkg_version("leanlm")},
        "scheme": args.scheme,
        "scheme_description": SCHEMES[args.scheme][1],
        "model": str(Path(args.model).resolve()),
        "machine": _ppl.machine_info(),
    }
    if eval_texts is not None and args.eval_float:
        report["float_eval"] = _ppl.evaluate(model, tok, eval_texts, batch_size=args.batch_size)
        print(f"float perplexity {report['float_eval']['perplexity']:.4f}", flush=True)

    ids = _ppl.calibration_ids(tok, calib_texts, args.samples, args.seq_len)
    cfg_name, cfg, changes = build_config(args.scheme, args.block_size, args.sq_alpha)
    report["algorithm"] = {
        "config": cfg_name,
        "changes_from_stock_config": changes,
        "algorithm": cfg.get("algorithm"),
        "quant_cfg_enabled": [e for e in cfg["quant_cfg"] if e.get("enable", True) is not False],
        "disabled_patterns": [e["quantizer_name"] for e in cfg["quant_cfg"] if e.get("enable", True) is False
                              and "parent_class" not in e],
    }
    report["calibration"] = {"samples": args.samples, "seq_len": args.seq_len, "tokens": int(ids.numel()),
                             "source": args.calib_file, "texts_sha256": _ppl.text_digest(calib_texts),
                             "cut": "documents joined with a blank line, tokenized once, first samples*seq_len "
                                    "tokens in consecutive rows", "forward_batch": 1}

    def forward_loop(m):
        with torch.no_grad():
            for row in ids:
                m(input_ids=row.unsqueeze(0), use_cache=False)

    load_before = os.getloadavg()
    t0 = time.perf_counter()
    model = mtq.quantize(model, cfg, forward_loop) or model
    calib_s = time.perf_counter() - t0
    report["calibration_wall_seconds"] = round(calib_s, 2)
    report["calib_seconds"] = report["calibration_wall_seconds"]  # alias read by bench/ptq.py
    # other processes on the machine inflate wall time: keep the 1-minute load average around it
    report["load_average_1min"] = {"before_calibration": round(load_before[0], 2),
                                   "after_calibration": round(os.getloadavg()[0], 2)}
    print(f"mtq.quantize done in {calib_s:.1f}s", flush=True)
    try:
        import io
        import contextlib

        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            mtq.print_quant_summary(model)
        (out / "quant_summary.txt").write_text(buf.getvalue(), encoding="utf-8")
    except Exception as e:  # summary is a convenience only
        print(f"warning: print_quant_summary failed: {e}", file=sys.stderr)

    if eval_texts is not None:
        report["eval"] = _ppl.evaluate(model, tok, eval_texts, batch_size=args.batch_size)
        print(f"{args.scheme}: perplexity {report['eval']['perplexity']:.4f}", flush=True)
        report["perplexity"] = report["eval"]["perplexity"]

    state, qinfo = export_state(model)
    act_quant = qinfo["input_quantized"] > 0
    report["quantized_modules"] = qinfo
    if "eval" in report:
        report["eval"]["what"] = ("modelopt's in-process fake-quant model: quantized weights"
                                  + (" + static activation quantization" if act_quant else ""))
    report["export"] = _ppl.save_float_checkpoint(args.model, out, state, tok)
    report["export"]["activation_quant_in_checkpoint"] = False
    report["export"]["note"] = (
        "weights are the peer's dequantized weights (pre-quant smoothing scales multiplied in); activation "
        "quantization is NOT in this checkpoint: use 'perplexity' (in-process) for the peer's full scheme"
        if act_quant else "weight-only scheme: the checkpoint reproduces the peer's model "
                          "(AWQ pre-quant scales multiplied into the weight columns)")
    del model
    want_export_eval = args.eval_export == "yes" or (args.eval_export == "auto" and act_quant)
    if eval_texts is not None and want_export_eval:
        m2 = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        report["export"]["eval"] = _ppl.evaluate(m2, tok, eval_texts, batch_size=args.batch_size)
        report["perplexity_exported_checkpoint"] = report["export"]["eval"]["perplexity"]
        print(f"exported checkpoint (weights only): perplexity {report['perplexity_exported_checkpoint']:.4f}")
    report["peak_rss_mib"] = _ppl.peak_rss_mib()
    _ppl.write_json(out / "peer.json", report)
    print(f"wrote {out}/peer.json", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
