"""The one decode loop over `StepModel`s: speculative decoding, and plain decoding as its special
case (no drafter: one target forward per token). `leanlm.runtime.Engine.generate`
runs this loop too.

Speculative decoding (Leviathan et al. 2023, "Fast Inference from Transformers via Speculative
Decoding"; Chen et al. 2023, "Accelerating LLM Decoding with Speculative Sampling"): a drafter
proposes k tokens, the target scores all of them in one forward pass, and

- greedy (temperature 0): drafts are kept while they equal the target's argmax; the target's own
  argmax follows the last kept one. The output is the target's greedy output, token for token.
- sampling: draft j is kept with probability min(1, p(d_j) / q(d_j)); at the first rejection a token
  is drawn from the residual max(0, p - q) renormalised; if all k are kept, one more is drawn from
  the target's next distribution. Each emitted token is then distributed exactly as p given the
  tokens before it, so the output follows the target's sampling distribution. A deterministic
  drafter (prompt lookup) is the case q = one-hot(d): keep d with probability p(d), else draw from p
  with d removed.

Caches: the target holds every committed token but the last (which is fed with the drafts); after
a round that keeps n drafts it is rewound to drop the rejected positions. The draft model's cache is
rewound by `ModelDrafter` to the prefix it shares with the committed text.

Tree drafts (``tree=``, a `leanlm.speculative.tree.DraftTree`, batch 1): the drafter fills a static
token tree (`propose_tree`), the target scores every node in one forward under a tree attention mask
(`forward_tree`), `verify_tree` accepts the longest path the target agrees with (greedy: token for token
the target's greedy output; sampling: multi-candidate speculative sampling, exact), and the target's
cache keeps only that path's entries (`compact`). See tree.py.

Batch > 1 (rows of equal length, no padding): every row keeps n = the smallest number of drafts
kept by any row, so the caches stay rectangular. A row that kept more than n emits its draft n+1,
which it had accepted, in place of a correction token: still exact, since each emitted token is
either an accepted draft or a correction, each distributed as p given its prefix.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from ..core.errors import LeanLMError
from .adaptive import AdaptiveK
from ..runtime.sampling import Sampling, next_token, sample
from .drafters import ModelDrafter
from .step import as_step_model, vocab_size
from .tree import DraftTree, RankCounts, parse_tree, verify_tree

K_MAX = 64  # largest speculation length accepted


@dataclass
class SpecStats:
    new_tokens: int = 0
    rounds: int = 0                # target verification forwards
    drafted: int = 0               # draft tokens proposed
    accepted: int = 0              # draft tokens kept
    draft_seconds: float = 0.0
    target_seconds: float = 0.0
    ks: list[int] = field(default_factory=list)   # drafts proposed per round
    ranks: RankCounts | None = None               # tree drafts: tries and acceptances per depth and rank

    def rank_acceptance(self) -> list[list[float]]:
        """Tree drafts: acc[d][r], how often the target took the rank-r draft at depth d + 1 when its parent was
        accepted (the input of `tree.tree_from_acceptance`)."""
        return self.ranks.acceptance() if self.ranks is not None else []

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_accepted(self) -> float:
        """Draft tokens kept per verification round."""
        return self.accepted / self.rounds if self.rounds else 0.0

    @property
    def tokens_per_round(self) -> float:
        """Tokens emitted per target forward after the prompt (1.0 for plain decoding)."""
        return (self.new_tokens - 1) / self.rounds if self.rounds else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ranks"] = self.rank_acceptance() if self.ranks is not None else None
        d.update(acceptance_rate=self.acceptance_rate, mean_accepted=self.mean_accepted, tokens_per_round=self.tokens_per_round)
        return d


def _check_prompt(input_ids: torch.Tensor, max_new_tokens: int) -> None:
    if input_ids.dim() != 2 or input_ids.dtype != torch.long or input_ids.shape[1] == 0:
        raise LeanLMError(f"input_ids must be a non-empty LongTensor [batch, length], got {tuple(input_ids.shape)} {input_ids.dtype}")
    if max_new_tokens < 1:
        raise LeanLMError(f"max_new_tokens must be >= 1, got {max_new_tokens}")


def _stop_at_eos(out: torch.Tensor, start: int, eos: int | None) -> tuple[torch.Tensor, bool]:
    """In the tokens generated from ``start`` (the prompt length) on, a row's tokens after its first
    ``eos`` become ``eos``; once every row has one, the output is cut after the last row's first
    ``eos`` and the loop stops (one row: cut right after its first ``eos``)."""
    if eos is None:
        return out, False
    hit = out == eos
    hit[:, :start] = False
    seen = hit.cumsum(1) > 0                       # from a row's first eos on
    out = out.masked_fill(torch.nn.functional.pad(seen[:, :-1], (1, 0)), eos)
    if not bool(seen[:, -1].all()):
        return out, False
    return out[:, : int(seen.long().argmax(1).max()) + 1], True


@torch.inference_mode()
def generate(target, input_ids: torch.Tensor, max_new_tokens: int, sampling: Sampling | None = None, *,
             generator: torch.Generator | None = None, eos_token_id: int | None = None,
             on_token: Callable[[], None] | None = None) -> torch.Tensor:
    """Plain decoding, one target forward per token (the baseline speculative decoding is measured
    against): ``speculative_generate`` without a drafter."""
    return speculative_generate(target, None, input_ids, max_new_tokens, 1, sampling, generator=generator,
                                eos_token_id=eos_token_id, on_token=on_token)[0]


def _check_k(k) -> None:
    if isinstance(k, AdaptiveK):
        if k.k_max > K_MAX:
            raise LeanLMError(f"adaptive k_max {k.k_max} is out of range; use 1..{K_MAX}")
        return
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= K_MAX:
        raise LeanLMError(f"speculation length k={k!r} is out of range; use an integer in 1..{K_MAX} or 'adaptive'")


def _accept_sampled(p, d, q, generator):
    """Modified rejection sampling. p [B, k+1, V] target probs, d [B, k] drafts, q [B, k, V] or None (one-hot).

    Returns (n, y): the number of drafts every row keeps and the token each row emits after them.
    """
    b, k = d.shape
    if k:
        pd = p[:, :k].gather(-1, d[..., None]).squeeze(-1)
        qd = q.gather(-1, d[..., None]).squeeze(-1) if q is not None else torch.ones_like(pd)
        r = torch.rand(b, k, generator=generator)
        keep = r * qd < pd  # accept with probability min(1, p/q)
        n_row = keep.long().cumprod(1).sum(1)
    else:
        n_row = torch.zeros(b, dtype=torch.long)
    n = int(n_row.min())
    y = torch.empty(b, dtype=torch.long)
    for i in range(b):
        if n_row[i] > n:  # this row accepted draft n too (batch > 1 only)
            y[i] = d[i, n]
        elif n == k:  # every draft kept: one more token from the target
            y[i] = sample(p[i, n][None], generator)[0]
        else:  # rejected at n: draw from the residual max(0, p - q)
            qn = q[i, n] if q is not None else torch.nn.functional.one_hot(d[i, n], p.shape[-1]).float()
            res = (p[i, n] - qn).clamp_min(0)
            s = res.sum()
            y[i] = sample((res / s if s > 0 else p[i, n])[None], generator)[0]
    return n, y


def _tree_round(target, drafter, tree: DraftTree, out: torch.Tensor, sampling: Sampling, generator, stats: SpecStats):
    """One tree round: draft the tree, verify all its nodes in one target forward, keep the accepted path."""
    t0 = time.perf_counter()
    d, q = drafter.propose_tree(out, tree, sampling, generator)            # [1, N] node tokens, q [1, N, V] or None
    t1 = time.perf_counter()
    base = target.length
    logits = target.forward_tree(torch.cat([out[:, -1:], d], 1), base + tree.depth, tree.mask)
    path, y = verify_tree(logits[0], d[0], tree, sampling, q[0] if q is not None else None, generator)
    target.compact(base, torch.tensor([0] + path, dtype=torch.long))
    t2 = time.perf_counter()
    new = torch.tensor([[int(d[0, c - 1]) for c in path] + [y]], dtype=torch.long)
    stats.rounds += 1
    stats.drafted += tree.size
    stats.accepted += len(path)
    stats.ks.append(tree.size)
    stats.ranks.add(tree, path)
    stats.draft_seconds += t1 - t0
    stats.target_seconds += t2 - t1
    return torch.cat([out, new], 1), len(path)


@torch.inference_mode()
def speculative_generate(target, drafter, input_ids: torch.Tensor, max_new_tokens: int, k: int | str | AdaptiveK = 4,
                         sampling: Sampling | None = None, *, generator: torch.Generator | None = None,
                         eos_token_id: int | None = None, on_token: Callable[[], None] | None = None,
                         tree: DraftTree | str | list | None = None) -> tuple[torch.Tensor, SpecStats]:
    """Generate `max_new_tokens` tokens after `input_ids` [B, L] with `drafter` proposing and `target` verifying.

    `target`: a StepModel or a Hugging Face causal LM. `drafter`: a `ModelDrafter`,
    `PromptLookupDrafter` or a Hugging Face model (wrapped in a ModelDrafter); None drafts nothing
    (plain decoding, one target forward per token). `k`: drafts per round
    (1..64), or "adaptive" / an `AdaptiveK` to choose it each round. `tree`: draft a static tree instead of a
    chain (a `DraftTree`, its paths, or "default"; `k` is then unused; batch 1; a drafter with `propose_tree`,
    a target with `forward_tree`). Returns (ids [B, L + new], stats).
    """
    _check_prompt(input_ids, max_new_tokens)
    sampling = sampling or Sampling()
    target = as_step_model(target)
    if isinstance(drafter, torch.nn.Module) or hasattr(drafter, "rewind"):
        drafter = ModelDrafter(drafter)
    if drafter is not None and not hasattr(drafter, "propose") and not hasattr(drafter, "propose_tree"):
        raise LeanLMError(f"{type(drafter).__name__} is not a drafter; pass a draft model, ModelDrafter or PromptLookupDrafter")
    if isinstance(drafter, ModelDrafter):
        vt, vd = vocab_size(target), vocab_size(drafter.step)
        if vt is not None and vd is not None and vt != vd:
            raise LeanLMError(f"the draft model's vocabulary has {vd} tokens, the target's {vt}: a draft must use the target's "
                              "tokenizer; pick a draft of the same model family, or use prompt lookup")
    adaptive = AdaptiveK() if k == "adaptive" else k
    if tree is not None:
        tree = parse_tree(tree)
        if not hasattr(drafter, "propose_tree"):
            raise LeanLMError(f"{type(drafter).__name__ if drafter is not None else 'no drafter'} cannot draft a tree; tree drafts "
                              "need a draft head (EagleDrafter, MedusaDrafter) or a draft model (ModelDrafter); prompt lookup drafts chains (drop tree=)")
        if not hasattr(target, "forward_tree"):
            raise LeanLMError(f"{type(target).__name__} cannot verify a draft tree (no forward_tree); use the leanlm runtime "
                              "Engine or a Hugging Face model as the target, or a chain")
        if input_ids.shape[0] != 1:
            raise LeanLMError(f"tree drafts take one prompt row, got {input_ids.shape[0]}; use a chain (k) for a batch")
        if isinstance(adaptive, AdaptiveK):
            raise LeanLMError("a draft tree has a fixed shape; drop adaptive k or the tree")
    else:
        _check_k(adaptive)
        if drafter is not None and not hasattr(drafter, "propose"):
            raise LeanLMError(f"{type(drafter).__name__} drafts trees only; pass tree= (e.g. tree='default')")
    stats = SpecStats(ranks=RankCounts() if tree is not None else None)
    target.reset()
    if drafter is not None:
        if hasattr(drafter, "attach"):   # a drafter that reads the target's hidden states (EAGLE)
            drafter.attach(target)
        drafter.start(input_ids)

    t0 = time.perf_counter()
    y = next_token(target.forward(input_ids, last_only=True), sampling, generator)  # a long prompt's logits are never all held
    stats.target_seconds += time.perf_counter() - t0
    out = torch.cat([input_ids, y[:, None]], 1)
    emitted = 1
    if on_token:
        on_token()
    out, stop = _stop_at_eos(out, input_ids.shape[1], eos_token_id)
    while not stop and emitted < max_new_tokens:
        if tree is not None and max_new_tokens - emitted > 1:
            out, n = _tree_round(target, drafter, tree.truncate(max_new_tokens - emitted - 1), out, sampling, generator, stats)
            emitted += n + 1
            if on_token:
                for _ in range(n + 1):
                    on_token()
            out, stop = _stop_at_eos(out, input_ids.shape[1], eos_token_id)
            continue
        want = adaptive.choose() if isinstance(adaptive, AdaptiveK) else adaptive
        want = min(want, max_new_tokens - emitted - 1)
        t0 = time.perf_counter()
        if want > 0 and drafter is not None:
            d, q = drafter.propose(out, want, sampling, generator)
        else:
            d, q = out[:, :0], None
        t1 = time.perf_counter()
        base = target.length
        logits = target.forward(torch.cat([out[:, -1:], d], 1))
        kd = d.shape[1]
        if kd == 0:  # nothing drafted: a plain decoding step
            n, y = 0, next_token(logits[:, 0], sampling, generator)
        elif sampling.greedy:
            tgt = logits.argmax(-1)
            n = int((d == tgt[:, :kd]).long().cumprod(1).sum(1).min())
            y = tgt[:, n]
        else:
            n, y = _accept_sampled(sampling.probs(logits), d, q, generator)
        target.rewind(base + 1 + n)
        t2 = time.perf_counter()
        new = torch.cat([d[:, :n], y[:, None]], 1)
        out = torch.cat([out, new], 1)
        emitted += n + 1
        stats.rounds += 1
        stats.drafted += kd
        stats.accepted += n
        stats.ks.append(kd)
        stats.draft_seconds += t1 - t0
        stats.target_seconds += t2 - t1
        if isinstance(adaptive, AdaptiveK):
            adaptive.observe(kd, n, t1 - t0, kd + 1, t2 - t1)
        if on_token:
            for _ in range(n + 1):
                on_token()
        out, stop = _stop_at_eos(out, input_ids.shape[1], eos_token_id)
    if hasattr(drafter, "detach"):
        drafter.detach()
    stats.new_tokens = out.shape[1] - input_ids.shape[1]
    return out, stats
