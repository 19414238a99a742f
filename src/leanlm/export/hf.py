"""Plain Hugging Face checkpoint (float or pruned models): config, safetensors, tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..core.errors import LeanLMError
from ..core.io import atomic_dir
from .common import is_leanlm_quantized, plain_model, save_tokenizer


def export_hf(model: nn.Module, out: str | Path, *, tokenizer=None, overwrite: bool = False,
              dtype: str | torch.dtype | None = None) -> Path:
    """Write `model` as an ordinary transformers checkpoint (safetensors) at `out`.

    The config must describe the tensors (a pruned model updates intermediate_size, head counts,
    ...); a mismatch is an error, checked before anything is written. Quantized models are an
    error: plain float weights would silently drop their quantization (use compressed-tensors or gguf).
    """
    from ..core.models import resolve_dtype

    if is_leanlm_quantized(model):
        raise LeanLMError("the model is quantized; a plain 'hf' checkpoint would hold dequantized float weights and drop the "
                          "quantization: export it with --to compressed-tensors (vLLM, transformers) or --to gguf (llama.cpp)")
    dt = resolve_dtype(dtype) if dtype is not None else next(model.parameters()).dtype
    fresh = plain_model(model, dt)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        fresh.save_pretrained(tmp, safe_serialization=True)
        save_tokenizer(tokenizer, tmp)
    return Path(out)
