"""Quantization-aware training (QAT) and quantization-aware distillation (QAD).

    from leanlm.qat import qat, QATConfig
    res = qat(model, "w3a16-gptq", tokenizer=tok, teacher="self", budget="10m")   # PTQ, then QAD
    leanlm.save(model, "out/", tokenizer=tok)
"""

from ..quantization.formats import fake_quantize_lsq
from .api import QATConfig, QATResult, check_trainable, default_train_config, finalize_qat, parse_budget, prepare_qat, qat
from .fakequant import QATActQuantizer, QATQuantizer

__all__ = ["QATActQuantizer", "QATConfig", "QATResult", "QATQuantizer", "check_trainable", "default_train_config", "fake_quantize_lsq",
           "finalize_qat", "parse_budget", "prepare_qat", "qat"]
