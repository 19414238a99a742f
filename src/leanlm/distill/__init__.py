"""Knowledge distillation and the shared CPU-friendly trainer (also used by pruning, sparsity and QAT).

    from leanlm.distill import TrainConfig, train, DistillConfig, distill
"""

from .kd import DistillConfig, DistillLoss, distill, kl_at_temperature, matched_hidden_pairs
from .trainer import (TrainConfig, TrainingInterrupted, TrainResult, latest_checkpoint, lm_loss, parse_budget, train,
                      trainable_params)

__all__ = ["DistillConfig", "DistillLoss", "distill", "kl_at_temperature", "matched_hidden_pairs", "TrainConfig", "TrainResult", "TrainingInterrupted",
           "latest_checkpoint", "lm_loss", "parse_budget", "train", "trainable_params"]
