"""`leanlm.quantize(model, config, calib_data)`: the one entry point for post-training quantization."""

from __future__ import annotations

import torch
from torch import nn

from ..core.data import calibration_batches
from ..core.errors import LeanLMError
from .calibrate import calibrate, needs_data
from .config import QuantConfig, preset
from .formats import dequantize, quantize as quantize_codes
from .modules import TensorQuantizer, insert_quantizers, quantizer_names, quantizers


def _check_weights_finite(model: nn.Module) -> None:
    for n, p in model.named_parameters():
        # A sum is finite only if every value is (NaN and inf propagate); one read, no mask. A finite tensor whose sum
        # overflows falls through to the exact check.
        if not torch.isfinite(p.detach().sum(dtype=torch.float32)) and not torch.isfinite(p).all():
            raise LeanLMError(f"parameter {n} holds NaN/inf; the checkpoint is corrupt, so quantizing it would be meaningless")


def _check_shapes(model: nn.Module, resolved: dict) -> None:
    """Every group or block size must divide its tensor's last dimension: fail before any work."""
    mods = dict(model.named_modules())
    for qname, qc in resolved.items():
        if not qname.endswith(".weight_quantizer"):
            continue
        from .formats import _divisor_hint, parse_format

        fmt = parse_format(qc.format)
        m = mods[qname[: -len(".weight_quantizer")]]
        if fmt.group_size and m.in_features % fmt.group_size:
            raise LeanLMError(
                f"{qname}: {fmt.name} needs the input dimension {m.in_features} to be a multiple of {fmt.group_size}; "
                f"{_divisor_hint(m.in_features, fmt.group_size) or 'use a group size that divides it, or '}"
                f"add a rule that keeps this layer in another format"
            )


def quantize(
    model: nn.Module,
    config: QuantConfig | str,
    calib_data: torch.Tensor | None = None,
    *,
    tokenizer=None,
    kv_cache: str | None = None,
    progress: bool = True,
) -> nn.Module:
    """Quantize `model` in place (fake quantization) and return it.

    `config` is a QuantConfig or a preset name (see `leanlm.quantization.PRESETS`). `calib_data` is
    a [N, L] LongTensor of token ids; when it is None and the config needs data (any algorithm or a
    static activation range), `config.calib_samples` x `config.calib_seq_len` tokens are cut from
    the protocol's calibration text with `tokenizer`.
    """
    if isinstance(config, str):
        config = preset(config, kv_cache)
    elif kv_cache:
        raise LeanLMError("kv_cache= applies to preset names; add k_quantizer/v_quantizer rules to a QuantConfig instead")
    if any(isinstance(m, TensorQuantizer) for m in model.modules()):
        raise LeanLMError("this model is already quantized; load the original float model to quantize it again")
    names = quantizer_names(model)
    if not names:
        raise LeanLMError(f"{type(model).__name__} has no nn.Linear layers to quantize")
    resolved = config.resolve(names)
    if not resolved:
        raise LeanLMError("the config's rules enable no quantizer; nothing to do")
    _check_weights_finite(model)
    _check_shapes(model, resolved)
    if config.rotate:
        from .rotate import check_rotatable

        check_rotatable(model, config.rotate)
    ids = None
    if needs_data(resolved, config):
        if calib_data is None:
            if tokenizer is None:
                raise LeanLMError("this config needs calibration data: pass calib_data= (token ids) or tokenizer=")
            calib_data = calibration_batches(tokenizer, config.calib_samples, config.calib_seq_len)
        ids = calib_data
        if ids.dim() != 2 or ids.dtype != torch.long:
            raise LeanLMError(f"calib_data must be a 2-D LongTensor of token ids [N, L], got {tuple(ids.shape)} {ids.dtype}")
    if config.rotate:
        from .rotate import massive_channels, rotate

        sample = calib_data if isinstance(calib_data, torch.Tensor) and calib_data.dim() == 2 else ids
        rotate(model, config.rotate, keep=massive_channels(model, sample) if sample is not None else None)
    insert_quantizers(model, resolved)
    was_training = model.training
    switch = any(m.training for m in model.modules())   # a loaded model is in eval mode: no train()/eval() walks
    if switch:
        model.eval()
    try:
        info = calibrate(model, config, ids, progress=progress)
    finally:
        if switch:
            model.train(was_training)
    model.leanlm_quant = {"config": config.to_dict(), "calib_seconds": info["seconds"]}
    return model


@torch.no_grad()
def summary(model: nn.Module) -> list[dict]:
    """One row per enabled quantizer: name, role, format, mode, and the relative weight error."""
    rows = []
    mods = dict(model.named_modules())
    for name, q in quantizers(model).items():
        if not q.enabled:
            continue
        role = name.rsplit(".", 1)[1].replace("_quantizer", "")
        row = {"name": name, "role": role, "format": q.fmt.name,
               "mode": "dynamic" if q.cfg.dynamic else "static", "bits_per_value": None, "rel_error": None}
        if role == "weight":
            m = mods[name[: -len(".weight_quantizer")]]
            row["bits_per_value"] = q.fmt.bits_per_weight(m.in_features)
            row["params"] = m.weight.numel()
            if q.qparams is not None:
                # the folded weight is exactly on the grid: decoding its codes reproduces it
                w = m.weight.float()
                back = dequantize(quantize_codes(w, q.fmt, q.qparams), q.fmt, q.qparams)
                row["on_grid"] = bool(torch.equal(back.to(m.weight.dtype), m.weight))
        rows.append(row)
    return rows


def average_bits(model: nn.Module) -> float:
    """Average storage bits per weight over all linear weights (float ones count 16 or 32)."""
    total_bits, total = 0.0, 0
    for n, m in model.named_modules():
        if isinstance(m, nn.Linear):
            q = getattr(m, "weight_quantizer", None)
            bits = q.fmt.bits_per_weight(m.in_features) if q is not None and q.enabled else m.weight.element_size() * 8
            total_bits += bits * m.weight.numel()
            total += m.weight.numel()
    return total_bits / max(total, 1)
