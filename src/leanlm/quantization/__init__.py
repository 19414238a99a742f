"""Post-training quantization: formats, quantizer modules, calibration algorithms, presets, save/load.

    model = leanlm.quantize(model, "w4a16-gptq", tokenizer=tok)   # or a QuantConfig
    leanlm.quantization.save_quantized(model, "out/", tokenizer=tok)
"""

from .api import average_bits, quantize, summary
from .config import AWQ, GPTQ, KV_CACHE, PRESETS, QuantConfig, QuantizerConfig, SmoothQuant, preset
from .formats import QFormat, parse_format
from .mixed import MixedPrecisionResult, mixed_precision
from .serialize import load_quantized, save_quantized

__all__ = [
    "quantize", "summary", "average_bits", "QuantConfig", "QuantizerConfig", "SmoothQuant", "AWQ", "GPTQ",
    "PRESETS", "KV_CACHE", "preset", "QFormat", "parse_format", "save_quantized", "load_quantized",
    "mixed_precision", "MixedPrecisionResult",
]
