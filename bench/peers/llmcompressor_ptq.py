#!/usr/bin/env python
"""Post-training quantization with llm-compressor (vLLM project), on CPU, for side-by-side comparison.

Run it with the interpreter of bench/.venvs/llmcompressor (made by bench/peers/setup_peers.sh):

    bench/.venvs/llmcompressor/bin/python bench/peers/llmcompressor_ptq.py \
        --model /tmp/smollm2-float --scheme w4a16-gptq --calib-file calib.json \
        --eval-file eval.json --samples 32 --seq-len 512 --out bench/.work/llmc-w4a16-gptq

It loads the float checkpoint, runs llm-compressor's `oneshot` with the scheme's recipe on
`--samples` x `--seq-len` calibration tokens, then
  1. scores the quantized model *as llm-compressor simulates it* (compressed-tensors' fake-quant
     forward: dequantized weights and, for w8a8/fp8, dynamic per-token activation quantization)
     on the held-out text (--eval-file), with leanlm's perplexity when importable;
  2. writes OUT/ as a plain float32 Hugging Face checkpoint whose Linear weights are the peer's
     quantized-then-dequantized weights (activation quantization cannot live in a float checkpoint:
     peer.json says so, and the in-process perplexity above is the one that includes it);
  3. writes OUT/peer.json (tool, versions, scheme, recipe, calibration seconds, perplexities).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import _ppl  # noqa: E402

SCHEMES = {
    "w4a16-gptq": "GPTQ, symmetric int4 weights, group 64, lm_head kept in float",
    "w4a16-rtn": "QuantizationModifier only (round-to-nearest), symmetric int4, group 64",
    "w4a16-awq": "AWQModifier + QuantizationModifier, symmetric int4, group 64",
    "w4a16-awq-asym": "AWQModifier + QuantizationModifier, asymmetric int4, group 64 (llm-compressor's usual AWQ)",
    "w8a8-smoothquant": "SmoothQuant 0.8 + GPTQ W8A8 (int8 per-channel weights, dynamic per-token int8 activations)",
    "w8a8-smoothquant-rtn": "SmoothQuant 0.8 + QuantizationModifier W8A8 (RTN weights)",
    "fp8": "QuantizationModifier FP8_DYNAMIC (fp8 e4m3 per-channel weights, dynamic per-token fp8 activations)",
}


def _int4_group(group_size: int, symmetric: bool) -> dict:
    return {
        "group_0": {
            "targets": ["Linear"],
            "weights": {
                "num_bits": 4,
                "type": "int",
                "symmetric": symmetric,
                "strategy": "group",
                "group_size": group_size,
                "dynamic": False,
            },
        }
    }


def build_recipe(scheme: str, group_size: int, smoothing: float, n_grid: int = 20, actorder: str = "default"):
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    ignore = ["lm_head"]
    gptq_kw = {} if actorder == "default" else {"actorder": None if actorder == "none" else actorder}
    if scheme == "w4a16-gptq":
        return [GPTQModifier(config_groups=_int4_group(group_size, True), ignore=ignore, **gptq_kw)]
    if scheme == "w4a16-rtn":
        return [QuantizationModifier(config_groups=_int4_group(group_size, True), ignore=ignore)]
    if scheme in ("w4a16-awq", "w4a16-awq-asym"):
        from llmcompressor.modifiers.transform import AWQModifier

        sym = scheme == "w4a16-awq"
        return [AWQModifier(n_grid=n_grid), QuantizationModifier(config_groups=_int4_group(group_size, sym), ignore=ignore)]
    if scheme in ("w8a8-smoothquant", "w8a8-smoothquant-rtn"):
        from llmcompressor.modifiers.transform import SmoothQuantModifier

        if scheme == "w8a8-smoothquant":
            q = GPTQModifier(targets="Linear", scheme="W8A8", ignore=ignore, **gptq_kw)
        else:
            q = QuantizationModifier(targets="Linear", scheme="W8A8", ignore=ignore)
        return [SmoothQuantModifier(smoothing_strength=smoothing), q]
    if scheme == "fp8":
        return [QuantizationModifier(targets="Linear", scheme="FP8_DYNAMIC", ignore=ignore)]
    raise SystemExit(f"unknown scheme {scheme!r}; choose from {', '.join(SCHEMES)}")


def recipe_text(recipe) -> str:
    parts = []
    for m in recipe:
        try:
            d = m.model_dump(exclude_unset=True)
        except Exception:
            d = repr(m)
        parts.append(f"{type(m).__name__}: {d}")
    return "\n".join(parts)


def cpu_workarounds(enable: bool) -> list[str]:
    """llm-compressor 0.14.0.1's AWQModifier pins its cached calibration activations with
    Tensor.pin_memory() (only to speed up host->GPU copies); on a machine without an accelerator
    torch raises "RuntimeError: Cannot access accelerator device when none is available." Pinning
    changes no value, so without an accelerator IntermediatesCache.pin_memory is made a no-op."""
    import torch

    if not enable or torch.accelerator.is_available():
        return []
    try:
        from llmcompressor.pipelines.cache import IntermediatesCache
    except ImportError:
        return []
    if not hasattr(IntermediatesCache, "pin_memory"):
        return []
    IntermediatesCache.pin_memory = lambda self, *a, **k: None
    return ["llmcompressor.pipelines.cache.IntermediatesCache.pin_memory -> no-op (no accelerator: "
            "pin_memory() raises 'Cannot access accelerator device when none is available.'; "
            "pinning only speeds host->device copies and changes no value)"]


def dequantized_state(model) -> tuple[dict, dict]:
    """name -> float tensor for every parameter/buffer of the model, with each quantized Linear's
    weight replaced by compressed-tensors' own fake-quantized (quantize -> dequantize) weight."""
    import torch
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize

    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    info = {"weight_quantized_modules": 0, "input_quantized_modules": 0, "changed_weights": 0}
    with torch.no_grad():
        for name, mod in model.named_modules():
            scheme = getattr(mod, "quantization_scheme", None)
            if scheme is None or getattr(mod, "quantization_status", None) is None:
                continue
            if scheme.input_activations is not None:
                info["input_quantized_modules"] += 1
            if scheme.weights is None:
                continue
            w = mod.weight.data
            q = forward_quantize(mod, w, "weight", scheme.weights).to(torch.float32)
            state[f"{name}.weight"] = q
            info["weight_quantized_modules"] += 1
            info["changed_weights"] += int(not torch.equal(q, w.float()))
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
    ap.add_argument("--group-size", type=int, default=64, help="int4 group size (576 is not a multiple of 128)")
    ap.add_argument("--smoothing", type=float, default=0.8, help="SmoothQuant strength for w8a8 schemes")
    ap.add_argument("--n-grid", type=int, default=20,
                    help="AWQ grid points per mapping (tool default 20; AWQ on CPU costs about n_grid forward "
                         "passes of each layer over the calibration set)")
    ap.add_argument("--gptq-actorder", choices=("default", "static", "weight", "none"), default="default",
                    help="GPTQ activation ordering (default: the tool's own default, 'static')")
    ap.add_argument("--eval-float", action="store_true", help="also score the float model before quantizing")
    ap.add_argument("--eval-export", choices=("auto", "yes", "no"), default="auto",
                    help="reload and score the exported float checkpoint (auto: only when activations are "
                         "quantized, i.e. when it differs from the in-process figure)")
    ap.add_argument("--batch-size", type=int, default=4, help="evaluation batch (windows)")
    ap.add_argument("--no-cpu-workaround", action="store_true",
                    help="do not neutralise pin_memory() on CPU (AWQ then fails on a machine without a GPU)")
    args = ap.parse_args(argv)

    _ppl.setup_threads()
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import compressed_tensors
    import llmcompressor
    from llmcompressor import oneshot

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    calib_texts = _ppl.load_texts(args.calib_file, "calibration")
    eval_texts = _ppl.load_texts(args.eval_file, "evaluation") if args.eval_file else None

    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model.eval()

    report: dict = {
        "tool": "llm-compressor",
        "version": llmcompressor.__version__,
        "versions": {"llmcompressor": llmcompressor.__version__,
                     "compressed-tensors": compressed_tensors.__version__,
                     "transformers": transformers.__version__, "torch": torch.__version__,
                     "leanlm": _ppl.pkg_version("leanlm")},
        "scheme": args.scheme,
        "scheme_description": SCHEMES[args.scheme],
        "model": str(Path(args.model).resolve()),
        "machine": _ppl.machine_info(),
        "cpu_workarounds": cpu_workarounds(not args.no_cpu_workaround),
    }
    if eval_texts is not None and args.eval_float:
        report["float_eval"] = _ppl.evaluate(model, tok, eval_texts, batch_size=args.batch_size)
        print(f"float perplexity {report['float_eval']['perplexity']:.4f}", flush=True)

    ids = _ppl.calibration_ids(tok, calib_texts, args.samples, args.seq_len)
    from torch.utils.data import DataLoader

    rows = [{"input_ids": r.unsqueeze(0), "attention_mask": torch.ones_like(r).unsqueeze(0)} for r in ids]
    loader = DataLoader(rows, batch_size=None, shuffle=False)  # each item is already a batch of 1

    recipe = build_recipe(args.scheme, args.group_size, args.smoothing, args.n_grid, args.gptq_actorder)
    report["algorithm"] = {
        "recipe": recipe_text(recipe),
        "group_size": args.group_size if args.scheme.startswith("w4a16") else None,
        "smoothing_strength": args.smoothing if args.scheme.startswith("w8a8") else None,
        "awq_n_grid": args.n_grid if "awq" in args.scheme else None,
        "ignore": ["lm_head"],
        "pipeline": "llm-compressor default for the recipe (sequential when calibration data is needed, else datafree)",
    }
    report["calibration"] = {"samples": args.samples, "seq_len": args.seq_len, "tokens": int(ids.numel()),
                             "source": args.calib_file, "texts_sha256": _ppl.text_digest(calib_texts),
                             "cut": "documents joined with a blank line, tokenized once, first samples*seq_len "
                                    "tokens in consecutive rows"}

    load_before = os.getloadavg()
    t0 = time.perf_counter()
    model = oneshot(model=model, processor=tok, dataset=loader, recipe=recipe,
                    num_calibration_samples=args.samples, max_seq_length=args.seq_len,
                    shuffle_calibration_samples=False, log_dir=None) or model
    calib_s = time.perf_counter() - t0
    report["calibration_wall_seconds"] = round(calib_s, 2)
    report["calib_seconds"] = report["calibration_wall_seconds"]  # alias read by bench/ptq.py
    # other processes on the machine inflate wall time: keep the 1-minute load average around it
    report["load_average_1min"] = {"before_calibration": round(load_before[0], 2),
                                   "after_calibration": round(os.getloadavg()[0], 2)}
    print(f"oneshot done in {calib_s:.1f}s", flush=True)

    state, qinfo = dequantized_state(model)
    act_quant = qinfo["input_quantized_modules"] > 0
    report["quantized_modules"] = qinfo

    if eval_texts is not None:
        report["eval"] = _ppl.evaluate(model, tok, eval_texts, batch_size=args.batch_size)
        report["eval"]["what"] = ("llm-compressor's in-process fake-quant model: dequantized weights"
                                  + (" + dynamic activation quantization" if act_quant else ""))
        report["perplexity"] = report["eval"]["perplexity"]
        print(f"{args.scheme}: perplexity {report['perplexity']:.4f}", flush=True)

    report["export"] = _ppl.save_float_checkpoint(args.model, out, state, tok)
    report["export"]["activation_quant_in_checkpoint"] = False
    report["export"]["note"] = (
        "weights are the peer's dequantized weights; activation quantization is NOT in this checkpoint, "
        "use 'perplexity' (in-process) for the peer's full scheme" if act_quant else
        "weight-only scheme: the checkpoint reproduces the peer's model")
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
