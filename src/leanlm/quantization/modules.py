"""Quantizer submodules and in-place class swaps (fake quantization for calibration and evaluation).

`TensorQuantizer` is a named submodule that fake-quantizes one tensor. `insert_quantizers` swaps
each `nn.Linear` class in place for a subclass that owns ``weight_quantizer`` and
``input_quantizer`` (so ``isinstance(m, nn.Linear)`` and the state_dict keys of the weights keep
working), and gives every attention module ``k_quantizer`` / ``v_quantizer`` for the KV cache,
applied through a registered transformers attention function to the keys (after RoPE) and values
exactly as the cache holds them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import LeanLMError
from .config import QuantizerConfig
from .formats import QFormat, QParams, compute_qparams, fake_quantize, fake_quantize_ste, parse_format


class TensorQuantizer(nn.Module):
    """Fake-quantizes one tensor in one format.

    ``mode``: "quant" (fake-quantize with dynamic scales computed from each input, or static ones:
    the ``amax`` buffer, or explicit ``qparams`` for weights), "calib" (record the range of what
    passes and return it unchanged) or "off" (pass through; used for layers not yet calibrated).
    A disabled quantizer (no format) is the identity. ``folded`` marks a weight whose values were
    already replaced by their quantized values, so the forward is the identity.
    """

    def __init__(self, cfg: QuantizerConfig | None = None, role: str = "input"):
        super().__init__()
        self.cfg = cfg
        self.role = role  # "weight", "input", "k" or "v"
        self.fmt: QFormat | None = parse_format(cfg.format) if cfg else None
        self.mode = "quant"
        self.folded = False
        self.ste = False  # straight-through gradients (quantization-aware training)
        self.qparams: QParams | None = None
        self.register_buffer("amax", None)

    @property
    def enabled(self) -> bool:
        return self.fmt is not None

    def observe(self, x: torch.Tensor) -> None:
        """Running range of what passes: max |x|, or the running max of each batch's percentile of |x|."""
        from .algorithms import activation_amax

        method = "percentile" if self.cfg.method == "percentile" else "max"
        a = activation_amax(x.detach(), method, self.cfg.percentile).float()
        self.amax = a if self.amax is None else torch.maximum(self.amax, a)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fmt is None or self.folded:
            return x
        if self.mode == "off":
            return x
        if self.mode == "calib":
            self.observe(x)
            return x
        qp = self.qparams  # None: computed from x (dynamic activations, or an unfolded weight)
        if qp is None and self.role != "weight" and not self.cfg.dynamic:
            if self.amax is None:
                raise LeanLMError("a static activation quantizer has no calibrated range; run leanlm.quantize with calibration data")
            qp = compute_qparams(x, self.fmt, amax=self.amax) if self.fmt.kind != "nvfp4" else compute_qparams(x, self.fmt, global_amax=self.amax)
        return self.fake_quantize(x, qp)

    def fake_quantize(self, x: torch.Tensor, qp: QParams | None) -> torch.Tensor:
        """The fake quantization itself, once the scales are known (QAT's `QATActQuantizer` fuses it)."""
        return (fake_quantize_ste if self.ste else fake_quantize)(x, self.fmt, qp)

    def extra_repr(self) -> str:
        if self.fmt is None:
            return "disabled"
        mode = "dynamic" if self.cfg.dynamic else "static"
        return f"{self.fmt.name}, {mode}" + (", folded" if self.folded else "")


class QuantLinearMixin:
    """Forward of a quantized linear layer: quantize the input, the weight, then the usual matmul.

    A sparsified layer (``weight_mask`` buffer, leanlm.sparsity) whose weight is not folded (during
    quantization-aware training) multiplies its fake-quantized weight by the mask, so pruned weights
    stay exactly zero (and get no gradient) whatever the latent weight or the scales do. A folded
    weight already holds its zeros (the forward stays a plain linear, as the exporters trace it).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight_quantizer(self.weight)
        mask = getattr(self, "weight_mask", None)
        if mask is not None and not self.weight_quantizer.folded:
            w = w * mask
        return F.linear(self.input_quantizer(x), w, self.bias)


_SWAPPED: dict[type, type] = {}


def _quant_class(cls: type) -> type:
    if issubclass(cls, QuantLinearMixin):
        return cls
    if cls not in _SWAPPED:
        _SWAPPED[cls] = type(f"Quant{cls.__name__}", (QuantLinearMixin, cls), {})
    return _SWAPPED[cls]


def is_attention(module: nn.Module) -> bool:
    return all(hasattr(module, a) for a in ("k_proj", "v_proj", "o_proj")) and hasattr(module, "config")


def quantizer_names(model: nn.Module) -> list[str]:
    """Names of every quantizer `insert_quantizers` can create on `model`."""
    names = []
    for n, m in model.named_modules():
        if isinstance(m, nn.Linear):
            names += [f"{n}.weight_quantizer", f"{n}.input_quantizer"]
        elif is_attention(m):
            names += [f"{n}.k_quantizer", f"{n}.v_quantizer"]
    return names


def insert_quantizers(model: nn.Module, resolved: dict[str, QuantizerConfig]) -> None:
    """Swap classes in place and attach a quantizer for every name in `resolved`."""
    mods = dict(model.named_modules())
    kv_used = False
    for n, m in list(mods.items()):
        if isinstance(m, nn.Linear):
            m.__class__ = _quant_class(type(m))
            m.weight_quantizer = TensorQuantizer(resolved.get(f"{n}.weight_quantizer"), "weight")
            m.input_quantizer = TensorQuantizer(resolved.get(f"{n}.input_quantizer"), "input")
            m.weight_quantizer.training = m.input_quantizer.training = m.training   # the mode of the model they join
        elif is_attention(m):
            k, v = resolved.get(f"{n}.k_quantizer"), resolved.get(f"{n}.v_quantizer")
            if k or v:
                m.k_quantizer, m.v_quantizer = TensorQuantizer(k, "k"), TensorQuantizer(v, "v")
                m.k_quantizer.training = m.v_quantizer.training = m.training
                kv_used = True
    if kv_used:
        _use_kv_attention(model)
    _untie_quantized_head(model, resolved)


def quantizers(model: nn.Module) -> dict[str, TensorQuantizer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, TensorQuantizer)}


def _untie_quantized_head(model: nn.Module, resolved: dict) -> None:
    # A head tied to the embedding must not share storage once its weight is quantized.
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if out is None or emb is None or out.weight is not emb.weight:
        return
    name = next(n for n, m in model.named_modules() if m is out)
    if f"{name}.weight_quantizer" in resolved:
        out.weight = nn.Parameter(emb.weight.detach().clone(), requires_grad=emb.weight.requires_grad)
        if hasattr(model.config, "tie_word_embeddings"):
            model.config.tie_word_embeddings = False
        getattr(model.config, "get_text_config", lambda: model.config)().tie_word_embeddings = False


# ---------------------------------------------------------------------------------- KV cache


def _kv_attention(inner: str):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def attention(module, query, key, value, attention_mask, **kwargs):
        if hasattr(module, "k_quantizer"):
            key, value = module.k_quantizer(key), module.v_quantizer(value)
        if inner == "sdpa":
            return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
        if inner == "eager":
            import importlib

            eager = importlib.import_module(type(module).__module__).eager_attention_forward
            return eager(module, query, key, value, attention_mask, **kwargs)
        return ALL_ATTENTION_FUNCTIONS[inner](module, query, key, value, attention_mask, **kwargs)

    return attention


def _use_kv_attention(model: nn.Module) -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    cfg = model.config
    inner = cfg._attn_implementation or "eager"
    if inner.startswith("leanlm_kv_"):
        return
    if inner not in ("sdpa", "eager"):
        raise LeanLMError(f"KV-cache quantization supports the sdpa and eager attention implementations, not {inner!r}; load the model with attn_implementation='sdpa'")
    name = f"leanlm_kv_{inner}"
    AttentionInterface.register(name, _kv_attention(inner))
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[inner])
    model.set_attn_implementation(name)
