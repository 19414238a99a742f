"""Mask selection and weight reconstruction for one Linear weight ``w`` [out, in].

Every function returns a bool ``keep`` mask (True = weight stays) with the target met exactly in
every output row: unstructured keeps ``in - round(sparsity * in)`` weights per row, ``n:m`` keeps
``n`` of every ``m`` consecutive input weights. Scores are compared within an output row (Wanda's
per-output comparison group, used here for every method), ties broken by column order (stable sort).
"""

from __future__ import annotations

import torch

from ..quantization.algorithms import inverse_cholesky
from .config import Target


def _prune_lowest(score: torch.Tensor, k: int | torch.Tensor) -> torch.Tensor:
    """keep mask that drops the ``k`` lowest scores of each row of ``score`` [rows, cols] (``k`` an
    int, or a LongTensor [rows] with a count per row)."""
    if isinstance(k, int):
        keep = torch.ones_like(score, dtype=torch.bool)
        if k > 0:
            keep.scatter_(1, torch.argsort(score, dim=1, stable=True)[:, :k], False)
        return keep
    rank = torch.empty_like(score, dtype=torch.long)
    order = torch.argsort(score, dim=1, stable=True)
    rank.scatter_(1, order, torch.arange(score.shape[1], device=score.device).expand_as(order))
    return rank >= k.to(score.device)[:, None]


def keep_mask(score: torch.Tensor, target: Target) -> torch.Tensor:
    """keep mask for a score matrix [out, in] (higher = more important) meeting ``target`` per row."""
    out_f, in_f = score.shape
    if target.structured:
        g = score.reshape(out_f, in_f // target.m, target.m).reshape(-1, target.m)
        return _prune_lowest(g, target.m - target.n).reshape(out_f, in_f)
    return _prune_lowest(score, round(target.sparsity * in_f))


@torch.no_grad()
def magnitude_mask(w: torch.Tensor, target: Target) -> torch.Tensor:
    """Magnitude pruning: drop the smallest |w| (Han et al. 2015), per output row."""
    return keep_mask(w.detach().float().abs(), target)


@torch.no_grad()
def wanda_mask(w: torch.Tensor, x_norm: torch.Tensor, target: Target) -> torch.Tensor:
    """Wanda (Sun et al. 2023, "A Simple and Effective Pruning Approach for Large Language Models",
    arXiv:2306.11695): score ``|W_ij| * ||X_j||_2`` with ``X_j`` input channel j over all calibration
    tokens, compared per output row. No weight update. ``x_norm`` [in]."""
    return keep_mask(w.detach().float().abs() * x_norm.detach().float().to(w.device)[None, :], target)


@torch.no_grad()
def channel_norms(x: torch.Tensor) -> torch.Tensor:
    """``||X_j||_2`` per input channel of inputs ``x`` [..., in] (float32)."""
    return x.detach().reshape(-1, x.shape[-1]).float().pow(2).sum(0).sqrt()


@torch.no_grad()
def sparsegpt(w: torch.Tensor, H: torch.Tensor, target: Target, *, block_size: int = 128,
              damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT (Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately
    Pruned in One-Shot", ICML, arXiv:2301.00774, Algorithm 1): columns are processed left to right;
    a pruned weight's error ``w / [H^-1]_jj`` is spread over the not yet processed columns of its row
    with the upper Cholesky factor of ``H^-1`` (the OBS update), with lazy updates per block of
    ``block_size`` columns. The mask is chosen adaptively from the already updated weights by the OBS
    saliency ``w^2 / [H^-1]_jj^2`` (``[H^-1]_jj`` read from the Cholesky factor, as in the reference
    code): for n:m at the start of every group of m columns; for unstructured sparsity once per
    block, per output row. Departure from the paper, which picks one threshold per block over all
    rows (so every block loses the same fraction): here each row prunes exactly ``round(sparsity *
    in)`` weights, and how many of them fall in each block comes from one saliency ranking of the
    whole row before any update (forcing the same fraction in every block lost to Wanda on inputs
    whose channels differ a lot in scale, tests/test_sparsity.py; SmolLM2's channels do differ).

    ``w`` [out, in]; ``H`` [in, in] = 2/n sum x^T x (``HessianAccumulator``); dead inputs (diag 0)
    are handled as in GPTQ. Returns ``(w_new float32 [out, in] with exact zeros, keep bool)``.
    """
    out_f, in_f = w.shape
    dev = w.device
    U = inverse_cholesky(H, dev, "SparseGPT", damp)
    W = w.detach().float().clone()
    keep = torch.ones(out_f, in_f, dtype=torch.bool, device=dev)
    m = target.m
    bs = max(m, block_size // m * m) if m else block_size
    if not m:
        # How many weights each row prunes in each block: from one OBS-saliency ranking of the whole
        # row up front, so that blocks of quiet input channels give up more weights than loud ones.
        d0 = U.diagonal()
        plan = ~keep_mask(W.pow(2) / d0[None, :].pow(2), target)
    for i1 in range(0, in_f, bs):
        i2 = min(i1 + bs, in_f)
        cnt = i2 - i1
        W1 = W[:, i1:i2].T.contiguous()  # [cols, out]: one column's rank-1 update is contiguous
        E1 = torch.empty_like(W1)
        U1 = U[i1:i2, i1:i2]
        d = U1.diagonal()
        dinv = (1.0 / d).tolist()
        K1 = keep[:, i1:i2].T.contiguous()
        if not m:  # the mask inside the block is chosen adaptively, from the updated weights
            k = plan[:, i1:i2].sum(1)
            K1 = _prune_lowest((W1.pow(2) / d[:, None].pow(2)).T, k).T.contiguous()
        for i in range(cnt):
            if m and i % m == 0:
                sal = (W1[i : i + m].pow(2) / d[i : i + m, None].pow(2)).T  # [out, m]
                K1[i : i + m] = keep_mask(sal, target).T
            wc = W1[i]
            err = E1[i]
            torch.sub(wc, wc * K1[i], out=err).mul_(dinv[i])
            W1[i:].addr_(U1[i, i:], err, alpha=-1)
            W1[i].mul_(K1[i])
        W[:, i1:i2] = W1.T
        keep[:, i1:i2] = K1.T
        if i2 < in_f:
            W[:, i2:] -= E1.T @ U[i1:i2, i2:]
    return W * keep, keep
