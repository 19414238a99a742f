"""The shared trainer and distillation, on tiny random Llama models."""

from __future__ import annotations

import os
import signal

import pytest
import torch
import torch.nn.functional as F

from conftest import TRAIN_TEXT, make_llama
from leanlm import LeanLMError
from leanlm.distill import (DistillConfig, DistillLoss, TrainConfig, TrainingInterrupted, distill, kl_at_temperature,
                            latest_checkpoint, lm_loss, train)


@pytest.fixture(scope="module")
def ids(tiny_tokenizer):
    return torch.tensor(tiny_tokenizer(TRAIN_TEXT)["input_ids"])


def cfg(**kw):
    base = dict(max_tokens=12 * 2 * 32, batch_size=2, seq_len=32, lr=3e-3, warmup_steps=2, eval_windows=2, progress=False,
                autocast_bf16=False)  # float32 unless a test asks: exact comparisons below
    base.update(kw)
    return TrainConfig(**base)


def test_loss_goes_down_and_result_fields(tiny_tokenizer, ids):
    m = make_llama(vocab_size=len(tiny_tokenizer))
    r = train(m, lm_loss, ids, cfg(max_tokens=30 * 2 * 32), eval_ids=ids[-400:])
    assert r.steps == 30 and r.tokens == 30 * 64
    first = sum(h["loss"] for h in r.history[:3]) / 3
    last = sum(h["loss"] for h in r.history[-3:]) / 3
    assert last < 0.8 * first
    assert r.final_perplexity < r.start_perplexity
    assert [e["step"] for e in r.evals] == [0, 30]
    assert not m.training  # back in eval mode


def test_eval_every_and_params_subset(tiny_tokenizer, ids):
    m = make_llama(vocab_size=len(tiny_tokenizer))
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    only = [m.model.layers[0].mlp.down_proj.weight]
    seen = []
    r = train(m, lm_loss, ids, cfg(max_tokens=6 * 64, eval_every=2), eval_ids=ids[-400:], params=only,
              after_step=[lambda mod, step: seen.append(step)])
    assert [e["step"] for e in r.evals] == [0, 2, 4, 6]
    assert seen == list(range(1, 7))
    for n, p in m.named_parameters():
        changed = not torch.equal(p, before[n])
        assert changed == (n == "model.layers.0.mlp.down_proj.weight"), n
        assert p.requires_grad  # restored afterwards


def _interrupt_at(step_to_stop):
    def f(model, step):
        if step == step_to_stop:
            os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C; the trainer defers it to the step boundary
    return f


def test_resume_after_interrupt_is_identical(tiny_tokenizer, ids, tmp_path):
    c = dict(max_tokens=10 * 64, checkpoint_every=3)
    ref = make_llama(vocab_size=len(tiny_tokenizer))
    r_ref = train(ref, lm_loss, ids, cfg(**c, checkpoint_dir=str(tmp_path / "a")), eval_ids=ids[-400:])

    m = make_llama(vocab_size=len(tiny_tokenizer))
    with pytest.raises(TrainingInterrupted, match="continue from step 5"):
        train(m, lm_loss, ids, cfg(**c, checkpoint_dir=str(tmp_path / "b")), eval_ids=ids[-400:], after_step=[_interrupt_at(5)])
    assert latest_checkpoint(tmp_path / "b").name == "step-0000005"
    m2 = make_llama(vocab_size=len(tiny_tokenizer), seed=123)  # fresh weights: everything must come from the checkpoint
    r = train(m2, lm_loss, ids, cfg(**c, checkpoint_dir=str(tmp_path / "b")), eval_ids=ids[-400:])
    assert r.resumed_from == 5 and r.steps == 10
    assert [h["loss"] for h in r.history] == [h["loss"] for h in r_ref.history]
    assert r.final_perplexity == r_ref.final_perplexity
    for (n, p), q in zip(m2.named_parameters(), ref.parameters()):
        assert torch.equal(p, q), n


def test_checkpoint_write_is_atomic(tiny_tokenizer, ids, tmp_path, monkeypatch):
    d = tmp_path / "ck"
    m = make_llama(vocab_size=len(tiny_tokenizer))
    train(m, lm_loss, ids, cfg(max_tokens=2 * 64, checkpoint_every=1, checkpoint_dir=str(d)))
    good = latest_checkpoint(d)
    assert good.name == "step-0000002"

    real_save = torch.save

    def dying_save(obj, f, *a, **k):  # simulate a kill in the middle of writing the file
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        train(m, lm_loss, ids, cfg(max_tokens=4 * 64, checkpoint_every=1, checkpoint_dir=str(d)))
    monkeypatch.setattr(torch, "save", real_save)
    assert latest_checkpoint(d) == good  # the half-written one never appeared under a checkpoint name
    assert sorted(p.name for p in d.iterdir()) == ["step-0000001", "step-0000002"]  # the newest two, no temporary left
    torch.load(good / "state.pt", weights_only=True)


def test_bad_configs(tiny_tokenizer, ids):
    m = make_llama(vocab_size=len(tiny_tokenizer))
    with pytest.raises(LeanLMError, match="budget"):
        train(m, lm_loss, ids, TrainConfig())
    with pytest.raises(LeanLMError, match="below one optimizer step"):
        train(m, lm_loss, ids, cfg(max_tokens=10))
    with pytest.raises(LeanLMError, match="schedule"):
        train(m, lm_loss, ids, cfg(schedule="linear"))
    with pytest.raises(LeanLMError, match="fewer than one window"):
        train(m, lm_loss, ids[:10], cfg())


def test_kl_at_temperature():
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    for T in (1.0, 2.0, 4.0):
        p = F.softmax(t / T, -1)
        ref = (p * (p.log() - F.log_softmax(s / T, -1))).sum(-1).mean() * T * T
        assert torch.allclose(kl_at_temperature(s, t, T), ref, atol=1e-6)
    assert kl_at_temperature(t, t, 2.0).abs() < 1e-6


def test_distill_student_moves_towards_teacher(tiny_tokenizer, ids):
    teacher = make_llama(vocab_size=len(tiny_tokenizer), seed=1)
    train(teacher, lm_loss, ids, cfg(max_tokens=20 * 64))
    student = make_llama(vocab_size=len(tiny_tokenizer), hidden=32, heads=2, kv_heads=1, intermediate=64, seed=2)
    batch = ids[:64].view(2, 32)

    def gap():
        with torch.no_grad():
            return kl_at_temperature(student(input_ids=batch).logits, teacher(input_ids=batch).logits).item()

    g0 = gap()
    dc = DistillConfig(temperature=2.0, lm_weight=0.5, hidden_layers=[(2, 2), (1, 1)])
    r = distill(student, teacher, ids, dc, cfg(max_tokens=20 * 64), eval_ids=ids[-400:])
    assert gap() < 0.7 * g0
    assert set(r.history[0]) >= {"kl", "lm", "hidden", "loss"}
    assert all(not p.requires_grad for p in teacher.parameters())


def test_distill_loss_projection_and_balancer(tiny_tokenizer, ids):
    teacher = make_llama(vocab_size=len(tiny_tokenizer))
    student = make_llama(vocab_size=len(tiny_tokenizer), hidden=32, heads=2, kv_heads=1, intermediate=64)
    loss = DistillLoss(teacher, student, DistillConfig(lm_weight=1.0, hidden_layers=[(1, 2)]))
    assert isinstance(loss.proj[0], torch.nn.Linear) and loss.proj[0].weight.shape == (64, 32)
    assert "teacher" not in dict(loss.named_modules())  # the frozen teacher is not in the checkpointed state
    total, parts = loss(student, ids[:64].view(2, 32))
    assert total.item() == pytest.approx(3.0, rel=1e-4)  # first step: each loss divided by itself, weights 1 + 1 + 1
    with pytest.raises(LeanLMError, match="out of range"):
        DistillLoss(teacher, student, DistillConfig(hidden_layers=[(5, 1)]))
    other = make_llama(vocab_size=len(tiny_tokenizer) + 3)
    with pytest.raises(LeanLMError, match="tokenizer"):
        distill(other, teacher, ids, DistillConfig(), cfg())


def test_grad_accum_matches_bigger_batch_and_bf16_runs(tiny_tokenizer, ids):
    a, b = make_llama(vocab_size=len(tiny_tokenizer)), make_llama(vocab_size=len(tiny_tokenizer))
    ra = train(a, lm_loss, ids, cfg(max_tokens=4 * 64, batch_size=2, grad_accum=1))
    rb = train(b, lm_loss, ids, cfg(max_tokens=4 * 64, batch_size=1, grad_accum=2))
    assert rb.steps == ra.steps == 4
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=1e-5)
    c = make_llama(vocab_size=len(tiny_tokenizer))
    rc = train(c, lm_loss, ids, cfg(max_tokens=10 * 64, autocast_bf16=True))
    assert rc.history[-1]["loss"] < rc.history[0]["loss"]
    assert rc.autocast_bf16 and not ra.autocast_bf16


def test_autocast_default_follows_the_hardware(tiny_tokenizer, ids):
    """autocast_bf16=None (the default) turns bf16 autocast on exactly where fast_bf16 says the CPU has bf16 matmuls."""
    from leanlm.distill.trainer import fast_bf16

    r = train(make_llama(vocab_size=len(tiny_tokenizer)), lm_loss, ids, cfg(max_tokens=2 * 64, autocast_bf16=None))
    flags = open("/proc/cpuinfo").read().split() if os.path.exists("/proc/cpuinfo") else []
    assert fast_bf16(torch.device("cpu")) == ("avx512_bf16" in flags or "amx_bf16" in flags)
    assert r.autocast_bf16 == fast_bf16(torch.device("cpu"))
    assert not fast_bf16(torch.device("meta"))
