"""Run exported files in their consuming engines, for verification and benchmarks: llama.cpp
(through llama-cpp-python) and transformers + compressed-tensors. No leanlm model code runs here:
the engines read the files themselves."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..core.errors import LeanLMError


def load_llamacpp(path: str | Path, *, n_ctx: int = 512, threads: int = 2, logits_all: bool = False):
    """A llama_cpp.Llama for `path` (CPU, `threads` threads)."""
    try:
        from llama_cpp import Llama
    except ImportError:
        raise LeanLMError("llama-cpp-python is not installed: pip install -e '.[llamacpp]' (builds llama.cpp from source, ~5 min)") from None
    return Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=threads, n_threads_batch=threads,
                 logits_all=logits_all, verbose=False)


def llamacpp_logits(llm, ids) -> np.ndarray:
    """float32 logits [len(ids), vocab] for one sequence, from an empty cache (needs logits_all=True)."""
    ids = [int(i) for i in ids]
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def llamacpp_perplexity(llm, windows: torch.Tensor) -> dict:
    """exp(mean NLL) over every predicted token of each row of `windows` [n, L] (as leanlm.evaluation.perplexity)."""
    total, count = 0.0, 0
    for row in windows:
        logits = torch.from_numpy(llamacpp_logits(llm, row.tolist()))[:-1]
        nll = torch.nn.functional.cross_entropy(logits, row[1:], reduction="sum").item()
        total += nll
        count += row.numel() - 1
    if not math.isfinite(total):
        raise LeanLMError("llama.cpp produced NaN/inf log-likelihoods; the GGUF file is broken")
    return {"perplexity": math.exp(total / count), "nll": total / count, "tokens": count, "windows": int(windows.shape[0]), "window": int(windows.shape[1])}


def llamacpp_generator(llm) -> Callable:
    """A leanlm.evaluation.speed generator: greedy (argmax of llama.cpp's logits), batch 1, no early stop."""

    def gen(input_ids: torch.Tensor, max_new_tokens: int, on_token: Callable[[], None]) -> torch.Tensor:
        if input_ids.shape[0] != 1:
            raise LeanLMError("the llama.cpp generator runs batch 1")
        import llama_cpp

        toks = input_ids[0].tolist()
        llm.reset()
        llm.eval(toks)
        out = []
        n_vocab = llm.n_vocab()
        for i in range(max_new_tokens):
            # logits of the last evaluated token (llama-cpp-python copies them to .scores only with logits_all)
            last = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))
            nxt = int(np.argmax(last))
            on_token()
            out.append(nxt)
            if i + 1 < max_new_tokens:
                llm.eval([nxt])
        return torch.cat([input_ids, torch.tensor([out], dtype=torch.long)], dim=1)

    return gen


def load_compressed_tensors(folder: str | Path, dtype: torch.dtype = torch.float32):
    """Load a compressed-tensors checkpoint with plain transformers (+ the compressed-tensors package)."""
    from transformers import AutoModelForCausalLM

    try:
        import compressed_tensors  # noqa: F401
    except ImportError:
        raise LeanLMError("compressed-tensors is not installed: pip install -e '.[export]'") from None
    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, local_files_only=True).eval()


@torch.no_grad()
def load_compressed_tensors_direct(folder: str | Path, dtype: torch.dtype = torch.float32):
    """Load a compressed-tensors checkpoint with compressed-tensors' own ModelCompressor on a
    transformers model built from the config (what `from_pretrained` does, minus its loader).

    For asymmetric pack-quantized checkpoints, which transformers 5.24's loader cannot read
    (it expects unpacked zero points; see docs/export.md)."""
    import json

    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import apply_quantization_config
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, CompressedTensorsConfig

    folder = Path(folder)
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    comp = ModelCompressor.from_compression_config(CompressedTensorsConfig.from_dict(qc))
    apply_quantization_config(model, comp.quantization_config, show_progress=False)
    comp.compress_model(model)
    state = {}
    for f in sorted(folder.glob("*.safetensors")):
        state.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise LeanLMError(f"{folder}: checkpoint does not match its quantization_config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    comp.decompress_model(model)
    return model.eval()
