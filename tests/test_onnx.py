"""ONNX export and ONNX in: every exported or quantized model is run in onnxruntime and compared with leanlm."""

from __future__ import annotations

import importlib.util
from collections import Counter

import pytest
import torch

from conftest import TRAIN_TEXT, make_llama

pytestmark = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("onnx", "onnxruntime", "onnxscript")),
    reason="ONNX tests need the onnx extra: pip install 'leanlm[onnx]'",
)

import leanlm  # noqa: E402
from leanlm.core.errors import LeanLMError  # noqa: E402


def _ops(path) -> Counter:
    import onnx

    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def _ids(tok, n=40, batch=2):
    ids = tok(TRAIN_TEXT)["input_ids"]
    return torch.tensor([ids[i * n : (i + 1) * n] for i in range(batch)])


@pytest.fixture(scope="module")
def float_export(tmp_path_factory, tiny_tokenizer):
    from leanlm.export.onnx import export_onnx

    model = make_llama(vocab_size=len(tiny_tokenizer))
    out = tmp_path_factory.mktemp("onnx") / "float"
    export_onnx(model, out, tokenizer=tiny_tokenizer)
    return model, out


def test_float_export_matches_and_kv_cache_greedy(float_export, tiny_tokenizer):
    from leanlm.export.onnx_run import OnnxCausalLM

    model, out = float_export
    assert {"model.onnx", "leanlm_onnx.json", "config.json", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    lm = OnnxCausalLM(out, threads=2)
    ids = _ids(tiny_tokenizer)
    with torch.no_grad():
        ref = model(ids).logits
    assert torch.allclose(lm(ids), ref, atol=1e-4, rtol=1e-4)
    # the cache path: prefill part, then one token at a time, equals the full forward
    lm.reset()
    parts = [lm.forward(ids[:, :30])] + [lm.forward(ids[:, t : t + 1]) for t in range(30, 40)]
    assert lm.length == 40
    assert torch.allclose(torch.cat(parts, 1), ref, atol=1e-4, rtol=1e-4)
    lm.rewind(35)
    assert torch.allclose(lm.forward(ids[:, 35:37]), ref[:, 35:37], atol=1e-4, rtol=1e-4)
    # greedy generation through the onnxruntime KV cache equals transformers' greedy generate
    prompt = ids[:1, :12]
    hf = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(lm.generate(prompt, 12), hf)


def test_quantized_export_matches_fake_quant(tmp_path, tiny_tokenizer):
    """leanlm's codes and scales go into the graph exactly: onnxruntime equals the fake-quant model to rounding.

    One model covers every layout: int8 per channel and asymmetric groups (DequantizeLinear), int4
    symmetric and asymmetric groups (MatMulNBits), int4 per channel and int3 (DequantizeLinear int4).
    """
    from leanlm.export.onnx import export_onnx
    from leanlm.export.onnx_run import OnnxCausalLM
    from leanlm.quantization import QuantConfig, QuantizerConfig

    model = make_llama(vocab_size=len(tiny_tokenizer))
    ids = _ids(tiny_tokenizer)
    float_logits = model(ids).logits.detach()
    rules = [("*q_proj.weight_quantizer", "int8"), ("*k_proj.weight_quantizer", "int8_g32_asym"),
             ("*v_proj.weight_quantizer", "int4_asym"), ("*o_proj.weight_quantizer", "int4_g32_asym"),
             ("*gate_proj.weight_quantizer", "int4_g64"), ("*up_proj.weight_quantizer", "int3_g32"),
             ("*down_proj.weight_quantizer", "int8_g64")]
    leanlm.quantize(model, QuantConfig([(p, QuantizerConfig(f)) for p, f in rules]), progress=False)
    p = export_onnx(model, tmp_path / "q", tokenizer=tiny_tokenizer)
    ops = _ops(p)
    assert ops["MatMulNBits"] == 6 and ops["DequantizeLinear"] == 8, ops  # 2 layers; the head stays a float MatMul
    with torch.no_grad():
        ref = model(ids).logits
    got = OnnxCausalLM(p.parent, threads=2)(ids)
    assert (got - ref).abs().max() < 1e-4
    assert (ref - float_logits).abs().max() > 1e-3  # the comparison is with the quantized model, not the float one


def test_float_model_quantized_round_to_nearest(tmp_path, tiny_tokenizer, float_export):
    from leanlm.export.onnx import export_onnx
    from leanlm.export.onnx_run import OnnxCausalLM

    model = make_llama(vocab_size=len(tiny_tokenizer))
    ids = _ids(tiny_tokenizer)
    ref = leanlm.quantize(make_llama(vocab_size=len(tiny_tokenizer)), "w4a16-rtn", progress=False)(ids).logits.detach()
    p = export_onnx(model, tmp_path / "int4", weights="int4")
    assert _ops(p)["MatMulNBits"] == 14
    assert (OnnxCausalLM(p, threads=2)(ids) - ref).abs().max() < 1e-4
    assert not hasattr(model.model.layers[0].mlp.up_proj, "weight_quantizer")  # the caller's model is untouched
    p8 = export_onnx(model, tmp_path / "int8", weights="int8")
    assert _ops(p8)["DequantizeLinear"] == 14
    assert p.stat().st_size < p8.stat().st_size < (float_export[1] / "model.onnx").stat().st_size


def test_export_errors(tmp_path, tiny_tokenizer, float_export):
    from leanlm.export.onnx import export_onnx

    _, out = float_export
    model = make_llama(vocab_size=len(tiny_tokenizer))
    with pytest.raises(LeanLMError, match="already exists"):
        export_onnx(model, out)
    with pytest.raises(LeanLMError, match="float, int8, int4"):
        export_onnx(model, tmp_path / "x", weights="int3")
    with pytest.raises(LeanLMError, match="cannot be exported to ONNX; it takes weight-only int2..int8"):
        export_onnx(leanlm.quantize(make_llama(vocab_size=len(tiny_tokenizer)), "nf4", progress=False), tmp_path / "x")
    with pytest.raises(LeanLMError, match="activation quantization"):
        export_onnx(leanlm.quantize(make_llama(vocab_size=len(tiny_tokenizer)), "w8a8", progress=False), tmp_path / "x")
    q4 = leanlm.quantize(make_llama(vocab_size=len(tiny_tokenizer)), "w4a16-rtn", progress=False)
    with pytest.raises(LeanLMError, match="does not match"):
        export_onnx(q4, tmp_path / "x", weights="int8")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("scheme,op,tol", [("int8-dynamic", "MatMulInteger", 0.05), ("int8-static", "QuantizeLinear", 0.1),
                                           ("int4-weight", "MatMulNBits", 0.15)])
def test_onnx_in_quantize(tmp_path, tiny_tokenizer, float_export, scheme, op, tol):
    from leanlm.export.onnx_in import quantize_onnx
    from leanlm.export.onnx_run import OnnxCausalLM

    _, src = float_export
    ids = _ids(tiny_tokenizer)
    ref = OnnxCausalLM(src, threads=2)(ids)
    calib = torch.tensor(tiny_tokenizer(TRAIN_TEXT)["input_ids"][80 : 80 + 8 * 32]).view(8, 32)
    p = quantize_onnx(src, tmp_path / "q.onnx", scheme=scheme, calib_data=calib if scheme == "int8-static" else None)
    ops = _ops(p)
    assert ops[op] > 0 and ops["MatMul"] >= 5, ops  # quantized, with the head and attention products still float MatMuls
    got = OnnxCausalLM(p, threads=2)(ids)
    rel = ((got - ref).norm() / ref.norm()).item()
    assert 0 < rel < tol
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


def test_onnx_in_static_uses_folder_tokenizer_and_errors(tmp_path, float_export):
    from leanlm.export.onnx_in import quantize_onnx

    _, src = float_export
    out = quantize_onnx(src, tmp_path / "static", scheme="int8-static", samples=2, seq_len=16)
    assert out.name == "model.onnx" and (out.parent / "tokenizer.json").is_file()
    with pytest.raises(LeanLMError, match="int8-dynamic, int8-static, int4-weight"):
        quantize_onnx(src, tmp_path / "y.onnx", scheme="int4-static")
    with pytest.raises(LeanLMError, match="already exists"):
        quantize_onnx(src, out.parent, scheme="int8-dynamic")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(LeanLMError, match="cannot read"):
        quantize_onnx(bad, tmp_path / "z.onnx")
    with pytest.raises(LeanLMError, match="not an ONNX model"):
        quantize_onnx(tmp_path / "missing.onnx", tmp_path / "z.onnx")
    assert not (tmp_path / "z.onnx").exists() and not (tmp_path / "y.onnx").exists()


def test_cli_quantize_onnx(tmp_path, float_export, capsys):
    from leanlm.cli import main

    _, src = float_export
    out = tmp_path / "cli.onnx"
    assert main(["quantize", str(src / "model.onnx"), "--scheme", "int4-weight", "--out", str(out), "--json"]) == 0
    assert out.is_file() and _ops(out)["MatMulNBits"] == 14
    assert main(["quantize", str(src / "model.onnx"), "--scheme", "int4-weight", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["quantize", str(src / "model.onnx"), "--scheme", "w4a16-rtn", "--out", str(tmp_path / "o.onnx")]) == 2
    assert "int8-dynamic, int8-static, int4-weight" in capsys.readouterr().err


def test_dynamo_exporter_matches(tmp_path, tiny_tokenizer):
    from leanlm.export.onnx import export_onnx
    from leanlm.export.onnx_run import OnnxCausalLM

    model = make_llama(vocab_size=len(tiny_tokenizer), layers=1)
    leanlm.quantize(model, "w4a16-rtn", progress=False)
    p = export_onnx(model, tmp_path / "d", exporter="dynamo")
    assert _ops(p)["MatMulNBits"] == 7
    ids = _ids(tiny_tokenizer)
    lm = OnnxCausalLM(p, threads=2)
    with torch.no_grad():
        ref = model(ids).logits
    assert (lm(ids) - ref).abs().max() < 1e-4
    lm.reset()
    lm.forward(ids[:, :20])
    assert (lm.forward(ids[:, 20:21]) - ref[:, 20:21]).abs().max() < 1e-4


@pytest.mark.integration
def test_real_smollm2_int4_export_matches_leanlm(tmp_path):
    """SmolLM2-135M, leanlm's w4a16-rtn model exported: onnxruntime logits and greedy tokens equal leanlm's."""
    from leanlm.evaluation.speed import protocol_prompts
    from leanlm.export.onnx import export_onnx
    from leanlm.export.onnx_run import OnnxCausalLM

    model, tok = leanlm.load("smollm2-135m")
    leanlm.quantize(model, "w4a16-rtn", progress=False)
    p = export_onnx(model, tmp_path / "int4", tokenizer=tok)
    assert p.stat().st_size < 0.6 * 4 * 134.5e6  # 4-bit linears, float embedding + head
    lm = OnnxCausalLM(p, threads=2)
    ids = protocol_prompts(tok, 1, 128)
    with torch.no_grad():
        ref = model(ids).logits
    assert (lm(ids) - ref).abs().max() < 1e-2  # logits of magnitude ~20; float32 summation order differs
    hf = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, min_new_tokens=16, do_sample=False,
                        pad_token_id=tok.pad_token_id or 0)
    assert torch.equal(lm.generate(ids, 16), hf)
