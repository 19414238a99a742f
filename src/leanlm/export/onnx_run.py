"""Run an exported ONNX causal LM in onnxruntime: a KV-cache step model, greedy generation, perplexity.

`OnnxCausalLM` implements leanlm's StepModel interface (``length``, ``reset``, ``forward``,
``rewind``) over an ``onnxruntime.InferenceSession`` whose graph has the interface written by
`leanlm.export.onnx.export_onnx` (or any ONNX model with the same input/output names, such as the
outputs of `leanlm.export.onnx_in.quantize_onnx`). Calling the object like a model
(``m(input_ids=ids)``) returns cache-free logits, so `leanlm.evaluation.perplexity` measures it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..core.errors import LeanLMError
from .onnx import MODEL_FILE, require_onnx

_PAST = re.compile(r"past_key_values\.(\d+)\.key")


def model_file(path: str | Path) -> Path:
    """The ``.onnx`` file of `path`: the file itself, or ``model.onnx`` inside an export folder."""
    p = Path(path)
    if p.is_dir():
        p = p / MODEL_FILE
    if p.suffix != ".onnx" or not p.is_file():
        raise LeanLMError(f"{path} is not an ONNX model; pass a .onnx file or a folder written by `leanlm export --to onnx`")
    return p


def session(path: str | Path, threads: int | None = None, accuracy_level: int = 0):
    """An onnxruntime CPU session with `threads` intra-op threads (default: all cores).

    onnxruntime fuses weight-only ``DequantizeLinear -> MatMul`` into its MatMulNBits kernel, by
    default with ``accuracy_level`` 4 (activations rounded to int8 on the fly: faster, inexact).
    leanlm passes 0 (float32 compute, exactly the exported weights) unless asked otherwise.
    """
    require_onnx()
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or os.cpu_count() or 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(accuracy_level))
    try:
        return ort.InferenceSession(str(model_file(path)), so, providers=["CPUExecutionProvider"])
    except LeanLMError:
        raise
    except Exception as e:
        raise LeanLMError(f"onnxruntime cannot load {path}: {str(e).strip().splitlines()[0]}") from e


class OnnxCausalLM:
    """A causal LM in onnxruntime holding its own KV cache (leanlm's StepModel interface)."""

    def __init__(self, path_or_session, threads: int | None = None, accuracy_level: int = 0):
        self.sess = path_or_session if hasattr(path_or_session, "run") else session(path_or_session, threads, accuracy_level)
        ins = {i.name: i for i in self.sess.get_inputs()}
        layers = sorted(int(m.group(1)) for n in ins if (m := _PAST.fullmatch(n)))
        if "input_ids" not in ins or not layers:
            raise LeanLMError(f"this ONNX model has inputs {sorted(ins)[:5]}...; leanlm runs models with input_ids, "
                              "attention_mask, position_ids and past_key_values.N.key/value (as `leanlm export --to onnx` writes)")
        self.layers = len(layers)
        shape = ins["past_key_values.0.key"].shape
        self.kv_heads, self.head_dim = int(shape[1]), int(shape[3])
        self.has_mask, self.has_pos = "attention_mask" in ins, "position_ids" in ins
        self.out_names = [o.name for o in self.sess.get_outputs()]
        self.reset()

    # StepModel ------------------------------------------------------------------------------
    def reset(self) -> None:
        self.length = 0
        self.cache: list[np.ndarray] | None = None

    def rewind(self, length: int) -> None:
        if not 0 <= length <= self.length:
            raise LeanLMError(f"cannot rewind to {length}: the cache holds {self.length} positions")
        if self.cache is not None:
            self.cache = [c[:, :, :length] for c in self.cache]
        self.length = length

    def forward(self, ids: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """Logits [B, T, vocab] of the new tokens `ids` [B, T] ([B, vocab] of the last with `last_only`);
        extends the cache by T."""
        ids = torch.as_tensor(ids)
        if ids.dim() != 2:
            raise LeanLMError(f"ids must be [batch, tokens], got shape {tuple(ids.shape)}")
        B, T = ids.shape
        P = self.length
        if self.cache is None or self.cache[0].shape[0] != B:
            if P:
                raise LeanLMError(f"batch size changed from {self.cache[0].shape[0]} to {B} with a non-empty cache; reset() first")
            self.cache = [np.zeros((B, self.kv_heads, 0, self.head_dim), np.float32) for _ in range(2 * self.layers)]
        feeds = {"input_ids": ids.numpy().astype(np.int64)}
        if self.has_mask:
            feeds["attention_mask"] = np.ones((B, P + T), np.int64)
        if self.has_pos:
            feeds["position_ids"] = np.broadcast_to(np.arange(P, P + T, dtype=np.int64), (B, T)).copy()
        for i in range(self.layers):
            feeds[f"past_key_values.{i}.key"] = self.cache[2 * i]
            feeds[f"past_key_values.{i}.value"] = self.cache[2 * i + 1]
        outs = self.sess.run(None, feeds)
        self.cache = outs[1:]
        self.length = P + T
        logits = torch.from_numpy(outs[0])
        return logits[:, -1] if last_only else logits

    # model-like use ---------------------------------------------------------------------------
    def __call__(self, input_ids: torch.Tensor, use_cache: bool = False, **_) -> torch.Tensor:
        """Cache-free logits of a whole batch (the cache is left empty)."""
        self.reset()
        try:
            return self.forward(input_ids)
        finally:
            self.reset()

    def parameters(self):
        """A CPU tensor, so helpers that ask a model for its device (perplexity) work."""
        yield torch.empty(0)

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, on_token: Callable[[], None] | None = None,
                 eos_token_id: int | None = None) -> torch.Tensor:
        """Greedy decoding through the KV cache (the one decode loop, `leanlm.speculative.decode.generate`);
        stops early only at `eos_token_id` (if given)."""
        from ..speculative.decode import generate

        try:
            return generate(self, torch.as_tensor(input_ids), max_new_tokens, eos_token_id=eos_token_id, on_token=on_token)
        finally:
            self.reset()


def onnx_generator(lm: OnnxCausalLM):
    """A `leanlm.evaluation.speed` generator (greedy, no early stop) over an `OnnxCausalLM`."""

    def gen(input_ids: torch.Tensor, max_new_tokens: int, on_token: Callable[[], None]) -> torch.Tensor:
        return lm.generate(input_ids, max_new_tokens, on_token)

    return gen
