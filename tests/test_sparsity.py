"""leanlm.sparsity on tiny random Llama models: exact patterns, Wanda/SparseGPT properties, rules,
masks through training, save/reload, sparsify-then-quantize, bad input."""

from __future__ import annotations

import json

import pytest
import torch

import leanlm

from conftest import make_llama
from leanlm import LeanLMError
from leanlm.quantization.algorithms import HessianAccumulator
from leanlm.sparsity import (MaskKeeper, SparsityConfig, magnitude_mask, parse_pattern,
                             sparsegpt, sparsify_, sparsity_report, wanda_mask)
from leanlm.sparsity.algorithms import channel_norms


def _ids(vocab, n=8, length=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (n, length), generator=g)


def _masked(model):
    return {n: m for n, m in model.named_modules() if hasattr(m, "weight_mask")}


@pytest.fixture(scope="module")
def vocab(tiny_tokenizer):
    return len(tiny_tokenizer)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern,sparsity", [("unstructured", 0.5), ("unstructured", 0.3), ("2:4", None), ("4:8", None)])
def test_exact_pattern_per_row(method, pattern, sparsity, vocab):
    model = make_llama(vocab_size=vocab)
    head = model.lm_head.weight.clone()
    rep = sparsify_(model, SparsityConfig(method, sparsity=sparsity, pattern=pattern), _ids(vocab), progress=False)
    masked = _masked(model)
    assert len(masked) == 2 * 7  # every decoder Linear, not the head
    for name, m in masked.items():
        keep, w = m.weight_mask, m.weight
        assert bool((w[~keep] == 0).all())  # pruned weights are exact zeros
        if pattern == "unstructured":
            k = round(sparsity * w.shape[1])
            assert ((~keep).sum(1) == k).all(), name
        else:
            n, mm = map(int, pattern.split(":"))
            groups = keep.reshape(-1, mm).sum(1)
            assert (groups == n).all(), name  # exactly m - n zeros in every m consecutive input weights
    assert torch.equal(model.lm_head.weight, head)
    # per row round(s * in) zeros: within half a weight per row of the target
    assert abs(rep["overall"]["masked_zero_fraction"] - parse_pattern(pattern, sparsity).sparsity) <= 0.5 / 64
    rows = {r["name"]: r for r in sparsity_report(model)}
    assert rows["model.layers.0.mlp.down_proj"]["masked"] and not rows["lm_head"]["masked"]
    if pattern == "2:4":
        assert rows["model.layers.1.self_attn.o_proj"]["nm"] == "2:4"


def test_wanda_equals_magnitude_with_equal_activations():
    torch.manual_seed(0)
    w = torch.randn(24, 64)
    x = torch.ones(100, 64) * 3.0  # every input channel has the same norm
    norms = channel_norms(x)
    assert torch.allclose(norms, torch.full((64,), 30.0))
    for p in ["unstructured", "2:4"]:
        t = parse_pattern(p)
        assert torch.equal(wanda_mask(w, norms, t), magnitude_mask(w, t))
    # and with unequal activations they differ: a loud channel protects its small weights
    x[:, 5] *= 100
    assert not torch.equal(wanda_mask(w, channel_norms(x), parse_pattern("unstructured")),
                           magnitude_mask(w, parse_pattern("unstructured")))


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_sparsegpt_reconstruction_beats_magnitude(pattern):
    torch.manual_seed(0)
    w = torch.randn(48, 64)
    mix = torch.randn(64, 64) * 0.3 + torch.eye(64)  # correlated input channels, uneven scales
    x = torch.randn(2048, 64) @ mix * torch.linspace(0.2, 3.0, 64)
    acc = HessianAccumulator(64)
    acc.add(x)
    t = parse_pattern(pattern)
    w_sg, keep = sparsegpt(w, acc.H, t, block_size=16)
    assert bool((w_sg[~keep] == 0).all())
    err = lambda wn: float((x @ (w - wn).T).pow(2).sum())  # noqa: E731
    e_sg, e_mag = err(w_sg), err(w * magnitude_mask(w, t))
    e_wanda = err(w * wanda_mask(w, channel_norms(x), t))
    assert e_sg <= e_mag and e_sg < e_wanda
    assert e_sg < 0.8 * e_mag  # the OBS update is a real gain here, not a tie


def test_sparsegpt_model_errors_reported(vocab):
    model = make_llama(vocab_size=vocab)
    rep = sparsify_(model, SparsityConfig("sparsegpt", pattern="2:4"), _ids(vocab), progress=False)
    errs = rep["errors"]
    assert len(errs) == 14
    assert all(e["reconstruction_error"] <= e["magnitude_error"] for e in errs.values())


def test_per_layer_rules(vocab):
    model = make_llama(vocab_size=vocab)
    cfg = SparsityConfig("wanda", sparsity=0.5, rules=[
        ("*down_proj", 0.25),                 # 25% unstructured
        ("*.layers.1.mlp.down_proj", "2:4"),  # later rules win
        ("*.layers.0.*", None),               # first layer dense
    ])
    rep = sparsify_(model, cfg, _ids(vocab), progress=False)
    masked = _masked(model)
    assert not any(n.startswith("model.layers.0.") for n in masked)
    assert rep["targets"]["model.layers.1.mlp.down_proj"] == "2:4"
    keep = masked["model.layers.1.mlp.down_proj"].weight_mask
    assert (keep.reshape(-1, 4).sum(1) == 2).all()
    q = masked["model.layers.1.self_attn.q_proj"].weight_mask
    assert ((~q).sum(1) == 32).all()
    assert model.model.layers[0].mlp.down_proj.weight.eq(0).float().mean() < 0.01


def _train_step(model, vocab, opt):
    ids = _ids(vocab, 4, 16, seed=3)
    loss = model(ids, labels=ids).loss
    opt.zero_grad()
    loss.backward()
    opt.step()


def test_mask_keeper_restores_zeros_after_optimizer_step(vocab):
    model = make_llama(vocab_size=vocab)
    sparsify_(model, SparsityConfig("magnitude"), progress=False)
    m = model.model.layers[0].mlp.up_proj
    pruned = ~m.weight_mask
    model.train()
    # without gradient masking, AdamW revives the pruned weights; the keeper zeroes them again
    keeper = MaskKeeper(model, mask_grads=False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    _train_step(model, vocab, opt)
    assert bool((m.weight[pruned] != 0).any())
    keeper(model, 1)
    assert bool((m.weight[pruned] == 0).all())
    kept_before = m.weight[m.weight_mask].clone()
    # with gradient masking the pruned weights get zero gradients (and stay zero through the step)
    keeper = MaskKeeper(model)
    _train_step(model, vocab, opt)
    assert bool((m.weight.grad[pruned] == 0).all())
    keeper(model, 2)
    assert bool((m.weight[pruned] == 0).all()) and not torch.equal(m.weight[m.weight_mask], kept_before)
    keeper.remove()
    _train_step(model, vocab, opt)
    assert bool((m.weight.grad[pruned] != 0).any())


def test_save_reload(tmp_path, vocab, tiny_tokenizer):
    model = make_llama(vocab_size=vocab)
    sparsify_(model, SparsityConfig("sparsegpt", pattern="2:4"), _ids(vocab), progress=False)
    # masks are persistent buffers: state_dict carries them
    sd = model.state_dict()
    assert sd["model.layers.0.mlp.down_proj.weight_mask"].dtype == torch.bool
    out = leanlm.save(model, tmp_path / "sparse", tokenizer=tiny_tokenizer)
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "sparsity_masks.safetensors", "leanlm.json"} <= files
    recipe = json.loads((out / "leanlm.json").read_text())["sparsity"]
    assert recipe["config"]["method"] == "sparsegpt" and recipe["config"]["pattern"] == "2:4"
    back, tok = leanlm.load(out)
    for n, m in _masked(model).items():
        b = dict(back.named_modules())[n]
        assert torch.equal(b.weight_mask, m.weight_mask) and torch.equal(b.weight, m.weight)
    ids = _ids(vocab, 2, 16)
    assert torch.allclose(back(ids).logits, model(ids).logits, atol=1e-5)
    # plain transformers reads the folder (dense weights with zeros) without leanlm and without extra keys
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    assert not any(k.endswith("weight_mask") for k in load_file(str(out / "model.safetensors")))
    plain = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    assert torch.equal(plain.model.layers[1].mlp.up_proj.weight, model.model.layers[1].mlp.up_proj.weight)


@pytest.mark.parametrize("scheme", ["w8a16", "w4a16-gptq", "int4_g32_asym"])
def test_sparsify_then_quantize_keeps_zeros(scheme, vocab, tmp_path):
    from leanlm.quantization import QuantConfig, QuantizerConfig, quantize

    model = make_llama(vocab_size=vocab)
    ids = _ids(vocab)
    sparsify_(model, SparsityConfig("wanda", pattern="2:4"), ids, progress=False)
    masks = {n: m.weight_mask.clone() for n, m in _masked(model).items()}
    cfg = scheme if scheme.startswith("w") else QuantConfig([("*weight_quantizer", QuantizerConfig(scheme)), ("*lm_head*", None)])
    quantize(model, cfg, ids, progress=False)
    mods = dict(model.named_modules())
    for n, keep in masks.items():
        w = mods[n].weight
        assert bool((w[~keep] == 0).all()), f"{scheme}: {n} lost zeros"
        assert float((w[keep] == 0).float().mean()) < 0.2  # the kept weights are not all rounded away
    # the quantized checkpoint keeps the masks too
    leanlm.save(model, tmp_path / "q")
    back = leanlm.load(tmp_path / "q")[0]
    bm = dict(back.named_modules())
    for n, keep in masks.items():
        assert torch.equal(bm[n].weight_mask, keep) and bool((bm[n].weight[~keep] == 0).all())


def test_gptq_without_mask_would_refill_zeros(vocab):
    """The check above is not vacuous: GPTQ spreads error onto pruned weights unless it reads the mask."""
    from leanlm.quantization.algorithms import gptq

    torch.manual_seed(0)
    w = torch.randn(16, 64)
    keep = magnitude_mask(w, parse_pattern("2:4"))
    x = torch.randn(512, 64) @ (torch.randn(64, 64) * 0.3 + torch.eye(64))
    acc = HessianAccumulator(64)
    acc.add(x)
    wq, _ = gptq(w * keep, acc.H, "int4_g32")
    assert bool((wq[~keep] != 0).any())
    wq, _ = gptq(w * keep, acc.H, "int4_g32", mask=keep)
    assert bool((wq[~keep] == 0).all())


@pytest.mark.parametrize("kwargs,match", [
    (dict(sparsity=0.0), "outside"),
    (dict(sparsity=1.5), "outside"),
    (dict(pattern="4:2"), "n > m"),
    (dict(pattern="4:4"), "outside"),
    (dict(pattern="2-4"), "unknown sparsity pattern"),
    (dict(pattern="2:4", sparsity=0.3), "drop one"),
    (dict(method="obs"), "unknown sparsity method"),
    (dict(rules=[("*down_proj", 2.0)]), "outside"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(LeanLMError, match=match) as e:
        SparsityConfig(**kwargs)
    assert "\n" not in str(e.value)


def test_bad_model_inputs(vocab):
    model = make_llama(vocab_size=vocab)
    w0 = model.model.layers[0].mlp.up_proj.weight.clone()
    cases = [
        (SparsityConfig(pattern="2:5"), None, "multiple of 5"),          # 64 is not a multiple of 5
        (SparsityConfig(rules=[("*gate_projj", None)]), None, "matches no"),
        (SparsityConfig("wanda"), None, "needs calibration data"),
        (SparsityConfig("sparsegpt"), torch.zeros(4, 8), "LongTensor"),
        (SparsityConfig(rules=[("*", None)]), None, "nothing to sparsify"),
    ]
    for cfg, ids, match in cases:
        with pytest.raises(LeanLMError, match=match) as e:
            sparsify_(model, cfg, ids, progress=False)
        assert "\n" not in str(e.value)
    assert not _masked(model) and torch.equal(model.model.layers[0].mlp.up_proj.weight, w0)  # untouched
    sparsify_(model, SparsityConfig(), progress=False)
    with pytest.raises(LeanLMError, match="already sparsified"):
        sparsify_(model, SparsityConfig(), progress=False)
    with pytest.raises(LeanLMError, match="no sparsity masks"):
        MaskKeeper(make_llama(vocab_size=vocab))


def test_cli_sparsify(capsys, tmp_path, tiny_folder, text_file):
    from leanlm.cli import main

    out = tmp_path / "sp"
    code = main(["sparsify", str(tiny_folder), "--method", "sparsegpt", "--pattern", "2:4", "--out", str(out),
                 "--calib", str(text_file), "--samples", "4", "--seq-len", "32", "--rule", "*down_proj=0.25",
                 "--rule", "*.layers.0.*=dense", "--json"])
    cap = capsys.readouterr()
    assert code == 0, cap.err
    r = json.loads(cap.out)
    assert r["overall"]["masked_params"] > 0 and r["command"].startswith("leanlm sparsify")
    model, _ = leanlm.load(out)
    masked = _masked(model)
    assert len(masked) == 7 and not any(".layers.0." in n for n in masked)
    assert ((~masked["model.layers.1.mlp.down_proj"].weight_mask).sum(1) == 32).all()
    assert (masked["model.layers.1.mlp.up_proj"].weight_mask.reshape(-1, 4).sum(1) == 2).all()
    # table output and one-line errors with exit status 2
    code = main(["sparsify", str(tiny_folder), "--method", "magnitude", "--out", str(tmp_path / "m")])
    assert code == 0 and "sparsified" in capsys.readouterr().out
    with pytest.raises(SystemExit):   # argparse's usage error (tests/test_bad_input.py checks every numeric option)
        main(["sparsify", str(tiny_folder), "--out", str(tmp_path / "x"), "--sparsity", "1.2"])
    assert "argument --sparsity: must be in (0, 1), got 1.2" in capsys.readouterr().err
    for args, msg in [(["--out", str(out)], "already exists"),
                      (["--out", str(tmp_path / "y"), "--rule", "nonsense"], "GLOB=VALUE"),
                      (["--out", str(tmp_path / "z"), "--pattern", "3:2"], "n > m")]:
        code = main(["sparsify", str(tiny_folder), "--method", "magnitude", *args])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("leanlm: error:") and msg in err and err.count("\n") == 1


@pytest.mark.integration
def test_smollm_sparsegpt_2_4_beats_magnitude():
    """On the real SmolLM2-135M (small calibration and evaluation, so the test stays short)."""
    import leanlm
    from leanlm.core.data import calibration_batches
    from leanlm.evaluation import perplexity

    ppl = {}
    for method in ["magnitude", "sparsegpt"]:
        model, tok = leanlm.load("smollm2-135m")
        ids = calibration_batches(tok, 8, 256)
        sparsify_(model, SparsityConfig(method, pattern="2:4"), ids, progress=False)
        up = model.model.layers[5].mlp.up_proj.weight_mask
        assert (up.reshape(-1, 4).sum(1) == 2).all()
        ppl[method] = perplexity(model, tok, max_windows=4, progress=False).perplexity
    assert ppl["sparsegpt"] < ppl["magnitude"]


def test_sparsify_and_distill_keeps_the_pattern_and_lowers_the_loss(tiny_tokenizer):
    """The one-call pipeline: 2:4 magnitude, then distillation from the dense original; the pattern
    survives training and the KL to the teacher goes down."""
    from leanlm.distill import TrainConfig
    from leanlm.sparsity import sparsify_and_distill

    model = make_llama(vocab_size=len(tiny_tokenizer))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, len(tiny_tokenizer), (4000,), generator=g)
    _, res = sparsify_and_distill(model, SparsityConfig("magnitude", pattern="2:4"), train_data=ids,
                                  train_config=TrainConfig(max_tokens=16 * 64 * 8, batch_size=8, seq_len=64, lr=1e-3,
                                                           warmup_steps=2, progress=False))
    w = model.model.layers[0].mlp.down_proj.weight
    assert (w.reshape(w.shape[0], -1, 4) != 0).sum(-1).max() <= 2          # zeros stayed zero through training
    assert res.history[-1]["loss"] < res.history[0]["loss"]
