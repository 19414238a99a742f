"""Helpers shared by the exporters: read a leanlm model's quantizers and rebuild a plain HF model."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..core.errors import LeanLMError
from ..quantization.formats import QFormat, QParams


@dataclass
class QuantLinear:
    """What a leanlm-quantized Linear holds: its folded weight (exactly on the format's grid),
    the weight format and scales, and the activation quantizer (None for weight-only)."""

    name: str
    weight: torch.Tensor            # float32, decodes exactly from (codes, qparams)
    fmt: QFormat
    qparams: QParams
    act_fmt: QFormat | None = None
    act_dynamic: bool = True
    act_amax: torch.Tensor | None = None


def is_leanlm_quantized(model: nn.Module) -> bool:
    from ..quantization.modules import TensorQuantizer

    return any(isinstance(m, TensorQuantizer) and m.enabled for m in model.modules())


def quantized_linears(model: nn.Module) -> dict[str, QuantLinear]:
    """Every Linear whose weight (and possibly input) leanlm quantized, by module name.

    Errors on what no export format represents: KV-cache quantizers, activation-only
    quantization, and weights that were never calibrated (folded).
    """
    out = {}
    for name, m in model.named_modules():
        if hasattr(m, "k_quantizer") and (m.k_quantizer.enabled or m.v_quantizer.enabled):
            raise LeanLMError(f"{name}: leanlm's dynamic per-token KV-cache quantization has no equivalent in the export formats; "
                              "quantize without --kv-cache for export (engines quantize their KV cache themselves)")
        wq, iq = getattr(m, "weight_quantizer", None), getattr(m, "input_quantizer", None)
        if wq is None:
            continue
        if not wq.enabled:
            if iq is not None and iq.enabled:
                raise LeanLMError(f"{name}: activation-only quantization (no weight format) cannot be exported; quantize the weights too")
            continue
        if not wq.folded or wq.qparams is None:
            raise LeanLMError(f"{name}: the weight quantizer was not calibrated; run leanlm.quantize to the end before exporting")
        qp = wq.qparams
        ql = QuantLinear(name, m.weight.detach().float().cpu(), wq.fmt,
                         QParams(*(t.detach().float().cpu() if t is not None else None for t in (qp.scale, qp.zero, qp.global_scale))))
        if iq is not None and iq.enabled:
            ql.act_fmt, ql.act_dynamic = iq.fmt, bool(iq.cfg.dynamic)
            ql.act_amax = None if iq.amax is None else iq.amax.detach().float().cpu().reshape(())
        out[name] = ql
    return out


def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's ordinary tensors (weights, biases, norms), without leanlm quantizer state."""
    return {k: v for k, v in model.state_dict().items()
            if not any(s in k for s in (".weight_quantizer.", ".input_quantizer.", ".k_quantizer.", ".v_quantizer."))}


@torch.no_grad()
def plain_model(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """A fresh transformers model of the same config holding `model`'s (folded) weights, no quantizers."""
    from transformers import AutoModelForCausalLM

    dtype = dtype or next(model.parameters()).dtype
    check_config_matches(model)
    fresh = AutoModelForCausalLM.from_config(model.config, dtype=dtype)
    missing, unexpected = fresh.load_state_dict(plain_state_dict(model), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and getattr(model.config, "tie_word_embeddings", False))]
    if missing or unexpected:
        raise LeanLMError(f"the model's tensors do not match its config (missing {missing[:3]}, unexpected {unexpected[:3]}); "
                          "a model changed in place must have its config updated before export")
    if getattr(fresh.config, "tie_word_embeddings", False):
        fresh.tie_weights()
    return fresh.eval()


def check_config_matches(model: nn.Module) -> None:
    """Error unless every tensor has the shape a model built from its config would have (e.g. after pruning)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        ref = AutoModelForCausalLM.from_config(model.config)
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    for k, v in plain_state_dict(model).items():
        if k in want and tuple(v.shape) != want[k]:
            raise LeanLMError(f"tensor {k} has shape {tuple(v.shape)} but the config implies {want[k]}; a pruned model must update its "
                              "config (e.g. intermediate_size, num_attention_heads), and every layer must keep the same shape to be a "
                              "plain Hugging Face checkpoint")


def save_tokenizer(tokenizer, folder) -> None:
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
