"""Hugging Face checkpoint in the compressed-tensors format (loaded natively by vLLM and by
transformers with the `compressed-tensors` package).

leanlm's quantized weights are exported with their exact scales and zero points: a fresh
transformers model gets compressed-tensors quantization schemes (``apply_quantization_config``),
its scale/zero-point parameters are set to leanlm's, its weights to leanlm's folded weights (which
lie exactly on the grid), and compressed-tensors itself compresses (packs) them. So the codes a
consumer decodes are exactly leanlm's codes.

What it can represent (anything else is an error listing this):

* weights: int8 or int4, symmetric or asymmetric, per channel or per group (``int8``,
  ``int4_g64``, ``int4_g32_asym``, ...); FP8 E4M3 per channel or per tensor.
* activations: none (weight-only), int8 per token dynamic, int8 per tensor static, FP8 E4M3 per
  token dynamic, FP8 E4M3 per tensor static.

One convention differs in the consumer, not in the file: compressed-tensors computes a dynamic
symmetric int8 activation scale as ``amax / 127.5`` (half the int8 range 255), leanlm and vLLM's
int8 kernels as ``amax / 127``. Weights and FP8 activations match leanlm exactly.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

from ..core.errors import LeanLMError
from ..core.io import atomic_dir
from ..quantization.formats import QFormat
from .common import QuantLinear, is_leanlm_quantized, plain_model, quantized_linears, save_tokenizer

SUPPORTED = ("weights: int8 | int4 (symmetric or asymmetric, per channel or per group, e.g. int8, int4_g64, int4_g32_asym), "
             "fp8_e4m3 per channel or per tensor; activations: none, int8 per token dynamic, int8 per tensor static, "
             "fp8_e4m3 per token dynamic, fp8_e4m3 per tensor static (presets w8a16, w4a16-*, w8a8, w8a8-smoothquant, "
             "w8a8-static, w4a8, fp8)")


def _unsupported(what: str) -> LeanLMError:
    return LeanLMError(f"compressed-tensors export cannot represent {what}; it takes {SUPPORTED}")


def weight_args(fmt: QFormat) -> dict:
    """compressed-tensors QuantizationArgs (as a dict) for a leanlm weight format."""
    if fmt.kind == "int" and fmt.bits in (4, 8) and fmt.granularity in ("channel", "group"):
        a = {"num_bits": fmt.bits, "type": "int", "symmetric": fmt.symmetric, "strategy": fmt.granularity, "dynamic": False}
        if fmt.granularity == "group":
            a["group_size"] = fmt.group_size
        return a
    if fmt.kind == "fp8_e4m3" and fmt.granularity in ("channel", "tensor"):
        return {"num_bits": 8, "type": "float", "symmetric": True, "strategy": fmt.granularity, "dynamic": False}
    return {}


def input_args(fmt: QFormat, dynamic: bool) -> dict:
    """compressed-tensors QuantizationArgs (as a dict) for a leanlm activation format."""
    typ = {"int": "int", "fp8_e4m3": "float"}.get(fmt.kind)
    if typ is None or fmt.bits != 8 or not fmt.symmetric:
        return {}
    if dynamic and fmt.granularity == "token":
        return {"num_bits": 8, "type": typ, "symmetric": True, "strategy": "token", "dynamic": True}
    if not dynamic and fmt.granularity == "tensor":
        return {"num_bits": 8, "type": typ, "symmetric": True, "strategy": "tensor", "dynamic": False}
    return {}


def _scheme(ql: QuantLinear) -> tuple:
    w = weight_args(ql.fmt)
    if not w:
        raise _unsupported(f"{ql.name}'s weight format {ql.fmt.name}")
    a = None
    if ql.act_fmt is not None:
        a = input_args(ql.act_fmt, ql.act_dynamic)
        if not a:
            raise _unsupported(f"{ql.name}'s activation format {ql.act_fmt.name} ({'dynamic' if ql.act_dynamic else 'static'})")
        if not ql.act_dynamic and ql.act_amax is None:
            raise LeanLMError(f"{ql.name}: the static activation quantizer has no calibrated range; finish leanlm.quantize before exporting")
    return tuple(sorted(w.items())), (tuple(sorted(a.items())) if a else None)


def quantization_config(model: nn.Module, qls: dict[str, QuantLinear]) -> dict:
    """The compressed-tensors `quantization_config` (before compression) describing `qls`."""
    groups: dict[tuple, list[str]] = defaultdict(list)
    for name, ql in qls.items():
        groups[_scheme(ql)].append(name)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    ignore = [n for n in linears if n not in qls]
    config_groups = {}
    for i, ((w, a), names) in enumerate(groups.items()):
        # One scheme for every quantized Linear: the usual "Linear" target; otherwise exact names.
        targets = ["Linear"] if len(groups) == 1 else [f"re:^{n.replace('.', '[.]')}$" for n in names]
        config_groups[f"group_{i}"] = {"targets": targets, "weights": dict(w), "input_activations": dict(a) if a else None}
    return {"config_groups": config_groups, "ignore": ignore, "quant_method": "compressed-tensors", "quantization_status": "frozen"}


@torch.no_grad()
def _set_qparams(module: nn.Module, ql: QuantLinear) -> None:
    """Copy leanlm's scales/zero points into the parameters compressed-tensors registered."""
    out_features = ql.weight.shape[0]
    scale = ql.qparams.scale
    if ql.fmt.granularity == "group":
        scale = scale.reshape(out_features, -1)
    elif ql.fmt.granularity == "channel":
        scale = scale.reshape(out_features, 1)
    else:
        scale = scale.reshape(1)
    p = module.weight_scale
    p.data = scale.to(p.dtype).reshape(p.shape).clone()
    zp = getattr(module, "weight_zero_point", None)
    if zp is not None:
        if ql.qparams.zero is not None:
            # leanlm asymmetric codes are 0..2**b-1 with zero in that range; compressed-tensors
            # codes are -2**(b-1)..2**(b-1)-1: both shift by 2**(b-1), the difference is unchanged.
            z = ql.qparams.zero.reshape(scale.shape) - 2 ** (ql.fmt.bits - 1)
            zp.data = z.round().to(zp.dtype).reshape(zp.shape)
        else:
            zp.data.zero_()
    if ql.act_fmt is not None and not ql.act_dynamic:
        s = (ql.act_amax / ql.act_fmt.qmax).clamp(min=torch.finfo(torch.float32).tiny)  # leanlm: scale = amax / qmax
        module.input_scale.data = s.to(module.input_scale.dtype).reshape(module.input_scale.shape)
        if getattr(module, "input_zero_point", None) is not None:
            module.input_zero_point.data.zero_()


def export_compressed_tensors(model: nn.Module, out: str | Path, *, tokenizer=None, overwrite: bool = False,
                              dtype: str | torch.dtype | None = None) -> Path:
    """Write a leanlm-quantized model as a compressed-tensors Hugging Face checkpoint at `out`.

    `dtype`: dtype of the unquantized tensors and of the scales (default: the model's, float32 for
    leanlm models, which keeps the scales exact; bfloat16 halves the embedding and rounds scales).
    """
    try:
        from compressed_tensors.compressors import ModelCompressor
        from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config
    except ImportError:
        raise LeanLMError("compressed-tensors export needs the compressed-tensors package: pip install -e '.[export]'") from None
    from ..core.models import resolve_dtype

    if not is_leanlm_quantized(model):
        raise LeanLMError("the model is not quantized: compressed-tensors holds quantized weights; quantize it first "
                          "(leanlm quantize ... --scheme w4a16-awq) or export a float model with --to hf or --to gguf")
    qls = quantized_linears(model)
    cfg = quantization_config(model, qls)
    dt = resolve_dtype(dtype) if dtype is not None else next(model.parameters()).dtype
    fresh = plain_model(model, dt)
    qcfg = QuantizationConfig.model_validate(cfg)
    apply_quantization_config(fresh, qcfg, show_progress=False)
    mods = dict(fresh.named_modules())
    for name, ql in qls.items():
        _set_qparams(mods[name], ql)
    compressor = ModelCompressor.from_pretrained_model(fresh)
    compressor.compress_model(fresh)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        fresh.save_pretrained(tmp, safe_serialization=True)
        compressor.update_config(str(tmp))
        save_tokenizer(tokenizer, tmp)
    return Path(out)
