"""leanlm: make language models smaller, faster and cheaper to run, on a CPU or a GPU."""

from .core.errors import LeanLMError
from .core.models import BUILTINS, cache_dir
from .state import load, save

__version__ = "0.1.0"


def quantize(model, config, calib_data=None, **kwargs):
    """Post-training quantization; see `leanlm.quantization.quantize`."""
    from .quantization import quantize as _quantize

    return _quantize(model, config, calib_data, **kwargs)


def __getattr__(name):  # leanlm.Recipe without importing the step machinery on `import leanlm`
    if name in ("Recipe", "StepResult"):
        from . import recipe

        return getattr(recipe, name)
    raise AttributeError(f"module 'leanlm' has no attribute {name!r}")


__all__ = ["LeanLMError", "BUILTINS", "Recipe", "StepResult", "cache_dir", "load", "save", "quantize", "__version__"]
