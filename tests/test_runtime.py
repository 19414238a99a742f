"""leanlm.runtime: packed layouts vs reference forwards, static KV cache, sampling, batching, errors."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import make_gemma3, make_llama
from leanlm.core.errors import LeanLMError
from leanlm.runtime import Engine, Sampling
from leanlm.runtime.sampling import filter_logits

V = 300


def _peaky(model):
    """Scale the final norm so the tiny random model's logits have clear winners (greedy is then
    insensitive to bfloat16 rounding, and token equality is a meaningful check)."""
    with torch.no_grad():
        model.model.norm.weight.mul_(40)
    return model


@pytest.fixture(scope="module")
def llama():
    return _peaky(make_llama(vocab_size=V, hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128))


@pytest.fixture(scope="module")
def ids():
    g = torch.Generator().manual_seed(1)
    return torch.randint(1, V, (2, 10), generator=g)


def _hf_with(model, eng):
    """The HF model with every linear weight replaced by what the engine's packed layout decodes to."""
    ref = copy.deepcopy(model)
    layers = eng.model.layers
    for hl, L in zip(ref.model.layers, layers):
        a, m = hl.self_attn, hl.mlp
        qkv = L.qkv.dequantize()
        q, k = a.q_proj.out_features, a.k_proj.out_features
        a.q_proj.weight.data, a.k_proj.weight.data, a.v_proj.weight.data = qkv[:q], qkv[q:q + k], qkv[q + k:]
        a.o_proj.weight.data = L.o.dequantize()
        gu = L.gate_up.dequantize()
        m.gate_proj.weight.data, m.up_proj.weight.data = gu[: m.gate_proj.out_features], gu[m.gate_proj.out_features:]
        m.down_proj.weight.data = L.down.dequantize()
    return ref


def _hf_greedy(model, ids, n):
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False)


@pytest.mark.parametrize("weights,tol", [("fp32", 1e-4), ("bf16", 0.15), ("int8", 0.15), ("int4", 0.15), ("w8a8", 0.15)])
def test_packed_float_model_matches_reference(llama, ids, weights, tol):
    eng = Engine(llama, weights, max_batch=2, max_seq_len=64)
    ref = _hf_with(llama, eng)
    with torch.no_grad():
        want = ref(ids).logits
    got = eng.forward(ids)
    scale = want.abs().max()
    assert (got - want).abs().max() <= tol * scale, weights
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    if weights != "w8a8":  # w8a8 also quantizes activations, which the float reference does not
        assert torch.equal(eng.generate(ids, 8), _hf_greedy(ref, ids, 8))


def test_packed_layouts_shrink_memory(llama):
    sizes = {w: Engine(llama, w, max_seq_len=32).weight_bytes() for w in ("fp32", "bf16", "int8", "int4")}
    assert sizes["fp32"] > sizes["bf16"] > sizes["int8"] > sizes["int4"]
    # int8 and int4 heads shrink the (tied) embedding + head table too; int8 is the default under a low-bit body
    dense = Engine(llama, "int4", head="dense", max_seq_len=32)
    assert dense.model.head_format == "bfloat16" and Engine(llama, "int4", max_seq_len=32).model.head_format == "int8"
    assert Engine(llama, "int4", head="int8", max_seq_len=32).weight_bytes() < dense.weight_bytes()


@pytest.mark.parametrize("scheme", ["w8a16", "w4a16-rtn", "int4_g32_asym", "w8a8"])
def test_packed_from_leanlm_quantized_reproduces_fake_quant(llama, ids, scheme):
    import leanlm
    from leanlm.quantization import QuantConfig, QuantizerConfig

    q = copy.deepcopy(llama)
    cfg = QuantConfig([("*weight_quantizer", QuantizerConfig(scheme)), ("*lm_head*", None)]) if scheme.startswith("int4") else scheme
    leanlm.quantize(q, cfg, progress=False)
    eng = Engine(q, max_batch=2, max_seq_len=64)
    assert not eng.fallbacks
    # the packed codes decode to the fake-quantized weights (scales rounded to the kernel's dtype)
    for name, lin, layout in [("o", q.model.layers[0].self_attn.o_proj, eng.model.layers[0].o),
                              ("down", q.model.layers[1].mlp.down_proj, eng.model.layers[1].down)]:
        fq = lin.weight_quantizer(lin.weight).detach().float()
        rel = 1e-7 if scheme == "w8a8" else 1e-2  # w8a8 keeps float32 scales; bf16 scales round to 8 bits
        assert (layout.dequantize() - fq).abs().max() <= rel * fq.abs().max(), name
    with torch.no_grad():
        want = q(ids).logits
    got = eng.forward(ids)
    tol = 1e-4 if scheme == "w8a8" else 0.15
    assert (got - want).abs().max() <= tol * want.abs().max()
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    if scheme == "w8a8":  # exact integer matmuls in float32: greedy tokens equal the fake-quant model's
        assert torch.equal(eng.generate(ids, 8), _hf_greedy(q, ids, 8))


def test_format_without_kernel_errors_unless_fallback(llama):
    import leanlm

    q = leanlm.quantize(copy.deepcopy(llama), "nf4", progress=False)
    with pytest.raises(LeanLMError, match="no fast CPU kernel for weight format nf4.*allow_fallback"):
        Engine(q)
    eng = Engine(q, allow_fallback=True, max_seq_len=32)
    assert eng.fallbacks and all("nf4" in f for f in eng.fallbacks)
    with pytest.raises(LeanLMError, match="int4 group 48"):
        Engine(llama, "int4", group_size=48)


def test_static_cache_incremental_and_rewind(llama, ids):
    eng = Engine(llama, "fp32", max_batch=2, max_seq_len=64, kv_block=16)
    full = eng.forward(ids)
    eng.reset()
    a = eng.forward(ids[:, :4])
    b = eng.forward(ids[:, 4:7])
    c = torch.cat([eng.forward(ids[:, i:i + 1]) for i in range(7, 10)], dim=1)
    assert eng.length == 10
    torch.testing.assert_close(torch.cat([a, b, c], 1), full, rtol=1e-4, atol=1e-4)
    eng.rewind(5)
    assert eng.length == 5
    again = eng.forward(ids[:, 5:])
    torch.testing.assert_close(again, full[:, 5:], rtol=1e-4, atol=1e-4)
    with pytest.raises(LeanLMError, match="cannot rewind to 11"):
        eng.rewind(11)


def test_batch_rows_equal_single_rows(llama, ids):
    eng = Engine(llama, "int8", max_batch=2, max_seq_len=64)
    both = eng.generate(ids, 6)
    for r in range(2):
        assert torch.equal(eng.generate(ids[r:r + 1], 6), both[r:r + 1])


def test_sampling_settings(llama, ids):
    eng = Engine(llama, "bf16", max_batch=2, max_seq_len=64)
    greedy = eng.generate(ids, 6)
    s1 = eng.generate(ids, 6, temperature=1.0, seed=3)
    s2 = eng.generate(ids, 6, temperature=1.0, seed=3)
    assert torch.equal(s1, s2)                                   # seeded sampling is reproducible
    assert torch.equal(eng.generate(ids, 6, temperature=0.7, top_k=1, seed=4), greedy)
    assert torch.equal(eng.generate(ids, 6, temperature=0.7, top_p=1e-6, seed=5), greedy)
    hot = eng.generate(ids[:1], 20, temperature=50.0, seed=6)
    assert not torch.equal(hot, eng.generate(ids[:1], 20))        # a hot temperature leaves the greedy path
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    kept = torch.isfinite(filter_logits(logits, Sampling(1.0, top_k=2)))
    assert kept.tolist() == [[True, True, False, False, False]]
    p = logits.softmax(-1)[0]  # [0.636, 0.234, 0.086, ...]
    kept = torch.isfinite(filter_logits(logits, Sampling(1.0, top_p=0.8)))
    assert kept.tolist() == [[True, True, False, False, False]] and p[0] < 0.8 < p[0] + p[1]
    with pytest.raises(LeanLMError, match="top_p"):
        Sampling(1.0, top_p=1.5)


def test_bad_input_errors(llama):
    eng = Engine(llama, "fp32", max_seq_len=16)
    with pytest.raises(LeanLMError, match="needs a cache of 21 tokens.*max_seq_len >= 21"):
        eng.generate(torch.ones(1, 12, dtype=torch.long), 10)
    with pytest.raises(LeanLMError, match="exceed the cache of 16 tokens"):
        eng.forward(torch.ones(1, 17, dtype=torch.long))
    with pytest.raises(LeanLMError, match="max_batch"):
        eng.forward(torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(LeanLMError, match="token ids must lie"):
        eng.forward(torch.full((1, 3), V, dtype=torch.long))
    with pytest.raises(LeanLMError, match="unknown weight format"):
        Engine(llama, "int3")
    with pytest.raises(LeanLMError, match="2-D LongTensor"):
        eng.forward(torch.ones(3))


def test_gemma3_matches_hf():
    model = make_gemma3(V)
    ids = torch.randint(1, V, (1, 9), generator=torch.Generator().manual_seed(2))
    eng = Engine(model, "fp32", max_seq_len=64, kv_block=8)
    with torch.no_grad():
        want = model(ids).logits
    torch.testing.assert_close(eng.forward(ids), want, rtol=1e-4, atol=1e-4)
    assert torch.equal(eng.generate(ids, 10), _hf_greedy(model, ids, 10))  # crosses the sliding window


def test_cli_generate(tiny_folder, capsys):
    from leanlm.cli import main

    assert main(["generate", str(tiny_folder), "--prompt", "The quick brown fox", "--max-new-tokens", "5",
                 "--weights", "int4", "--no-stop", "--json"]) == 0
    out = capsys.readouterr().out
    assert '"new_tokens": 5' in out and '"weights": "int4"' in out
    assert main(["generate", str(tiny_folder), "--prompt", "x", "--weights", "int5"]) == 2
    assert "unknown weight format 'int5'" in capsys.readouterr().err


@pytest.mark.integration
def test_real_smollm2_greedy_equals_hf():
    import leanlm

    model, tok = leanlm.load("smollm2-135m")
    ids = torch.tensor([tok("The capital of France is", return_attention_mask=False)["input_ids"]])
    eng = Engine(model, "fp32", max_seq_len=64)
    assert torch.equal(eng.generate(ids, 16), _hf_greedy(model, ids, 16))


def test_cli_eval_speed_engine(tiny_folder, capsys, monkeypatch):
    """`leanlm eval --speed --engine both` times transformers and the leanlm engine through the speed harness."""
    import leanlm.evaluation.harness as harness
    from leanlm.cli import main

    ids = torch.randint(1, 200, (1, 8), generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(harness, "protocol_prompts", lambda tok, b, p, src: ids.repeat(b, 1))  # the tiny tokenizer's text is short
    assert main(["eval", str(tiny_folder), "--speed", "--engine", "both", "--weights", "int8", "--runs", "1",
                 "--new-tokens", "3", "--prompt-tokens", "8", "--json"]) == 0
    out = capsys.readouterr().out
    assert "leanlm int8" in out and '"decode_tps"' in out
