"""Post-training quantization: formats, quantizer modules, calibration algorithms, presets, save/load.

    model = leanlm.quantize(model, "w4a16-gptq", tokenizer=tok)   # or a QuantConfig
    leanlm.save(model, "out/", tokenizer=tok)
"""

from .api import average_bits, quantize, summary
from .config import ALIASES, AWQ, GPTQ, AutoRound, KV_CACHE, PRESETS, QuantConfig, QuantizerConfig, SmoothQuant, preset
from .formats import QFormat, parse_format
from .mixed import MixedPrecisionResult, mixed_config, mixed_precision
from .serialize import load_quantized, quant_tensors

__all__ = [
    "quantize", "summary", "average_bits", "QuantConfig", "QuantizerConfig", "SmoothQuant", "AWQ", "GPTQ", "AutoRound",
    "PRESETS", "ALIASES", "KV_CACHE", "preset", "QFormat", "parse_format", "quant_tensors", "load_quantized",
    "mixed_precision", "mixed_config", "MixedPrecisionResult",
]
