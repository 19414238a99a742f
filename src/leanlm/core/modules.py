"""Walking a model's modules: names, glob patterns, decoder layers, architecture facts."""

from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass

from torch import nn

from .arch import arch_or_none, text_config
from .errors import LeanLMError


def named_linears(model: nn.Module, pattern: str = "*") -> dict[str, nn.Linear]:
    """Every nn.Linear (including subclasses, such as swapped-in quantized ones) whose name matches `pattern`."""
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and fnmatch.fnmatchcase(n, pattern)}


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The stack of transformer blocks: the adapter's (core.arch) for a family it knows; for another
    transformer stack, the largest nn.ModuleList whose items are identical in type."""
    arch = arch_or_none(model)
    if arch is not None:
        return arch.layers(model)
    best = None
    for _, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) > 0 and len({type(x) for x in m}) == 1:
            if best is None or len(m) > len(best):
                best = m
    if best is None:
        raise LeanLMError(f"cannot find the decoder layers of {type(model).__name__}; it is not a transformer stack leanlm understands")
    return best


@dataclass
class ModelFacts:
    architecture: str
    model_type: str
    params: int               # unique parameters (tied weights once)
    layers: int
    hidden_size: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    dtype: str
    tied_embeddings: bool

    def to_dict(self) -> dict:
        return asdict(self)


def unique_params(model: nn.Module) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel()
    return total


def facts(model: nn.Module) -> ModelFacts:
    """Size facts for reports: from the adapter for a family it knows, else read off the config as is."""
    a = arch_or_none(model)
    cfg = text_config(model) if hasattr(model, "config") else None
    get = lambda k, d=0: getattr(cfg, k, d) or d if cfg is not None else d  # noqa: E731
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = emb is not None and out is not None and emb.weight.data_ptr() == out.weight.data_ptr()
    shape = (a.n_layers, a.hidden, a.heads, a.kv_heads, a.head_dim, a.intermediate, a.vocab) if a is not None else (
        get("num_hidden_layers") or len(decoder_layers(model)), get("hidden_size"), get("num_attention_heads"),
        get("num_key_value_heads") or get("num_attention_heads"), get("head_dim"), get("intermediate_size"), get("vocab_size"))
    return ModelFacts(type(model).__name__, get("model_type", "unknown"), unique_params(model), *shape,
                      dtype=str(next(model.parameters()).dtype).replace("torch.", ""), tied_embeddings=tied)


def vocab_size(model: nn.Module) -> int | None:
    """Rows of the output head (what next-token distributions range over), else config.vocab_size."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        return int(head.weight.shape[0])
    return int(getattr(getattr(model, "config", None), "vocab_size", 0)) or None


def check_same_vocab(ref: nn.Module, other: nn.Module, ref_tokenizer=None, other_tokenizer=None, *,
                     ref_name: str, other_name: str, fix: str) -> None:
    """Refuse `other` (a draft, a teacher) whose output vocabulary or tokenizer differs from `ref`'s."""
    vr, vo = vocab_size(ref), vocab_size(other)
    if vr and vo and vr != vo:
        raise LeanLMError(f"the {other_name}'s vocabulary has {vo} tokens, the {ref_name}'s {vr}: the {other_name} must use "
                          f"the {ref_name}'s tokenizer; {fix}")
    if ref_tokenizer is not None and other_tokenizer is not None and ref_tokenizer.get_vocab() != other_tokenizer.get_vocab():
        raise LeanLMError(f"the {other_name}'s tokenizer differs from the {ref_name}'s (same size, different tokens); {fix}")
