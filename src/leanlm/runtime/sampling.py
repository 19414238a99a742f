"""Next-token choice from float32 logits [B, V]: greedy, or sampling with temperature, top-k, top-p."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.errors import LeanLMError


@dataclass
class SamplingConfig:
    temperature: float = 0.0     # 0: greedy (argmax)
    top_k: int | None = None     # keep the k most likely tokens
    top_p: float | None = None   # keep the smallest set whose probability reaches p (nucleus)
    seed: int | None = None

    def __post_init__(self):
        if self.temperature < 0:
            raise LeanLMError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise LeanLMError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise LeanLMError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def filter_logits(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """Temperature-scaled logits with everything outside top-k / top-p set to -inf."""
    logits = logits / cfg.temperature
    if cfg.top_k is not None and cfg.top_k < logits.shape[-1]:
        kth = torch.topk(logits, cfg.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p is not None and cfg.top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= cfg.top_p  # tokens after the nucleus is full (the top one always stays)
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def next_token(logits: torch.Tensor, cfg: SamplingConfig, gen: torch.Generator | None = None) -> torch.Tensor:
    """[B, V] float logits -> [B] token ids."""
    if cfg.greedy:
        return logits.argmax(-1)
    probs = filter_logits(logits.float(), cfg).softmax(-1)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)
