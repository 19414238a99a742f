"""Masks on sparsified Linears: a ``weight_mask`` bool buffer each, kept through training, reported,
saved and re-attached on load.

``weight_mask`` is True where the weight stays. It is a persistent buffer, so ``state_dict()`` and
``torch.save`` carry it; ``leanlm.save`` writes the model as a plain Hugging Face folder (dense
weights holding exact zeros, readable by transformers alone) plus the masks, bit-packed, in
``sparsity_masks.safetensors``, listed in the folder's manifest ``leanlm.json``; ``leanlm.load``
re-attaches them.
"""

from __future__ import annotations

import torch
from torch import nn

from ..core.errors import LeanLMError

MASK = "weight_mask"
MASKS_FILE = "sparsity_masks.safetensors"


def attach_mask(linear: nn.Module, keep: torch.Tensor) -> None:
    """Store ``keep`` as the Linear's ``weight_mask`` buffer and zero the pruned weights."""
    keep = keep.to(device=linear.weight.device, dtype=torch.bool)
    if keep.shape != linear.weight.shape:
        raise LeanLMError(f"mask of shape {list(keep.shape)} does not match weight {list(linear.weight.shape)}")
    if MASK in linear._buffers:
        linear._buffers[MASK] = keep
    else:
        linear.register_buffer(MASK, keep, persistent=True)
    with torch.no_grad():
        linear.weight.mul_(keep)


def masked_linears(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(getattr(m, MASK, None), torch.Tensor)}


@torch.no_grad()
def apply_masks(model: nn.Module) -> int:
    """Zero every masked weight (in place); returns how many Linears were masked."""
    mods = masked_linears(model)
    for m in mods.values():
        m.weight.mul_(m.weight_mask)
    return len(mods)


class MaskKeeper:
    """Keeps a sparsified model sparse while it trains (fine-tuning, distillation).

    The shared trainer (``leanlm.distill.train``) attaches one by itself whenever the model has
    masks; in a loop of your own, call ``keeper(model, step)`` after every optimizer step: it zeroes
    the pruned weights (momentum or weight decay would otherwise revive
    them). With ``mask_grads`` (default) it also zeroes their gradients through tensor hooks, so
    optimizer states of pruned weights stay zero too; ``remove()`` takes the hooks off.
    """

    def __init__(self, model: nn.Module, mask_grads: bool = True):
        self.linears = masked_linears(model)
        if not self.linears:
            raise LeanLMError("the model has no sparsity masks (weight_mask buffers); sparsify it first "
                              "(leanlm.sparsity.sparsify_) or load it with leanlm.load")
        self._hooks = []
        if mask_grads:
            for m in self.linears.values():
                self._hooks.append(m.weight.register_hook(lambda g, m=m: g * m.weight_mask))

    @torch.no_grad()
    def __call__(self, model: nn.Module | None = None, step: int | None = None) -> None:
        for m in self.linears.values():
            m.weight.mul_(m.weight_mask)

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []


@torch.no_grad()
def sparsity_report(model: nn.Module) -> list[dict]:
    """One row per nn.Linear: name, shape, whether it is masked, the mask's sparsity and the actual
    fraction of zero weights, and for masks the n:m pattern it satisfies (if 2:4 or 4:8 hold)."""
    rows = []
    for n, m in model.named_modules():
        if not isinstance(m, nn.Linear):
            continue
        w = m.weight
        mask = getattr(m, MASK, None)
        row = {"name": n, "shape": list(w.shape), "masked": mask is not None,
               "zeros": float((w == 0).float().mean()), "mask_sparsity": None, "nm": None}
        if mask is not None:
            row["mask_sparsity"] = float(1 - mask.float().mean())
            row["nm"] = next((f"{k}:{g}" for k, g in ((2, 4), (4, 8)) if w.shape[1] % g == 0
                              and int(mask.reshape(-1, g).sum(1).max()) <= k), None)
        rows.append(row)
    return rows


def overall_sparsity(model: nn.Module) -> dict:
    """Zero fraction over the masked Linears and over every Linear weight (the head counted once)."""
    masked = total = zm = zt = 0
    seen = set()
    for m in model.modules():
        if isinstance(m, nn.Linear) and m.weight.data_ptr() not in seen:
            seen.add(m.weight.data_ptr())
            z = int((m.weight == 0).sum())
            total, zt = total + m.weight.numel(), zt + z
            if getattr(m, MASK, None) is not None:
                masked, zm = masked + m.weight.numel(), zm + z
    return {"masked_params": masked, "masked_zero_fraction": zm / max(masked, 1),
            "linear_params": total, "linear_zero_fraction": zt / max(total, 1)}


def _pack(mask: torch.Tensor) -> torch.Tensor:
    b = mask.reshape(-1).to(torch.uint8)
    pad = (-b.numel()) % 8
    if pad:
        b = torch.cat([b, b.new_zeros(pad)])
    return (b.reshape(-1, 8) << torch.arange(8, dtype=torch.uint8)).sum(1, dtype=torch.uint8)


def _unpack(p: torch.Tensor, shape: list[int]) -> torch.Tensor:
    n = 1
    for s in shape:
        n *= s
    bits = (p[:, None] >> torch.arange(8, dtype=torch.uint8)) & 1
    return bits.reshape(-1)[:n].bool().reshape(shape)


def mask_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, list[int]]]:
    """Every ``weight_mask``, bit-packed, and each masked Linear's weight shape (what `leanlm.state.save` writes)."""
    mods = masked_linears(model)
    return ({f"{n}.{MASK}": _pack(m.weight_mask.cpu()) for n, m in mods.items()},
            {n: list(m.weight.shape) for n, m in mods.items()})


def restore_masks(model: nn.Module, packed: dict[str, torch.Tensor], shapes: dict[str, list[int]], where: str = "the checkpoint") -> nn.Module:
    """Re-attach masks saved by `mask_tensors` to `model` (loaded from the same folder)."""
    mods = dict(model.named_modules())
    for name, shape in shapes.items():
        key = f"{name}.{MASK}"
        if name not in mods or list(mods[name].weight.shape) != list(shape) or key not in packed:
            raise LeanLMError(f"{where}: the mask for {name} does not match the model; load the model from the same folder")
        attach_mask(mods[name], _unpack(packed[key], list(shape)))
    return model
