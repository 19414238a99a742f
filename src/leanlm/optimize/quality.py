"""Quality of a candidate against the original model on held-out text: perplexity increase, next-token
agreement and KL divergence, on windows the calibration text never touches.

The held-out token stream (the protocol's evaluation split, or the user's --quality-text) is cut into
non-overlapping windows; the first `search_windows` are the search's, the next `check_windows` are kept
for the final check of the chosen candidate only (the search never sees them). The original model's
per-window figures are computed once: its argmax at every position (agreement), its NLL (perplexity)
and its log-probabilities at every `kl_stride`-th position in bfloat16 (KL; a full vocabulary at every
position would not fit in memory).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from ..core.data import evaluation_texts, join_and_tokenize, read_user_texts
from ..core.errors import LeanLMError
from ..evaluation.perplexity import logits_of


@dataclass
class Quality:
    perplexity: float
    perplexity_base: float
    loss: float              # relative perplexity increase: perplexity / perplexity_base - 1
    agreement: float         # fraction of positions whose argmax equals the original model's
    kl: float                # mean KL(original || candidate) in nats per position (every kl_stride-th position)
    windows: int
    tokens: int

    def to_dict(self) -> dict:
        return asdict(self)


class QualityProbe:
    """Held-out windows and the original model's reference figures on them."""

    def __init__(self, model, tokenizer, text: str | None = None, window: int = 512, search_windows: int = 8,
                 check_windows: int = 8, kl_stride: int = 8, progress: bool = False):
        texts = read_user_texts(text) if text else evaluation_texts("wiki")
        need = (search_windows + check_windows) * window
        chars = need * 6           # tokenize only as much text as the windows need (doubling until it is enough)
        while True:
            head, n_chars = [], 0
            for t in texts:
                head.append(t)
                n_chars += len(t) + 2
                if n_chars >= chars:
                    break
            ids = join_and_tokenize(tokenizer, head)
            if ids.numel() >= need or len(head) == len(texts):
                break
            chars *= 2
        if ids.numel() < 2 * window:
            raise LeanLMError(f"the quality text has {ids.numel()} tokens, fewer than two windows of {window} (one to search "
                              "with, one to check on); pass a longer --quality-text")
        n = min(ids.numel() // window, search_windows + check_windows)
        check = max(1, min(check_windows, n // 2)) if ids.numel() < need else check_windows
        self.window, self.kl_stride = window, kl_stride
        w = ids[: n * window].view(n, window)
        self.search, self.check = w[: n - check], w[n - check:]
        self.progress = progress
        self._ref: dict[tuple[str, int], tuple] = {}
        self.model = model

    def _reference(self, split: str, i: int):
        key = (split, i)
        if key not in self._ref:
            batch = (self.search if split == "search" else self.check)[i : i + 1]
            with torch.inference_mode():
                lg = logits_of(self.model, batch)[0, :-1].float()
            logp = F.log_softmax(lg, -1)
            tgt = batch[0, 1:]
            nll = -logp.gather(-1, tgt[:, None]).sum().item()
            self._ref[key] = (lg.argmax(-1), nll, logp[:: self.kl_stride].to(torch.bfloat16))
        return self._ref[key]

    @torch.inference_mode()
    def measure(self, model, windows: int | None = None, split: str = "search") -> Quality:
        """Quality of `model` on the first `windows` windows of `split` ("search" or "check")."""
        src = self.search if split == "search" else self.check
        n = len(src) if windows is None else min(windows, len(src))
        nll = nll_base = 0.0
        agree = kl = 0.0
        kl_n = tok = 0
        for i in range(n):
            ref_arg, ref_nll, ref_logp = self._reference(split, i)
            batch = src[i : i + 1]
            lg = logits_of(model, batch)[0, :-1].float()
            logp = F.log_softmax(lg, -1)
            tgt = batch[0, 1:]
            v = -logp.gather(-1, tgt[:, None]).sum().item()
            if not math.isfinite(v):
                raise LeanLMError("the candidate produced NaN/inf log-likelihoods; its weights or activations are broken")
            nll += v
            nll_base += ref_nll
            agree += (lg.argmax(-1) == ref_arg).sum().item()
            sub = logp[:: self.kl_stride]
            kl += F.kl_div(sub, ref_logp.float(), log_target=True, reduction="sum").item()
            kl_n += sub.shape[0]
            tok += tgt.numel()
        ppl, base = math.exp(nll / tok), math.exp(nll_base / tok)
        return Quality(ppl, base, ppl / base - 1, agree / tok, max(kl / kl_n, 0.0), n, tok)
