"""Sparsity: unstructured and n:m (2:4) pruning with magnitude, Wanda or SparseGPT; masks that survive
training and saving.

    from leanlm.sparsity import SparsityConfig, sparsify_, MaskKeeper, sparsity_report
    report = sparsify_(model, SparsityConfig("sparsegpt", pattern="2:4"), tokenizer=tok)
    leanlm.distill.distill(model, teacher, ...)        # the shared trainer keeps the zeros (MaskKeeper)
"""

from .algorithms import magnitude_mask, sparsegpt, wanda_mask
from .api import candidates, sparsify_, sparsify_and_distill
from .config import METHODS, SparsityConfig, Target, parse_pattern
from .masks import (MaskKeeper, apply_masks, attach_mask, mask_tensors, masked_linears, overall_sparsity, restore_masks,
                    sparsity_report)

__all__ = [
    "SparsityConfig", "Target", "METHODS", "parse_pattern", "sparsify_", "sparsify_and_distill", "candidates", "MaskKeeper", "apply_masks",
    "attach_mask", "masked_linears", "sparsity_report", "overall_sparsity", "mask_tensors", "restore_masks", "magnitude_mask", "wanda_mask", "sparsegpt",
]
