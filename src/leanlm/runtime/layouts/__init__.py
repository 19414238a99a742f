"""Packed weight layouts: one module per storage format, each a tiny `nn.Module` holding the packed
tensors and calling one PyTorch CPU kernel in `forward(x)` (x: [..., in_features]).

`pack_linear` picks the layout for one linear weight, either from a leanlm-quantized layer (its
``weight_quantizer`` format and scales: the packed codes decode to exactly the fake-quantized
values) or from a float weight by round-to-nearest. A format with no fast kernel here raises
`LeanLMError` unless ``allow_fallback=True``; a fallback is recorded in ``layout.fallback``.
"""

from __future__ import annotations

import torch

from ...core.errors import LeanLMError
from .dense import DenseWeight
from .int4 import INT4_GROUPS, Int4Weight
from .int8 import Int8Weight
from .w8a8 import W8A8Weight

WEIGHT_KINDS = ("fp32", "bf16", "int8", "int4", "w8a8")

__all__ = ["DenseWeight", "Int8Weight", "Int4Weight", "W8A8Weight", "WEIGHT_KINDS", "pack_linear", "pack_weight"]


def pack_weight(w: torch.Tensor, kind: str, dtype: torch.dtype, group_size: int = 64, allow_fallback: bool = False):
    """Pack a float weight [out, in] by round-to-nearest in `kind` (fp32 | bf16 | int8 | int4 | w8a8)."""
    if kind == "fp32":
        return DenseWeight(w, torch.float32)
    if kind == "bf16":
        return DenseWeight(w, torch.bfloat16)
    if kind == "int8":
        return Int8Weight.from_float(w, dtype)
    if kind == "int4":
        if group_size not in INT4_GROUPS or w.shape[1] % group_size:
            return _no_kernel(w, f"int4 group {group_size} on in_features={w.shape[1]}",
                              f"the int4 kernel takes groups {INT4_GROUPS} dividing in_features", dtype, allow_fallback)
        return Int4Weight.from_float(w, group_size, dtype)
    if kind == "w8a8":
        return W8A8Weight.from_float(w, dtype)
    raise LeanLMError(f"unknown weight format {kind!r}; choose one of: {', '.join(WEIGHT_KINDS)}")


def pack_linear(linear: torch.nn.Module, kind: str | None, dtype: torch.dtype, group_size: int = 64, allow_fallback: bool = False):
    """Pack one linear layer. A leanlm-quantized layer (``weight_quantizer``) is packed in its own format,
    reproducing its fake-quantized weight; otherwise the float weight is packed in `kind`."""
    if getattr(linear, "bias", None) is not None:
        raise LeanLMError("linear layers with a bias are not supported by the leanlm runtime yet")
    wq = getattr(linear, "weight_quantizer", None)
    iq = getattr(linear, "input_quantizer", None)
    w = linear.weight.detach()
    if wq is None or not wq.enabled:
        if iq is not None and iq.enabled:
            return _no_kernel(w, f"activation-only quantization ({iq.fmt.name})", "quantize the weights too", dtype, allow_fallback)
        return pack_weight(w, kind or "bf16", dtype, group_size, allow_fallback)
    from ...quantization.formats import compute_qparams, quantize

    fmt = wq.fmt
    qp = wq.qparams if wq.qparams is not None else compute_qparams(w.float(), fmt)
    name = fmt.name
    if iq is not None and iq.enabled:
        if fmt.kind == "int" and fmt.bits == 8 and fmt.symmetric and fmt.granularity == "channel" and \
                iq.fmt.kind == "int" and iq.fmt.bits == 8 and iq.fmt.symmetric and iq.fmt.granularity in ("token", "tensor"):
            codes = quantize(w.float(), fmt, qp)
            static = None if iq.cfg.dynamic else iq.amax
            return W8A8Weight(codes, qp.scale.reshape(-1), dtype, static_amax=static)
        return _no_kernel(w, f"weights {name} with activations {iq.fmt.name}",
                          "the runtime runs int8 per-channel weights with int8 per-token or per-tensor activations (w8a8)", dtype, allow_fallback)
    if fmt.kind == "int" and fmt.bits == 8 and fmt.symmetric and fmt.granularity == "channel":
        return Int8Weight(quantize(w.float(), fmt, qp), qp.scale.reshape(-1), dtype)
    if fmt.kind == "int" and fmt.bits == 4 and fmt.granularity == "group" and fmt.group_size in INT4_GROUPS:
        codes = quantize(w.float(), fmt, qp)
        return Int4Weight.from_codes(codes, qp.scale, qp.zero, fmt.group_size, dtype)
    return _no_kernel(w, f"weight format {name}", "fast kernels exist for int8 per-channel (sym) and int4 groups "
                      f"{INT4_GROUPS} (sym or asym)", dtype, allow_fallback)


def _no_kernel(w, what: str, why: str, dtype, allow_fallback: bool):
    if not allow_fallback:
        raise LeanLMError(f"no fast CPU kernel for {what} ({why}); pass allow_fallback=True (CLI: --allow-fallback) "
                          "to run it as dense weights in the compute dtype")
    layout = DenseWeight(w, dtype)
    layout.fallback = f"{what} runs as dense {str(dtype).replace('torch.', '')} weights (no fast kernel)"
    return layout
