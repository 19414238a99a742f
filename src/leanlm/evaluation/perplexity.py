"""Held-out perplexity on non-overlapping windows (../shared/PROTOCOL.md)."""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..core.data import evaluation_texts, join_and_tokenize
from ..core.errors import LeanLMError


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float            # mean negative log-likelihood per predicted token (nats)
    tokens: int           # predicted tokens (window - 1 per window)
    windows: int
    window: int
    source: str

    def to_dict(self) -> dict:
        return asdict(self)


def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    """Logits of a transformers model or of a module that returns them directly, without a KV cache."""
    out = model(input_ids=ids, use_cache=False)
    return out.logits if hasattr(out, "logits") else out


@torch.inference_mode()
def perplexity(
    model,
    tokenizer=None,
    *,
    source: str | Path = "wiki",
    texts: list[str] | None = None,
    ids: torch.Tensor | None = None,
    window: int = 512,
    max_windows: int | None = 40,
    batch_size: int = 4,
    progress: bool = True,
) -> PerplexityResult:
    """exp(mean NLL) over every predicted token of the first `max_windows` windows of `window` tokens.

    The text is the protocol's evaluation split of `source` unless `texts` (documents) or `ids`
    (a 1-D token tensor) is given. `max_windows=None` uses every full window.
    """
    label = "custom" if (texts is not None or ids is not None) else str(source)
    if ids is None:
        ids = join_and_tokenize(tokenizer, texts if texts is not None else evaluation_texts(source))
    ids = ids.reshape(-1)
    if window < 2:
        raise LeanLMError(f"window must be at least 2 tokens, got {window}")
    n_full = ids.numel() // window
    if n_full == 0:
        raise LeanLMError(
            f"evaluation text has {ids.numel()} tokens, fewer than one window of {window}; "
            "pass a longer text or a smaller --window"
        )
    n = n_full if max_windows is None else min(n_full, max_windows)
    if max_windows is not None and n < max_windows:
        warnings.warn(f"evaluation text gives only {n} windows of {window} tokens (asked for {max_windows}); using {n}")
    windows = ids[: n * window].view(n, window)
    device = next(model.parameters()).device
    total_nll, total_tok = 0.0, 0
    for i in tqdm(range(0, n, batch_size), desc="perplexity", unit="batch", disable=not progress, leave=False):
        batch = windows[i : i + batch_size].to(device)
        logits = logits_of(model, batch)[:, :-1].float()
        targets = batch[:, 1:]
        nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="sum")
        if not torch.isfinite(nll):
            raise LeanLMError("the model produced NaN/inf log-likelihoods; its weights or activations are broken (check the quantization or dtype)")
        total_nll += nll.item()
        total_tok += targets.numel()
    mean = total_nll / total_tok
    return PerplexityResult(math.exp(mean), mean, total_tok, n, window, label)
