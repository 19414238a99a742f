"""Real low-bit inference on CPU: packed weights (bf16, int8, int4, w8a8) and a lean decoder with a
static KV cache (see docs/runtime.md)."""

from .engine import Engine
from .layouts import WEIGHT_KINDS
from .sampling import Sampling

__all__ = ["Engine", "Sampling", "WEIGHT_KINDS"]
