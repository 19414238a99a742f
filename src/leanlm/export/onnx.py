"""Export a decoder-only Hugging Face model (Llama family) to ONNX with a KV-cache interface.

Graph interface (names follow the convention of Optimum and onnxruntime-genai):
  inputs  ``input_ids`` [B, T] int64, ``attention_mask`` [B, P+T] int64, ``position_ids`` [B, T] int64,
          ``past_key_values.{i}.key`` / ``.value`` [B, kv_heads, P, head_dim] float32 (P may be 0);
  outputs ``logits`` [B, T, vocab] float32, ``present.{i}.key`` / ``.value`` [B, kv_heads, P+T, head_dim].

The graph is traced with ``torch.onnx.export(dynamo=True)`` from a small wrapper that turns the flat
cache tensors into a transformers ``DynamicCache``. Quantized weights are then put in place of the
float ones in the ONNX graph:

* 8-bit weights (int5..int8): ``DequantizeLinear`` (int8 or uint8 codes, per tensor, per output
  channel or in blocks along the input dimension, opset 21) feeding the ``MatMul`` (QDQ, weight-only).
* 4-bit weights (int2..int4): ``com.microsoft.MatMulNBits`` (bits=4, blocks of 16..256 along the
  input dimension, low nibble first, zero point 8 for symmetric codes); other 4-bit layouts
  (per channel, other group sizes) use ``DequantizeLinear`` with int4/uint4 codes.

From a leanlm-quantized model the exported codes and scales are exactly leanlm's (so onnxruntime
matches the fake-quant model to float rounding); from a float model the weights are first quantized
round-to-nearest with leanlm's own formats.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..core.arch import Arch, arch_of, text_config
from ..core.errors import LeanLMError
from ..core.io import atomic_dir

WEIGHTS = ("float", "int8", "int4")
MODEL_FILE = "model.onnx"
META_FILE = "leanlm_onnx.json"
OPSET = 21
NBITS_BLOCKS = (16, 32, 64, 128, 256)  # block sizes onnxruntime's MatMulNBits CPU kernels take
_PREFIX = "model."  # the wrapper's attribute name, prefixed to every parameter name by the exporter
REPRESENTABLE = ("weight-only int2..int8 formats (int8, int8_asym, int8_g64, int4_g64, int4_g32_asym, int4, "
                 "int3_g64, ...; per tensor, per channel or groups) with float activations and a float KV cache")


def require_onnx() -> None:
    missing = [m for m in ("onnx", "onnxruntime", "onnxscript") if _missing(m)]
    if missing:
        raise LeanLMError(f"ONNX support needs {', '.join(missing)}; run: pip install 'leanlm[onnx]'")


def _missing(mod: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(mod) is None


# ------------------------------------------------------------------------------ what is exported


def _weight_formats(model: nn.Module) -> dict[str, tuple]:
    """``{linear name: (QFormat, QParams)}`` for every quantized weight; errors for what ONNX cannot take."""
    from ..quantization.modules import TensorQuantizer

    out = {}
    for name, m in model.named_modules():
        if not isinstance(m, TensorQuantizer) or not m.enabled:
            continue
        owner, role = name.rsplit(".", 1)
        if role != "weight_quantizer":
            what = "KV-cache" if role in ("k_quantizer", "v_quantizer") else "activation"
            raise LeanLMError(
                f"{name}: {what} quantization ({m.fmt.name}) cannot be exported to ONNX; the ONNX export takes "
                f"{REPRESENTABLE}. Export a weight-only scheme, or quantize the float ONNX export's activations "
                "with `leanlm quantize model.onnx --scheme int8-dynamic|int8-static`")
        if m.fmt.kind != "int":
            raise LeanLMError(f"{owner}: weight format {m.fmt.name} cannot be exported to ONNX; it takes {REPRESENTABLE}")
        if not m.folded or m.qparams is None:
            raise LeanLMError(f"{owner}: the weight quantizer holds no calibrated codes; run leanlm.quantize on the model first")
        out[owner] = (m.fmt, m.qparams)
    return out


def _quantize_float(model: nn.Module, weights: str, group_size: int | None) -> nn.Module:
    """A round-to-nearest quantized copy (symmetric; int8 per channel; int4 in groups on the full-range grid, as
    the w4a16-rtn preset; head kept float)."""
    from ..quantization import QuantConfig, QuantizerConfig, quantize

    fmt = "int8" if weights == "int8" else f"int4_g{group_size or 64}"
    if weights == "int8" and group_size:
        fmt = f"int8_g{group_size}"
    q = copy.deepcopy(model)
    cfg = QuantConfig([("*weight_quantizer", QuantizerConfig(fmt, method="full" if weights == "int4" else "max")), ("*lm_head*", None)])
    return quantize(q, cfg, progress=False)


# ------------------------------------------------------------------------------ tracing


class _Decoder(nn.Module):
    """Flat cache tensors in and out, so the ONNX graph has one input/output per cache tensor."""

    def __init__(self, model: nn.Module, layers: int):
        super().__init__()
        self.model = model
        self.layers = layers

    def forward(self, input_ids, attention_mask, position_ids, *past):
        from transformers import DynamicCache

        cache = DynamicCache([(past[2 * i], past[2 * i + 1]) for i in range(self.layers)])
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=cache, use_cache=True)
        present = []
        for layer in out.past_key_values.layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


def io_names(layers: int) -> tuple[list[str], list[str]]:
    kv = [(i, k) for i in range(layers) for k in ("key", "value")]
    return (["input_ids", "attention_mask", "position_ids"] + [f"past_key_values.{i}.{k}" for i, k in kv],
            ["logits"] + [f"present.{i}.{k}" for i, k in kv])


def _shape_facts(model: nn.Module, arch: Arch) -> dict:
    return {"layers": arch.n_layers, "kv_heads": arch.kv_heads, "head_dim": arch.head_dim, "vocab": arch.vocab,
            "eos_token_id": text_config(model).eos_token_id, "model_type": arch.model_type}


def _trace(model: nn.Module, facts: dict, exporter: str):
    """Trace to an unoptimized ONNX graph in which every linear is ``MatMul(x, Transpose(<param name>))``.

    "torchscript" (default; ``torch.jit.trace`` based, several times faster on deep models) or
    "dynamo" (``torch.export`` based, the exporter torch recommends, slower: minutes for 30 layers).
    """
    L, kvh, hd = facts["layers"], facts["kv_heads"], facts["head_dim"]
    wrapper = _Decoder(model, L).eval()
    B, T, P = 2, 4, 3  # sizes > 1 so that nothing is specialized
    ids = torch.zeros(B, T, dtype=torch.long)
    mask = torch.ones(B, P + T, dtype=torch.long)
    pos = torch.arange(P, P + T).expand(B, T)
    past = tuple(torch.zeros(B, kvh, P, hd) for _ in range(2 * L))
    names_in, names_out = io_names(L)
    import io
    import logging

    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            Dim = torch.export.Dim
            b, s, p, tot = Dim("batch"), Dim("sequence"), Dim("past_sequence"), Dim("total_sequence")
            shapes = {"input_ids": {0: b, 1: s}, "attention_mask": {0: b, 1: tot}, "position_ids": {0: b, 1: s},
                      "past": tuple({0: b, 2: p} for _ in range(2 * L))}
            prog = torch.onnx.export(wrapper, (ids, mask, pos, *past), dynamo=True, input_names=names_in,
                                     output_names=names_out, dynamic_shapes=shapes, opset_version=OPSET,
                                     optimize=False, verbose=False)
            return prog.model_proto
        import onnx

        axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "total_sequence"},
                "position_ids": {0: "batch", 1: "sequence"}, "logits": {0: "batch", 1: "sequence"}}
        axes.update({n: {0: "batch", 2: "past_sequence"} for n in names_in[3:]})
        axes.update({n: {0: "batch", 2: "total_sequence"} for n in names_out[1:]})
        buf = io.BytesIO()
        torch.onnx.export(wrapper, (ids, mask, pos, *past), buf, dynamo=False, input_names=names_in, output_names=names_out,
                          dynamic_axes=axes, opset_version=OPSET, do_constant_folding=False)
        return onnx.load_from_string(buf.getvalue())


# ------------------------------------------------------------------------------ graph rewriting


def _codes(w: torch.Tensor, fmt, qp) -> torch.Tensor:
    """Integer codes of leanlm's folded weight (exactly what its fake-quant forward used)."""
    from ..quantization.formats import dequantize, quantize

    q = quantize(w.float(), fmt, qp)
    if not torch.equal(dequantize(q, fmt, qp), w.float()):
        raise LeanLMError("a quantized weight is not on its own grid (was it edited after quantization?); "
                          "quantize the float model again before exporting")
    return q.reshape(w.shape).to(torch.int32)


def _nbits_initializers(name: str, w: torch.Tensor, fmt, qp) -> tuple[list, dict]:
    """MatMulNBits B (packed uint8 [N, blocks, bs/2]), scales [N, blocks] and packed zero points."""
    from onnx import numpy_helper

    N, K = w.shape
    bs = fmt.group_size
    q = _codes(w, fmt, qp)
    u = (q + 8) if fmt.symmetric else q  # unsigned 4-bit codes; symmetric codes use the default zero point 8
    blocks = K // bs
    u = u.reshape(N, blocks, bs).to(torch.uint8)
    packed = (u[..., 0::2] | (u[..., 1::2] << 4)).numpy()
    inits = [numpy_helper.from_array(packed, f"{name}.qweight"),
             numpy_helper.from_array(qp.scale.reshape(N, blocks).float().numpy(), f"{name}.scales")]
    if not fmt.symmetric:
        z = qp.zero.reshape(N, blocks).to(torch.uint8)
        if blocks % 2:
            z = torch.cat([z, torch.zeros(N, 1, dtype=torch.uint8)], 1)
        inits.append(numpy_helper.from_array((z[:, 0::2] | (z[:, 1::2] << 4)).reshape(-1).numpy(), f"{name}.zero_points"))
    return inits, {"K": K, "N": N, "bits": 4, "block_size": bs}


def _dq_initializers(name: str, w: torch.Tensor, fmt, qp) -> tuple[list, dict]:
    """DequantizeLinear codes in MatMul's [K, N] layout, scales (and zero points), axis / block_size."""
    import ml_dtypes
    from onnx import numpy_helper

    N, K = w.shape
    q = _codes(w, fmt, qp).T.contiguous()  # [K, N]
    four = fmt.bits <= 4
    dtype = (ml_dtypes.int4 if fmt.symmetric else ml_dtypes.uint4) if four else (np.int8 if fmt.symmetric else np.uint8)
    attrs: dict = {}
    if fmt.granularity == "tensor":
        scale = qp.scale.reshape(()).float()
        zero = qp.zero.reshape(()) if qp.zero is not None else None
    elif fmt.granularity == "channel":
        scale, attrs["axis"] = qp.scale.reshape(N).float(), 1
        zero = qp.zero.reshape(N) if qp.zero is not None else None
    else:  # groups along the input dimension: blocked quantization along axis 0 of [K, N]
        g = fmt.group_size
        scale = qp.scale.reshape(N, K // g).T.contiguous().float()
        zero = qp.zero.reshape(N, K // g).T.contiguous() if qp.zero is not None else None
        attrs.update(axis=0, block_size=g)
    inits = [numpy_helper.from_array(q.numpy().astype(dtype), f"{name}.qweight"),
             numpy_helper.from_array(scale.numpy(), f"{name}.scales")]
    if zero is not None:
        inits.append(numpy_helper.from_array(zero.numpy().astype(dtype), f"{name}.zero_points"))
    return inits, attrs


def _rewrite(proto, qweights: dict[str, tuple], state: dict[str, torch.Tensor]) -> dict[str, str]:
    """Replace ``MatMul(x, Transpose(W))`` of every quantized linear by its quantized form, in place."""
    from onnx import helper

    g = proto.graph
    producer = {o: n for n in g.node for o in n.output}
    done: dict[str, str] = {}
    new_nodes = []
    for node in g.node:
        t = producer.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        lin = t.input[0][len(_PREFIX):-len(".weight")] if t is not None and t.op_type == "Transpose" else None
        if lin not in qweights:
            new_nodes.append(node)
            continue
        fmt, qp = qweights[lin]
        w = state[lin + ".weight"]
        if fmt.bits <= 4 and fmt.granularity == "group" and fmt.group_size in NBITS_BLOCKS:
            inits, attrs = _nbits_initializers(lin, w, fmt, qp)
            new_nodes.append(helper.make_node("MatMulNBits", [node.input[0]] + [i.name for i in inits], list(node.output),
                                              name=f"{lin}.MatMulNBits", domain="com.microsoft", **attrs))
            done[lin] = f"MatMulNBits {fmt.name}"
        else:
            inits, attrs = _dq_initializers(lin, w, fmt, qp)
            deq = f"{lin}.weight_dq"
            new_nodes.append(helper.make_node("DequantizeLinear", [i.name for i in inits], [deq], name=f"{lin}.DequantizeLinear", **attrs))
            new_nodes.append(helper.make_node("MatMul", [node.input[0], deq], list(node.output), name=node.name or f"{lin}.MatMul"))
            done[lin] = f"DequantizeLinear {fmt.name}"
        g.initializer.extend(inits)
    missing = sorted(set(qweights) - set(done))
    if missing:
        raise LeanLMError(f"could not find the ONNX MatMul of {missing[0]} (and {len(missing) - 1} more) in the traced graph; "
                          "this architecture's linear layers are not exported as MatMul(x, Transpose(W))")
    del g.node[:]
    g.node.extend(new_nodes)
    if not any(o.domain == "com.microsoft" for o in proto.opset_import) and any(n.domain == "com.microsoft" for n in new_nodes):
        proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return done


def _prune(proto) -> None:
    """Drop nodes and initializers nothing reads any more (the replaced float weights and transposes)."""
    g = proto.graph
    needed = {o.name for o in g.output}
    keep = []
    for n in reversed(list(g.node)):
        if any(o in needed for o in n.output):
            keep.append(n)
            needed.update(i for i in n.input if i)
    del g.node[:]
    g.node.extend(reversed(keep))
    inits = [i for i in g.initializer if i.name in needed]
    del g.initializer[:]
    g.initializer.extend(inits)


def _fold_transposes(proto) -> None:
    """Store ``Transpose(W)`` of float weights pre-transposed (what the optimizer would do, keeping names)."""
    from onnx import numpy_helper

    g = proto.graph
    inits = {i.name: i for i in g.initializer}
    consumers: dict[str, int] = {}
    for n in g.node:
        for i in n.input:
            consumers[i] = consumers.get(i, 0) + 1
    keep = []
    for n in g.node:
        perm = next((list(a.ints) for a in n.attribute if a.name == "perm"), None)
        if n.op_type == "Transpose" and n.input[0] in inits and perm == [1, 0]:
            arr = numpy_helper.to_array(inits[n.input[0]]).T.copy()
            g.initializer.append(numpy_helper.from_array(arr, n.output[0]))
            continue
        keep.append(n)
    del g.node[:]
    g.node.extend(keep)
    _prune(proto)


def _simplify(proto):
    """Constant folding (shape arithmetic; weights untouched) and dead-node removal with onnxscript.

    onnxscript's full ``optimize`` also runs pattern rewrites, which take minutes on a 30-layer model
    and change nothing onnxruntime would not do at load time.
    """
    import onnx_ir as ir
    import onnxscript.optimizer as opt

    m = ir.from_proto(proto)
    opt.fold_constants(m, input_size_limit=1024)
    opt.remove_unused_nodes(m)
    return ir.to_proto(m)


# ------------------------------------------------------------------------------ public API


def export_onnx(model: nn.Module, out: str | Path, *, tokenizer=None, overwrite: bool = False, weights: str | None = None,
                group_size: int | None = None, exporter: str = "torchscript", optimize: bool = True) -> Path:
    """Export `model` to the folder `out` (``model.onnx``, ``leanlm_onnx.json``, config and tokenizer files).

    weights: None exports the model as it is (float, or a leanlm-quantized model's own codes and
    scales); "float" needs a float model; "int8" / "int4" export a leanlm-quantized model whose
    weights are 8-bit / at most 4-bit, or quantize a float model round-to-nearest first (symmetric
    int8 per output channel, or symmetric int4 on the full-range grid in groups of `group_size`, default 64, as
    `w4a16-rtn`; the head stays
    float, as in leanlm's presets). exporter: "torchscript" (default, fast) or "dynamo" (see `_trace`).
    optimize: simplify the graph with onnxscript's optimizer (constant folding, dead code), so the
    file holds fewer nodes and loads faster. Returns the path of ``model.onnx``.
    """
    require_onnx()
    import onnx

    out = Path(out)
    if out.exists() and not overwrite:
        raise LeanLMError(f"output {out} already exists; choose another path or pass overwrite=True (--overwrite)")
    if exporter not in ("torchscript", "dynamo"):
        raise LeanLMError(f"unknown exporter {exporter!r}; choose torchscript or dynamo")
    if weights is not None and weights not in WEIGHTS:
        raise LeanLMError(f"unknown ONNX weights {weights!r}; choose one of: {', '.join(WEIGHTS)}")
    if not hasattr(model, "config") or not hasattr(model, "get_output_embeddings"):
        raise LeanLMError(f"{type(model).__name__} is not a Hugging Face causal LM; the ONNX export takes decoder-only "
                          "transformers models (Llama family: SmolLM2, Llama, Mistral, Qwen2, ...)")
    arch = arch_of(model)
    if any(arch.windows) and arch.family not in ("mistral", "phi3"):   # those two slide alike in every layer
        raise LeanLMError(f"{arch.model_type} has per-layer sliding-window attention, which the ONNX export does not handle "
                          "yet; it takes models with the same attention in every layer (Llama, SmolLM2, Mistral, Qwen2)")
    n_bytes = sum(p.numel() * 4 for p in model.parameters())
    if n_bytes > 1.9e9:
        raise LeanLMError(f"the model holds {n_bytes / 1e9:.1f} GB of float32 weights; the ONNX export currently handles models "
                          "under 2 GB (about 500M parameters), the protobuf limit of its in-memory graph")
    qweights = _weight_formats(model)
    if qweights:
        bits = {f.bits for f, _ in qweights.values()}
        if weights == "float":
            raise LeanLMError("this model is quantized; weights='float' needs the float model (or pass weights=None to export its codes)")
        if weights == "int8" and max(bits) <= 4 or weights == "int4" and max(bits) > 4:
            raise LeanLMError(f"weights={weights!r} does not match the model's quantized formats "
                              f"({', '.join(sorted({f.name for f, _ in qweights.values()}))}); pass weights=None to export them as they are")
    elif weights in ("int8", "int4"):
        model = _quantize_float(model, weights, group_size)
        qweights = _weight_formats(model)
    elif group_size is not None:
        raise LeanLMError("group_size applies to weights='int4' or 'int8' exported from a float model")
    facts = _shape_facts(model, arch)
    if getattr(model.config, "_attn_implementation", None) not in (None, "sdpa", "eager"):
        model.set_attn_implementation("sdpa")
    was_training = model.training
    model.eval()
    try:
        proto = _trace(model, facts, exporter)
    except LeanLMError:
        raise
    except Exception as e:  # tracing errors are long; keep the first line
        raise LeanLMError(f"torch.onnx.export could not trace {type(model).__name__}: {str(e).strip().splitlines()[0]}") from e
    finally:
        model.train(was_training)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    layout = _rewrite(proto, qweights, state)
    _fold_transposes(proto)
    if optimize:
        proto = _simplify(proto)
    scheme = "float" if not qweights else sorted({f.name for f, _ in qweights.values()})
    meta = {**facts, "format": "leanlm-onnx-v1", "opset": OPSET, "weights": scheme, "quantized_layers": layout,
            "inputs": io_names(facts["layers"])[0], "outputs": io_names(facts["layers"])[1]}
    onnx.helper.set_model_props(proto, {"leanlm": json.dumps({k: meta[k] for k in ("format", "weights", "layers", "kv_heads", "head_dim")})})
    with atomic_dir(out, overwrite=overwrite) as tmp:
        big = proto.ByteSize() > 1.8e9
        onnx.save_model(proto, tmp / MODEL_FILE, save_as_external_data=big, location=MODEL_FILE + ".data" if big else None)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
        model.config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return out / MODEL_FILE
