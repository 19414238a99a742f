"""Cutting a decoder down to given dimensions: a new, smaller model of the same class.

Everything here is index bookkeeping; which indices survive is decided in `api.py` from the
importance scores. Projection and norm names come from the architecture adapter (`core.arch`).
Shapes: embed [V, H]; per layer q [nh*d, H], k/v [nkv*d, H], o [H, nh*d], gate/up [I, H],
down [H, I] (each with an optional bias of its rows), two RMSNorms [H], optional per-head q/k norms
[d]; final norm [H]; head [V, H] (tied to the embedding or not). Query head j attends with KV head
j // (nh / nkv).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..core.arch import FAMILIES, arch_of, text_config
from ..core.errors import LeanLMError

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")   # families with separate q/k/v and gate/up and no sliding windows


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
    mt = getattr(text_config(model), "model_type", None)
    if FAMILIES.get(mt) == "gemma3":
        raise LeanLMError("structured pruning: Gemma-3 is not supported yet (its scaled embedding, four norms per layer and "
                          "sliding-window layout need their own slicing); prune a Llama-family model such as smollm2-135m")
    if FAMILIES.get(mt) not in SUPPORTED:
        raise LeanLMError(f"structured pruning supports the Llama family ({', '.join(SUPPORTED)}), not model_type {mt!r} "
                          f"({type(model).__name__})")
    arch = arch_of(model)
    if any(arch.windows):
        raise LeanLMError("models with sliding-window layers are not supported by structured pruning yet")
    from ..export.common import is_leanlm_quantized

    if is_leanlm_quantized(model):
        raise LeanLMError("the model is quantized; prune the float model first, then quantize the pruned one")


def dims_of(model_or_cfg) -> Dims:
    a = arch_of(model_or_cfg)
    return Dims(a.hidden, a.intermediate, a.heads, a.kv_heads, a.n_layers)


def config_for(cfg, d: Dims):
    new = copy.deepcopy(cfg)
    new.head_dim = arch_of(cfg).head_dim
    new.hidden_size, new.intermediate_size = d.hidden, d.intermediate
    new.num_attention_heads, new.num_key_value_heads, new.num_hidden_layers = d.heads, d.kv_heads, d.layers
    if getattr(new, "layer_types", None):   # every layer global (check_supported)
        new.layer_types = new.layer_types[: d.layers]
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
    arch = arch_of(model)
    d = arch.head_dim
    first = keep.layers[0]
    dims = Dims(len(keep.hidden), len(keep.channels[first]), len(keep.heads[first]), len(keep.kv_heads[first]), len(keep.layers))
    sd = model.state_dict()
    h = keep.hidden
    body, L = arch.body_path, arch.layers_prefix()
    out: dict[str, torch.Tensor] = {}
    out[f"{body}.embed_tokens.weight"] = sd[f"{body}.embed_tokens.weight"][:, h]
    out[f"{body}.norm.weight"] = sd[f"{body}.norm.weight"][h]
    if not arch.tied:
        out["lm_head.weight"] = sd["lm_head.weight"][:, h]
    (q_, k_, v_), (gate, up) = arch.qkv, arch.gate_up
    for new_i, old_i in enumerate(keep.layers):
        p, q = f"{L}{old_i}.", f"{L}{new_i}."
        qh = _rows(keep.heads[old_i], d)
        kvh = _rows(keep.kv_heads[old_i], d)
        ch = keep.channels[old_i]
        # projection -> (kept output rows, kept input columns); a bias follows the rows
        cut = {q_: (qh, h), k_: (kvh, h), v_: (kvh, h), arch.o: (h, qh), gate: (ch, h), up: (ch, h), arch.down: (h, ch)}
        for name, (rows, cols) in cut.items():
            out[q + name + ".weight"] = sd[p + name + ".weight"][rows][:, cols]
            if p + name + ".bias" in sd:
                out[q + name + ".bias"] = sd[p + name + ".bias"][rows]
        for norm in arch.layer_norms:
            out[q + norm + ".weight"] = sd[p + norm + ".weight"][h]
        for norm in arch.qk_norms:   # per head: [head_dim], unchanged
            out[q + norm + ".weight"] = sd[p + norm + ".weight"]
    dtype = next(model.parameters()).dtype
    new = type(model)(config_for(cfg, dims))
    missing, unexpected = new.load_state_dict({k: v.contiguous().clone() for k, v in out.items()}, strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise LeanLMError(f"internal error slicing {type(model).__name__}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if arch.tied:
        new.tie_weights()
    return new.to(dtype).eval()
