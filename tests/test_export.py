"""Export: compressed-tensors round trips through transformers, GGUF files run in llama.cpp, plain
HF checkpoints of pruned models, and bad input. Tiny random models; consumers that are optional
extras (compressed-tensors, llama-cpp-python) skip with a message when missing."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import leanlm
from leanlm.core.errors import LeanLMError
from leanlm.export import export
from leanlm.quantization import QuantConfig, QuantizerConfig

from conftest import make_llama

ct = pytest.importorskip("compressed_tensors", reason="compressed-tensors not installed: pip install -e '.[export]'")


def _ids(tok, n=2, length=48, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, len(tok), (n, length), generator=g)


def _quantized(tok, scheme, **kw):
    m = make_llama(vocab_size=len(tok), **kw)
    leanlm.quantize(m, scheme, calib_data=_ids(tok, 4, 32, seed=5), progress=False)
    return m


# ------------------------------------------------------------------------------ compressed-tensors


@pytest.mark.parametrize("scheme,fmt", [("w8a16", "pack-quantized"), ("w4a16-rtn", "pack-quantized"),
                                        ("fp8", "float-quantized"), ("w8a8-static", "int-quantized")])
def test_compressed_tensors_round_trip_is_exact(tmp_path, tiny_tokenizer, scheme, fmt):
    from leanlm.export.consumers import load_compressed_tensors

    m = _quantized(tiny_tokenizer, scheme)
    ids = _ids(tiny_tokenizer)
    with torch.no_grad():
        ref = m(ids).logits
    out = export(m, "compressed-tensors", tmp_path / "ct", tokenizer=tiny_tokenizer)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == fmt and qc["ignore"] == ["lm_head"]
    loaded = load_compressed_tensors(out)          # plain transformers + compressed-tensors
    with torch.no_grad():
        got = loaded(ids).logits
    assert torch.equal(got, ref), (got - ref).abs().max()


def test_compressed_tensors_w8a8_dynamic_differs_only_by_scale_convention(tmp_path, tiny_tokenizer):
    """Weights are bit-exact; compressed-tensors' dynamic int8 activation scale is amax/127.5 (leanlm: amax/127)."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    from leanlm.export.consumers import load_compressed_tensors
    from leanlm.quantization.formats import QParams, dequantize, quantize

    m = _quantized(tiny_tokenizer, "w8a8-smoothquant")
    out = export(m, "compressed-tensors", tmp_path / "ct", tokenizer=tiny_tokenizer)
    loaded = load_compressed_tensors(out)
    ids = _ids(tiny_tokenizer)
    with torch.no_grad():
        ref, got = m(ids).logits, loaded(ids).logits
        loaded_w = dict(loaded.named_parameters())
    for n, p in m.named_parameters():
        assert torch.equal(loaded_w[n], p), n
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()
    # the whole difference: the same rounding with a scale of amax / 127.5
    x = torch.randn(3, 7, 64)
    args = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True)
    amax = x.abs().amax(-1, keepdim=True)
    scale, zp = calculate_qparams(-amax, amax, args)
    assert torch.allclose(scale, amax / 127.5)
    ours = dequantize(quantize(x, "int8_token", QParams(scale)), "int8_token", QParams(scale))
    assert torch.equal(fake_quantize(x, scale, zp, args), ours)


def test_compressed_tensors_asymmetric_int4_mixed(tmp_path, tiny_tokenizer):
    """Asymmetric packed int4 plus an int8 layer: two config groups; decoded by compressed-tensors itself."""
    from leanlm.export.consumers import load_compressed_tensors_direct

    m = make_llama(vocab_size=len(tiny_tokenizer))
    cfg = QuantConfig([("*weight_quantizer", QuantizerConfig("int4_g32_asym")), ("*down_proj.weight_quantizer", QuantizerConfig("int8")),
                       ("*lm_head*", None)])
    leanlm.quantize(m, cfg, progress=False)
    out = export(m, "compressed-tensors", tmp_path / "ct", tokenizer=tiny_tokenizer)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert len(qc["config_groups"]) == 2
    assert {g["weights"]["symmetric"] for g in qc["config_groups"].values()} == {True, False}
    ids = _ids(tiny_tokenizer)
    with torch.no_grad():
        assert torch.equal(load_compressed_tensors_direct(out)(ids).logits, m(ids).logits)


def test_compressed_tensors_bad_input(tmp_path, tiny_tokenizer, tiny_model):
    with pytest.raises(LeanLMError, match="not quantized"):
        export(tiny_model, "compressed-tensors", tmp_path / "a")
    with pytest.raises(LeanLMError, match="cannot represent .*nvfp4.*it takes weights: int8"):
        export(_quantized(tiny_tokenizer, "nvfp4"), "compressed-tensors", tmp_path / "b")
    with pytest.raises(LeanLMError, match="cannot represent .*mxfp4"):
        export(_quantized(tiny_tokenizer, "mxfp4"), "compressed-tensors", tmp_path / "c")
    m = make_llama(vocab_size=len(tiny_tokenizer))
    leanlm.quantize(m, "w8a16", kv_cache="int8", calib_data=_ids(tiny_tokenizer, 2, 16), progress=False)
    with pytest.raises(LeanLMError, match="KV-cache"):
        export(m, "compressed-tensors", tmp_path / "d")
    assert not any(tmp_path.iterdir())  # nothing half-written


# ------------------------------------------------------------------------------ plain HF (pruned)


def _prune_mlp(model, keep: int):
    """Structured pruning by hand: keep the first `keep` MLP channels of every layer, update the config."""
    from torch import nn

    for layer in model.model.layers:
        mlp = layer.mlp
        for name in ("gate_proj", "up_proj"):
            old = getattr(mlp, name)
            new = nn.Linear(old.in_features, keep, bias=False)
            new.weight.data = old.weight.data[:keep].clone()
            setattr(mlp, name, new)
        new = nn.Linear(keep, mlp.down_proj.out_features, bias=False)
        new.weight.data = mlp.down_proj.weight.data[:, :keep].clone()
        mlp.down_proj = new
    return model


def test_hf_export_of_pruned_model(tmp_path, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    m = _prune_mlp(make_llama(vocab_size=len(tiny_tokenizer)), 48)
    with pytest.raises(LeanLMError, match="config implies"):
        export(m, "hf", tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
    m.config.intermediate_size = 48
    out = export(m, "hf", tmp_path / "pruned", tokenizer=tiny_tokenizer)
    loaded = AutoModelForCausalLM.from_pretrained(out)
    ids = _ids(tiny_tokenizer)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, m(ids).logits)
    assert loaded.config.intermediate_size == 48 and (out / "tokenizer.json").is_file()
    with pytest.raises(LeanLMError, match="quantized"):
        export(_quantized(tiny_tokenizer, "w8a16"), "hf", tmp_path / "q")


def test_overwrite_and_cli(tmp_path, tiny_folder, capsys):
    from leanlm.cli import main

    out = tmp_path / "o"
    assert main(["export", str(tiny_folder), "--to", "hf", "--out", str(out)]) == 0
    code = main(["export", str(tiny_folder), "--to", "hf", "--out", str(out)])
    assert code == 2 and "already exists" in capsys.readouterr().err
    assert main(["export", str(tiny_folder), "--to", "hf", "--out", str(out), "--overwrite"]) == 0
    assert main(["export", str(tiny_folder), "--to", "tflite", "--out", str(tmp_path / "t")]) == 2
    assert "choose one of: compressed-tensors, gguf, hf, onnx" in capsys.readouterr().err
    assert main(["export", str(tiny_folder), "--to", "hf", "--quant", "Q4_0", "--out", str(tmp_path / "h")]) == 2


# ------------------------------------------------------------------------------ GGUF


def test_ggml_block_packers_match_gguf_dequantize():
    import gguf
    from gguf.quants import dequantize

    from leanlm.export import ggml_blocks as B

    rng = np.random.default_rng(0)
    d = rng.random(8).astype(np.float32)
    d16 = d.astype(np.float16).astype(np.float32)[:, None]
    for name, (bits, pack) in B.SYM_PACKERS.items():
        c = rng.integers(-(2 ** (bits - 1)), 2 ** (bits - 1), (8, 32))
        got = dequantize(pack(c, d), getattr(gguf.GGMLQuantizationType, name))
        assert np.array_equal(got, c * d16), name
    u, m = rng.integers(0, 16, (8, 32)), rng.standard_normal(8).astype(np.float32)
    got = dequantize(B.pack_q4_1(u, d, m), gguf.GGMLQuantizationType.Q4_1)
    assert np.array_equal(got, u * d16 + m.astype(np.float16).astype(np.float32)[:, None])
    x = rng.standard_normal((16, 256)).astype(np.float32)
    for name, bound in (("Q4_K", 0.08), ("Q6_K", 0.02)):
        y = dequantize(B.KQUANTIZERS[name](x), getattr(gguf.GGMLQuantizationType, name))
        assert np.sqrt(((y - x) ** 2).mean()) < bound * x.std(), name


def _gguf_tensor(path, name):
    import gguf
    from gguf.quants import dequantize

    t = next(t for t in gguf.GGUFReader(str(path)).tensors if t.name == name)
    return t.tensor_type.name, dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))


def test_gguf_reuses_leanlm_codes_exactly(tmp_path, tiny_tokenizer):
    """int4 g64 (AWQ) weights go into Q4_0 with leanlm's codes; only the scale is rounded to fp16."""
    from leanlm.export import gguf as G

    from leanlm.quantization import AWQ

    m = _quantized(tiny_tokenizer, QuantConfig([("*weight_quantizer", QuantizerConfig("int4_g64")), ("*lm_head*", None)], [AWQ(grid=4, clip=False)]))
    out = export(m, "gguf", tmp_path / "m.gguf", tokenizer=tiny_tokenizer)
    assert G.last_report["quant"] == "Q4_0" and len(G.last_report["reused_exact"]) == 14 and not G.last_report["requantized"]
    typ, w = _gguf_tensor(out, "blk.1.ffn_down.weight")
    ref = m.model.layers[1].mlp.down_proj.weight.detach().numpy()
    assert typ == "Q4_0"
    np.testing.assert_allclose(w, ref, rtol=2 ** -10, atol=0)
    # q rows are permuted into llama.cpp's RoPE layout
    typ, wq = _gguf_tensor(out, "blk.0.attn_q.weight")
    perm = G._qk_perm(64, 4)
    np.testing.assert_allclose(wq, m.model.layers[0].self_attn.q_proj.weight.detach().numpy()[perm], rtol=2 ** -10, atol=0)
    # asymmetric int4 groups of 32 -> Q4_1 (d = scale, m = -zero * scale, both fp16)
    m = _quantized(tiny_tokenizer, QuantConfig([("*weight_quantizer", QuantizerConfig("int4_g32_asym")), ("*lm_head*", None)]))
    out = export(m, "gguf", tmp_path / "a.gguf", tokenizer=tiny_tokenizer)
    assert G.last_report["quant"] == "Q4_1" and len(G.last_report["reused_exact"]) == 14
    typ, w = _gguf_tensor(out, "blk.0.ffn_up.weight")
    ref = m.model.layers[0].mlp.up_proj.weight.detach().numpy()
    assert typ == "Q4_1"
    np.testing.assert_allclose(w, ref, rtol=0, atol=2e-3 * np.abs(ref).max())


def test_gguf_type_rules_follow_llama_cpp():
    from leanlm.export.gguf import tensor_type

    # SmolLM2-135M shapes: rows of 576 are not a multiple of 256, so k-quants fall back
    assert tensor_type("blk.0.attn_q.weight", (576, 576), "Q4_K_M", 30, False) == "Q5_0"
    assert tensor_type("blk.0.ffn_down.weight", (576, 1536), "Q4_K_M", 30, False) == "Q6_K"
    assert tensor_type("blk.4.ffn_down.weight", (576, 1536), "Q4_K_M", 30, False) == "Q4_K"
    assert tensor_type("token_embd.weight", (49152, 576), "Q4_0", 30, False) == "Q8_0"
    assert tensor_type("token_embd.weight", (49152, 576), "Q8_0", 30, False) == "Q8_0"
    assert tensor_type("blk.0.attn_norm.weight", (576,), "Q4_0", 30, False) == "F32"


def test_gguf_bad_input(tmp_path, tiny_tokenizer):
    with pytest.raises(LeanLMError, match="activation quantization.*GGUF export takes"):
        export(_quantized(tiny_tokenizer, "w8a8"), "gguf", tmp_path / "a.gguf", tokenizer=tiny_tokenizer)
    with pytest.raises(LeanLMError, match="cannot represent nvfp4.*GGUF export takes"):
        export(_quantized(tiny_tokenizer, "nvfp4-w4a16"), "gguf", tmp_path / "b.gguf", tokenizer=tiny_tokenizer)
    m = make_llama(vocab_size=len(tiny_tokenizer))
    with pytest.raises(LeanLMError, match="unknown GGUF quant 'Q3_X'"):
        export(m, "gguf", tmp_path / "c.gguf", tokenizer=tiny_tokenizer, quant="Q3_X")
    with pytest.raises(LeanLMError, match="needs the tokenizer"):
        export(m, "gguf", tmp_path / "d.gguf")
    from transformers import GPT2Config, GPT2LMHeadModel

    with pytest.raises(LeanLMError, match="model_type .gpt2.*supported families"):
        export(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=len(tiny_tokenizer))), "gguf",
               tmp_path / "e.gguf", tokenizer=tiny_tokenizer)
    assert not any(tmp_path.iterdir())


# ----- in llama.cpp

# Max |logit difference| relative to the largest float logit, per quant type, on a tiny random Llama
# (hidden 256 so that every k-quant block fits); llama.cpp also quantizes activations to 8 bits
# inside its quantized matmuls, which the F16 file does not.
GGUF_TOL = {"F16": 0.002, "BF16": 0.008, "Q8_0": 0.025, "Q5_0": 0.1, "Q4_0": 0.15, "Q4_1": 0.16, "Q4_K_M": 0.12}
# measured: F16 0.0004, BF16 0.0029, Q8_0 0.011, Q5_0 0.069, Q4_0 0.10, Q4_1 0.114, Q4_K_M 0.08


@pytest.fixture(scope="module")
def gguf_model(tiny_tokenizer):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed: pip install -e '.[llamacpp]' (builds llama.cpp, ~5 min)")
    tok = tiny_tokenizer
    tok.chat_template = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
    return make_llama(vocab_size=len(tok), hidden=256, heads=4, kv_heads=2, intermediate=512, seed=3), tok


@pytest.mark.parametrize("quant", list(GGUF_TOL))
def test_gguf_runs_in_llama_cpp(tmp_path, gguf_model, quant):
    from leanlm.export.consumers import llamacpp_logits, load_llamacpp

    model, tok = gguf_model
    out = export(model, "gguf", tmp_path / f"m-{quant}.gguf", tokenizer=tok, quant=quant)
    llm = load_llamacpp(out, n_ctx=64, logits_all=True)
    ids = _ids(tok, 1, 48)[0]
    with torch.no_grad():
        ref = model(ids[None]).logits[0].numpy()
    got = llamacpp_logits(llm, ids)
    err = np.abs(got - ref).max() / np.abs(ref).max()
    assert err < GGUF_TOL[quant], (quant, err)
    if quant == "F16":  # greedy continuation identical to leanlm's model
        from leanlm.export.consumers import llamacpp_generator

        prompt = ids[None, :16]
        with torch.no_grad():
            hf = model.generate(prompt, max_new_tokens=12, min_new_tokens=12, do_sample=False, attention_mask=torch.ones_like(prompt))
        assert torch.equal(llamacpp_generator(load_llamacpp(out, n_ctx=64))(prompt, 12, lambda: None), hf)


def test_gguf_of_leanlm_int4_runs_leanlm_quantization(tmp_path, gguf_model):
    """A leanlm int4 model in Q4_0: llama.cpp reproduces leanlm's quantized model, not the float one."""
    from leanlm.export.consumers import llamacpp_logits, load_llamacpp

    _, tok = gguf_model
    model = make_llama(vocab_size=len(tok), hidden=256, heads=4, kv_heads=2, intermediate=512, seed=3)
    ids = _ids(tok, 1, 48)[0]
    with torch.no_grad():
        ref_float = model(ids[None]).logits[0].numpy()
        leanlm.quantize(model, "w4a16-rtn", progress=False)
        ref_q = model(ids[None]).logits[0].numpy()
    got = llamacpp_logits(load_llamacpp(export(model, "gguf", tmp_path / "q.gguf", tokenizer=tok), n_ctx=64, logits_all=True), ids)
    err_q = np.abs(got - ref_q).max() / np.abs(ref_q).max()
    err_float = np.abs(got - ref_float).max() / np.abs(ref_float).max()
    assert err_q < 0.04 and err_float > 3 * err_q, (err_q, err_float)   # measured 0.020 and 0.148


def test_gguf_tokenizer_and_metadata(tmp_path, gguf_model):
    import gguf

    from leanlm.export.consumers import load_llamacpp

    model, tok = gguf_model
    out = export(model, "gguf", tmp_path / "m.gguf", tokenizer=tok, quant="Q8_0")
    f = gguf.GGUFReader(str(out)).fields
    assert f["general.architecture"].contents() == "llama" and f["llama.block_count"].contents() == 2
    assert f["llama.attention.head_count_kv"].contents() == 2 and f["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q8_0
    assert len(f["tokenizer.ggml.tokens"].contents()) == len(tok) and len(f["tokenizer.ggml.merges"].contents()) > 0
    assert f["tokenizer.ggml.eos_token_id"].contents() == tok.eos_token_id and f["tokenizer.ggml.pre"].contents() == "gpt-2"
    assert f["tokenizer.chat_template"].contents() == tok.chat_template
    llm = load_llamacpp(out, n_ctx=64)
    text = "The quick brown fox jumps over the lazy dog. Quantization stores weights in fewer bits!"
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok(text)["input_ids"]
    assert llm.token_eos() == tok.eos_token_id
