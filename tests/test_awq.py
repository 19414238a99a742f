"""AWQ (quantization/algorithms.py, calibrate.py): the Gram-matrix objective equals the direct one, the
clipping search lowers the quantized Linears' output error on a tiny model, the signed clip reaches the
int grid's extra negative code, AutoRound after AWQ starts from AWQ's clip, and the W4A16 preset users
reach first resolves to the chosen algorithm."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import make_llama
from leanlm import LeanLMError
from leanlm.quantization import AWQ, AutoRound, QuantConfig, QuantizerConfig, preset, quantize
from leanlm.quantization import algorithms as alg
from leanlm.quantization.formats import fake_quantize, parse_format


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_gram_objectives_equal_the_direct_ones():
    x = torch.randn(300, 128, generator=_gen(0))
    x[:, 7] *= 15.0
    ws = [torch.randn(48, 128, generator=_gen(1)), torch.randn(16, 128, generator=_gen(2))]
    f = parse_format("int4_g32")
    s = torch.rand(128, generator=_gen(3)) + 0.5
    direct = 0.0
    for w in ws:
        wq = fake_quantize(w * s, f, alg.weight_qparams(w * s, f)) / s
        direct += float(((x @ (w - wq).T) ** 2).sum()) / x.shape[0]
    assert alg.awq_loss(x, ws, f, s) == pytest.approx(direct, rel=1e-4)
    d = ws[0] - fake_quantize(ws[0], f)
    per_cell = torch.einsum("nkg,okg->nok", x.reshape(300, 4, 32), d.reshape(48, 4, 32)).pow(2).mean(0)
    assert torch.allclose(alg._cell_out_err(x, d, f).squeeze(-1), per_cell, rtol=1e-4, atol=1e-7)


def test_awq_search_scale_families_never_worse_than_no_scaling():
    x = torch.randn(512, 128, generator=_gen(4)) * (torch.rand(128, generator=_gen(5)) * 10)
    ws = [torch.randn(64, 128, generator=_gen(6))]
    base = alg.awq_loss(x, ws, "int4_g32", None)
    got = {fam: alg.awq_loss(x, ws, "int4_g32", alg.awq_search(x, ws, "int4_g32", grid=8, scales=fam))
           for fam in alg.AWQ_SCALES}
    assert all(v <= base * (1 + 1e-6) for v in got.values())
    assert got["both"] <= min(got["x"], got["duo"]) * (1 + 1e-6)  # "both" searches the union
    with pytest.raises(ValueError, match="scale family"):
        alg.awq_search(x, ws, "int4_g32", scales="nope")


def test_awq_search_scores_each_weight_in_its_own_format():
    """A mixed-precision group (one int8 and one int4 weight reading the same input): the loss sums each weight's
    error in its own format, and the search minimises that sum, not the error of the first weight's format."""
    x = torch.randn(512, 128, generator=_gen(9)) * (torch.rand(128, generator=_gen(10)) * 10)
    ws = [torch.randn(64, 128, generator=_gen(11)), torch.randn(32, 128, generator=_gen(12))]
    fmts = ["int8", "int4_g32"]
    s = torch.rand(128, generator=_gen(13)) + 0.5
    assert alg.awq_loss(x, ws, fmts, s) == pytest.approx(alg.awq_loss(x, ws[:1], "int8", s) + alg.awq_loss(x, ws[1:], "int4_g32", s), rel=1e-6)
    mixed = alg.awq_search(x, ws, fmts, grid=8)
    first = alg.awq_search(x, ws, "int8", grid=8)   # what a group searched in its first linear's format would get
    assert alg.awq_loss(x, ws, fmts, mixed) <= alg.awq_loss(x, ws, fmts, first) * (1 + 1e-6)
    with pytest.raises(ValueError, match="2 weights"):
        alg.awq_search(x, ws, ["int8"], grid=2)


def test_signed_clip_reaches_the_extra_negative_code():
    """A group on an exact -8..7 grid whose largest magnitude is negative: the signed search finds the
    lossless range (max|w| = 8 steps), the plain one cannot (max|w| / 7 per step)."""
    f = parse_format("int4_g32")
    codes = torch.randint(-8, 8, (16, 64), generator=_gen(7)).float()
    codes[:, 0], codes[:, 1] = -8, 3  # every group: min -8, max below 8
    codes[:, 32], codes[:, 33] = -8, 3
    w = codes * 0.01
    x = torch.randn(200, 64, generator=_gen(8))
    plain = alg.awq_clip(x, w, f)
    signed = alg.awq_clip(x, w, f, signed=True)
    err = lambda a: float(((x @ (w - fake_quantize(w, f, alg.weight_qparams(w, f, "max", amax=a))).T) ** 2).mean())  # noqa: E731
    assert err(signed) < 1e-10 < err(plain)


def _linear_output_error(model, qmodel, ids) -> float:
    """Sum over layer 0's Linears of the squared output error on the inputs each one sees in the float model."""
    seen, hooks = {}, []
    for n, m in model.model.layers[0].named_modules():
        if isinstance(m, torch.nn.Linear):
            hooks.append(m.register_forward_hook(lambda mod, a, o, n=n: seen.__setitem__(n, a[0].detach())))
    with torch.no_grad():
        model(ids, use_cache=False)
    for h in hooks:
        h.remove()
    qmods = dict(qmodel.model.layers[0].named_modules())
    fmods = dict(model.model.layers[0].named_modules())
    return sum(float((seen[n] @ (fmods[n].weight - qmods[n].weight).detach().T).pow(2).sum()) for n in seen)


def test_awq_clip_lowers_linear_output_error_on_a_tiny_model(monkeypatch):
    """The scales are the same with and without clipping (the clip search runs after them), so each
    variant is compared with the AWQ-scaled float model, made by the same run with the weights left float."""
    from leanlm.quantization import calibrate as qcal

    model = make_llama(vocab_size=300, hidden=64, layers=2, intermediate=128)
    ids = torch.randint(0, 300, (8, 32), generator=_gen(9))
    rules = [("*weight_quantizer", QuantizerConfig("int4_g32")), ("*lm_head*", None)]
    quantized = {}
    for name, a in (("none", AWQ(grid=4, clip=False)), ("clip", AWQ(grid=4, clip_grid=10)),
                    ("signed", AWQ(grid=4, clip_grid=10, clip_signed=True))):
        quantized[name] = copy.deepcopy(model)
        quantize(quantized[name], QuantConfig(rules, [a], calib_batch=4), ids, progress=False)
    scaled = copy.deepcopy(model)
    monkeypatch.setattr(qcal, "finish_weight", lambda m, wq, qp: None)  # keep the scaled float weights
    quantize(scaled, QuantConfig(rules, [AWQ(grid=4, clip=False)], calib_batch=4), ids, progress=False)
    e = {k: _linear_output_error(scaled, m, ids) for k, m in quantized.items()}
    assert e["clip"] < 0.95 * e["none"] and e["signed"] < 0.95 * e["none"], e


def test_autoround_after_awq_starts_from_awq_clip():
    from leanlm.quantization.autoround import RoundingParams

    f = parse_format("int4_g32")
    w = torch.randn(8, 64, generator=_gen(10))
    amax = alg._reduce(alg._cells(w, f).abs(), f, "amax") * 0.75
    rp = RoundingParams(w, f, None, True, init_amax=amax)
    assert torch.allclose(rp.qparams().scale, alg.weight_qparams(w, f, "max", amax=amax).scale)
    model = make_llama(vocab_size=300)
    ids = torch.randint(0, 300, (4, 16), generator=_gen(11))
    quantize(model, QuantConfig([("*weight_quantizer", QuantizerConfig("int4_g32")), ("*lm_head*", None)],
                                [AWQ(grid=2), AutoRound(iters=2)]), ids, progress=False)


def test_awq_config_bad_settings():
    for bad in ({"grid": 0}, {"samples": 0}, {"clip_samples": 0}, {"clip_grid": 0}, {"scales": "w"}):
        with pytest.raises(LeanLMError, match="AWQ"):
            AWQ(**bad)


def test_w4a16_preset_resolves_to_the_chosen_algorithm():
    cfg = preset("w4a16")
    assert cfg.algorithms == preset("w4a16-awq-autoround").algorithms == [
        AWQ(), AutoRound(float_targets=True, full_range=True, keep="last")]
    assert cfg.rules == preset("w4a16-awq-autoround").rules
    assert cfg.rules[0][1].format == "int4_g64" and cfg.rules[0][1].method == "max"   # AWQ searches on amax / 7
    assert preset("w4a16-awq").rules[0][1].method == "full"
