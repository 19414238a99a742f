"""Medusa draft heads: k small residual blocks over the target's last feature, head i predicting the token i + 1
positions ahead (Cai et al. 2024, "Medusa: Simple LLM Inference Acceleration Framework with Multiple Decoding
Heads", Medusa-1: the target stays frozen).

    head i:  h_i = f_t + SiLU(W_i f_t)   (one residual block per head, W_i starts at zero)  ->  lm_head rows  ->  x_{t+1+i}

All k drafts of a round come from one feature, the one the target computed last (so a round costs k tiny
blocks and k reduced-vocabulary products, no sequential head steps): the simpler baseline to EAGLE
(`eagle.py`), whose one-layer decoder drafts autoregressively from the features it predicts.

Decisions (docs/speculative.md): the head rows are the target's lm_head rows of a reduced draft vocabulary,
frozen and not stored (Medusa-1 trains a full output head per Medusa head: 28M weights each on SmolLM2, 5x
the size limit of the whole head file); the training text, the target fingerprint, the head folder, the
trainer and the tree measurement are EAGLE's (`eagle.train_head`, `eagle.save_head`, `eagle.load_head`).
Loss: the sum over heads of 0.8^i x cross-entropy to the target's own next-token distribution at that
position (Medusa's head weights, with the target's distribution as the label: self-distillation).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import LeanLMError
from ..runtime.sampling import Sampling, sample
from .eagle import FeatureDrafter

FORMAT = "leanlm-medusa-1"


@dataclass
class MedusaConfig:
    hidden: int
    vocab: int
    draft_vocab: int
    heads: int            # Medusa heads: head i (0-based) drafts the token i + 1 positions after the next one
    target_hash: str
    target_type: str = ""
    layers: int = 1       # residual blocks per head


class ResBlock(nn.Module):
    """x + SiLU(W x + b), W and b starting at zero (so a fresh head predicts what the target's own head would)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.linear = nn.Linear(hidden, hidden)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x):
        return x + F.silu(self.linear(x))


class MedusaHead(nn.Module):
    """`cfg.heads` stacks of residual blocks over a feature, each read by the target's lm_head rows at `vocab_map`
    (held, never trained or saved). `embed` is accepted for the shared head constructor and not used."""

    METHOD, FORMAT = "medusa", FORMAT

    @staticmethod
    def config_for(arch, draft_vocab: int, target: str, heads: int = 4) -> MedusaConfig:
        """The config of `heads` Medusa heads for a target of architecture `arch`."""
        if heads < 1:
            raise LeanLMError(f"a Medusa head needs --heads >= 1, got {heads}")
        return MedusaConfig(hidden=arch.hidden, vocab=arch.vocab, draft_vocab=draft_vocab, heads=heads,
                            target_hash=target, target_type=arch.model_type)

    def __init__(self, cfg: MedusaConfig, embed: nn.Module, head_rows: torch.Tensor, vocab_map: torch.Tensor):
        super().__init__()
        self.cfg = cfg
        self.blocks = nn.ModuleList([nn.Sequential(*[ResBlock(cfg.hidden) for _ in range(cfg.layers)]) for _ in range(cfg.heads)])
        self.register_buffer("vocab_map", vocab_map.long().clone())
        object.__setattr__(self, "head_rows", head_rows.detach().float())   # [draft_vocab, hidden], frozen

    @property
    def max_tree_depth(self) -> int:
        return self.cfg.heads

    def trained_state(self) -> dict[str, torch.Tensor]:
        return dict(self.state_dict())

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """feats [..., H] (f_t) -> draft logits [..., heads, draft_vocab]; head i scores x_{t+2+i}."""
        rows = self.head_rows.to(feats.dtype).T
        return torch.stack([b(feats) @ rows for b in self.blocks], -2)


class MedusaLoss:
    """The shared trainer's loss over windows of flat positions (`eagle.self_distill_data` layout): head i's logits on
    f_t against the target's next-token distribution at t + 1 + i, softmax(lm_head(f_{t+1+i})) over the draft
    vocabulary, weighted 0.8^i; pairs that cross a sequence boundary are masked."""

    def __init__(self, data: dict[str, torch.Tensor], decay: float = 0.8):
        self.d, self.decay = data, decay

    def __call__(self, head: MedusaHead, idx: torch.Tensor):
        d = self.d
        f = d["feats"][idx].float()                              # [B, S, H]
        logits = head(f).float()                                 # [B, S, K, V]
        with torch.no_grad():
            p_all = (f @ head.head_rows.T).softmax(-1)           # the target's distribution after each position
        loss, stats = 0.0, {}
        S = idx.shape[1]
        for i in range(min(head.cfg.heads, S - 2)):
            a, b = idx[:, : S - 1 - i], idx[:, 1 + i:]
            valid = (d["seq"][a] == d["seq"][b]).float()
            p = p_all[:, 1 + i:]
            logq = logits[:, : S - 1 - i, i].log_softmax(-1)
            ce = (-(p * logq).sum(-1) * valid).sum() / valid.sum().clamp_min(1)
            loss = loss + self.decay**i * ce
            if i == 0:
                with torch.no_grad():
                    stats["top1"] = (((logq.argmax(-1) == p.argmax(-1)).float() * valid).sum() / valid.sum().clamp_min(1)).item()
                stats["ce"] = ce.item()
        return loss, stats


class MedusaDrafter(FeatureDrafter):
    """A drafter (`start` / `propose` / `propose_tree`) running a `MedusaHead` on the target's last feature."""

    def start(self, prompt: torch.Tensor) -> None:
        self.feats = torch.zeros(prompt.shape[0], 0, self.head.cfg.hidden)

    def _logits(self, ctx: torch.Tensor) -> torch.Tensor:
        """The heads' draft logits [B, heads, draft_vocab] for the tokens after ctx, from the feature of ctx[-2] (the last
        one the target computed: ctx[-1] is the token it chose there)."""
        self._require_target()
        self._collect()
        if self.feats.shape[1] != ctx.shape[1] - 1:
            raise LeanLMError("MedusaDrafter lost track of the target's features; it must see every target forward")
        return self.head(self.feats[:, -1])

    @torch.inference_mode()
    def propose(self, ctx: torch.Tensor, k: int, sampling: Sampling, generator=None):
        lg = self._logits(ctx)[:, : min(k, self.head.cfg.heads)]
        vmap = self.head.vocab_map
        if sampling.greedy:
            return vmap[lg.argmax(-1)], None
        full = torch.full((*lg.shape[:2], self.head.cfg.vocab), float("-inf"))
        full[..., vmap] = lg.float()
        q = sampling.probs(full)
        toks = torch.stack([sample(q[:, i], generator) for i in range(q.shape[1])], 1)
        return toks, q

    @torch.inference_mode()
    def propose_tree(self, ctx: torch.Tensor, tree, sampling: Sampling, generator=None):
        """Fill a static `DraftTree` (batch 1): the children of every node at depth d are head d's top-ranked tokens
        (Medusa's trees: the same candidates under every parent), deterministic, so q is None."""
        if ctx.shape[0] != 1:
            raise LeanLMError(f"tree drafts take one prompt row, got {ctx.shape[0]}; use a chain (k) for a batch")
        if tree.max_depth > self.head.cfg.heads:
            raise LeanLMError(f"a Medusa head with {self.head.cfg.heads} heads drafts trees of depth at most {self.head.cfg.heads}, "
                              f"this tree has depth {tree.max_depth}; choose a shallower tree (or train more heads with --heads)")
        lg = self._logits(ctx)[0]
        tokens = torch.zeros(tree.size + 1, dtype=torch.long)
        for d in range(tree.max_depth):
            for u in tree.inner(d):
                tree.fill_children(u, lg[d], tokens, self.head.vocab_map)
        return tokens[1:][None], None
