"""leanlm: make language models smaller, faster and cheaper to run, on a CPU or a GPU."""

from .core.errors import LeanLMError
from .core.models import BUILTINS, cache_dir, load

__version__ = "0.1.0"


def quantize(model, config, calib_data=None, **kwargs):
    """Post-training quantization; see `leanlm.quantization.quantize`."""
    from .quantization import quantize as _quantize

    return _quantize(model, config, calib_data, **kwargs)


__all__ = ["LeanLMError", "BUILTINS", "cache_dir", "load", "quantize", "__version__"]
