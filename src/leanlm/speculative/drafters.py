"""Drafters: what proposes the tokens the target verifies.

A drafter has ``start(prompt)`` and ``propose(ctx, k, sampling, generator) -> (tokens [B, k'], q)``
where ``ctx`` is every committed token so far ([B, L], the last one not yet seen by the target),
``k' <= k`` and ``q`` is the drafter's distribution ``[B, k', V]`` the tokens were drawn from, or
``None`` for a deterministic drafter (a one-hot q: prompt lookup, greedy drafts).

- `ModelDrafter`: a smaller causal LM with the same vocabulary (Leviathan et al. 2023; Chen et al.
  2023). Its KV cache is kept across rounds and rewound to the longest prefix it shares with the
  committed text. It drafts chains (`propose`) or static trees (`propose_tree`, tree.py).
- `PromptLookupDrafter`: no model; copies the tokens that followed the latest earlier occurrence of
  the text's last n-gram (prompt lookup decoding, Saxena 2023; the "copy" drafts of LLMA, Yang et al. 2023).
"""

from __future__ import annotations

import torch

from ..core.errors import LeanLMError
from ..runtime.sampling import Sampling, sample
from .step import as_step_model


def common_prefix(a: torch.Tensor, b: torch.Tensor) -> int:
    """Length of the prefix shared by every row of two [B, *] token tensors."""
    n = min(a.shape[1], b.shape[1])
    diff = (a[:, :n] != b[:, :n]).any(0).nonzero()
    return int(diff[0]) if len(diff) else n


class ModelDrafter:
    """Drafts with a smaller causal LM (a `StepModel`, or any Hugging Face model through `HFStepModel`)."""

    def __init__(self, model):
        self.step = as_step_model(model)
        self.held = torch.zeros(1, 0, dtype=torch.long)  # tokens in the draft's cache

    def start(self, prompt: torch.Tensor) -> None:
        self.step.reset()
        self.held = prompt[:, :0]

    @torch.inference_mode()
    def propose(self, ctx: torch.Tensor, k: int, sampling: Sampling, generator=None):
        keep = min(common_prefix(self.held, ctx), ctx.shape[1] - 1)
        self.step.rewind(keep)
        feed = ctx[:, keep:]
        toks, qs = [], []
        for _ in range(k):
            logits = self.step.forward(feed)[:, -1]
            if sampling.greedy:
                t = logits.argmax(-1)
            else:
                q = sampling.probs(logits)
                t = sample(q, generator)
                qs.append(q)
            toks.append(t)
            feed = t[:, None]
        # the last draft token is never fed: the cache holds ctx + toks[:-1]
        self.held = torch.cat([ctx, torch.stack(toks[:-1], 1)], 1) if k > 1 else ctx
        return torch.stack(toks, 1), (torch.stack(qs, 1) if qs else None)


    @torch.inference_mode()
    def propose_tree(self, ctx: torch.Tensor, tree, sampling: Sampling, generator=None):
        """Fill a static `DraftTree` (batch 1): each node's children are the draft model's top-ranked tokens there
        (deterministic: q is None, exact through `tree.verify_tree`'s one-hot rule). One draft forward per depth: the
        non-leaf nodes of a depth go in together (`forward_tree`), each seeing the committed text and its ancestors
        fed at earlier depths; the tree's entries are dropped from the draft's cache afterwards."""
        if ctx.shape[0] != 1:
            raise LeanLMError(f"tree drafts take one prompt row, got {ctx.shape[0]}; use a chain (k) for a batch")
        if not hasattr(self.step, "forward_tree"):
            raise LeanLMError(f"the draft {type(self.step).__name__} cannot run a tree (no forward_tree); use a chain")
        keep = min(common_prefix(self.held, ctx), ctx.shape[1] - 1)
        self.step.rewind(keep)
        logits = {0: self.step.forward(ctx[:, keep:])[0, -1]}
        self.held = ctx
        base = self.step.length
        tokens = torch.zeros(tree.size + 1, dtype=torch.long)
        slot = {}                                             # node -> its entry after base in the draft's cache
        for d in range(tree.max_depth):
            level = tree.inner(d)
            for u in level:
                tree.fill_children(u, logits[u], tokens)
            grow = [c for u in level for c in tree.children[u] if tree.children[c]]
            if not grow:
                continue
            fed = self.step.length - base
            mask = tree.feed_mask(grow, slot, fed + len(grow))
            lg = self.step.forward_tree(tokens[grow][None], torch.full((len(grow),), base + d), mask)[0]
            for i, c in enumerate(grow):
                logits[c], slot[c] = lg[i], fed + i
        self.step.rewind(base)
        return tokens[1:][None], None


class PromptLookupDrafter:
    """Copies the continuation of the latest earlier match of the last n tokens (n from max_ngram down to min_ngram)."""

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1):
        if not 1 <= min_ngram <= max_ngram:
            raise LeanLMError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram} and {max_ngram}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def start(self, prompt: torch.Tensor) -> None:
        pass

    def lookup(self, row: torch.Tensor, k: int) -> torch.Tensor:
        n_tok = row.shape[0]
        for n in range(min(self.max_ngram, n_tok - 1), self.min_ngram - 1, -1):
            tail = row[-n:]
            win = row[:-1].unfold(0, n, 1)  # every n-gram that has at least one token after it
            hits = (win == tail).all(-1).nonzero().flatten()
            if len(hits):
                start = int(hits[-1]) + n
                return row[start : start + k]
        return row[:0]

    def propose(self, ctx: torch.Tensor, k: int, sampling: Sampling, generator=None):
        rows = [self.lookup(r, k) for r in ctx]
        m = min(len(r) for r in rows)
        return torch.stack([r[:m] for r in rows]), None
