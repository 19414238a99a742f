"""The decode-step interface speculative decoding drives, and its adapter for Hugging Face models.

`StepModel` is a causal LM that holds its own KV cache (shared with `leanlm.runtime`):
``forward(ids)`` appends new tokens and returns their logits, ``rewind(n)`` drops cached positions
after the first ``n`` (how a rejected draft is undone), ``reset()`` empties the cache. Every row of a
batch holds the same number of positions. Anything engine-specific lives in the adapter.

A StepModel that drafts or verifies trees (`leanlm.speculative.tree`) also has ``forward_tree(ids, pos,
mask)``: append T tree nodes, node i rotated at position ``pos[i]``; ``mask`` [T, S] (S >= T) marks what
node i sees among the last S - T cached entries and the T new ones (itself and its ancestors), every
earlier cached entry being visible; and ``compact(start, keep)``: keep the cached entries ``start + keep``
(ascending) at ``start..`` and drop every other one after ``start``.
"""

from __future__ import annotations

import inspect
from typing import Protocol, runtime_checkable

import torch

from ..core.errors import LeanLMError


@runtime_checkable
class StepModel(Protocol):
    length: int

    def reset(self) -> None: ...

    def forward(self, ids: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """Logits [B, T, vocab] of the new tokens; [B, vocab] of the last one with `last_only` (a prefill)."""
        ...

    def rewind(self, length: int) -> None: ...


class HFStepModel:
    """`StepModel` over any Hugging Face causal LM, with a `transformers.DynamicCache` (cropped on rewind).

    Rows of a batch are never padded: all rows hold the same number of positions.
    """

    def __init__(self, model: torch.nn.Module):
        if not callable(getattr(model, "forward", None)) or not hasattr(model, "config"):
            raise LeanLMError(f"{type(model).__name__} is not a Hugging Face causal LM; pass a model loaded with leanlm.load")
        self.model = model.eval()
        self._new_api = "cache" in inspect.signature(model.forward).parameters
        from transformers import DynamicCache

        self._crop_drops = "tokens_to_remove" in inspect.signature(DynamicCache.crop).parameters
        self.cache = None
        self.length = 0
        # keep_hidden (set by an EAGLE drafter): each forward keeps the final norm's output in `hidden` (positions
        # hidden_start..), caught by a hook on the norm; off, nothing is added to plain decoding
        self.keep_hidden, self.hidden, self.hidden_start = False, None, 0

    @property
    def vocab_size(self) -> int:
        head = self.model.get_output_embeddings()
        return int(head.weight.shape[0]) if head is not None else int(self.model.config.vocab_size)

    def reset(self) -> None:
        from transformers import DynamicCache

        self.cache = DynamicCache(config=self.model.config)
        self.length = 0

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        if self.cache is None:
            self.reset()
        t = ids.shape[1]
        pos = torch.arange(self.length, self.length + t).unsqueeze(0).expand(ids.shape[0], -1)
        out = self._run(ids, position_ids=pos, **({"logits_to_keep": 1} if last_only else {}))
        return out.logits[:, -1].float() if last_only else out.logits.float()

    def _run(self, ids: torch.Tensor, **kw):
        """The model over new tokens `ids`, the cache growing in place; with `keep_hidden`, the final norm's output
        is caught in `hidden`."""
        kw["cache" if self._new_api else "past_key_values"] = self.cache  # transformers 5 renamed the argument
        hook = None
        if self.keep_hidden:
            from ..core.arch import arch_of

            norm = arch_of(self.model).body(self.model).norm
            hook = norm.register_forward_hook(lambda m, i, o: setattr(self, "hidden", o.float()))
        try:
            out = self.model(input_ids=ids, use_cache=True, **kw)
        finally:
            if hook is not None:
                hook.remove()
        self.hidden_start = self.length
        self.length += ids.shape[1]
        return out

    @torch.inference_mode()
    def forward_tree(self, ids: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Logits [B, T, vocab] of T tree nodes (see the module docstring): a custom 4-D attention mask, which
        transformers passes to the attention as is; RoPE at `pos`."""
        if self.cache is None:
            self.reset()
        b, t = ids.shape
        win = getattr(self.model.config, "sliding_window", None)
        if win and self.length + t >= win and "sliding_attention" in (getattr(self.model.config, "layer_types", None) or []):
            raise LeanLMError(f"a draft tree over {self.length} cached tokens would pass this model's sliding window ({win}) "
                              "through transformers; use the leanlm runtime Engine as the target, or a chain (drop --tree)")
        dtype = next(self.model.parameters()).dtype
        allowed = torch.cat([torch.ones(t, self.length + t - mask.shape[1], dtype=torch.bool), mask.bool()], 1)
        bias = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
        out = self._run(ids, position_ids=pos.long()[None].expand(b, -1), attention_mask=bias[None, None].expand(b, 1, -1, -1))
        return out.logits.float()

    def compact(self, start: int, keep: torch.Tensor) -> None:
        """Keep the cached positions start + keep (ascending offsets) at start.., drop the others after start."""
        tail = self.length - start
        keep = keep.long()
        if not 0 <= start <= self.length or (len(keep) and (int(keep.min()) < 0 or int(keep.max()) >= tail)):
            raise LeanLMError(f"cannot keep offsets {keep.tolist()} after position {start}: the cache holds {self.length}")
        def gather(t):
            n = t.shape[-2]
            return torch.cat([t[..., : n - tail, :], t[..., n - tail + keep, :]], -2)

        if not hasattr(self.cache, "layers"):   # transformers 4.x: per-layer key and value lists
            for lst in (self.cache.key_cache, self.cache.value_cache):
                lst[:] = [gather(t) if t is not None and t.numel() else t for t in lst]
            if hasattr(self.cache, "_seen_tokens"):
                self.cache._seen_tokens = start + len(keep)
        for layer in getattr(self.cache, "layers", []):
            if not getattr(layer, "is_initialized", True) or layer.keys is None or layer.keys.numel() == 0:
                continue
            layer.keys, layer.values = gather(layer.keys), gather(layer.values)
            if hasattr(layer, "cumulative_length"):
                layer.cumulative_length -= tail - len(keep)
        if self.keep_hidden and self.hidden is not None and self.hidden_start == start:
            self.hidden = self.hidden[:, keep]
        self.length = start + len(keep)

    def rewind(self, length: int) -> None:
        if not 0 <= length <= self.length:
            raise LeanLMError(f"cannot rewind to {length} positions: the cache holds {self.length}")
        if length < self.length:
            # transformers 5 takes minus the number of positions to drop, 4.x the length to keep
            self.cache.crop(length - self.length if self._crop_drops else length)
            self.length = length


def as_step_model(model) -> StepModel:
    """A StepModel as is, or an `HFStepModel` around a Hugging Face model."""
    if all(hasattr(model, a) for a in ("reset", "forward", "rewind", "length")):
        return model
    return HFStepModel(model)


def vocab_size(step: StepModel) -> int | None:
    v = getattr(step, "vocab_size", None)
    return int(v) if v is not None else None
