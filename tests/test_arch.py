"""The architecture adapter (leanlm.core.arch) on a tiny random model of every supported family:
runtime logits and greedy tokens equal transformers', a PTQ preset calibrates, GGUF runs in llama.cpp."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import leanlm
from conftest import make_tokenizer
from leanlm.core.arch import arch_of
from leanlm.core.errors import LeanLMError
from leanlm.export import export
from leanlm.runtime import Engine

V = 300
COMMON = dict(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, eos_token_id=0, pad_token_id=0, bos_token_id=None)


def _config(family: str, **over):
    import transformers as T

    if over:
        cfg = _config(family)
        for k, v in over.items():
            setattr(cfg, k, v)
        return cfg

    if family == "llama":
        return T.LlamaConfig(**COMMON, tie_word_embeddings=True)
    if family == "mistral":   # a window shorter than the test sequences, so that it matters
        return T.MistralConfig(**COMMON, sliding_window=8, tie_word_embeddings=False)
    if family == "qwen2":
        return T.Qwen2Config(**COMMON, tie_word_embeddings=True)
    if family == "qwen3":
        return T.Qwen3Config(**COMMON, head_dim=16, tie_word_embeddings=True)
    if family == "gemma3":
        return T.Gemma3TextConfig(**COMMON, head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
                                  layer_types=["sliding_attention", "full_attention"], tie_word_embeddings=True)
    if family == "phi3":
        return T.Phi3Config(**COMMON, partial_rotary_factor=0.5, tie_word_embeddings=False)
    raise AssertionError(family)


FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma3", "phi3"]


def make_model(family: str, seed: int = 0, **over):
    """A tiny random model of `family` whose logits have clear winners (random biases and norms, so that
    Qwen2's q/k/v biases and every norm weight matter; a scaled final norm keeps greedy decisive)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config(family, **over), torch_dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
        model.model.norm.weight.mul_(20 if family != "gemma3" else 1)
        if family == "gemma3":
            model.model.norm.weight.add_(20.0)
    return model


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request):
    return request.param, make_model(request.param)


def _ids(n: int = 20, rows: int = 1, seed: int = 1):
    return torch.randint(1, V, (rows, n), generator=torch.Generator().manual_seed(seed))


def test_adapter_reads_each_family(family_model):
    family, model = family_model
    a = arch_of(model)
    assert a.family == family and a.n_layers == 2 and a.hidden == 64 and a.heads == 4 and a.kv_heads == 2
    for group in a.groups:   # every named projection exists, and a group's members read the same input width
        mods = [a.layers(model)[0].get_submodule(n) for n in group]
        assert len({m.in_features for m in mods}) == 1
    assert a.fused == (family == "phi3")
    assert bool(a.qk_norms) == (family in ("qwen3", "gemma3"))
    assert (a.norm_offset, a.embed_scale != 1.0) == ((1.0, True) if family == "gemma3" else (0.0, False))
    assert a.rotary_dim == (8 if family == "phi3" else a.head_dim)
    assert any(a.windows) == (family in ("mistral", "gemma3"))
    assert (a.layers(model)[0].self_attn.q_proj.bias is not None) == (family == "qwen2") if family != "phi3" else True


def test_runtime_matches_transformers(family_model):
    family, model = family_model
    ids = _ids(20, rows=2)
    eng = Engine(model, "fp32", max_seq_len=64, max_batch=2)
    with torch.no_grad():
        ref = model(ids).logits
    got = eng.forward(ids)
    assert torch.allclose(got, ref, atol=1e-4, rtol=1e-4), (family, (got - ref).abs().max())
    # prefill then one-token steps through the KV cache (and past Mistral's / Gemma's sliding window)
    prompt = ids[:1, :6]
    with torch.no_grad():
        hf = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=14, min_new_tokens=14, do_sample=False)
    assert torch.equal(eng.generate(prompt, 14), hf), family


def _on_int4_grid(m, lin_names) -> bool:
    """Every quantized weight holds at most 16 distinct values per group of 64 inputs."""
    for n in lin_names:
        w = m.get_submodule(n).weight.detach()
        if max(len(torch.unique(g)) for g in w.reshape(-1, 64)) > 16:
            return False
    return True


def _check_quantized(model, m):
    a = arch_of(m)
    qlin = [n for n, x in m.named_modules() if getattr(x, "weight_quantizer", None) is not None and x.weight_quantizer.enabled]
    assert any(n.endswith(a.down) for n in qlin) and any(n.endswith(a.qkv[0]) for n in qlin)
    assert _on_int4_grid(m, qlin)
    ids = _ids(16)
    with torch.no_grad():
        ref, got = model(ids).logits[0], m(ids).logits[0]
    assert not torch.equal(ref, got) and F.cosine_similarity(ref, got, dim=-1).min() > 0.9
    return ids, got


def test_ptq_preset_calibrates(family_model):
    """AWQ + GPTQ calibrate on random token batches; the runtime packs the int4 model and reproduces it."""
    import copy

    family, model = family_model
    m = copy.deepcopy(model)
    leanlm.quantize(m, "w4a16-awq-gptq", calib_data=_ids(32, rows=4, seed=5), progress=False)
    ids, got = _check_quantized(model, m)
    eng = Engine(m, max_seq_len=32)
    assert eng.model.weights == "auto" and type(eng.model.layers[0].qkv).__name__ == "Int4Weight"
    assert F.cosine_similarity(eng.forward(ids)[0], got, dim=-1).min() > 0.999


@pytest.mark.parametrize("family", ["phi3", "qwen2"])
def test_gptq_groups_from_adapter(family, monkeypatch):
    """GPTQ solves the adapter's groups (Phi-3's fused qkv_proj alone, Qwen2's q/k/v together) without tracing."""
    import copy

    from leanlm.core import calibrate as cal

    model = make_model(family)
    m = copy.deepcopy(model)

    def no_trace(*a, **k):
        raise AssertionError("GPTQ traced the inputs of a family the adapter knows")

    monkeypatch.setattr(cal, "_trace_inputs", no_trace)
    leanlm.quantize(m, "w4a16-gptq", calib_data=_ids(32, rows=4, seed=5), progress=False)
    _check_quantized(model, m)


def test_unknown_family_is_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=V))
    with pytest.raises(LeanLMError, match=r"model_type 'gpt2'.*supported families: Llama.*Mistral.*Qwen2.*Qwen3.*Gemma-3.*Phi-3"):
        arch_of(gpt2)
    with pytest.raises(LeanLMError, match="supported families"):
        Engine(gpt2)


# ----- GGUF in llama.cpp

@pytest.fixture(scope="module")
def tok():
    return make_tokenizer(V)


@pytest.mark.parametrize("family", FAMILIES)
def test_gguf_runs_in_llama_cpp(tmp_path, tok, family):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed: pip install -e '.[llamacpp]'")
    from leanlm.export.consumers import llamacpp_generator, llamacpp_logits, load_llamacpp

    # llama.cpp's llama graph (Mistral) has no sliding window; its gemma3 graph slides in five layers of six
    over = {"mistral": {"sliding_window": None}, "gemma3": {"layer_types": ["sliding_attention"] * 2}}.get(family, {})
    model = make_model(family, **over)
    out = export(model, "gguf", tmp_path / f"{family}.gguf", tokenizer=tok, quant="F32")
    import gguf

    assert gguf.GGUFReader(str(out)).fields["general.architecture"].contents() == arch_of(model).gguf_arch
    ids = _ids(24)[0]
    with torch.no_grad():
        ref = model(ids[None]).logits[0].numpy()
    got = llamacpp_logits(load_llamacpp(out, n_ctx=64, logits_all=True), ids)
    err = np.abs(got - ref).max() / np.abs(ref).max()
    assert err < 2e-3, (family, err)
    prompt = ids[None, :6]
    with torch.no_grad():
        hf = model.generate(prompt, max_new_tokens=10, min_new_tokens=10, do_sample=False, attention_mask=torch.ones_like(prompt))
    assert torch.equal(llamacpp_generator(load_llamacpp(out, n_ctx=64))(prompt, 10, lambda: None), hf), family


# ----- leanlm eval --speed: the runtime by default where it runs the family

def _speed(capsys, folder, *extra):
    from leanlm.cli import main

    code = main(["eval", str(folder), "--speed", "--prompt-tokens", "4", "--new-tokens", "2", "--runs", "1", "--json", *extra])
    out = capsys.readouterr()
    assert code == 0, out.err
    import json

    return list(json.loads(out.out)["models"]), out.err


def test_eval_speed_engine_default(tmp_path, tok, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    qwen = tmp_path / "qwen3"
    make_model("qwen3").save_pretrained(qwen)
    tok.save_pretrained(qwen)
    labels, _ = _speed(capsys, qwen)
    assert len(labels) == 1 and "leanlm" in labels[0]
    labels, _ = _speed(capsys, qwen, "--engine", "hf")
    assert len(labels) == 1 and "leanlm" not in labels[0]
    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=V, n_positions=64)).save_pretrained(gpt2)
    tok.save_pretrained(gpt2)
    labels, err = _speed(capsys, gpt2)
    assert "leanlm" not in labels[0] and "note: timing transformers" in err and "model_type 'gpt2'" in err


# ----- structured pruning through the adapter (separate q/k/v and gate/up, no sliding windows)

@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_prune_families(family):
    from leanlm.prune import PruneTarget, dims_of, prune

    model = make_model(family)
    calib = torch.randint(1, V, (4, 32), generator=torch.Generator().manual_seed(0))
    same = prune(model, PruneTarget(layers=2, hidden=64, intermediate=128, heads=4, kv_heads=2), calib=calib, progress=False)
    with torch.no_grad():
        assert torch.equal(same(calib[:2]).logits, model(calib[:2]).logits)   # a no-op keep is exact (biases, q/k norms)
    small = prune(model, PruneTarget(layers=1, hidden=48, intermediate=64, heads=2, kv_heads=1), calib=calib, progress=False)
    assert dims_of(small).to_dict() == dict(hidden=48, intermediate=64, heads=2, kv_heads=1, layers=1)
    ids = calib[:1, :12]
    with torch.no_grad():
        ref = small(ids).logits
    assert torch.allclose(Engine(small, "fp32", max_seq_len=16).forward(ids), ref, atol=1e-4)
    with pytest.raises(LeanLMError, match="Gemma-3 is not supported"):
        prune(make_model("gemma3"), PruneTarget(layers=1), calib=calib, progress=False)


def test_profile_and_facts_read_the_adapter():
    from leanlm.core.modules import decoder_layers, facts
    from leanlm.evaluation import decode_costs

    gemma = make_model("gemma3")   # layer 0 slides over 8 tokens, layer 1 is global
    a = arch_of(gemma)
    assert decoder_layers(gemma) is a.layers(gemma)
    f = facts(gemma)
    assert (f.layers, f.heads, f.kv_heads, f.head_dim) == (2, 4, 2, 16)
    c = decode_costs(gemma, context=20)
    assert c["kv_bytes"] == 2 * 2 * 16 * (8 + 20) * 4


def test_gguf_refuses_what_llama_cpp_would_run_differently(tmp_path, tok):
    with pytest.raises(LeanLMError, match="llama graph has no sliding-window attention"):
        export(make_model("mistral"), "gguf", tmp_path / "m.gguf", tokenizer=tok)
    with pytest.raises(LeanLMError, match="five sliding-window layers then one global"):
        export(make_model("gemma3"), "gguf", tmp_path / "g.gguf", tokenizer=tok)   # sliding, then global
    assert not any(tmp_path.iterdir())


def test_runtime_llama_with_every_bias():
    """attention_bias / mlp_bias put a bias on every projection (o and down too): added after each matmul."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**COMMON, attention_bias=True, mlp_bias=True)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.2)
    ids = _ids(12)
    with torch.no_grad():
        ref = model(ids).logits
    assert torch.allclose(Engine(model, "fp32", max_seq_len=16).forward(ids), ref, atol=1e-4)


@pytest.mark.parametrize("family", ["qwen3", "gemma3", "phi3"])
def test_shallow_draft_keeps_the_first_layers(family):
    from leanlm.speculative import truncate_layers

    model = make_model(family)
    draft = truncate_layers(model, 1)
    a = arch_of(draft)
    assert a.n_layers == 1 and a.windows == arch_of(model).windows[:1]
    sd, full = draft.state_dict(), model.state_dict()
    assert all(torch.equal(v, full[k]) for k, v in sd.items())
    with pytest.raises(LeanLMError, match="supported families"):
        from transformers import GPT2Config, GPT2LMHeadModel

        truncate_layers(GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=V)), 1)
