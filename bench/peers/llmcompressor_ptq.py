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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import _ppl  # noqa: E402

SCHEMES = {
    "w4a16-gptq": "GPTQ, symmetric int4 weights, group 64, lm_head kept in float",
    "w4a16-rtn": "QuantizationModifier only (round-to-nearest), symmetric int4, group 64",
    "w4a16-awq": "AWQModifier + QuantizationModifier, symmetric int4, group 64",
    "w4a16-autoround": "AutoRoundModifier (auto-round's signed-gradient rounding and clipping), symmetric int4, group 64",
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


def build_recipe(scheme: str, group_size: int, smoothing: float, n_grid: int = 20, actorder: str = "default",
                 ar_iters: int = 200, ar_batch: int = 8, ar_compile: bool = False):
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    ignore = ["lm_head"]
    gptq_kw = {} if actorder == "default" else {"actorder": None if actorder == "none" else actorder}
    if scheme == "w4a16-gptq":
        return [GPTQModifier(config_groups=_int4_group(group_size, True), ignore=ignore, **gptq_kw)]
    if scheme == "w4a16-rtn":
        return [QuantizationModifier(config_groups=_int4_group(group_size, True), ignore=ignore)]
    if scheme == "w4a16-autoround":
        from llmcompressor.modifiers.autoround import AutoRoundModifier

        return [AutoRoundModifier(config_groups=_int4_group(group_size, True), ignore=ignore, iters=ar_iters,
                                  batch_size=ar_batch, enable_torch_compile=ar_compile)]
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
    _ppl.common_args(ap)
    ap.add_argument("--scheme", required=True, choices=sorted(SCHEMES))
    ap.add_argument("--group-size", type=int, default=64, help="int4 group size (576 is not a multiple of 128)")
    ap.add_argument("--smoothing", type=float, default=0.8, help="SmoothQuant strength for w8a8 schemes")
    ap.add_argument("--n-grid", type=int, default=20,
                    help="AWQ grid points per mapping (tool default 20; AWQ on CPU costs about n_grid forward "
                         "passes of each layer over the calibration set)")
    ap.add_argument("--gptq-actorder", choices=("default", "static", "weight", "none"), default="default",
                    help="GPTQ activation ordering (default: the tool's own default, 'static')")
    ap.add_argument("--ar-iters", type=int, default=200, help="AutoRound iterations per block (tool default 200)")
    ap.add_argument("--ar-batch", type=int, default=8, help="AutoRound tuning batch (tool default 8)")
    ap.add_argument("--ar-seed", type=int, default=None,
                    help="AutoRound's random seed (the tool's default 42; the modifier does not expose it, so it is passed to "
                         "auto_round's AutoRound by wrapping the class the modifier builds)")
    ap.add_argument("--ar-compile", action="store_true",
                    help="AutoRound: torch.compile the tuning loop (the tool's default; off here: compiling on a 2-core CPU "
                         "costs more than it saves for a 135M model)")
    ap.add_argument("--no-cpu-workaround", action="store_true",
                    help="do not neutralise pin_memory() on CPU (AWQ then fails on a machine without a GPU)")
    args = ap.parse_args(argv)

    import compressed_tensors
    import llmcompressor
    import torch
    import transformers
    from llmcompressor import oneshot
    from torch.utils.data import DataLoader

    report: dict = {
        "tool": "llm-compressor",
        "version": llmcompressor.__version__,
        "versions": {"llmcompressor": llmcompressor.__version__,
                     "compressed-tensors": compressed_tensors.__version__,
                     "transformers": transformers.__version__, "torch": torch.__version__},
        "scheme": args.scheme,
        "scheme_description": SCHEMES[args.scheme],
        "cpu_workarounds": cpu_workarounds(not args.no_cpu_workaround),
    }
    tok, model, ids, eval_texts = _ppl.prepare(args, report)
    rows = [{"input_ids": r.unsqueeze(0), "attention_mask": torch.ones_like(r).unsqueeze(0)} for r in ids]
    loader = DataLoader(rows, batch_size=None, shuffle=False)  # each item is already a batch of 1

    if args.ar_seed is not None:
        import functools

        import llmcompressor.modifiers.autoround.base as ar_base

        ar_base.AutoRound = functools.partial(ar_base.AutoRound, seed=args.ar_seed)
    recipe = build_recipe(args.scheme, args.group_size, args.smoothing, args.n_grid, args.gptq_actorder,
                          args.ar_iters, args.ar_batch, args.ar_compile)
    report["algorithm"] = {
        "recipe": recipe_text(recipe),
        "group_size": args.group_size if args.scheme.startswith("w4a16") else None,
        "smoothing_strength": args.smoothing if args.scheme.startswith("w8a8") else None,
        "awq_n_grid": args.n_grid if "awq" in args.scheme else None,
        "autoround": {"iters": args.ar_iters, "batch_size": args.ar_batch, "torch_compile": args.ar_compile,
                      "seed": 42 if args.ar_seed is None else args.ar_seed}
        if "autoround" in args.scheme else None,
        "ignore": ["lm_head"],
        "pipeline": "llm-compressor default for the recipe (sequential when calibration data is needed, else datafree)",
    }
    model = _ppl.timed_calibration(report, lambda: oneshot(
        model=model, processor=tok, dataset=loader, recipe=recipe, num_calibration_samples=args.samples,
        max_seq_length=args.seq_len, shuffle_calibration_samples=False, log_dir=None)) or model

    # auto-round trains in bfloat16 on CPUs (its amp default) and leaves some modules' weights and scales in bfloat16;
    # every value it produced is exact in float32, so the model is scored in float32 like every other row.
    dtypes = sorted({str(p.dtype) for p in model.parameters()})
    if dtypes != ["torch.float32"]:
        report["cast_to_float32_for_scoring"] = {"dtypes_after_calibration": dtypes}
        model = model.float()
    state, qinfo = dequantized_state(model)
    act_quant = qinfo["input_quantized_modules"] > 0
    report["quantized_modules"] = qinfo
    _ppl.score_and_export(
        args, report, model, tok, eval_texts, state, act_quant,
        what="llm-compressor's in-process fake-quant model: dequantized weights"
             + (" + dynamic activation quantization" if act_quant else ""),
        note="weights are the peer's dequantized weights; activation quantization is NOT in this checkpoint, "
             "use 'perplexity' (in-process) for the peer's full scheme" if act_quant else
             "weight-only scheme: the checkpoint reproduces the peer's model")
    return 0


if __name__ == "__main__":
    sys.exit(main())
