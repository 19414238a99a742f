"""ONNX in: quantize an existing ONNX model with onnxruntime's quantization tools and leanlm's calibration text.

Schemes (all through ``onnxruntime.quantization``):

* ``int8-dynamic``: ``quantize_dynamic``; int8 weights per output channel, activations quantized
  per tensor at run time (DynamicQuantizeLinear + MatMulInteger).
* ``int8-static``: ``quantize_static`` in QDQ format; int8 weights per output channel, uint8
  activations with ranges calibrated (MinMax) on leanlm's protocol calibration text.
* ``int4-weight``: ``MatMulNBitsQuantizer``; symmetric 4-bit weights in blocks of `block_size`
  (default 64, the protocol's reference scheme), float activations.

Only MatMuls with a constant weight are quantized (not the attention score products), and the
output head is kept in float by default, as in leanlm's own presets. What leanlm adds: its
calibration text and KV-cache input feeding for static calibration, checks with one-line errors,
and atomic outputs.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch

from ..core.errors import LeanLMError
from ..core.io import atomic_dir, atomic_file
from .onnx import MODEL_FILE, require_onnx
from .onnx_run import _PAST, model_file

SCHEMES = ("int8-dynamic", "int8-static", "int4-weight")


def _calibration_feeds(proto, ids: torch.Tensor) -> list[dict]:
    """One feed dict per calibration row, for a plain (input_ids[, attention_mask]) or a KV-cache graph."""
    from onnx import TensorProto

    inits = {i.name for i in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in inits]
    known = {"input_ids", "attention_mask", "position_ids"}
    other = [i.name for i in inputs if i.name not in known and not i.name.startswith("past_key_values.")]
    if "input_ids" not in {i.name for i in inputs} or other:
        raise LeanLMError(f"static calibration feeds input_ids, attention_mask, position_ids and past_key_values.N.key/value; "
                          f"this model also needs {other or 'input_ids'}; use int8-dynamic or int4-weight, which need no data")
    feeds = []
    for row in ids:
        x = row.view(1, -1).numpy().astype(np.int64)
        f = {"input_ids": x}
        for i in inputs:
            if i.name == "attention_mask":
                f[i.name] = np.ones_like(x)
            elif i.name == "position_ids":
                f[i.name] = np.arange(x.shape[1], dtype=np.int64)[None]
            elif i.name.startswith("past_key_values."):
                dims = [d.dim_value for d in i.type.tensor_type.shape.dim]
                if i.type.tensor_type.elem_type != TensorProto.FLOAT or len(dims) != 4:
                    raise LeanLMError(f"input {i.name} is not a float32 [batch, heads, past, head_dim] cache tensor")
                f[i.name] = np.zeros((1, dims[1], 0, dims[3]), np.float32)
        feeds.append(f)
    return feeds


def _head_node(proto) -> str | None:
    """Name of the MatMul that produces the ``logits`` output (through at most a few reshapes)."""
    producer = {o: n for n in proto.graph.node for o in n.output}
    name = next((o.name for o in proto.graph.output if o.name == "logits"), None)
    for _ in range(5):
        n = producer.get(name)
        if n is None:
            return None
        if n.op_type in ("MatMul", "Gemm"):
            return n.name
        name = n.input[0]
    return None


def quantize_onnx(
    onnx_path: str | Path,
    out: str | Path,
    *,
    scheme: str = "int8-dynamic",
    calib_data: torch.Tensor | None = None,
    tokenizer=None,
    samples: int = 32,
    seq_len: int = 256,
    block_size: int = 64,
    keep_head_float: bool = True,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Quantize the ONNX model at `onnx_path` (a .onnx file or an export folder) and write it to `out`.

    `out` ending in ``.onnx`` is one file; otherwise a folder holding ``model.onnx`` and copies of the
    source folder's other files (tokenizer, config). int8-static calibrates on `calib_data` ([N, L]
    token ids) or, by default, `samples` x `seq_len` tokens of the protocol's calibration text cut with
    `tokenizer` (read from the source folder when not given). Returns the written .onnx path.
    """
    require_onnx()
    import onnx

    if scheme not in SCHEMES:
        raise LeanLMError(f"unknown ONNX quantization scheme {scheme!r}; choose one of: {', '.join(SCHEMES)}")
    src = model_file(onnx_path)
    out = Path(out)
    if out.exists() and not overwrite:
        raise LeanLMError(f"output {out} already exists; choose another --out or pass --overwrite")
    if out.resolve() == src.resolve() or out.resolve() == src.parent.resolve():
        raise LeanLMError(f"output {out} is the input model; write the quantized model to another path")
    try:
        proto = onnx.load(str(src))
    except Exception as e:
        raise LeanLMError(f"cannot read {src} as an ONNX model: {str(e).strip().splitlines()[0]}") from e
    if scheme == "int8-static" and calib_data is None:
        if tokenizer is None:
            tokenizer = _folder_tokenizer(src.parent)
        from ..core.data import calibration_batches

        calib_data = calibration_batches(tokenizer, samples, seq_len)
    if calib_data is not None and (calib_data.dim() != 2 or calib_data.dtype != torch.long):
        raise LeanLMError(f"calib_data must be a 2-D LongTensor of token ids [N, L], got {tuple(calib_data.shape)} {calib_data.dtype}")
    exclude = [n for n in [_head_node(proto)] if n] if keep_head_float else []
    big = proto.ByteSize() > 1.8e9

    def write(path: Path) -> None:
        if scheme == "int8-dynamic":
            from onnxruntime.quantization import QuantType, quantize_dynamic

            quantize_dynamic(proto, path, op_types_to_quantize=["MatMul"], per_channel=True, weight_type=QuantType.QInt8,
                             nodes_to_exclude=exclude, use_external_data_format=big, extra_options={"MatMulConstBOnly": True})
        elif scheme == "int8-static":
            from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

            feeds = _calibration_feeds(proto, calib_data)

            class Reader(CalibrationDataReader):
                def __init__(self):
                    from tqdm.auto import tqdm

                    self.it = iter(tqdm(feeds, desc="calibrating (onnxruntime)", unit="sample", disable=not progress, leave=False))

                def get_next(self):
                    return next(self.it, None)

            quantize_static(proto, path, Reader(), quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul"],
                            per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            nodes_to_exclude=exclude, use_external_data_format=big, extra_options={"MatMulConstBOnly": True})
        else:
            from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

            if block_size < 16 or block_size & (block_size - 1):
                raise LeanLMError(f"int4-weight needs a power-of-two block size >= 16 (onnxruntime's MatMulNBits), got {block_size}")
            q = MatMulNBitsQuantizer(proto, bits=4, block_size=block_size, is_symmetric=True, nodes_to_exclude=exclude,
                                     op_types_to_quantize=("MatMul",))
            q.process()
            q.model.save_model_to_file(str(path), use_external_data_format=big)

    if out.suffix == ".onnx":
        if big:
            raise LeanLMError(f"{src} is larger than 2 GB and needs an external data file; pass a folder as --out")
        with atomic_file(out, overwrite=overwrite) as tmp:
            _run(write, tmp)
        return out
    with atomic_dir(out, overwrite=overwrite) as tmp:
        if src.name == MODEL_FILE:  # an export folder: keep its tokenizer, config and metadata
            for f in src.parent.iterdir():
                if f.is_file() and not f.name.startswith(MODEL_FILE):
                    shutil.copy2(f, tmp / f.name)
        _run(write, tmp / MODEL_FILE)
    return out / MODEL_FILE


def _run(write, path: Path) -> None:
    import logging

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # onnxruntime.quantization logs advice ("consider pre-processing") on the root logger
    try:
        write(path)
    except LeanLMError:
        raise
    except Exception as e:
        raise LeanLMError(f"onnxruntime could not quantize this model: {type(e).__name__}: {str(e).strip().splitlines()[0]}") from e
    finally:
        root.setLevel(level)


def _folder_tokenizer(folder: Path):
    if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        raise LeanLMError("int8-static needs calibration text: pass tokenizer= or calib_data=, or use a folder written "
                          "by `leanlm export --to onnx` (it holds the tokenizer)")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)
