"""Calibration algorithms (GPTQ, SmoothQuant, AWQ, range selection) on small seeded tensors."""

from __future__ import annotations

import pytest
import torch

from leanlm.quantization import algorithms as alg
from leanlm.quantization.formats import compute_qparams, fake_quantize, fake_quantize_with, parse_format, quantize


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _correlated(n=512, d=128, seed=0):
    g = _gen(seed)
    z = torch.randn(n, d, generator=g)
    a = torch.randn(d, d, generator=g) / d**0.5 + 0.5 * torch.eye(d)
    return z @ a


def _weight(out=64, d=128, seed=1):
    return torch.randn(out, d, generator=_gen(seed))


def _hessian(x):
    acc = alg.HessianAccumulator(x.shape[-1])
    acc.add(x)
    return acc.H


def _rtn(w, fmt, method="max"):
    return fake_quantize(w, fmt, alg.weight_qparams(w, fmt, method))


def _on_grid(wq, fmt, qp):
    return torch.equal(fake_quantize(wq, fmt, qp), wq)


# ----------------------------------------------------------------------------- GPTQ


def test_hessian_accumulator_is_running_mean():
    x = torch.randn(3, 10, 16, generator=_gen())
    acc = alg.HessianAccumulator(16)
    for b in x:
        acc.add(b)
    flat = x.reshape(-1, 16)
    torch.testing.assert_close(acc.H, 2 / flat.shape[0] * flat.T @ flat, rtol=1e-5, atol=1e-5)
    assert acc.n_samples == 30
    assert torch.equal(alg.HessianAccumulator(4).H, torch.zeros(4, 4))


def test_quant_error_is_output_mse():
    x, w = _correlated(), _weight()
    wq = _rtn(w, "int4_g32")
    direct = 2 * ((x @ (w - wq).T) ** 2).sum() / x.shape[0] / w.shape[0]
    assert alg.quant_error(w, wq, _hessian(x)) == pytest.approx(float(direct), rel=1e-4)


@pytest.mark.parametrize("fmt,method", [("int4_g32", "max"), ("int4_g32_asym", "mse"), ("int8", "max"), ("mxfp4", "max")])
def test_gptq_rows_are_independent(fmt, method):
    """calibrate.py solves q/k/v (and gate/up) in one GPTQ call on the stacked weights; that must
    equal one call per weight, bit for bit, for every format it fuses."""
    from leanlm.quantization.calibrate import _fusable

    x = _correlated()
    H, w1, w2 = _hessian(x), _weight(32, seed=2), _weight(48, seed=3)
    assert _fusable(parse_format(fmt))
    both, _ = alg.gptq(torch.cat([w1, w2]), H, fmt, weight_method=method)
    one, _ = alg.gptq(w1, H, fmt, weight_method=method)
    two, _ = alg.gptq(w2, H, fmt, weight_method=method)
    assert torch.equal(both, torch.cat([one, two]))
    assert not _fusable(parse_format("nvfp4")) and not _fusable(parse_format("int8_tensor"))


@pytest.mark.parametrize("fmt", ["int4_g32", "int4_g32_asym", "int3", "int3_asym"])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_and_stays_on_grid(fmt, act_order):
    x, w = _correlated(), _weight()
    H = _hessian(x)
    wq, qp = alg.gptq(w, H, fmt, act_order=act_order)
    assert wq.shape == w.shape and wq.dtype == torch.float32
    assert _on_grid(wq, fmt, qp)
    e_gptq, e_rtn = alg.quant_error(w, wq, H), alg.quant_error(w, _rtn(w, fmt), H)
    assert e_gptq < 0.8 * e_rtn, (e_gptq, e_rtn)


@pytest.mark.parametrize("fmt", ["int8", "int8_tensor", "int4_g32", "int4_g32_asym", "fp8_e4m3", "fp8_e4m3_channel",
                                 "fp8_e5m2", "nvfp4", "mxfp4", "mxfp8", "nf4", "nf4_g32"])
def test_gptq_every_format_exact_grid(fmt):
    x, w = _correlated(n=256), _weight()
    H = _hessian(x)
    variants = [{}, {"act_order": True}] + ([{"static_groups": True}] if fmt == "int4_g32_asym" else [])
    for kw in variants:
        wq, qp = alg.gptq(w, H, fmt, **kw)
        assert torch.isfinite(wq).all()
        assert _on_grid(wq, fmt, qp), kw
        assert alg.quant_error(w, wq, H) <= alg.quant_error(w, _rtn(w, fmt), H) * 1.05, kw


@pytest.mark.parametrize("fmt", ["int4_g32", "int4_g32_asym", "int3", "int8_tensor", "fp8_e4m3", "nvfp4", "mxfp4",
                                 "nf4"])
def test_fake_quantize_with_column_scales_matches_formats_bitwise(fmt):
    f = parse_format(fmt)
    w = _weight() * torch.logspace(-3, 1, 128)  # wide dynamic range, incl. tiny nvfp4 blocks
    qp = compute_qparams(w, f)
    ref = fake_quantize(w, f, qp)
    for c in range(w.shape[1]):
        if f.granularity == "group":
            s = qp.scale[:, c // f.group_size, 0]
            z = None if qp.zero is None else qp.zero[:, c // f.group_size, 0]
        elif f.granularity == "tensor":
            s, z = qp.scale, qp.zero
        else:
            s, z = qp.scale.reshape(-1), None if qp.zero is None else qp.zero.reshape(-1)
        assert torch.equal(fake_quantize_with(w[:, c], f, s, z, qp.global_scale), ref[:, c]), c


@pytest.mark.parametrize("fmt", ["int4_g32", "int4_g32_asym", "int3", "int8_tensor", "fp8_e4m3", "nvfp4", "mxfp4",
                                 "nf4"])
def test_gptq_identity_hessian_equals_rtn(fmt):
    w = _weight()
    wq, qp = alg.gptq(w, torch.eye(128), fmt, block_size=48)
    assert torch.equal(wq, _rtn(w, fmt))


def test_gptq_dead_input_column():
    x, w = _correlated(), _weight()
    x[:, [5, 77]] = 0
    H = _hessian(x)
    assert H[5, 5] == 0
    wq, qp = alg.gptq(w, H, "int4_g32")
    assert torch.isfinite(wq).all() and _on_grid(wq, "int4_g32", qp)
    assert alg.quant_error(w, wq, H) < 0.8 * alg.quant_error(w, _rtn(w, "int4_g32"), H)
    wq2, _ = alg.gptq(w, H, "int3", act_order=True)
    assert torch.isfinite(wq2).all()
    # per-channel scales are fixed up front and nothing propagates into a dead column: it is plain RTN
    wq3, _ = alg.gptq(w, H, "int4")
    torch.testing.assert_close(wq3[:, 5], _rtn(w, "int4")[:, 5], rtol=0, atol=0)


def test_gptq_damping_retry():
    x = torch.randn(16, 128, generator=_gen())  # rank 16 < 128
    H = _hessian(x)
    H -= 0.05 * H.diagonal().mean() * torch.eye(128)  # indefinite: damp 0.01 fails, 0.1 works
    w = _weight()
    with pytest.warns(RuntimeWarning, match="damp"):
        wq, qp = alg.gptq(w, H, "int4_g32", damp=0.01)
    assert torch.isfinite(wq).all() and _on_grid(wq, "int4_g32", qp)
    with pytest.raises(ValueError, match="NaN"):
        alg.gptq(w, H * float("nan"), "int4_g32")


def test_gptq_blocks_not_multiple_of_columns():
    """Lazy block updates are only a reordering of the arithmetic: block sizes that split groups
    (48 vs groups of 32) and do not divide the 160 columns give the same result as one block."""
    x, w = _correlated(d=160), _weight(d=160)
    H = _hessian(x)
    ref, _ = alg.gptq(w, H, "int4_g32", block_size=1000)
    for bs in (48, 64, 7):
        wq, qp = alg.gptq(w, H, "int4_g32", block_size=bs)
        assert _on_grid(wq, "int4_g32", qp)
        # same codes (scales may differ in the last bit from the summation order)
        assert ((wq - ref).abs() < 1e-4).float().mean() > 0.995, bs
        assert alg.quant_error(w, wq, H) == pytest.approx(alg.quant_error(w, ref, H), rel=1e-2)


def test_gptq_rejects_bad_shapes():
    with pytest.raises(ValueError, match="group size 32 does not divide"):
        alg.gptq(_weight(d=48), torch.eye(48), "int4_g32")
    with pytest.raises(ValueError, match="does not match"):
        alg.gptq(_weight(), torch.eye(64), "int4_g32")


# ----------------------------------------------------------------------------- SmoothQuant


def _outlier_x(n=256, d=64, seed=0, cols=(3, 17, 40), mag=60.0):
    x = torch.randn(n, d, generator=_gen(seed))
    x[:, list(cols)] *= mag
    return x


def test_smoothquant_equivalence_and_activation_error():
    x, w = _outlier_x(), torch.randn(32, 64, generator=_gen(1))
    obs = alg.AbsMaxObserver()
    for chunk in x.split(100):
        obs.update(chunk)
    s = alg.smoothquant_scales(obs.channel_absmax, [w], alpha=0.5)
    assert s.shape == (64,) and torch.isfinite(s).all() and (s > 0).all()
    y = x @ w.T
    torch.testing.assert_close((x / s) @ (w * s).T, y, rtol=1e-4, atol=1e-3)

    def act_err(xx, ww):
        return ((fake_quantize(xx, "int8_tensor") @ ww.T - y) ** 2).mean()

    assert act_err(x / s, w * s) < 0.25 * act_err(x, w)


def test_smoothquant_zero_channels_nan_free():
    a = torch.tensor([0.0, 1.0, 4.0, 2.0])
    w = torch.tensor([[1.0, 0.0, 2.0, 1.0], [0.5, 0.0, -1.0, 3.0]])
    s = alg.smoothquant_scales(a, [w], alpha=0.5)
    assert torch.isfinite(s).all()
    assert s[0] == 1 and s[1] == 1
    assert s[2] == pytest.approx(2 / 2**0.5)


def _rmsnorm(x, g, offset):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (offset + g)


@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_apply_smoothing_into_norm(offset):
    x = _outlier_x()
    g = torch.rand(64, generator=_gen(2)) + 0.5 - offset
    ws = [torch.randn(32, 64, generator=_gen(3)), torch.randn(16, 64, generator=_gen(4))]
    before = [_rmsnorm(x, g, offset) @ w.T for w in ws]
    h = _rmsnorm(x, g, offset)
    s = alg.smoothquant_scales(h.abs().amax(0), ws, alpha=0.5)
    g2, ws2 = g.clone(), [w.clone() for w in ws]
    alg.apply_smoothing(g2, None, ws2, s, prev_is_norm=True, norm_offset=offset)
    for b, w in zip(before, ws2):
        torch.testing.assert_close(_rmsnorm(x, g2, offset) @ w.T, b, rtol=1e-4, atol=1e-3)
    ln_b = torch.randn(64, generator=_gen(5))
    b2 = ln_b.clone()
    alg.apply_smoothing(g.clone(), b2, [ws[0].clone()], s, prev_is_norm=True, norm_offset=offset)
    torch.testing.assert_close(b2, ln_b / s)


def test_apply_smoothing_into_previous_linear():
    x = torch.randn(64, 48, generator=_gen())
    up, up_b = torch.randn(64, 48, generator=_gen(1)), torch.randn(64, generator=_gen(2))
    up[7] *= 30
    down = torch.randn(16, 64, generator=_gen(3))
    y = (x @ up.T + up_b) @ down.T
    s = alg.smoothquant_scales((x @ up.T + up_b).abs().amax(0), [down], alpha=0.5)
    up2, b2, down2 = up.clone(), up_b.clone(), down.clone()
    alg.apply_smoothing(up2, b2, [down2], s, prev_is_norm=False)
    torch.testing.assert_close((x @ up2.T + b2) @ down2.T, y, rtol=1e-4, atol=1e-3)
    with pytest.raises(ValueError, match="norm_offset"):
        alg.apply_smoothing(up2, b2, [down2], s, prev_is_norm=False, norm_offset=1.0)


def test_apply_smoothing_keeps_dtype():
    g = torch.ones(8, dtype=torch.bfloat16)
    w = torch.ones(4, 8, dtype=torch.bfloat16)
    alg.apply_smoothing(g, None, [w], torch.full((8,), 2.0), prev_is_norm=True)
    assert g.dtype == torch.bfloat16 and torch.equal(g.float(), torch.full((8,), 0.5))
    assert torch.equal(w.float(), torch.full((4, 8), 2.0))


def test_smoothquant_search_never_worse_than_fixed_alpha_or_none():
    x = _outlier_x(n=512, d=64, cols=(3, 17, 40), mag=40.0)
    ws = [torch.randn(32, 64, generator=_gen(1)), torch.randn(16, 64, generator=_gen(2))]
    amax = x.abs().amax(0)
    for wfmt, afmt in (("int8", "int8_token"), ("int4_g32", "int8_token"), ("int8", None), (None, "int8_tensor")):
        s, alpha = alg.smoothquant_search(x, amax, ws, wfmt, afmt, grid=10)
        assert s.shape == (64,) and torch.isfinite(s).all() and (s > 0).all()
        got = alg.smoothquant_loss(x, ws, wfmt, afmt, s)
        none = alg.smoothquant_loss(x, ws, wfmt, afmt, torch.ones(64))
        half = alg.smoothquant_loss(x, ws, wfmt, afmt, alg.smoothquant_scales(amax, ws, alpha=0.5))
        assert got <= none and got <= half * (1 + 1e-6), (wfmt, afmt, got, none, half)
        if alpha is None:
            assert torch.equal(s, torch.ones(64))
        else:
            torch.testing.assert_close(s, alg.smoothquant_scales(amax, ws, alpha=alpha))
    # with per-tensor activations the outlier channels make smoothing clearly worth it
    s, alpha = alg.smoothquant_search(x, amax, ws, "int8", "int8_tensor", grid=10)
    assert alpha is not None
    assert alg.smoothquant_loss(x, ws, "int8", "int8_tensor", s) < 0.5 * alg.smoothquant_loss(x, ws, "int8", "int8_tensor", torch.ones(64))


# ----------------------------------------------------------------------------- AWQ


def test_awq_search_never_worse_and_helps_salient_channels():
    x = _outlier_x(n=512, d=128, cols=(5, 9, 70, 100), mag=20.0)
    ws = [torch.randn(64, 128, generator=_gen(1)), torch.randn(32, 128, generator=_gen(2))]
    for fmt in ("int4_g32", "int3_asym", "int4_g32_asym"):
        s = alg.awq_search(x, ws, fmt, grid=10)
        assert s.shape == (128,) and torch.isfinite(s).all() and (s > 0).all()
        base = alg.awq_loss(x, ws, fmt, None)
        assert alg.awq_loss(x, ws, fmt, torch.ones(128)) == pytest.approx(base, rel=1e-6)
        got = alg.awq_loss(x, ws, fmt, s)
        assert got < 0.9 * base, (fmt, got, base)
    # no salient channels: still never worse than alpha = 0
    xr = torch.randn(256, 128, generator=_gen(7))
    s = alg.awq_search(xr, ws, "int4_g32", grid=5)
    assert alg.awq_loss(xr, ws, "int4_g32", s) <= alg.awq_loss(xr, ws, "int4_g32", None) * (1 + 1e-6)


@pytest.mark.parametrize("fmt", ["int4_g32", "int3_asym", "int3", "nf4_g32", "int8_tensor"])
def test_awq_clip_never_increases_error(fmt):
    f = parse_format(fmt)
    x = _outlier_x(n=300, d=128, cols=(5, 70), mag=5.0)
    w = torch.randn(64, 128, generator=_gen(1))
    w[:, 3] *= 8  # weight outliers make clipping worthwhile
    amax = alg.awq_clip(x, w, f, batch_out=16)
    ref_qp = alg.weight_qparams(w, f)
    assert amax.shape == ref_qp.scale.shape
    clipped = fake_quantize(w, f, alg.weight_qparams(w, f, "max", amax=amax))
    plain = fake_quantize(w, f, ref_qp)
    # the per-cell objective never increases ...
    e_clip = alg._cell_out_err(x, w - clipped, f, None)
    e_plain = alg._cell_out_err(x, w - plain, f, None)
    assert (e_clip <= e_plain).all()
    # ... and the full output error drops on this data
    assert ((x @ (w - clipped).T) ** 2).mean() <= ((x @ (w - plain).T) ** 2).mean()
    obs = alg._reduce(alg._cells(w, f).abs(), f, "amax")
    assert (amax <= obs).all() and (amax >= 0.5 * obs * (1 - 1e-6)).all()


# ----------------------------------------------------------------------------- ranges


@pytest.mark.parametrize("fmt", ["int4_g32", "int4_g32_asym", "int3", "int8_tensor", "fp8_e4m3", "nvfp4", "mxfp4",
                                 "nf4"])
def test_weight_qparams_mse_not_worse_than_max(fmt):
    w = torch.randn(32, 128, generator=_gen()) ** 3  # heavy tails
    e_max = (_rtn(w, fmt, "max") - w).abs().pow(2.4).sum()
    e_mse = (fake_quantize(w, fmt, alg.weight_qparams(w, fmt, "mse", grid=50)) - w).abs().pow(2.4).sum()
    assert e_mse <= e_max
    if fmt in ("int4_g32", "int3"):
        assert e_mse < 0.9 * e_max


@pytest.mark.parametrize("fmt", ["int4_g64", "int3_g32", "int4", "int4_tensor"])
def test_weight_qparams_full_range_grid(fmt):
    """"full": each cell's largest-magnitude value decodes exactly from the extra negative code (scale = -e / 2**(n-1),
    negative where e > 0), and on Gaussian weights the finer step beats max's amax / qmax in squared error."""
    f = parse_format(fmt)
    w = torch.randn(64, 128, generator=_gen())
    qp = alg.weight_qparams(w, f, "full")
    codes = quantize(w, f, qp)
    v, c = alg._cells(w, f), alg._cells(codes.float(), f)
    ext = v.gather(-1, v.abs().argmax(-1, keepdim=True))
    assert torch.equal(c.gather(-1, v.abs().argmax(-1, keepdim=True)), torch.full_like(ext, -(f.qmax + 1)))
    assert torch.allclose(alg._stat(ext, f), -(f.qmax + 1) * qp.scale)
    assert f.granularity == "tensor" or ((qp.scale < 0).any() and (qp.scale > 0).any())
    wq = fake_quantize(w, f, qp)
    assert (wq - w).pow(2).sum() < (_rtn(w, f) - w).pow(2).sum()
    # an amax override sets the magnitude, the sign stays the extreme's
    half = alg.weight_qparams(w, f, "full", amax=alg._reduce(v.abs(), f, "amax") / 2)
    assert torch.allclose(half.scale, qp.scale / 2)
    for bad in ("int4_g64_asym", "nvfp4", "fp8_e4m3"):
        with pytest.raises(ValueError, match="full"):
            alg.weight_qparams(w, bad, "full")


def _rtn_cases_weight(k: int, seed: int) -> torch.Tensor:
    """Gaussian rows of varied scale plus the rows that test the edges: all zeros, one tiny value among zeros, a row
    whose largest magnitude is negative, and (fp8 e4m3: scale 448 / 448 = 1) a row of exact e4m3 ties, subnormals and
    values next to the saturation bound."""
    g = _gen(seed)
    w = torch.randn(9, k, generator=g) * torch.rand(9, 1, generator=g) * 4
    w[0] = 0
    w[1] = 0
    w[1, k // 2] = 1e-30
    w[2, 3] = -10 * w[2].abs().max()
    e4m3 = torch.tensor([448, 1.0625, 1.1875, -1.0625, 2 ** -10, 3 * 2 ** -10, -(2 ** -6 - 2 ** -10), 432, -440, 0.0, 2 ** -12])
    w[3] = torch.randn(k, generator=g)
    w[3, : e4m3.numel()] = e4m3
    return w


@pytest.mark.parametrize("fmt,method", [("int4_g64", "max"), ("int4_g64", "full"), ("int3_g16", "full"), ("int4_g32_asym", "max"),
                                        ("int2_g8_asym", "max"), ("int8", "max"), ("int8_g24", "full"),
                                        ("fp8_e4m3_channel", "max"), ("int4_g64", "mse"), ("fp8_e4m3", "max")])
@pytest.mark.parametrize("k", [192, 40 * 3])
def test_round_to_nearest_is_qparams_then_fake_quantize(fmt, method, k):
    """`round_to_nearest` (one C++ pass per cell where the fused kernels run) gives the scales, zero points and values of
    `weight_qparams` + `fake_quantize`, bit for bit, on group and channel cells of 16-multiple and odd lengths."""
    f = parse_format(fmt)
    if f.group_size and k % f.group_size:
        pytest.skip(f"{fmt} does not divide {k}")
    from leanlm.runtime import kernels

    w = _rtn_cases_weight(k, seed=k)
    ref_qp = alg.weight_qparams(w, f, method)
    ref = fake_quantize(w, f, ref_qp)
    wq, qp = alg.round_to_nearest(w, f, method)
    assert wq.dtype == torch.float32 and torch.equal(wq, ref)
    assert qp.scale.shape == ref_qp.scale.shape and torch.equal(qp.scale, ref_qp.scale)
    assert (qp.zero is None) == (ref_qp.zero is None) and (qp.zero is None or torch.equal(qp.zero, ref_qp.zero))
    kernel = alg._rtn_kernel(w, f, method)
    if method == "mse" or f.granularity == "tensor":
        assert kernel is None  # the reference functions compute these
    elif kernels.load():
        assert kernel is not None  # ... and the kernel these
    assert torch.equal(w, _rtn_cases_weight(k, seed=k))  # the input is left alone


@pytest.mark.parametrize("fmt", ["int4_g32_asym", "int3", "nvfp4", "int8_tensor"])
@pytest.mark.parametrize("method", ["mse", "percentile"])
def test_weight_qparams_row_chunks_match(fmt, method, monkeypatch):
    w = torch.randn(24, 64, generator=_gen()) ** 3
    whole = alg.weight_qparams(w, fmt, method, grid=20)
    monkeypatch.setattr(alg, "_SEARCH_CHUNK", 5 * 64)  # 5 rows at a time
    chunked = alg.weight_qparams(w, fmt, method, grid=20)
    assert torch.equal(whole.scale, chunked.scale)
    assert (whole.zero is None) == (chunked.zero is None)
    assert whole.zero is None or torch.equal(whole.zero, chunked.zero)


@pytest.mark.parametrize("n", [1, 2, 9, 1000, 4099, 1 << 20])
def test_activation_percentile_is_torch_quantile(n):
    """The top-k percentile of `activation_amax` gives torch.quantile's value bit for bit (rank in float32, linear
    interpolation), with ties and at the percentiles static ranges use."""
    g = _gen(n)
    for v in ((torch.randn(n, generator=g) ** 3).abs(), torch.round(torch.rand(n, generator=g) * 8) / 4):
        for q in (0.9999, 0.999, 0.99, 0.9, 0.5, 1.0):
            assert torch.equal(alg._quantile(v, q), torch.quantile(v, q)), (n, q)
    x = torch.randn(4, min(n, 4099), generator=g)   # under ACT_SAMPLE_LIMIT: every value counts
    assert torch.equal(alg.activation_amax(x, "percentile", 99.99), torch.quantile(x.reshape(-1).abs(), 0.9999))
    if n == 1 << 20:   # over it: ACT_SAMPLE_LIMIT values drawn with replacement (seed 0), in any order
        big = torch.randn(3, n, generator=g)
        draw = big.reshape(-1)[torch.randint(big.numel(), (alg.ACT_SAMPLE_LIMIT,), generator=_gen(0))]
        assert torch.equal(alg.activation_amax(big, "percentile", 99.99), torch.quantile(draw.abs(), 0.9999))


@pytest.mark.parametrize("fmt", ["int4_g32", "int8", "int8_tensor", "int4_g32_asym", "nvfp4"])
def test_weight_qparams_percentile_within_range(fmt):
    f = parse_format(fmt)
    w = torch.randn(16, 128, generator=_gen())
    qmax = alg.weight_qparams(w, f, "max")
    qp = alg.weight_qparams(w, f, "percentile", percentile=99.0)
    assert qp.scale.shape == qmax.scale.shape
    assert (qp.scale <= qmax.scale).all() and (qp.scale > 0).all()
    assert torch.equal(alg.weight_qparams(w, f, "percentile", percentile=100.0).scale, qmax.scale)


def test_weight_qparams_amax_override_and_errors():
    w = torch.randn(8, 64, generator=_gen())
    f = parse_format("int4_g32_asym")
    obs = w.reshape(8, 2, 32).abs().amax(-1, keepdim=True)
    qp_same = alg.weight_qparams(w, f, amax=obs)
    qp_max = alg.weight_qparams(w, f)
    assert torch.equal(qp_same.scale, qp_max.scale) and torch.equal(qp_same.zero, qp_max.zero)
    qp_half = alg.weight_qparams(w, f, amax=obs / 2)
    assert (qp_half.scale < qp_max.scale).all()
    with pytest.raises(ValueError, match="unknown range method"):
        alg.weight_qparams(w, f, "minmax")
    with pytest.raises(ValueError, match="cannot be combined"):
        alg.weight_qparams(w, f, "mse", amax=obs)


def test_activation_amax_and_observer():
    x = torch.randn(4, 1000, 64, generator=_gen())
    x[0, 0, 0] = 1000.0
    amax = alg.activation_amax(x)
    assert amax == 1000.0 and amax.dim() == 0
    assert alg.activation_amax(list(x)) == 1000.0
    p = alg.activation_amax(x, "percentile", 99.0)
    assert 1.5 < p < 4.0
    big = torch.randn(3_000_000, generator=_gen(1))
    p_big = alg.activation_amax(big, "percentile", 99.0)
    assert abs(float(p_big) - 2.576) < 0.05
    assert abs(float(alg.activation_amax([big[:10], big], "percentile", 50.0)) - 0.6745) < 0.02  # median |N(0,1)|

    obs = alg.AbsMaxObserver()
    assert obs.channel_absmax is None
    for b in x:
        obs.update(b.to(torch.bfloat16))
    torch.testing.assert_close(obs.channel_absmax, x.abs().reshape(-1, 64).amax(0).bfloat16().float())
    assert obs.absmax == 1000.0 and obs.n_rows == 4000
    torch.testing.assert_close(obs.channel_absmean, x.abs().reshape(-1, 64).mean(0), rtol=1e-2, atol=1e-2)
