"""Structured pruning on tiny random Llama models: shapes, targets, GQA, exactness, saved folders, errors."""

from __future__ import annotations

import json

import pytest
import torch

import leanlm

from conftest import TRAIN_TEXT, make_llama
from leanlm import LeanLMError
from leanlm.prune import PruneTarget, count_params, dims_of, parse_count, prune, prune_and_distill, solve_dims


@pytest.fixture(scope="module")
def calib(tiny_tokenizer):
    ids = torch.tensor(tiny_tokenizer(TRAIN_TEXT)["input_ids"])
    return ids[: 6 * 64].view(6, 64)


def model(tok, **kw):
    base = dict(vocab_size=len(tok), hidden=64, layers=4, heads=4, kv_heads=2, intermediate=128)
    base.update(kw)
    return make_llama(**base)


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def logits(m, ids):
    with torch.no_grad():
        return m(input_ids=ids).logits


def test_prune_nothing_is_exact(tiny_tokenizer, calib):
    m = model(tiny_tokenizer)
    p = prune(m, PruneTarget(layers=4, hidden=64, intermediate=128, heads=4, kv_heads=2), calib=calib, progress=False)
    assert p is not m
    assert torch.equal(logits(p, calib[:2]), logits(m, calib[:2]))


@pytest.mark.parametrize("axis,kw,expect", [
    ("intermediate", dict(intermediate=48), dict(intermediate=48)),
    ("hidden", dict(hidden=40), dict(hidden=40)),
    ("heads-per-group", dict(heads=2), dict(heads=2, kv_heads=2)),
    ("kv-groups", dict(heads=2, kv_heads=1), dict(heads=2, kv_heads=1)),
    ("depth", dict(layers=2), dict(layers=2)),
])
def test_each_axis_shapes(tiny_tokenizer, calib, axis, kw, expect):
    m = model(tiny_tokenizer)
    p = prune(m, PruneTarget(**kw), calib=calib, progress=False)
    d = dims_of(p).to_dict()
    for k, v in expect.items():
        assert d[k] == v, (axis, d)
    cfg = p.config
    lay = p.model.layers[0]
    hd = 16
    assert lay.self_attn.q_proj.weight.shape == (cfg.num_attention_heads * hd, cfg.hidden_size)
    assert lay.self_attn.k_proj.weight.shape == (cfg.num_key_value_heads * hd, cfg.hidden_size)
    assert lay.self_attn.o_proj.weight.shape == (cfg.hidden_size, cfg.num_attention_heads * hd)
    assert lay.mlp.down_proj.weight.shape == (cfg.hidden_size, cfg.intermediate_size)
    assert p.model.embed_tokens.weight.shape == (len(tiny_tokenizer), cfg.hidden_size)
    assert p.lm_head.weight is p.model.embed_tokens.weight  # still tied
    assert n_params(p) < n_params(m)
    out = logits(p, calib[:2])
    assert out.shape == (2, 64, len(tiny_tokenizer)) and torch.isfinite(out).all()


def test_importance_keeps_the_loud_channels(tiny_tokenizer, calib):
    m = model(tiny_tokenizer, layers=1)
    with torch.no_grad():  # make MLP channels 0..15 of layer 0 much louder than the rest
        m.model.layers[0].mlp.up_proj.weight[:16] *= 50
        m.model.layers[0].self_attn.v_proj.weight[16:32] *= 50  # KV group 1 (query heads 2, 3) loud
        m.model.layers[0].self_attn.q_proj.weight[48:64] *= 50  # query head 3 attends more sharply
    p = prune(m, PruneTarget(intermediate=16, heads=1, kv_heads=1), calib=calib, progress=False)
    ref = m.model.layers[0].mlp.down_proj.weight[:, :16]
    assert torch.equal(p.model.layers[0].mlp.down_proj.weight, ref)
    assert torch.equal(p.model.layers[0].self_attn.v_proj.weight, m.model.layers[0].self_attn.v_proj.weight[16:32])
    assert p.model.layers[0].self_attn.q_proj.weight.shape == (16, 64)  # one query head of KV group 1
    q, o = p.model.layers[0].self_attn.q_proj.weight, p.model.layers[0].self_attn.o_proj.weight
    mq, mo = m.model.layers[0].self_attn.q_proj.weight, m.model.layers[0].self_attn.o_proj.weight
    assert any(torch.equal(q, mq[16 * j : 16 * j + 16]) and torch.equal(o, mo[:, 16 * j : 16 * j + 16]) for j in (2, 3))


def test_depth_drops_the_layer_that_matters_least(tiny_tokenizer, calib):
    m = model(tiny_tokenizer)
    with torch.no_grad():  # layer 2 does (almost) nothing: zero its output projections
        m.model.layers[2].self_attn.o_proj.weight.zero_()
        m.model.layers[2].mlp.down_proj.weight.zero_()
    p = prune(m, PruneTarget(layers=3), calib=calib, depth_metric="cosine", progress=False)
    assert p.leanlm_prune["kept_layers"] == [0, 1, 3]
    assert torch.allclose(logits(p, calib[:2]), logits(m, calib[:2]), atol=1e-5)  # removing a no-op layer is exact
    # "ppl": the score is the NLL change when the layer is skipped (0 for the no-op layer; a random layer's skip may
    # even lower the NLL); the layer with the lowest score goes
    p = prune(m, PruneTarget(layers=3), calib=calib, depth_metric="ppl", progress=False)
    scores = torch.tensor(p.leanlm_prune["layer_scores"])
    assert abs(scores[2]) < 1e-5
    assert p.leanlm_prune["kept_layers"] == sorted(set(range(4)) - {int(scores.argmin())})


def test_hidden_pairs_follow_the_kept_layers(tiny_tokenizer, calib):
    from leanlm.distill import DistillConfig, TrainConfig, distill, matched_hidden_pairs

    m = model(tiny_tokenizer)
    with torch.no_grad():  # layer 1 does nothing: depth pruning drops it and keeps 0, 2, 3
        m.model.layers[1].self_attn.o_proj.weight.zero_()
        m.model.layers[1].mlp.down_proj.weight.zero_()
    p = prune(m, PruneTarget(layers=3), calib=calib, depth_metric="cosine", progress=False)
    assert p.leanlm_prune["kept_layers"] == [0, 2, 3]
    pairs = matched_hidden_pairs(p, m, 2)
    assert pairs == [(1, 1), (2, 3)]   # student layer 1 (output index 2) was the teacher's layer 2 (index 3)
    with torch.no_grad():   # the matched hidden states are the same tensors before any training
        hs, ht = p(calib[:1], output_hidden_states=True).hidden_states, m(calib[:1], output_hidden_states=True).hidden_states
    assert all(torch.allclose(hs[s], ht[t], atol=1e-5) for s, t in pairs)
    assert matched_hidden_pairs(model(tiny_tokenizer), m, 3) == [(1, 1), (2, 2), (3, 3)]   # unpruned: same depth
    with pytest.raises(LeanLMError, match="at most 2 hidden-state pairs"):
        matched_hidden_pairs(p, m, 3)
    res = distill(p, m, calib.reshape(-1), DistillConfig(hidden_layers=pairs),
                  TrainConfig(max_tokens=2 * 64 * 3, batch_size=2, seq_len=64, lr=1e-3, progress=False, autocast_bf16=False))
    assert res.steps == 3 and all("hidden" in h for h in res.history)


@pytest.mark.parametrize("axes", ["width", "depth", "both"])
def test_param_target(tiny_tokenizer, calib, axes):
    m = model(tiny_tokenizer)
    want = int(n_params(m) * 0.7)
    p = prune(m, PruneTarget(params=want, axes=axes, multiple_of=16), calib=calib, progress=False)
    got = n_params(p)
    assert got <= want and got > 0.5 * n_params(m)
    assert p.leanlm_prune["params_after"] == got == count_params(m, dims_of(p))
    d = dims_of(p)
    if axes == "depth":
        assert (d.hidden, d.intermediate, d.layers) == (64, 128, d.layers) and d.layers < 4
    elif axes == "width":
        assert d.layers == 4 and d.hidden % 16 == 0 and d.intermediate % 16 == 0 and d.hidden < 64 and d.intermediate < 128
    else:
        assert d.layers < 4 and (d.hidden < 64 or d.intermediate < 128)


def test_saved_folder_loads_with_plain_transformers(tiny_tokenizer, calib, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    m = model(tiny_tokenizer)
    p = prune(m, PruneTarget(hidden=32, intermediate=64, heads=4, layers=3), calib=calib, progress=False)
    out = leanlm.save(p, tmp_path / "pruned", tokenizer=tiny_tokenizer)
    assert json.loads((out / "leanlm.json").read_text())["prune"]["to"]["hidden"] == 32 and (out / "model.safetensors").is_file()
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(plain).__name__ == "LlamaForCausalLM"
    assert torch.equal(logits(plain, calib[:2]), logits(p, calib[:2]))
    assert AutoTokenizer.from_pretrained(out)("fox")["input_ids"] == tiny_tokenizer("fox")["input_ids"]
    with pytest.raises(LeanLMError, match="already exists"):
        leanlm.save(p, out)


def test_untied_head_is_sliced(tiny_tokenizer, calib):
    m = make_llama(vocab_size=len(tiny_tokenizer), tie=False)
    p = prune(m, PruneTarget(hidden=32), calib=calib, progress=False)
    assert p.lm_head.weight.shape == (len(tiny_tokenizer), 32) and p.lm_head.weight is not p.model.embed_tokens.weight


def test_prune_and_distill(tiny_tokenizer, calib):
    from leanlm.distill import TrainConfig, lm_loss, train

    ids = torch.tensor(tiny_tokenizer(TRAIN_TEXT)["input_ids"])
    m = model(tiny_tokenizer)
    tc = TrainConfig(max_tokens=20 * 2 * 32, batch_size=2, seq_len=32, lr=3e-3, warmup_steps=1, progress=False)
    train(m, lm_loss, ids, tc)  # a teacher that has learnt something, so its distribution is worth matching
    ref = {k: v.clone() for k, v in m.state_dict().items()}
    tc = TrainConfig(max_tokens=8 * 2 * 32, batch_size=2, seq_len=32, lr=3e-3, warmup_steps=1, progress=False, eval_windows=2)
    target = PruneTarget(intermediate=32, hidden=32, layers=3)
    before = prune(m, target, calib=calib, progress=False)  # deterministic: the student before distillation
    student, res = prune_and_distill(m, target, train_data=ids, train_config=tc, eval_ids=ids[-300:],
                                     prune_kwargs=dict(calib=calib, progress=False))
    assert dims_of(student).layers == 3 and res.steps == 8

    def gap(s):
        from leanlm.distill import kl_at_temperature

        return kl_at_temperature(logits(s, calib), logits(m, calib)).item()

    g0, g1 = gap(before), gap(student)
    assert g1 < 0.8 * g0, (g0, g1)
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in ref.items())  # the teacher is untouched


def test_bad_targets(tiny_tokenizer, calib):
    m = model(tiny_tokenizer)
    full = n_params(m)
    cases = [
        (PruneTarget(params=full + 1), "not smaller"),
        (PruneTarget(hidden=65), "larger than the model"),
        (PruneTarget(heads=5), "not a multiple"),
        (PruneTarget(heads=4, kv_heads=3), "larger than the model"),
        (PruneTarget(heads=3, kv_heads=2), "cannot be shared evenly"),
        (PruneTarget(heads=4, kv_heads=1), "cannot add heads"),
        (PruneTarget(hidden=62), "not a multiple of 4 attention heads"),
        (PruneTarget(layers=0), "at least 1"),
        (PruneTarget(), "no pruning target"),
        (PruneTarget(params="lots"), "bad parameter count"),
        (PruneTarget(params=100), "no width fits"),
        (PruneTarget(params=int(full * 0.7), axes="depth", layers=4), "--layers is fixed"),
        (PruneTarget(params=1000, axes="sideways"), "unknown axes"),
    ]
    for t, msg in cases:
        with pytest.raises(LeanLMError, match=msg):
            prune(m, t, calib=calib, progress=False)
    assert parse_count("90M") == 90_000_000 and parse_count("1.5k") == 1500 and parse_count(7) == 7


def test_unsupported_architecture(tiny_tokenizer, calib):
    from transformers import GPT2Config, GPT2LMHeadModel

    g = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=len(tiny_tokenizer)))
    with pytest.raises(LeanLMError, match="Llama family"):
        prune(g, PruneTarget(layers=1), calib=calib, progress=False)
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    g = Gemma3ForCausalLM(Gemma3TextConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=2, num_key_value_heads=1, head_dim=16))
    with pytest.raises(LeanLMError, match="Gemma-3 is not supported"):
        prune(g, PruneTarget(layers=1), calib=calib, progress=False)
    with pytest.raises(LeanLMError, match="below|calib"):
        prune(model(tiny_tokenizer), PruneTarget(layers=2), calib=calib[0], progress=False)


def test_cli_prune_distill_and_errors(capsys, tiny_folder, text_file, tmp_path):
    import json

    from transformers import AutoModelForCausalLM

    from leanlm.cli import main

    out = tmp_path / "p"
    args = ["prune", str(tiny_folder), "--layers", "1", "--intermediate", "64", "--out", str(out), "--samples", "2",
            "--seq-len", "64", "--batch-size", "2", "--text", str(text_file), "--distill-tokens", "512", "--eval-windows", "2",
            "--json"]
    assert main(args) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["prune"]["to"]["layers"] == 1 and r["distill"]["steps"] == 4
    assert not (tmp_path / "p.checkpoints").exists()  # removed after success
    m = AutoModelForCausalLM.from_pretrained(out)
    assert m.config.num_hidden_layers == 1 and m.config.intermediate_size == 64
    assert main(["distill", str(out), "--teacher", str(tiny_folder), "--out", str(tmp_path / "d"), "--tokens", "256",
                 "--seq-len", "64", "--batch-size", "2", "--text", str(text_file), "--eval-windows", "2"]) == 0
    assert "steps" in capsys.readouterr().out and (tmp_path / "d" / "config.json").is_file()
    assert main(["distill", str(out), "--teacher", str(tiny_folder), "--out", str(tmp_path / "h"), "--tokens", "256",
                 "--hidden-pairs", "1", "--text", str(text_file)]) == 2
    assert "at most 0 hidden-state pairs" in capsys.readouterr().err
    assert main(["prune", str(tiny_folder), "--heads", "3", "--out", str(tmp_path / "x"), "--text", str(text_file)]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # after the loading progress bar: one error line
    assert last.startswith("leanlm: error: ") and "grouped-query attention" in last
    assert main(["prune", str(tiny_folder), "--target-params", "10G", "--out", str(tmp_path / "x")]) == 2
    assert "not smaller" in capsys.readouterr().err


@pytest.mark.integration
def test_smollm2_pruned_to_90m_loads_in_plain_transformers(tmp_path):
    """The real model: <= 90M parameters, GQA kept, a folder plain transformers loads with the same logits."""
    from transformers import AutoModelForCausalLM

    import leanlm
    from leanlm.core.data import calibration_batches

    m, tok = leanlm.load("smollm2-135m")
    calib = calibration_batches(tok, 4, 256)
    p = prune(m, PruneTarget(params="90M", axes="both"), calib=calib, depth_samples=1, progress=False)
    assert n_params(p) <= 90_000_000 and p.config.num_attention_heads % p.config.num_key_value_heads == 0
    out = leanlm.save(p, tmp_path / "smol90", tokenizer=tok)
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    assert torch.equal(logits(plain, calib[:1, :64]), logits(p, calib[:1, :64]))
