"""Activation-based importance of every prunable structure, measured on calibration text.

Following Minitron (Muralidharan et al. 2024, "Compact language models via pruning and knowledge
distillation"), importance comes from forward activations only (no gradients), measured block by
block on the core's calibration engine (``leanlm.core.calibrate``):

- attention head h of a layer: squared L2 norm, over all calibration tokens, of that head's output
  (its slice of the input of `o_proj`); a KV group's importance is the sum over its query heads;
- MLP channel c: squared L2 norm of the c-th input of `down_proj` (act(gate) * up);
- hidden (embedding) channel c: squared L2 norm of channel c at the output of every RMSNorm
  (both norms of each layer and the final norm), summed;
- depth: each layer is skipped alone and the calibration NLL (metric "ppl", the log of the
  perplexity) or the block's own input/output cosine distance (metric "cosine": 1 - cos(x, f(x)),
  the Block Influence of ShortGPT, Men et al. 2024) is recorded; layers whose skipping costs least
  are removed first.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..core.arch import arch_of
from ..core.calibrate import LayerStep, calibrate_blocks, register


@dataclass
class Importance:
    heads: list[torch.Tensor]          # per layer: [num_attention_heads]
    channels: list[torch.Tensor]       # per layer: [intermediate_size]
    hidden: torch.Tensor               # [hidden_size]
    layers: torch.Tensor | None        # [num_layers]: cost of skipping each layer (higher = keep)
    layer_metric: str | None


def _nll(model, batches: torch.Tensor, batch_size: int) -> float:
    total, n = 0.0, 0
    for i in range(0, batches.shape[0], batch_size):
        b = batches[i : i + batch_size]
        lg = model(input_ids=b, use_cache=False).logits[:, :-1].float()
        total += F.cross_entropy(lg.reshape(-1, lg.size(-1)), b[:, 1:].reshape(-1), reduction="sum").item()
        n += b[:, 1:].numel()
    return total / n


@torch.inference_mode()
def activation_importance(model: nn.Module, calib: torch.Tensor, *, batch_size: int = 4, progress: bool = True) -> Importance:
    """Heads, MLP channels and hidden channels from one block-by-block pass over `calib` ([N, T] token ids)."""
    arch = arch_of(model)
    heads = [torch.zeros(arch.heads, dtype=torch.float64) for _ in range(arch.n_layers)]
    chans = [torch.zeros(arch.intermediate, dtype=torch.float64) for _ in range(arch.n_layers)]
    imp = Importance(heads, chans, torch.zeros(arch.hidden, dtype=torch.float64), None, None)
    calibrate_blocks(model, calib, [("activation_importance", imp)], batch=batch_size, progress=progress, desc="importance")
    return imp


@register("activation_importance")
def importance_step(step: LayerStep, imp: Importance) -> None:
    """One layer's share of `activation_importance`: hooks on o_proj's and down_proj's inputs and on
    the norms' outputs during the layer's forward (and the final norm after the last layer)."""
    layer, i, arch = step.layer, step.index, arch_of(step.model)
    nh = imp.heads[i].numel()

    def on_o(mod, args):
        imp.heads[i].add_(args[0].float().reshape(-1, nh, args[0].shape[-1] // nh).pow(2).sum((0, 2)).double())

    def on_down(mod, args):
        imp.channels[i].add_(args[0].float().reshape(-1, args[0].shape[-1]).pow(2).sum(0).double())

    def on_norm(mod, args, out):
        imp.hidden.add_(out.float().reshape(-1, out.shape[-1]).pow(2).sum(0).double())

    handles = [layer.get_submodule(arch.o).register_forward_pre_hook(on_o), layer.get_submodule(arch.down).register_forward_pre_hook(on_down)]
    handles += [layer.get_submodule(norm).register_forward_hook(on_norm) for norm in arch.layer_norms]
    try:
        step.out = step.run()
    finally:
        for h in handles:
            h.remove()
    if i == len(imp.heads) - 1:
        for h in step.out:
            on_norm(None, None, arch.body(step.model).norm(h))


@register("block_influence")
def block_influence_step(step: LayerStep, score: torch.Tensor) -> None:
    """ShortGPT's Block Influence of one layer: sum over tokens of 1 - cos(input, output)."""
    step.out = step.run()
    for x, y in zip(step.hidden, step.out):
        score[step.index] += (1 - F.cosine_similarity(x.float(), y.float(), dim=-1)).sum().double()


@torch.inference_mode()
def layer_importance(model: nn.Module, calib: torch.Tensor, metric: str = "ppl", *, batch_size: int = 4,
                     progress: bool = True) -> torch.Tensor:
    """Cost of skipping each decoder layer alone: NLL increase ("ppl") or 1 - cos(in, out) ("cosine")."""
    body = arch_of(model).body(model)
    n = len(body.layers)
    if metric == "cosine":
        score = torch.zeros(n, dtype=torch.float64)
        calibrate_blocks(model, calib, [("block_influence", score)], batch=batch_size, progress=progress, desc="layer importance")
        return score / calib.numel()
    base = _nll(model, calib, batch_size)
    score = torch.zeros(n, dtype=torch.float64)
    full = body.layers
    try:
        for i in tqdm(range(n), desc="layer importance (skip each)", unit="layer", disable=not progress, leave=False):
            body.layers = nn.ModuleList([m for j, m in enumerate(full) if j != i])
            score[i] = _nll(model, calib, batch_size) - base
    finally:
        body.layers = full
    return score
