"""Steps compose: what one step establishes, the next keeps.

Sparsity masks (2:4 and unstructured) stay exactly zero through every PTQ algorithm (RTN, GPTQ,
AWQ, SmoothQuant), every weight format, QAT, QAD and plain distillation, and through the runtime's
packed layouts; a quantized model that is trained leaves training exactly on its grid."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import TRAIN_TEXT, make_llama
from leanlm.distill import DistillConfig, TrainConfig, distill, train
from leanlm.distill.trainer import lm_loss
from leanlm.qat import QATConfig, qat
from leanlm.quantization import AWQ, QuantConfig, QuantizerConfig, quantize
from leanlm.quantization import algorithms as alg
from leanlm.quantization.formats import fake_quantize, parse_format
from leanlm.quantization.modules import quantizers
from leanlm.sparsity import SparsityConfig, masked_linears, sparsify_

FORMATS = ["int8", "int4_g32", "int4_g32_asym", "int3_g64_asym", "int8_asym", "fp8_e4m3_channel", "fp8_e5m2",
           "nvfp4", "mxfp4", "mxfp8", "nf4_g32"]
PATTERNS = ["2:4", "unstructured"]


def _ids(vocab, n=8, length=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (n, length), generator=g)


@pytest.fixture(scope="module")
def vocab(tiny_tokenizer):
    return len(tiny_tokenizer)


def _sparse(vocab, pattern, seed=0):
    model = make_llama(vocab_size=vocab, seed=seed)
    sparsify_(model, SparsityConfig("magnitude", pattern=pattern), progress=False)
    return model, {n: m.weight_mask.clone() for n, m in masked_linears(model).items()}


def _assert_sparse(model, masks, pattern, where):
    mods = dict(model.named_modules())
    assert masks and len(masks) == len(masked_linears(model)), f"{where}: masks were lost"
    for n, keep in masks.items():
        w = mods[n].weight.detach()
        assert bool((w[~keep] == 0).all()), f"{where}: pruned weights of {n} are not zero"
        assert float((w[keep] == 0).float().mean()) < 0.25, f"{where}: {n} lost most kept weights"
        if pattern == "2:4":
            assert int((w != 0).reshape(-1, 4).sum(1).max()) <= 2, f"{where}: {n} has a group of four with > 2 non-zeros"


def _assert_on_grid(model, where):
    """Every folded weight equals its re-quantization with the same format and scales."""
    mods = dict(model.named_modules())
    n_checked = 0
    for name, q in quantizers(model).items():
        if q.enabled and q.role == "weight":
            assert type(q).__name__ == "TensorQuantizer" and q.folded, f"{where}: {name} is not an ordinary folded quantizer"
            w = mods[name[: -len(".weight_quantizer")]].weight.detach()
            assert torch.equal(fake_quantize(w, q.fmt, q.qparams), w), f"{where}: {name} is off its grid"
            n_checked += 1
    assert n_checked


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("method", ["max", "mse", "percentile"])
def test_zero_is_exactly_representable_in_every_format(fmt, method):
    f = parse_format(fmt)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 128, generator=g)
    w[torch.rand(16, 128, generator=g) < 0.5] = 0
    w[0, :64] = w[0, :64].abs() + 0.1  # a row whose first groups hold only positive values (asymmetric ranges)
    w[1] = 0  # an all-zero row
    qp = alg.weight_qparams(w, f, method)
    assert bool((fake_quantize(w, f, qp)[w == 0] == 0).all())
    clipped = alg.weight_qparams(w, f, "max", amax=torch.tensor(0.5))  # a clipped range (AWQ's clip search)
    assert bool((fake_quantize(w, f, clipped)[w == 0] == 0).all())


SCHEMES = {
    "rtn": "w4a16-rtn",
    "gptq": "w4a16-gptq",
    "awq": "w4a16-awq",
    "awq-gptq": "w4a16-awq-gptq",
    "gptq-asym-act-order": lambda: QuantConfig([("*weight_quantizer", QuantizerConfig("int4_g32_asym")), ("*lm_head*", None)],
                                               [alg_gptq(act_order=True)]),
    "smoothquant-w8a8": "w8a8-smoothquant",
    "nvfp4": "nvfp4",
    "nvfp4-gptq": lambda: QuantConfig([("*weight_quantizer", QuantizerConfig("nvfp4")), ("*lm_head*", None)], [alg_gptq()]),
    "autoround": lambda: QuantConfig([("*weight_quantizer", QuantizerConfig("int4_g64")), ("*lm_head*", None)], [_autoround()]),
    "autoround-asym": lambda: QuantConfig([("*weight_quantizer", QuantizerConfig("int4_g32_asym")), ("*lm_head*", None)],
                                          [_autoround()]),
    "awq-autoround-nvfp4": lambda: QuantConfig([("*weight_quantizer", QuantizerConfig("nvfp4")), ("*lm_head*", None)],
                                               [AWQ(clip=False), _autoround()]),
}


def _autoround():
    from leanlm.quantization import AutoRound

    return AutoRound(iters=8, batch=2)


def alg_gptq(**kw):
    from leanlm.quantization.config import GPTQ

    return GPTQ(**kw)


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_masks_stay_zero_through_ptq(scheme, pattern, vocab):
    model, masks = _sparse(vocab, pattern)
    cfg = SCHEMES[scheme]
    quantize(model, cfg if isinstance(cfg, str) else cfg(), _ids(vocab), progress=False)
    _assert_sparse(model, masks, pattern, scheme)
    _assert_on_grid(model, scheme)
    # the fake-quantized forward uses exactly the folded weights, masked
    lin = model.model.layers[0].mlp.down_proj
    x = torch.randn(3, lin.in_features)
    with torch.no_grad():
        ref = torch.nn.functional.linear(lin.input_quantizer(x), lin.weight)
        assert torch.equal(lin(x), ref)


def test_gptq_on_a_sparse_layer_beats_rtn_and_mask_after(vocab):
    """Quality. On the layer's calibration activations, GPTQ with the mask reconstructs the sparse layer's
    output better than RTN. On correlated activations (low rank plus noise, like a real model's, where
    GPTQ's error feedback without the mask writes into pruned weights), quantizing pruned weights to 0
    inside GPTQ (their error fed back, as SparseGPT does) beats GPTQ with the mask applied afterwards."""
    model, masks = _sparse(vocab, "2:4")
    lin = model.model.layers[1].mlp.down_proj
    xs = []
    h = lin.register_forward_pre_hook(lambda m, a: xs.append(a[0].detach().reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        model(_ids(vocab, n=16, length=64))
    h.remove()
    w, keep, fmt = lin.weight.detach().float(), masks["model.layers.1.mlp.down_proj"], parse_format("int3_g32")

    def errors(x):
        acc = alg.HessianAccumulator(lin.in_features)
        acc.add(x)
        err = lambda wq: float((x @ (w - wq).T).pow(2).mean())  # noqa: E731
        w_gptq = alg.gptq(w, acc.H, fmt, mask=keep)[0]
        w_free = alg.gptq(w, acc.H, fmt)[0]
        w_rtn = fake_quantize(w, fmt, alg.weight_qparams(w, fmt))
        assert bool((w_gptq[~keep] == 0).all()) and bool((w_rtn[~keep] == 0).all())
        return err(w_gptq), err(w_rtn), err(w_free * keep), float((w_free[~keep] != 0).float().mean())

    e_gptq, e_rtn, _, _ = errors(torch.cat(xs))
    assert e_gptq < e_rtn
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1024, 32, generator=g) @ torch.randn(32, lin.in_features, generator=g)
    e_gptq, e_rtn, e_after, revived = errors(x + 0.1 * torch.randn(x.shape, generator=g))
    assert revived > 0.02  # without the mask GPTQ writes into pruned weights
    assert e_gptq < e_after < e_rtn


def _tc(tokens):
    return TrainConfig(max_tokens=tokens, lr=3e-3, warmup_steps=0, batch_size=2, seq_len=32, eval_windows=2, progress=False,
                       schedule="constant", autocast_bf16=False)


@pytest.fixture(scope="module")
def train_ids(tiny_tokenizer):
    return tiny_tokenizer(TRAIN_TEXT, return_tensors="pt").input_ids[0]


@pytest.mark.parametrize("pattern", PATTERNS)
def test_masks_stay_zero_through_plain_distillation(pattern, vocab, train_ids):
    """The shared trainer keeps masks without the caller passing a MaskKeeper."""
    model, masks = _sparse(vocab, pattern)
    before = {n: m.weight.detach().clone() for n, m in masked_linears(model).items()}
    teacher = make_llama(vocab_size=vocab, seed=3)
    distill(model, teacher, train_ids, DistillConfig(), _tc(64 * 4))
    _assert_sparse(model, masks, pattern, "distill")
    assert any(not torch.equal(m.weight, before[n]) for n, m in masked_linears(model).items())
    assert all(m.weight.grad is None or bool((m.weight.grad[~m.weight_mask] == 0).all()) for m in masked_linears(model).values())


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("teacher", [None, "self"])
def test_masks_stay_zero_through_qat_and_qad(pattern, teacher, vocab, tiny_tokenizer, train_ids):
    model, masks = _sparse(vocab, pattern)
    res = qat(model, "w4a16-gptq", tokenizer=tiny_tokenizer, teacher=teacher, config=QATConfig(learn_scales=True, compile=False),
              train_config=_tc(64 * 4), train_data=train_ids, calib_data=_ids(vocab), evaluate=False, progress=False)
    assert res.mode == ("qat" if teacher is None else "qad") and res.train.steps == 4
    _assert_sparse(model, masks, pattern, res.mode)
    _assert_on_grid(model, res.mode)


def test_qat_forward_masks_the_latent_weight(vocab):
    """During QAT a quantized Linear's forward multiplies by its mask: a pruned latent weight that moved
    changes neither the output nor gets a gradient."""
    from leanlm.qat import prepare_qat

    model, masks = _sparse(vocab, "2:4")
    quantize(model, "w4a16-rtn", progress=False)
    prepare_qat(model, QATConfig(compile=False))
    lin = model.model.layers[0].mlp.up_proj
    x = torch.randn(3, lin.in_features)
    y = lin(x).detach()
    with torch.no_grad():
        lin.weight[~lin.weight_mask] = 0.5
    out = lin(x)
    assert torch.equal(out, y)
    out.pow(2).sum().backward()
    assert bool((lin.weight.grad[~lin.weight_mask] == 0).all()) and bool((lin.weight.grad[lin.weight_mask] != 0).any())


@pytest.mark.parametrize("scheme", ["w4a16-gptq", "int4_g32_asym", "nvfp4", "w8a8-smoothquant"])
def test_a_quantized_model_stays_on_its_grid_through_distillation(scheme, vocab, train_ids):
    """Distillation of an already-quantized (and sparse) model trains through its fake quantization and
    folds back: every weight is exactly on the grid afterwards, the weights did train, masks hold."""
    model, masks = _sparse(vocab, "2:4")
    teacher = copy.deepcopy(model).eval()
    cfg = scheme if scheme.startswith(("w", "nvfp4")) else QuantConfig([("*weight_quantizer", QuantizerConfig(scheme)), ("*lm_head*", None)])
    quantize(model, cfg, _ids(vocab), progress=False)
    before = {n: q.qparams for n, q in quantizers(model).items() if q.enabled and q.role == "weight"}
    w0 = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    distill(model, teacher, train_ids, DistillConfig(), _tc(64 * 4))
    _assert_on_grid(model, f"distill of {scheme}")
    _assert_sparse(model, masks, "2:4", f"distill of {scheme}")
    assert not torch.equal(model.model.layers[0].mlp.up_proj.weight, w0)  # trained through straight-through gradients
    after = {n: q.qparams for n, q in quantizers(model).items() if q.enabled and q.role == "weight"}
    assert before.keys() == after.keys() and all(torch.equal(before[n].scale, after[n].scale) for n in before)


def test_trainer_keeps_the_grid_after_an_error(vocab, train_ids):
    """A training run that fails still leaves the quantized model folded on its grid."""
    model = make_llama(vocab_size=vocab)
    quantize(model, "w4a16-rtn", progress=False)

    def bad_loss(m, batch):
        loss, info = lm_loss(m, batch)
        return loss * float("nan"), info

    with pytest.raises(Exception, match="training loss became"):
        train(model, bad_loss, train_ids, _tc(64 * 4))
    _assert_on_grid(model, "failed training")


def test_training_refuses_quantizers_without_their_record(vocab, train_ids):
    from leanlm.core.errors import LeanLMError

    model = make_llama(vocab_size=vocab)
    quantize(model, "w4a16-rtn", progress=False)
    del model.leanlm_quant
    with pytest.raises(LeanLMError, match="cannot keep it on its grid"):
        train(model, lm_loss, train_ids, _tc(64 * 4))


@pytest.mark.parametrize("fmt", ["int4_g32", "int4_g64", "int4_g32_asym", "int8"])
def test_runtime_packing_keeps_exact_zeros(fmt, vocab):
    from leanlm.runtime.layouts import pack_linear

    model, masks = _sparse(vocab, "2:4")
    quantize(model, QuantConfig([("*weight_quantizer", QuantizerConfig(fmt)), ("*lm_head*", None)], [alg_gptq()]), _ids(vocab),
             progress=False)
    mods = dict(model.named_modules())
    for n, keep in masks.items():
        w = mods[n].weight.detach()
        packed = pack_linear(mods[n], None, torch.float32).dequantize()
        if fmt.endswith("asym"):
            # the int4 kernel adds the zero point as a float (8 - z) * scale: exact up to that product's rounding
            assert float(packed[~keep].abs().max()) <= 1e-6 * float(w.abs().max())
            assert torch.allclose(packed, w, rtol=0, atol=1e-6 * float(w.abs().max()))
        else:
            assert bool((packed[~keep] == 0).all()), f"{fmt}: {n} packed weights are not zero where pruned"
            assert torch.equal(packed, w)
