"""Cutting a Llama-family model down to given dimensions: a new, smaller model of the same class.

Everything here is index bookkeeping; which indices survive is decided in `api.py` from the
importance scores. Shapes (transformers' Llama): embed [V, H]; per layer q [nh*d, H], k/v
[nkv*d, H], o [H, nh*d], gate/up [I, H], down [H, I], two RMSNorms [H]; final norm [H]; head [V, H]
(tied to the embedding or not). Query head j attends with KV head j // (nh / nkv).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..core.errors import LeanLMError

SUPPORTED = ("llama", "mistral")
LAYER_KEYS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm")


@dataclass(frozen=True)
class Dims:
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    layers: int

    def to_dict(self) -> dict:
        return asdict(self)


def check_supported(model: nn.Module) -> None:
    cfg = getattr(model, "config", None)
    mt = getattr(cfg, "model_type", None)
    if mt == "gemma3" or mt == "gemma3_text":
        raise LeanLMError("structured pruning: Gemma-3 is not supported yet (its scaled embedding, four norms per layer and "
                          "sliding-window layout need their own slicing); prune a Llama-family model such as smollm2-135m")
    if mt not in SUPPORTED:
        raise LeanLMError(f"structured pruning supports the Llama family ({', '.join(SUPPORTED)}), not model_type {mt!r} "
                          f"({type(model).__name__})")
    if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        raise LeanLMError("structured pruning does not handle attention or MLP biases yet; this model has them")
    from ..export.common import is_leanlm_quantized

    if is_leanlm_quantized(model):
        raise LeanLMError("the model is quantized; prune the float model first, then quantize the pruned one")
    layer = model.model.layers[0]
    for k in LAYER_KEYS:
        if not hasattr(layer.get_submodule(k), "weight"):
            raise LeanLMError(f"layer part {k} of {type(model).__name__} has no weight; not a standard Llama layout")


def head_dim(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def dims_of(model_or_cfg) -> Dims:
    cfg = getattr(model_or_cfg, "config", model_or_cfg)
    return Dims(cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.num_hidden_layers)


def config_for(cfg, d: Dims):
    new = copy.deepcopy(cfg)
    new.head_dim = head_dim(cfg)
    new.hidden_size, new.intermediate_size = d.hidden, d.intermediate
    new.num_attention_heads, new.num_key_value_heads, new.num_hidden_layers = d.heads, d.kv_heads, d.layers
    if getattr(new, "layer_types", None):
        raise LeanLMError("models with per-layer types (sliding-window layouts) are not supported by structured pruning yet")
    return new


def count_params(model: nn.Module, d: Dims) -> int:
    """Unique parameters of `model`'s class at dimensions `d` (built on the meta device: no memory, no init)."""
    with torch.device("meta"):
        m = type(model)(config_for(model.config, d))
    return sum(p.numel() for p in m.parameters())  # parameters() yields a tied weight once


@dataclass
class Keep:
    """Indices that survive, all sorted ascending (so a no-op keep reproduces the model exactly)."""
    layers: list[int]
    hidden: torch.Tensor
    heads: dict[int, torch.Tensor]        # original layer index -> kept query heads
    kv_heads: dict[int, torch.Tensor]     # original layer index -> kept KV heads
    channels: dict[int, torch.Tensor]     # original layer index -> kept MLP channels


def _rows(heads: torch.Tensor, d: int) -> torch.Tensor:
    """Row (or column) indices of whole heads of width `d`."""
    return (heads[:, None] * d + torch.arange(d)[None]).reshape(-1)


def slice_model(model: nn.Module, keep: Keep) -> nn.Module:
    """A new model of `model`'s class holding only the kept layers, heads, channels and hidden channels."""
    cfg = model.config
    d = head_dim(cfg)
    first = keep.layers[0]
    dims = Dims(len(keep.hidden), len(keep.channels[first]), len(keep.heads[first]), len(keep.kv_heads[first]), len(keep.layers))
    sd = model.state_dict()
    h = keep.hidden
    out: dict[str, torch.Tensor] = {}
    out["model.embed_tokens.weight"] = sd["model.embed_tokens.weight"][:, h]
    out["model.norm.weight"] = sd["model.norm.weight"][h]
    if not getattr(cfg, "tie_word_embeddings", False):
        out["lm_head.weight"] = sd["lm_head.weight"][:, h]
    for new_i, old_i in enumerate(keep.layers):
        p, q = f"model.layers.{old_i}.", f"model.layers.{new_i}."
        qh = _rows(keep.heads[old_i], d)
        kvh = _rows(keep.kv_heads[old_i], d)
        ch = keep.channels[old_i]
        out[q + "self_attn.q_proj.weight"] = sd[p + "self_attn.q_proj.weight"][qh][:, h]
        out[q + "self_attn.k_proj.weight"] = sd[p + "self_attn.k_proj.weight"][kvh][:, h]
        out[q + "self_attn.v_proj.weight"] = sd[p + "self_attn.v_proj.weight"][kvh][:, h]
        out[q + "self_attn.o_proj.weight"] = sd[p + "self_attn.o_proj.weight"][h][:, qh]
        out[q + "mlp.gate_proj.weight"] = sd[p + "mlp.gate_proj.weight"][ch][:, h]
        out[q + "mlp.up_proj.weight"] = sd[p + "mlp.up_proj.weight"][ch][:, h]
        out[q + "mlp.down_proj.weight"] = sd[p + "mlp.down_proj.weight"][h][:, ch]
        out[q + "input_layernorm.weight"] = sd[p + "input_layernorm.weight"][h]
        out[q + "post_attention_layernorm.weight"] = sd[p + "post_attention_layernorm.weight"][h]
    dtype = next(model.parameters()).dtype
    new = type(model)(config_for(cfg, dims))
    missing, unexpected = new.load_state_dict({k: v.contiguous().clone() for k, v in out.items()}, strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise LeanLMError(f"internal error slicing {type(model).__name__}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if getattr(cfg, "tie_word_embeddings", False):
        new.tie_weights()
    return new.to(dtype).eval()
