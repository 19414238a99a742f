"""Activation-based importance of every prunable structure, measured on calibration text.

Following Minitron (Muralidharan et al. 2024, "Compact language models via pruning and knowledge
distillation"), importance comes from forward activations only (no gradients):

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
    """Heads, MLP channels and hidden channels from one pass over `calib` ([N, T] token ids)."""
    arch = arch_of(model)
    layers = arch.layers(model)
    nh, hd = arch.heads, arch.head_dim
    heads = [torch.zeros(nh, dtype=torch.float64) for _ in layers]
    chans = [torch.zeros(arch.intermediate, dtype=torch.float64) for _ in layers]
    hidden = torch.zeros(arch.hidden, dtype=torch.float64)
    handles = []

    def on_o(i):
        def hook(mod, args):
            x = args[0].float()
            heads[i].add_(x.reshape(-1, nh, hd).pow(2).sum((0, 2)).double())
        return hook

    def on_down(i):
        def hook(mod, args):
            chans[i].add_(args[0].float().reshape(-1, args[0].shape[-1]).pow(2).sum(0).double())
        return hook

    def on_norm(mod, args, out):
        hidden.add_(out.float().reshape(-1, out.shape[-1]).pow(2).sum(0).double())

    for i, layer in enumerate(layers):
        handles.append(layer.get_submodule(arch.o).register_forward_pre_hook(on_o(i)))
        handles.append(layer.get_submodule(arch.down).register_forward_pre_hook(on_down(i)))
        for norm in arch.layer_norms:
            handles.append(layer.get_submodule(norm).register_forward_hook(on_norm))
    handles.append(arch.body(model).norm.register_forward_hook(on_norm))
    _forward_all(model, calib, batch_size, handles, "importance", progress)
    return Importance(heads, chans, hidden, None, None)



def _forward_all(model: nn.Module, calib: torch.Tensor, batch_size: int, handles: list, desc: str, progress: bool) -> None:
    """Run the calibration batches through the model (hooks collect the statistics), then remove the hooks."""
    try:
        for i in tqdm(range(0, calib.shape[0], batch_size), desc=desc, unit="batch", disable=not progress, leave=False):
            model(input_ids=calib[i : i + batch_size], use_cache=False)
    finally:
        for h in handles:
            h.remove()

@torch.inference_mode()
def layer_importance(model: nn.Module, calib: torch.Tensor, metric: str = "ppl", *, batch_size: int = 4,
                     progress: bool = True) -> torch.Tensor:
    """Cost of skipping each decoder layer alone: NLL increase ("ppl") or 1 - cos(in, out) ("cosine")."""
    body = arch_of(model).body(model)
    layers = body.layers
    n = len(layers)
    if metric == "cosine":
        score = torch.zeros(n, dtype=torch.float64)
        handles = []

        def on_layer(i):
            def hook(mod, args, kwargs, out):
                x = args[0] if args else kwargs["hidden_states"]
                y = out[0] if isinstance(out, tuple) else out
                score[i] += (1 - F.cosine_similarity(x.float(), y.float(), dim=-1)).sum().double()
            return hook

        for i, layer in enumerate(layers):
            handles.append(layer.register_forward_hook(on_layer(i), with_kwargs=True))
        _forward_all(model, calib, batch_size, handles, "layer importance", progress)
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
