"""Structured pruning (Minitron-style): remove attention heads / KV groups, MLP channels, hidden channels
and whole layers by activation importance, giving a smaller standard Hugging Face model.

    from leanlm.prune import PruneTarget, prune, prune_and_distill
"""

from .api import PruneSizes, PruneTarget, parse_count, prune, prune_and_distill, solve_dims
from .importance import Importance, activation_importance, layer_importance
from .structure import Dims, Keep, count_params, dims_of, slice_model

__all__ = ["PruneTarget", "parse_count", "prune", "prune_and_distill", "solve_dims", "Importance",
           "activation_importance", "layer_importance", "Dims", "Keep", "count_params", "dims_of", "slice_model"]
