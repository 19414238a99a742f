"""Export to deployment engines: `export(model_or_dir, to=FORMAT, out=PATH)`.

Formats (see docs/export.md):

* ``compressed-tensors``: a Hugging Face checkpoint in the compressed-tensors format (what vLLM and
  transformers load natively) for leanlm-quantized models: int8 per channel, int4 group-wise
  symmetric/asymmetric (packed), W8A8 int8 with dynamic per-token activations, FP8.
* ``gguf``: one GGUF file for llama.cpp (``quant=`` F16, Q8_0, Q4_0, Q4_1, Q5_0, Q4_K_M, ...).
* ``hf``: a plain float Hugging Face checkpoint (float and pruned models).
* ``onnx``: ONNX for onnxruntime with a KV-cache interface, float / int8 (DequantizeLinear) / int4
  (MatMulNBits) weights (``leanlm.export.onnx``; ONNX in: ``leanlm.export.onnx_in.quantize_onnx``).

Each format is one function ``fn(model, out, *, tokenizer=None, overwrite=False, **opts) -> Path``
registered by dotted name in ``FORMATS`` and imported only when used.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

from ..core.errors import LeanLMError

FORMATS: dict[str, str] = {
    "compressed-tensors": "leanlm.export.compressed_tensors.export_compressed_tensors",
    "gguf": "leanlm.export.gguf.export_gguf",
    "hf": "leanlm.export.hf.export_hf",
    "onnx": "leanlm.export.onnx.export_onnx",
}


def _exporter(to: str):
    if to not in FORMATS:
        raise LeanLMError(f"unknown export format {to!r}; choose one of: {', '.join(FORMATS)}")
    module, _, fn = FORMATS[to].rpartition(".")
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        if getattr(e, "name", None) == module:
            raise LeanLMError(f"export format {to!r} is not part of this leanlm installation ({module} is missing)") from None
        extra = "onnx" if to == "onnx" else "export"
        raise LeanLMError(f"export format {to!r} needs a package that is not installed ({e}); pip install -e '.[{extra}]'") from None
    return getattr(mod, fn)


def load_source(model_or_dir, tokenizer=None):
    """(model, tokenizer) from a module, a built-in name, an HF folder or a leanlm-quantized folder."""
    import torch

    if isinstance(model_or_dir, torch.nn.Module):
        return model_or_dir, tokenizer
    from ..state import load

    return load(model_or_dir, tokenizer=tokenizer)


# Formats that carry a rotation applied at run time (quantization/rotate.py's online Hadamard before
# down_proj): ONNX traces it into the graph. The others hold weights only (GGUF / llama.cpp, a plain
# Hugging Face folder) or a transform config whose Hadamard is built differently from leanlm's
# (compressed-tensors 0.20); a fold-only rotation (``hadamard-fold``) exports to every format.
ONLINE_ROTATION = ("onnx",)


def check_rotation(model, to: str) -> None:
    """A clear error when `model` needs an online rotation that format `to` cannot carry."""
    from ..quantization.rotate import online_transforms

    online = online_transforms(model)
    if online and to not in ONLINE_ROTATION:
        raise LeanLMError(f"{to} cannot carry the online Hadamard rotation before {next(iter(online))} (and {len(online) - 1} more) "
                          f"that this model runs at inference; export it to {', '.join(ONLINE_ROTATION)}, or quantize with "
                          "rotate 'hadamard-fold' (no online part), which every format carries")


def export(model_or_dir, to: str, out: str | os.PathLike, *, overwrite: bool = False, tokenizer=None, **opts) -> Path:
    """Export a model (an in-memory module, a built-in name, an HF folder or a folder saved by
    `leanlm quantize`) to format `to` at `out`; returns the written path.

    The output is written under a temporary name and renamed into place; an existing `out` is an
    error unless `overwrite=True`.
    """
    fn = _exporter(to)
    out = Path(out)
    if out.exists() and not overwrite:
        raise LeanLMError(f"output {out} already exists; choose another path or pass overwrite=True (--overwrite)")
    model, tok = load_source(model_or_dir, tokenizer)
    check_rotation(model, to)
    # Sparsity masks are training state: their zeros are in the weights, no deployment format holds the masks.
    mods = dict(model.named_modules())
    masks = {n: m._buffers.pop("weight_mask") for n, m in mods.items() if m._buffers.get("weight_mask") is not None}
    try:
        return fn(model, out, tokenizer=tok, overwrite=overwrite, **opts)
    finally:
        for n, b in masks.items():
            mods[n]._buffers["weight_mask"] = b


__all__ = ["export", "FORMATS", "ONLINE_ROTATION", "check_rotation", "load_source"]
