"""leanlm.qat: straight-through fake quantization, learned scales, QAT/QAD on tiny models, save/reload,
runtime and export of the result, bad input."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import leanlm
from conftest import TRAIN_TEXT, make_llama
from leanlm.core.errors import LeanLMError
from leanlm.distill import TrainConfig
from leanlm.qat import QATConfig, QATQuantizer, fake_quantize_lsq, finalize_qat, parse_budget, prepare_qat, qat
from leanlm.quantization import QuantConfig, QuantizerConfig, summary
from leanlm.quantization.formats import compute_qparams, fake_quantize, parse_format

FORMATS = ["int4_g32", "int3_g32", "int4_g32_asym", "int8", "fp8_e4m3_channel", "nvfp4", "mxfp4", "nf4_g32"]


def _ids(tok):
    return tok(TRAIN_TEXT, return_tensors="pt").input_ids[0]


def _tc(tokens, **kw):
    base = dict(max_tokens=tokens, lr=3e-3, warmup_steps=0, batch_size=2, seq_len=32, eval_windows=2, progress=False,
                schedule="constant", autocast_bf16=False)
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("fmt", FORMATS)
def test_lsq_forward_equals_fake_quantize(fmt):
    f = parse_format(fmt)
    w = torch.randn(16, 64) * torch.rand(16, 1)
    qp = compute_qparams(w, f)
    assert torch.equal(fake_quantize_lsq(w, f, qp.scale, qp.zero, qp.global_scale), fake_quantize(w, f, qp))


def test_straight_through_gradients_and_lsq_scale_gradient():
    f = parse_format("int4_g32")
    w = torch.randn(4, 64)
    qp = compute_qparams(w, f, amax=torch.full((4, 2, 1), 1.0))  # clip: values beyond ~1.0 saturate
    x = w.clone().requires_grad_(True)
    s = qp.scale.clone().requires_grad_(True)
    fake_quantize_lsq(x, f, s).sum().backward()
    v = (w.reshape(4, 2, 32) / qp.scale)
    inside = (v >= -8) & (v <= 7)
    assert (~inside).any() and inside.any()
    assert torch.equal(x.grad.reshape(4, 2, 32), inside.float())          # STE: 1 inside, 0 where clipped
    want = torch.where(inside, torch.round(v) - v, v.clamp(-8, 7)).sum(-1, keepdim=True)   # LSQ (Esser et al. 2020)
    assert torch.allclose(s.grad, want, atol=1e-5)


def test_weight_gradients_flow_through_qat_model(tiny_tokenizer):
    m = make_llama(vocab_size=len(tiny_tokenizer))
    cfg = QuantConfig([("*weight_quantizer", QuantizerConfig("int4_g32")),
                       ("*input_quantizer", QuantizerConfig("int8_token", dynamic=True)), ("*lm_head*", None)])
    leanlm.quantize(m, cfg, progress=False)
    params = prepare_qat(m, QATConfig(learn_scales=True, compile=False))
    lin = m.model.layers[0].self_attn.q_proj
    assert isinstance(lin.weight_quantizer, QATQuantizer) and lin.input_quantizer.ste
    ids = _ids(tiny_tokenizer)[None, :40]
    out = m(input_ids=ids, labels=ids)
    out.loss.backward()
    assert lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0
    assert lin.weight_quantizer.log_scale.grad.abs().sum() > 0
    assert any(p is lin.weight for p in params) and any(p is lin.weight_quantizer.log_scale for p in params)


def test_compiled_fake_quantization_equals_eager(tiny_tokenizer):
    """The fused (torch.compile) QAT path computes the same forward values as the eager one, nearly the
    same gradients, and folds to the same model."""
    cfg = QuantConfig([("*weight_quantizer", QuantizerConfig("nvfp4")),
                       ("*input_quantizer", QuantizerConfig("nvfp4", dynamic=True)), ("*lm_head*", None)])
    base = make_llama(vocab_size=len(tiny_tokenizer))
    leanlm.quantize(base, cfg, progress=False)
    ids = _ids(tiny_tokenizer)[None, :40]
    outs = []
    for flag in (False, True):
        m = copy.deepcopy(base)
        prepare_qat(m, QATConfig(learn_scales=True, compile=flag))
        lin = m.model.layers[0].mlp.down_proj
        assert lin.weight_quantizer.compiled is flag and lin.input_quantizer.compiled is flag
        out = m(input_ids=ids, labels=ids)
        out.loss.backward()
        grads = (lin.weight.grad.clone(), lin.weight_quantizer.log_scale.grad.clone())
        finalize_qat(m)
        with torch.no_grad():
            outs.append((out.logits.detach(), grads, m(ids).logits))
    (l0, (gw0, gs0), f0), (l1, (gw1, gs1), f1) = outs
    assert torch.equal(l0, l1) and torch.equal(f0, f1) and torch.equal(f1, l1)
    assert torch.allclose(gw0, gw1, rtol=1e-4, atol=1e-6) and torch.allclose(gs0, gs1, rtol=1e-3, atol=1e-6)


def test_scales_learn_and_fold_consistently(tiny_tokenizer):
    m = make_llama(vocab_size=len(tiny_tokenizer))
    leanlm.quantize(m, "w4a16-rtn", progress=False)
    lin = m.model.layers[1].mlp.down_proj
    before_w, before_s = lin.weight.detach().clone(), lin.weight_quantizer.qparams.scale.clone()
    res = qat(m, None, tokenizer=tiny_tokenizer, config=QATConfig(learn_scales=True, train="scales", compile=False),
              train_config=_tc(640), train_data=_ids(tiny_tokenizer), eval_ids=_ids(tiny_tokenizer))
    after_s = lin.weight_quantizer.qparams.scale
    assert res.train.steps == 10 and not torch.equal(after_s, before_s)       # the scales moved
    # w4a16-rtn is on the full-range grid: negative scales (the group's extreme on code -8) keep their sign
    assert (before_s < 0).any() and torch.equal(torch.sign(after_s), torch.sign(before_s))
    q = lin.weight_quantizer  # only the scales trained: the folded weight is the PTQ weight on the learned grid
    assert torch.equal(lin.weight.detach(), fake_quantize(before_w, q.fmt, q.qparams))
    assert all(r["on_grid"] for r in summary(m) if r["role"] == "weight")   # folded exactly onto the new grid
    assert not any(isinstance(q, QATQuantizer) for q in m.modules())


def test_qat_lowers_the_loss_and_saves(tmp_path, tiny_tokenizer):
    m = make_llama(vocab_size=len(tiny_tokenizer))
    ids = _ids(tiny_tokenizer)
    res = qat(m, "w4a16-rtn", tokenizer=tiny_tokenizer, config=QATConfig(compile=False), train_config=_tc(64 * 30), train_data=ids, eval_ids=ids, progress=False)
    losses = [h["loss"] for h in res.train.history]
    assert res.mode == "qat" and sum(losses[-5:]) < 0.7 * sum(losses[:5])
    assert res.train.final_perplexity < 0.7 * res.train.start_perplexity
    with torch.no_grad():
        want = m(ids[None, :50]).logits
    leanlm.save(m, tmp_path / "q", tokenizer=tiny_tokenizer)
    recipe = json.loads((tmp_path / "q" / "leanlm.json").read_text())["quantization"]
    assert recipe["qat"]["mode"] == "qat" and recipe["qat"]["steps"] == 30
    back = leanlm.load(tmp_path / "q")[0]
    with torch.no_grad():
        assert torch.equal(back(ids[None, :50]).logits, want)


def test_qad_result_runs_in_runtime_and_exports(tmp_path, tiny_tokenizer):
    from leanlm.runtime import Engine

    m = make_llama(vocab_size=len(tiny_tokenizer))
    with torch.no_grad():
        m.model.norm.weight.mul_(20)  # clear argmax winners
    ids = _ids(tiny_tokenizer)
    res = qat(m, "w4a16-rtn", tokenizer=tiny_tokenizer, teacher="self", train_config=_tc(64 * 6, lr=1e-3),
              config=QATConfig(learn_scales=True, compile=False), train_data=ids, eval_ids=ids, progress=False)
    assert res.mode == "qad" and "kl" in res.train.history[0]
    x = ids[None, :24]
    with torch.no_grad():
        want = m(x).logits
    eng = Engine(m, weights="auto", max_seq_len=64)
    assert not eng.fallbacks
    got = eng.forward(x)
    assert (got - want).abs().max() <= 0.15 * want.abs().max() and torch.equal(got.argmax(-1), want.argmax(-1))
    pytest.importorskip("compressed_tensors", reason="compressed-tensors not installed: pip install -e '.[export]'")
    from leanlm.export import export
    from leanlm.export.consumers import load_compressed_tensors

    out = export(m, "compressed-tensors", tmp_path / "ct", tokenizer=tiny_tokenizer)
    with torch.no_grad():
        assert torch.equal(load_compressed_tensors(out)(x).logits, want)


def test_sparsity_masks_and_excluded_head_are_kept(tiny_tokenizer):
    m = make_llama(vocab_size=len(tiny_tokenizer), tie=False)
    lin = m.model.layers[0].mlp.up_proj
    mask = (torch.rand_like(lin.weight) > 0.5).float()
    with torch.no_grad():
        lin.weight.mul_(mask)
    lin.register_buffer("weight_mask", mask)
    head = m.lm_head.weight.detach().clone()
    ids = _ids(tiny_tokenizer)
    qat(m, "w4a16-rtn", tokenizer=tiny_tokenizer, config=QATConfig(train="quantized", compile=False), train_config=_tc(64 * 4),
        train_data=ids, evaluate=False, progress=False)
    assert torch.all(lin.weight[mask == 0] == 0) and (lin.weight[mask == 1] != 0).any()
    assert not m.lm_head.weight_quantizer.enabled and torch.equal(m.lm_head.weight, head)  # excluded head untouched


def test_parse_budget():
    assert parse_budget("10m") == {"max_tokens": None, "max_minutes": 10.0}
    assert parse_budget("90s")["max_minutes"] == 1.5
    assert parse_budget("2M") == {"max_tokens": 2_000_000, "max_minutes": None}
    assert parse_budget("500k")["max_tokens"] == 500_000 and parse_budget(4096)["max_tokens"] == 4096


def test_bad_inputs(tmp_path, tiny_tokenizer, tiny_folder, capsys):
    m = make_llama(vocab_size=len(tiny_tokenizer))
    ids = _ids(tiny_tokenizer)
    for b in ("0", "0m", 0, "ten minutes"):
        with pytest.raises(LeanLMError, match="budget"):
            parse_budget(b)
    with pytest.raises(LeanLMError, match="ONNX graph.*no fake-quant path"):
        qat(m, "int8-dynamic", tokenizer=tiny_tokenizer, budget="1k", train_data=ids)
    with pytest.raises(LeanLMError, match="unknown scheme"):
        qat(m, "w5a5", tokenizer=tiny_tokenizer, budget="1k", train_data=ids)
    other = make_llama(vocab_size=len(tiny_tokenizer) + 7)
    with pytest.raises(LeanLMError, match="teacher's vocabulary has"):
        qat(m, "w4a16-rtn", tokenizer=tiny_tokenizer, teacher=other, budget="1k", train_data=ids)
    with pytest.raises(LeanLMError, match="learn_scales"):
        qat(m, "w4a16-rtn", tokenizer=tiny_tokenizer, config=QATConfig(train="scales"), budget="1k", train_data=ids)
    with pytest.raises(LeanLMError, match="quantized by leanlm.quantize"):
        prepare_qat(copy.deepcopy(m))
    assert not any(hasattr(x, "weight_quantizer") for x in m.modules())  # errors came before any change
    from leanlm.cli import main

    assert main(["qat", str(tiny_folder), "--scheme", "w4a16-rtn", "--budget", "0", "--out", str(tmp_path / "o")]) == 2
    assert "leanlm: error: the training budget must be positive" in capsys.readouterr().err


def test_cli_qad(tmp_path, tiny_folder, text_file, capsys):
    from leanlm.cli import main

    out = tmp_path / "qad"
    rc = main(["qat", str(tiny_folder), "--scheme", "w4a16-rtn", "--teacher", "self", "--budget", "256", "--seq-len", "32",
               "--batch-size", "2", "--grad-accum", "1", "--lr", "1e-3", "--text", str(text_file), "--out", str(out), "--json",
               "--eval-windows", "2", "--no-compile", "--checkpoint-dir", str(tmp_path / "ck")])
    assert rc == 0
    r = json.loads(capsys.readouterr().out)
    assert r["mode"] == "qad" and r["steps"] == 4 and r["tokens"] == 256 and (tmp_path / "ck").is_dir()
    back = leanlm.load(out)[0]
    assert any(isinstance(q, leanlm.quantization.modules.TensorQuantizer) and q.folded for q in back.modules())


@pytest.mark.integration
def test_real_smollm2_qad_steps_then_runtime(tmp_path):
    """SmolLM2: PTQ (w4a16-rtn), a few QAD steps with learned scales on the calibration split, save, and run
    the saved model in the runtime's packed int4 path."""
    from leanlm.core.data import calibration_texts, join_and_tokenize
    from leanlm.runtime import Engine

    model, tok = leanlm.load("smollm2-135m")
    ids = join_and_tokenize(tok, calibration_texts("wiki"))
    res = qat(model, "w4a16-rtn", tokenizer=tok, teacher="self", config=QATConfig(learn_scales=True),
              train_config=_tc(3 * 2 * 128, lr=1e-4, seq_len=128), train_data=ids, evaluate=False, progress=False)
    assert res.train.steps == 3 and all(torch.isfinite(torch.tensor(h["kl"])) for h in res.train.history)
    leanlm.save(model, tmp_path / "q", tokenizer=tok)
    back = leanlm.load(tmp_path / "q")[0]
    x = ids[None, :32]
    with torch.no_grad():
        want = back(x).logits
    got = Engine(back, weights="auto", max_seq_len=64).forward(x)
    assert (got - want).abs().max() <= 0.1 * want.abs().max()
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9


def test_cli_continues_from_a_quantized_folder(tmp_path, tiny_folder, text_file, capsys):
    from leanlm.cli import main

    q = tmp_path / "ptq"
    assert main(["quantize", str(tiny_folder), "--scheme", "w4a16-rtn", "--out", str(q), "--json"]) == 0
    capsys.readouterr()
    common = ["--budget", "128", "--seq-len", "32", "--batch-size", "2", "--grad-accum", "1", "--text", str(text_file), "--eval-windows", "1", "--json"]
    assert main(["qat", str(q), "--teacher", "self", "--out", str(tmp_path / "x"), *common]) == 2
    assert "teacher 'self' needs the float model" in capsys.readouterr().err
    assert main(["qat", str(q), "--teacher", str(tiny_folder), "--out", str(tmp_path / "qad"), *common]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["mode"] == "qad" and r["ptq_seconds"] == 0 and r["steps"] == 2
