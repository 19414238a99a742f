"""Hadamard rotations (leanlm.quantization.rotate, QuaRot): folded into tiny models of every family the float
logits stay the same; rotated and quantized models save, reload, run in the runtime and export where the
format carries the online Hadamard; the rest refuse clearly."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch

import leanlm
from conftest import make_llama
from leanlm.core.errors import LeanLMError
from leanlm.quantization import QuantConfig, QuantizerConfig
from leanlm.quantization.rotate import OnlineHadamard, hadamard_factors, kron, online_transforms, orthogonal_factors, rotate
from test_arch import V, _ids, make_model

ROTATABLE = ["llama", "mistral", "qwen2", "qwen3", "phi3"]


@pytest.mark.parametrize("family", ROTATABLE)
def test_fold_keeps_float_logits(family):
    """Norms fused, residual / value heads rotated, online Hadamard before down_proj: same logits."""
    model = make_model(family)
    ids = _ids(20, rows=2)
    with torch.no_grad():
        ref = model(ids).logits
        rec = rotate(model, "hadamard")
        got = model(ids).logits
    assert torch.allclose(got, ref, atol=1e-4, rtol=1e-4), (family, (got - ref).abs().max())
    assert len(rec["online"]) == 2 and len(online_transforms(model)) == 2
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    assert head.weight.data_ptr() != emb.weight.data_ptr() and not model.config.tie_word_embeddings
    assert torch.equal(model.model.norm.weight, torch.ones_like(model.model.norm.weight))


def test_fold_non_power_of_two_sizes():
    """Hidden 48 = 12 x 4 and intermediate 96 = 12 x 8 (Paley factors, as SmolLM2's 576 and 1536); fold only."""
    for method in ("hadamard", "hadamard-fold"):
        model = make_model("llama", hidden_size=48, intermediate_size=96, head_dim=12)
        ids = _ids(16)
        with torch.no_grad():
            ref = model(ids).logits
            rotate(model, method)
            got = model(ids).logits
        assert torch.allclose(got, ref, atol=1e-4, rtol=1e-4), (got - ref).abs().max()
        assert bool(online_transforms(model)) == (method == "hadamard")


def test_constructions():
    assert hadamard_factors(576) == [12, 12, 4] and hadamard_factors(1536) == [12, 128] and hadamard_factors(640) == [20, 32]
    for n in (576, 1536, 640, 64):
        q = kron(orthogonal_factors(n)[0])
        assert torch.allclose(q @ q.T, torch.eye(n, dtype=q.dtype), atol=1e-10)
        assert torch.allclose(q.abs(), torch.full_like(q, n ** -0.5))   # a Hadamard matrix: every entry +-1/sqrt(n)
    x = torch.randn(3, 5, 96)
    assert torch.allclose(OnlineHadamard(96)(x), x @ kron(orthogonal_factors(96)[0]).float(), atol=1e-5)
    # 36 = 4 x 9 has no Hadamard construction here: a random orthogonal odd part when folded, an error online
    factors, how = orthogonal_factors(36, torch.Generator().manual_seed(0))
    q = kron(factors)
    assert "random orthogonal 9" in how and torch.allclose(q @ q.T, torch.eye(36, dtype=q.dtype), atol=1e-10)
    with pytest.raises(LeanLMError, match="no Hadamard construction"):
        orthogonal_factors(36)


def test_refusals():
    with pytest.raises(LeanLMError, match="Gemma-3 cannot absorb a rotation.*post-feedforward norms"):
        rotate(make_model("gemma3"))
    with pytest.raises(LeanLMError, match="unknown rotation 'givens'"):
        QuantConfig([("*weight_quantizer", QuantizerConfig("int4_g64"))], rotate="givens")
    m = make_model("llama")
    leanlm.quantize(m, "w8a16", progress=False)
    with pytest.raises(LeanLMError, match="before quantizing"):
        rotate(m)
    m = make_model("llama")
    rotate(m)
    with pytest.raises(LeanLMError, match="already rotated"):
        rotate(m)


def test_rotated_quantized_save_load_runtime_export(tmp_path, tiny_tokenizer):
    """AWQ + GPTQ W4A16 with the online Hadamard: saved, reloaded identical, packed by the runtime; ONNX carries
    the online part, GGUF / compressed-tensors / hf refuse it; a fold-only rotation exports to GGUF."""
    from leanlm.export import export
    from leanlm.quantization import AWQ, GPTQ
    from leanlm.runtime import Engine

    model = make_llama(vocab_size=len(tiny_tokenizer), tie=True)
    ids = _ids(24, rows=2)
    calib = _ids(32, rows=4, seed=3)
    with torch.no_grad():
        ref = model(ids).logits
    m = copy.deepcopy(model)
    cfg = QuantConfig([("*weight_quantizer", QuantizerConfig("int4_g32")), ("*lm_head*", None)], [AWQ(), GPTQ()], rotate="hadamard")
    leanlm.quantize(m, cfg, calib, progress=False)
    with torch.no_grad():
        got = m(ids).logits
    assert not torch.equal(got, ref) and torch.nn.functional.cosine_similarity(got, ref, dim=-1).min() > 0.9
    assert m.leanlm_quant["config"]["rotate"] == "hadamard"

    leanlm.save(m, tmp_path / "q", tokenizer=tiny_tokenizer)
    back, _ = leanlm.load(tmp_path / "q")
    assert set(online_transforms(back)) == set(online_transforms(m)) and back.leanlm_rotation == m.leanlm_rotation
    with torch.no_grad():
        assert torch.equal(back(ids).logits, got)
    eng = Engine(back, max_seq_len=64, max_batch=2)
    assert eng.model.layers[0].down_in is not None
    assert torch.nn.functional.cosine_similarity(eng.forward(ids), got, dim=-1).min() > 0.999

    for to in ("gguf", "compressed-tensors", "hf"):
        with pytest.raises(LeanLMError, match=f"{to} cannot carry the online Hadamard"):
            export(tmp_path / "q", to=to, out=tmp_path / f"out-{to}")
    if all(importlib.util.find_spec(x) for x in ("onnx", "onnxruntime", "onnxscript")):
        from leanlm.export.onnx_run import OnnxCausalLM

        p = export(tmp_path / "q", to="onnx", out=tmp_path / "onnx")
        onnx_logits = OnnxCausalLM(p.parent, threads=2)(ids)
        assert (onnx_logits - got).abs().max() < 1e-3

    fold = copy.deepcopy(model)
    leanlm.quantize(fold, QuantConfig([("*weight_quantizer", QuantizerConfig("int4_g32")), ("*lm_head*", None)],
                                      rotate="hadamard-fold"), progress=False)
    assert not online_transforms(fold)
    if importlib.util.find_spec("gguf"):
        assert export(fold, to="gguf", out=tmp_path / "fold.gguf", tokenizer=tiny_tokenizer).is_file()


def test_rotation_spreads_outliers():
    """A model with a few huge residual channels (as SmolLM2's attention sink): W4A4 int with the rotation is
    closer to the float model than without it."""
    model = make_llama(vocab_size=V, seed=2)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, :3] *= 30.0
    ids = _ids(32, rows=2, seed=4)
    with torch.no_grad():
        ref = model(ids).logits
    err = {}
    for r in (None, "hadamard"):
        m = copy.deepcopy(model)
        cfg = QuantConfig([("*weight_quantizer", QuantizerConfig("int4_g32")), ("*input_quantizer", QuantizerConfig("int4_token", dynamic=True)),
                           ("*lm_head*", None)], rotate=r)
        leanlm.quantize(m, cfg, progress=False)
        with torch.no_grad():
            err[r] = (m(ids).logits - ref).pow(2).mean().item()
    assert err["hadamard"] < 0.5 * err[None], err


def test_cli_rotate_and_export_refusal(tmp_path, tiny_folder, capsys):
    from leanlm.cli import main

    out = tmp_path / "q"
    assert main(["quantize", str(tiny_folder), "--scheme", "w4a16-rtn", "--rotate", "hadamard", "--out", str(out)]) in (0, None)
    assert leanlm.state.read_manifest(out)["rotation"]["method"] == "hadamard"
    capsys.readouterr()
    try:
        code = main(["export", str(out), "--to", "gguf", "--out", str(tmp_path / "m.gguf")])
    except SystemExit as e:
        code = e.code
    assert code == 2 and "gguf cannot carry the online Hadamard" in capsys.readouterr().err
    assert not (tmp_path / "m.gguf").exists()


def test_massive_channels_kept_out_of_the_rotation():
    """A planted massive residual channel (as SmolLM2's channel 507 on the attention-sink token) is detected
    from calibration text, left unrotated with its norm scales kept, and the float logits stay the same."""
    from leanlm.quantization.rotate import massive_channels

    model = make_llama(vocab_size=V, seed=2)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 5] = 200.0
    calib = _ids(32, rows=2, seed=3)
    assert massive_channels(model, calib) == [5]
    ids = _ids(20, rows=2)
    with torch.no_grad():
        ref = model(ids).logits
    g = model.model.layers[0].input_layernorm.weight[5].item()
    emb = model.model.embed_tokens.weight[:, 5].clone()
    rec = rotate(model, "hadamard", keep=[5])
    with torch.no_grad():
        got = model(ids).logits
    assert torch.allclose(got, ref, atol=1e-4, rtol=1e-4), (got - ref).abs().max()
    assert rec["keep"] == [5] and model.model.layers[0].input_layernorm.weight[5].item() == g
    assert torch.equal(model.model.embed_tokens.weight[:, 5], emb)   # channel 5 is not mixed with the others
    m = make_llama(vocab_size=V, seed=2)
    with torch.no_grad():
        m.model.embed_tokens.weight[:, 5] = 200.0
    leanlm.quantize(m, QuantConfig([("*weight_quantizer", QuantizerConfig("int4_g32")), ("*lm_head*", None)], rotate="hadamard"),
                    calib, progress=False)
    assert m.leanlm_rotation["keep"] == [5]
    with pytest.raises(LeanLMError, match="keep channels"):
        rotate(make_model("llama"), keep=[10_000])
