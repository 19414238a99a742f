"""Tests for leanlm.quantization.formats against independent references (ml_dtypes, numpy)."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
import torch

from leanlm.quantization.formats import (
    FP8_E4M3_MAX,
    NF4_CODEBOOK,
    QFormat,
    QParams,
    compute_qparams,
    dequantize,
    fake_quantize,
    fake_quantize_ste,
    parse_format,
    quantize,
    round_minifloat,
    round_to_grid,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
ALL_NAMES = [
    "int8", "int4_g64", "int4_g32_asym", "int8_tensor", "int8_token", "int8_asym", "int3_g64",
    "int2_g64", "int4_g128", "int5_channel_asym", "fp8_e4m3", "fp8_e5m2", "fp8_e4m3_channel",
    "fp8_e5m2_channel", "fp8_e4m3_token", "nvfp4", "mxfp4", "mxfp8", "nf4", "nf4_g128",
]  # fmt: skip

# (ml_dtypes type, ebits, mbits, fmax)
ELEMENT_FORMATS = {
    "e4m3": (ml_dtypes.float8_e4m3fn, 4, 3, 448.0),
    "e5m2": (ml_dtypes.float8_e5m2, 5, 2, 57344.0),
    "e2m1": (ml_dtypes.float4_e2m1fn, 2, 1, 6.0),
}


def _ref_cast(x: np.ndarray, dt, fmax: float) -> np.ndarray:
    """ml_dtypes RNE cast with saturation (clip first; ml_dtypes e4m3fn would give NaN)."""
    return np.clip(x.astype(np.float32), -fmax, fmax).astype(dt).astype(np.float32)


def _grid(dt) -> np.ndarray:
    """All finite non-negative values of a <=8-bit ml_dtypes type, sorted."""
    n = 16 if dt == ml_dtypes.float4_e2m1fn else 256
    v = np.arange(n, dtype=np.uint8).view(dt).astype(np.float32)
    return np.unique(v[np.isfinite(v) & (v >= 0)])


# ----------------------------------------------------------------------------- element casts


@pytest.mark.parametrize("name", ELEMENT_FORMATS)
def test_minifloat_matches_ml_dtypes_grid_ties_and_random(name):
    dt, eb, mb, fmax = ELEMENT_FORMATS[name]
    grid = _grid(dt)
    assert grid[-1] == fmax
    mids = (grid[:-1] + grid[1:]) / 2  # exact ties (fits float32)
    around = np.concatenate([mids, np.nextafter(mids, np.inf), np.nextafter(mids, -np.inf)])
    rng = np.random.default_rng(0)
    rand = (np.exp2(rng.uniform(math.log2(grid[1]) - 3, math.log2(fmax), 20000)) * rng.choice([-1, 1], 20000))
    x = np.concatenate([grid, -grid, around, -around, rand.astype(np.float32)]).astype(np.float32)
    ours = round_minifloat(torch.from_numpy(x), eb, mb, fmax).numpy()
    np.testing.assert_array_equal(ours, _ref_cast(x, dt, fmax))
    # ties really go to the even code: the result of every exact midpoint has an even code
    codes = np.abs(round_minifloat(torch.from_numpy(mids), eb, mb, fmax).numpy())
    idx = np.searchsorted(grid, codes)
    assert np.all(idx % 2 == 0)


@pytest.mark.parametrize("name", ELEMENT_FORMATS)
def test_minifloat_saturates(name):
    dt, eb, mb, fmax = ELEMENT_FORMATS[name]
    x = torch.tensor([fmax * 1.01, fmax * 1.1, fmax * 2, 1e30, float("inf"), -fmax * 1.07, -float("inf")])
    out = round_minifloat(x, eb, mb, fmax)
    assert out.tolist() == [fmax] * 5 + [-fmax] * 2
    assert torch.isnan(round_minifloat(torch.tensor([float("nan")]), eb, mb, fmax)).all()


@pytest.mark.parametrize("eb,mb,fmax", [(4, 3, 448.0), (5, 2, 57344.0)])
def test_fp8_native_cast_path_equals_the_arithmetic_rounding(eb, mb, fmax):
    """round_minifloat casts fp8 through torch's dtype when no gradient is wanted; with one it rounds arithmetically.
    Both give the same values on random float32 bit patterns (NaN, inf, subnormals included), ties and the grid."""
    g = torch.Generator().manual_seed(0)
    bits = torch.randint(-2**31, 2**31 - 1, (400_000,), generator=g, dtype=torch.int64).to(torch.int32)
    grid = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn if eb == 4 else torch.float8_e5m2).float()
    grid = grid[torch.isfinite(grid)].unique()
    x = torch.cat([bits.view(torch.float32), grid, (grid[1:] + grid[:-1]) / 2, torch.randn(100_000, generator=g) * fmax / 8])
    native = round_minifloat(x, eb, mb, fmax)
    arith = round_minifloat(x.clone().requires_grad_(True), eb, mb, fmax).detach()
    same = (native == arith) | (native.isnan() & arith.isnan())
    assert same.all() and torch.equal(torch.signbit(native[~native.isnan()]), torch.signbit(arith[~arith.isnan()]))


@pytest.mark.parametrize("name", ELEMENT_FORMATS)
def test_minifloat_arithmetic_on_random_bit_patterns(name):
    """The arithmetic rounding (in place without autograd, out of place with it) equals ml_dtypes' saturating cast on
    random float32 bit patterns: NaN stays NaN, inf saturates, float32 subnormals and signed zeros keep their sign."""
    dt, eb, mb, fmax = ELEMENT_FORMATS[name]
    g = torch.Generator().manual_seed(1)
    x = torch.randint(-2**31, 2**31 - 1, (200_000,), generator=g, dtype=torch.int64).to(torch.int32).view(torch.float32)
    x = torch.cat([x, torch.tensor([0.0, -0.0, 1e-45, -1e-45, float("inf"), -float("inf")])])
    arith = round_minifloat(x.clone().requires_grad_(True), eb, mb, fmax).detach()
    ok = ~x.isnan()
    assert arith[~ok].isnan().all()
    want = torch.from_numpy(_ref_cast(x[ok].numpy(), dt, fmax))
    got = arith[ok]
    assert torch.equal(got, want) and torch.equal(got.signbit(), want.signbit())
    if name == "e2m1":  # no native dtype: the eager no-grad path is the in-place arithmetic one
        inplace = round_minifloat(x, eb, mb, fmax)
        assert torch.equal(inplace[ok], got) and torch.equal(inplace[ok].signbit(), got.signbit()) and inplace[~ok].isnan().all()


def test_e2m1_packing_of_every_value():
    """Each E2M1 value packs to sign bit + its magnitude's index (the nibble layout the exporters read) and back."""
    from leanlm.quantization.formats import _E2M1_VALUES, pack_codes, unpack_codes

    vals = torch.tensor(_E2M1_VALUES)
    codes = torch.cat([vals, -vals[1:]])
    stored, packing = pack_codes(codes, parse_format("nvfp4"))
    want = list(range(8)) + [8 | i for i in range(1, 8)] + [0]  # 15 codes: the last byte's high nibble pads
    assert packing == "e2m1x2" and (stored & 0xF).tolist() + (stored >> 4).tolist() == want[0::2] + want[1::2]
    assert torch.equal(unpack_codes(stored, packing, parse_format("nvfp4"), [15]), codes)


def test_e2m1_ties_by_hand():
    x = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -2.5, -0.25, 5.01, 4.99])
    want = [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -2.0, -0.0, 6.0, 4.0]
    assert round_to_grid(x, "mxfp4").tolist() == want


def test_fp8_cast_also_matches_torch_native():
    x = torch.randn(4096) * 300
    ours = round_to_grid(x, "fp8_e4m3")
    native = x.clamp(-448, 448).to(torch.float8_e4m3fn).float()
    assert torch.equal(ours, native)
    y = torch.randn(4096) * 3e4
    assert torch.equal(round_to_grid(y, "fp8_e5m2"), y.clamp(-57344, 57344).to(torch.float8_e5m2).float())


@pytest.mark.parametrize("kind,dt,fmax", [("fp8_e4m3", ml_dtypes.float8_e4m3fn, 448.0),
                                          ("fp8_e5m2", ml_dtypes.float8_e5m2, 57344.0)])
@pytest.mark.parametrize("gran", ["tensor", "channel", "token"])
def test_fp8_scaled_reference(kind, dt, fmax, gran):
    x = (torch.randn(16, 64) * torch.logspace(-3, 2, 16)[:, None]).float()
    fmt = QFormat(kind, 8, granularity=gran)
    qp = compute_qparams(x, fmt)
    xn = x.numpy()
    amax = np.abs(xn).max() if gran == "tensor" else np.abs(xn).max(axis=1, keepdims=True)
    scale = (amax / np.float32(fmax)).astype(np.float32)
    q = _ref_cast(xn / scale, dt, fmax)
    np.testing.assert_array_equal(qp.scale.numpy(), scale)
    np.testing.assert_array_equal(quantize(x, fmt, qp).numpy(), q)
    np.testing.assert_array_equal(fake_quantize(x, fmt).numpy(), q * scale)


# ----------------------------------------------------------------------------- integers


def _np_int_ref(x: np.ndarray, bits: int, sym: bool, axis, g: int | None):
    """Hand-written numpy reference; returns (codes, dequant) with x's shape."""
    shape = x.shape
    if g is not None:
        x = x.reshape(*shape[:-1], shape[-1] // g, g)
        axis = -1
    kw = dict(axis=axis, keepdims=True) if axis is not None else {}
    if sym:
        qmax, qmin = 2 ** (bits - 1) - 1, -(2 ** (bits - 1))
        scale = np.abs(x).max(**kw) / np.float32(qmax)
        scale = np.where(scale == 0, np.float32(1), scale).astype(np.float32)
        q = np.clip(np.rint(x / scale), qmin, qmax)
        deq = q * scale
    else:
        qmax = 2**bits - 1
        lo = np.minimum(x.min(**kw), 0)
        hi = np.maximum(x.max(**kw), 0)
        scale = ((hi - lo) / np.float32(qmax)).astype(np.float32)
        scale = np.where(scale == 0, np.float32(1), scale).astype(np.float32)
        zero = np.clip(np.rint(-lo / scale), 0, qmax)
        q = np.clip(np.rint(x / scale) + zero, 0, qmax)
        deq = (q - zero) * scale
    return q.reshape(shape), deq.astype(np.float32).reshape(shape)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("gran,g", [("tensor", None), ("channel", None), ("token", None), ("group", 32),
                                    ("group", 64)])
def test_int_matches_numpy_reference(bits, sym, gran, g):
    torch.manual_seed(bits)
    x = torch.randn(12, 128) * 2 + 0.3
    x[3] = 0.0  # an all-zero row/group
    x[5, :64] = x[5, :64].abs()  # a group with min > 0 (asym range must include 0)
    fmt = QFormat("int", bits, symmetric=sym, granularity=gran, group_size=g)
    axis = {"tensor": None, "channel": 1, "token": -1, "group": None}[gran]
    q_ref, dq_ref = _np_int_ref(x.numpy(), bits, sym, axis, g)
    qp = compute_qparams(x, fmt)
    q = quantize(x, fmt, qp)
    assert q.dtype == (torch.int8 if sym else torch.uint8)
    np.testing.assert_array_equal(q.numpy().astype(np.float64), q_ref)
    np.testing.assert_array_equal(dequantize(q, fmt, qp).numpy(), dq_ref)
    np.testing.assert_array_equal(fake_quantize(x, fmt).numpy(), dq_ref)


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("sym", [True, False])
def test_int_roundtrip_error_bound(bits, sym):
    torch.manual_seed(100 + bits)
    x = torch.randn(8, 256) * torch.rand(8, 1) * 10
    fmt = QFormat("int", bits, symmetric=sym, granularity="group", group_size=64)
    qp = compute_qparams(x, fmt)
    err = (x - fake_quantize(x, fmt, qp)).reshape(8, 4, 64).abs()
    assert torch.all(err <= qp.scale / 2 * (1 + 1e-5))


def test_int_symmetric_range_convention_and_clipping():
    fmt = parse_format("int4_tensor")
    x = torch.tensor([[-3.0, -1.0, 0.0, 0.5, 1.0, 3.0]])
    qp = compute_qparams(x, fmt)
    assert qp.scale.item() == pytest.approx(3.0 / 7)  # scale = amax / (2**(n-1) - 1)
    assert quantize(x, fmt, qp).tolist() == [[-7, -2, 0, 1, 2, 7]]
    clipped = compute_qparams(x, fmt, amax=3.5)  # scale 0.5; clipped range reaches qmin = -8
    xc = torch.tensor([[-5.0, -3.6, 0.25, 0.75, 1.0, 5.0]])
    assert quantize(xc, fmt, clipped).tolist() == [[-8, -7, 0, 2, 2, 7]]  # ties to even


def test_asym_by_hand():
    fmt = parse_format("int2_tensor_asym")
    x = torch.tensor([[0.5, 1.0, 2.0, 3.0]])
    qp = compute_qparams(x, fmt)  # range [0, 3] -> scale 1, zero 0
    assert qp.scale.item() == 1.0 and qp.zero.item() == 0.0
    assert quantize(x, fmt, qp).tolist() == [[0, 1, 2, 3]]  # 0.5 ties to even -> 0
    qp2 = compute_qparams(x, fmt, xmin=-1.5, xmax=1.5)  # scale 1, zero round(1.5)=2
    assert qp2.zero.item() == 2.0
    assert dequantize(quantize(x, fmt, qp2), fmt, qp2).tolist() == [[0.0, 1.0, 1.0, 1.0]]


def test_range_override_shapes():
    x = torch.randn(4, 64)
    qp = compute_qparams(x, "int8", amax=torch.ones(4))  # [out] accepted for [out, 1]
    assert qp.scale.shape == (4, 1)
    assert compute_qparams(x, "int4_g32", amax=2.0).scale.shape == (4, 2, 1)
    with pytest.raises(ValueError, match="does not fit"):
        compute_qparams(x, "int8", amax=torch.ones(3))
    with pytest.raises(ValueError, match="either amax or xmin"):
        compute_qparams(x, "int8_asym", amax=1.0, xmin=-1.0)


# ----------------------------------------------------------------------------- NF4


def test_nf4_codebook_published_and_derived():
    published = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                 -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                 0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
                 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                 0.7229568362236023, 1.0]  # fmt: skip
    assert list(NF4_CODEBOOK) == published
    # QLoRA construction: normal quantiles, 8 positive / 7 negative + exact zero, normalized
    off = 1 - 0.5 * (1 / 30 + 1 / 32)
    pos = torch.special.ndtri(torch.linspace(off, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(off, 0.5, 8, dtype=torch.float64)[:-1])
    v = torch.cat([pos, neg, torch.zeros(1, dtype=torch.float64)]).sort().values
    torch.testing.assert_close(v / v.max(), torch.tensor(published, dtype=torch.float64), rtol=0, atol=1e-6)


def test_nf4_blockwise_nearest():
    torch.manual_seed(1)
    x = torch.randn(6, 128)
    fmt = parse_format("nf4")
    assert fmt.group_size == 64
    qp = compute_qparams(x, fmt)
    absmax = x.reshape(6, 2, 64).abs().amax(-1, keepdim=True)
    assert torch.equal(qp.scale, absmax)
    idx = quantize(x, fmt, qp)
    assert idx.dtype == torch.uint8 and idx.shape == x.shape
    cb = np.array(NF4_CODEBOOK, dtype=np.float32)
    v = (x.reshape(6, 2, 64) / absmax).reshape(6, 128).numpy()
    ref = np.abs(v[..., None] - cb).argmin(-1)
    np.testing.assert_array_equal(idx.numpy(), ref)
    y = fake_quantize(x, fmt)
    np.testing.assert_array_equal(y.reshape(6, 2, 64).numpy(), (cb[ref].reshape(6, 2, 64) * absmax.numpy()))
    # the absmax element of each block is reproduced exactly
    m = x.reshape(6, 2, 64).abs().argmax(-1, keepdim=True)
    assert torch.equal(y.reshape(6, 2, 64).gather(-1, m), x.reshape(6, 2, 64).gather(-1, m))


# ----------------------------------------------------------------------------- NVFP4 and MX


def test_nvfp4_by_hand():
    # global amax 2688 = 6 * 448 -> global scale 1
    x = torch.zeros(1, 48)
    x[0, 0] = 2688.0
    x[0, 16] = 3.0  # block amax 3 -> block scale 0.5
    x[0, 17] = 1.3  # 1.3 / 0.5 = 2.6 -> E2M1 3 -> 1.5
    x[0, 32] = 7.8  # block amax 7.8 -> 1.3 -> E4M3 1.25
    x[0, 33] = -1.0  # -1 / 1.25 = -0.8 -> -1.0 -> -1.25
    fmt = parse_format("nvfp4")
    qp = compute_qparams(x, fmt)
    assert qp.global_scale.item() == 1.0
    assert qp.scale.flatten().tolist() == [448.0, 0.5, 1.25]
    q = quantize(x, fmt, qp)
    assert q[0, [0, 16, 17, 32, 33]].tolist() == [6.0, 6.0, 3.0, 6.0, -1.0]
    y = dequantize(q, fmt, qp)
    assert y[0, [0, 16, 17, 32, 33]].tolist() == [2688.0, 3.0, 1.5, 7.5, -1.25]


def test_nvfp4_matches_numpy_reference():
    torch.manual_seed(2)
    x = torch.randn(8, 64) * torch.logspace(-2, 1, 8)[:, None]
    x[2, 16:32] = 0.0  # all-zero block
    fmt = parse_format("nvfp4")
    qp = compute_qparams(x, fmt)
    xn = x.numpy().reshape(8, 4, 16)
    gs = np.float32(np.abs(xn).max() / np.float32(6 * 448))
    bamax = np.abs(xn).max(-1, keepdims=True)
    bs = _ref_cast(bamax / np.float32(6) / gs, ml_dtypes.float8_e4m3fn, 448.0)
    eff = bs * gs
    q = _ref_cast(xn / np.where(eff == 0, 1, eff), ml_dtypes.float4_e2m1fn, 6.0)
    np.testing.assert_array_equal(qp.global_scale.numpy(), gs)
    np.testing.assert_array_equal(qp.scale.numpy(), bs)
    np.testing.assert_array_equal(quantize(x, fmt, qp).numpy().reshape(8, 4, 16), q)
    np.testing.assert_array_equal(fake_quantize(x, fmt).numpy().reshape(8, 4, 16), (q * bs) * gs)
    # block scales are E4M3 values, the global scale is a static override when given
    assert torch.equal(qp.scale.to(torch.float8_e4m3fn).float(), qp.scale)
    qs = compute_qparams(x, fmt, global_amax=1.0)  # smaller than the data: block scales saturate
    assert qs.global_scale.item() == pytest.approx(1.0 / 2688) and qs.scale.max().item() == FP8_E4M3_MAX


@pytest.mark.parametrize("kind,emax,dt,fmax", [("mxfp4", 2, ml_dtypes.float4_e2m1fn, 6.0),
                                               ("mxfp8", 8, ml_dtypes.float8_e4m3fn, 448.0)])
def test_mx_matches_reference(kind, emax, dt, fmax):
    torch.manual_seed(3)
    x = torch.randn(4, 128) * torch.logspace(-30, 3, 4)[:, None]
    x[1, 32:64] = 0.0
    x[0, 0] = 1024.0  # exact power of two as block amax
    fmt = parse_format(kind)
    qp = compute_qparams(x, fmt)
    xn = x.numpy().reshape(4, 4, 32)
    amax = np.abs(xn).max(-1, keepdims=True)
    exp = np.array([[[min(max(math.floor(math.log2(a)) - emax, -127), 127) if a > 0 else -127]
                     for a in row[:, 0]] for row in amax])
    scale = np.exp2(exp.astype(np.float64)).astype(np.float32)
    np.testing.assert_array_equal(qp.scale.numpy(), scale)
    # scales are exactly representable in E8M0
    np.testing.assert_array_equal(scale.astype(ml_dtypes.float8_e8m0fnu).astype(np.float32), scale)
    assert qp.scale[0, 0].item() == 2.0 ** (10 - emax) and qp.scale[1, 1].item() == 2.0**-127
    q = _ref_cast((xn / scale).astype(np.float32), dt, fmax)
    np.testing.assert_array_equal(quantize(x, fmt, qp).numpy().reshape(4, 4, 32), q)
    np.testing.assert_array_equal(fake_quantize(x, fmt).numpy().reshape(4, 4, 32), q * scale)


def test_mx_saturates_with_floor_scale():
    x = torch.zeros(1, 32)
    x[0, 0] = 7.5  # floor(log2 7.5) = 2 -> X = 1 -> 7.5 saturates to 6
    assert fake_quantize(x, "mxfp4")[0, 0].item() == 6.0
    x[0, 0] = 500.0  # mxfp8: X = 2**0 -> 500 saturates to 448
    assert fake_quantize(x, "mxfp8")[0, 0].item() == 448.0


# ----------------------------------------------------------------------------- generic properties


@pytest.mark.parametrize("name", ALL_NAMES)
@pytest.mark.parametrize("device", DEVICES)
def test_idempotent_and_zero_safe(name, device):
    fmt = parse_format(name)
    torch.manual_seed(4)
    x = (torch.randn(8, 256) * 3).to(device)
    x[1] = 0.0
    qp = compute_qparams(x, fmt)
    y = fake_quantize(x, fmt, qp)
    assert y.shape == x.shape and y.dtype == x.dtype and torch.isfinite(y).all()
    assert torch.equal(fake_quantize(y, fmt, qp), y)  # same params: exact
    if fmt.symmetric:  # recomputed params: same up to float rounding of the scale
        torch.testing.assert_close(fake_quantize(y, fmt), y, rtol=1e-6, atol=0)
    z = torch.zeros(4, 256, device=device)
    assert torch.equal(fake_quantize(z, fmt), z)
    assert (y[1] == 0).all()


@pytest.mark.parametrize("name", ALL_NAMES)
def test_bfloat16_inputs(name):
    torch.manual_seed(5)
    x = torch.randn(4, 128, dtype=torch.bfloat16)
    y = fake_quantize(x, name)
    assert y.dtype == torch.bfloat16 and y.shape == x.shape
    assert torch.equal(y, fake_quantize(x.float(), name).to(torch.bfloat16))


@pytest.mark.parametrize("name", ["int4_g64", "int4_g32_asym", "int8", "int8_tensor", "int8_token", "int8_asym",
                                  "int3_g64", "int5_channel_asym"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int_fake_quantize_fast_path_is_the_reference_bit_for_bit(name, dtype):
    """fake_quantize's in-place int path gives the bits of dequantize(quantize()), clipped ranges included."""
    fmt = parse_format(name)
    torch.manual_seed(6)
    x = (torch.randn(8, 128) * 3 + 0.2).to(dtype)
    for qp in (compute_qparams(x, fmt), compute_qparams(x, fmt, amax=1.0),
               compute_qparams(x, fmt, xmin=-0.5, xmax=2.0) if not fmt.symmetric else compute_qparams(x, fmt)):
        want = dequantize(quantize(x, fmt, qp), fmt, qp).to(dtype)
        got = fake_quantize(x, fmt, qp)
        assert got.dtype == dtype and torch.equal(got, want)


@pytest.mark.parametrize("name", ["fp8_e4m3", "fp8_e4m3_channel", "fp8_e4m3_token", "fp8_e5m2", "fp8_e5m2_channel",
                                  "mxfp8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_fake_quantize_fast_path_is_the_reference_bit_for_bit(name, dtype):
    """fake_quantize's in-place float8 path gives the bits of dequantize(quantize()): saturation, an all-zero row,
    subnormal codes, inf and NaN included, with observed and overridden ranges."""
    from leanlm.quantization.formats import _NATIVE_FP8

    fmt = parse_format(name)
    assert _NATIVE_FP8.get(fmt.spec.elem) is not None  # the fast path is the one taken
    torch.manual_seed(7)
    x = torch.randn(8, 128) * torch.logspace(-6, 3, 128)
    x[1] = 0.0
    x[2, :4] = torch.tensor([float("inf"), -float("inf"), float("nan"), 1e-30])
    x = x.to(dtype)
    for qp in (compute_qparams(x, fmt), compute_qparams(x, fmt, amax=0.5)):
        want = dequantize(quantize(x, fmt, qp), fmt, qp).to(dtype)
        got = fake_quantize(x, fmt, qp)
        assert got.dtype == dtype and torch.equal(got.isnan(), want.isnan())
        ok = ~want.isnan()
        assert torch.equal(got[ok], want[ok]) and torch.equal(got[ok].signbit(), want[ok].signbit())


@pytest.mark.parametrize("dt", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_fp8_decode_table_covers_every_code(dt):
    """The CPU decode of fp8 codes by table gives torch's own widening for all 256 codes (NaN codes stay NaN)."""
    from leanlm.quantization.formats import _fp8_values

    codes = torch.arange(256, dtype=torch.uint8)
    want = codes.view(dt).float()
    got = torch.take(_fp8_values(dt), codes.long())
    assert torch.equal(got.isnan(), want.isnan())
    ok = ~want.isnan()
    assert torch.equal(got[ok], want[ok]) and torch.equal(got[ok].signbit(), want[ok].signbit())


@pytest.mark.parametrize("name,dim,msg", [
    ("int4_g128", 576, "group size 128 does not divide input dimension 576; use 64 or 32"),
    ("nvfp4", 100, "block size 16 does not divide input dimension 100"),
    ("mxfp4", 48, "block size 32 does not divide input dimension 48"),
    ("mxfp8", 16, "block size 32 does not divide input dimension 16"),
    ("nf4", 96, "group size 64 does not divide input dimension 96"),
])  # fmt: skip
def test_group_size_must_divide(name, dim, msg):
    x = torch.randn(3, dim)
    with pytest.raises(ValueError, match=msg.replace("(", r"\(")):
        compute_qparams(x, name)
    with pytest.raises(ValueError, match="does not divide"):
        fake_quantize(x, name)


def test_channel_needs_2d():
    with pytest.raises(ValueError, match="per-channel"):
        fake_quantize(torch.randn(8), "int8")
    assert fake_quantize(torch.randn(8), "int8_tensor").shape == (8,)


def test_conv_and_3d_layouts():
    w = torch.randn(6, 4, 3, 3)
    qp = compute_qparams(w, "int8")
    assert qp.scale.shape == (6, 1, 1, 1)
    a = torch.randn(2, 5, 64)
    assert compute_qparams(a, "int8_token").scale.shape == (2, 5, 1)
    assert compute_qparams(a, "nvfp4").scale.shape == (2, 5, 4, 1)


def test_ste_gradient():
    torch.manual_seed(6)
    w = torch.randn(4, 64)
    fmt = parse_format("int4_g32")
    qp = compute_qparams(w, fmt, amax=compute_qparams(w, fmt).scale * 7 * 0.5)  # clip at half range
    x = w.clone().requires_grad_()
    y = fake_quantize_ste(x, fmt, qp)
    assert torch.equal(y.detach(), fake_quantize(w, fmt, qp))
    y.sum().backward()
    lo, hi = -8 * qp.scale, 7 * qp.scale
    wg = w.reshape(4, 2, 32)
    inside = ((wg >= lo) & (wg <= hi)).reshape(4, 64).float()
    assert torch.equal(x.grad, inside) and 0 < inside.mean() < 1
    xb = torch.randn(2, 32, dtype=torch.bfloat16, requires_grad=True)
    fake_quantize_ste(xb, "mxfp8").sum().backward()
    assert xb.grad.dtype == torch.bfloat16 and (xb.grad == 1).all()


# ----------------------------------------------------------------------------- spec and parsing


def test_bits_per_weight():
    bpw = {n: parse_format(n).bits_per_weight() for n in
           ["int4_g64", "int4_g128", "int4_g32_asym", "int3_g64", "int2_g64", "int8", "fp8_e4m3",
            "nvfp4", "mxfp4", "mxfp8", "nf4"]}  # fmt: skip
    assert bpw == {"int4_g64": 4.25, "int4_g128": 4.125, "int4_g32_asym": 4.625, "int3_g64": 3.25,
                   "int2_g64": 2.25, "int8": 8.0, "fp8_e4m3": 8.0, "nvfp4": 4.5, "mxfp4": 4.25,
                   "mxfp8": 8.25, "nf4": 4.5}  # fmt: skip
    assert parse_format("int8").bits_per_weight(in_features=1024) == 8 + 16 / 1024
    assert parse_format("fp8_e4m3_channel").bits_per_weight(in_features=512) == 8 + 32 / 512


@pytest.mark.parametrize("name", ALL_NAMES)
def test_parse_round_trip(name):
    fmt = parse_format(name)
    assert fmt.name == {"int5_channel_asym": "int5_asym"}.get(name, name)
    assert parse_format(fmt.name) == fmt and str(fmt) == fmt.name
    assert parse_format(fmt) is fmt


def test_parse_specifics_and_errors():
    assert parse_format("int4_g64") == QFormat("int", 4, granularity="group", group_size=64)
    assert parse_format("INT4_G64_SYM").name == "int4_g64"
    assert parse_format("int8_channel").name == "int8"
    assert parse_format("fp8_e4m3") == QFormat("fp8_e4m3", 8, granularity="tensor")
    assert parse_format("fp8_e5m2_channel").granularity == "channel"
    assert parse_format("nvfp4") == QFormat("nvfp4", 4) == QFormat("nvfp4", 4, granularity="group", group_size=16)
    assert parse_format("mxfp8").group_size == 32 and parse_format("nf4_g128").group_size == 128
    with pytest.raises(ValueError, match="valid forms: int<n>"):
        parse_format("int4_g64_foo")
    with pytest.raises(ValueError, match="2..8 bits"):
        parse_format("int9")
    with pytest.raises(ValueError, match="symmetric only"):
        QFormat("fp8_e4m3", 8, symmetric=False)
    with pytest.raises(ValueError, match="blocks of 16"):
        QFormat("nvfp4", 4, group_size=32)
    with pytest.raises(ValueError, match="needs group_size"):
        QFormat("int", 4, granularity="group")
    with pytest.raises(ValueError, match="nvfp4 needs QParams.global_scale"):
        quantize(torch.randn(2, 16), "nvfp4", QParams(scale=torch.ones(2, 1, 1)))


@pytest.mark.parametrize("name", ALL_NAMES)
def test_table_row_packing_and_differentiable_quantizer(name):
    """Every format's row drives packing (codes survive pack/unpack exactly, two per byte up to 4
    bits) and the differentiable quantizer (bit-identical to fake_quantize, straight-through
    gradient inside the representable range)."""
    from leanlm.quantization.formats import FORMATS, _grouped, fake_quantize_lsq, fake_quantize_with, pack_codes, unpack_codes

    f = parse_format(name)
    assert f.spec is FORMATS[f.kind] and (f.spec.bits is None or f.spec.bits == f.bits)
    x = torch.randn(8, 128, generator=torch.Generator().manual_seed(3)) * torch.logspace(-2, 1, 128)
    qp = compute_qparams(x, f)
    codes = quantize(x, f, qp)
    stored, packing = pack_codes(codes, f)
    assert stored.numel() * stored.element_size() * 8 == codes.numel() * (4 if f.bits <= 4 else 8)  # 4 bits: two per byte
    back = unpack_codes(stored, packing, f, list(codes.shape))
    assert back.dtype == codes.dtype and torch.equal(back, codes)
    ref = fake_quantize(x, f, qp)
    assert torch.equal(fake_quantize_with(_grouped(x, f), f, qp.scale, qp.zero, qp.global_scale).reshape(x.shape), ref)
    xr = x.clone().requires_grad_(True)
    out = fake_quantize_lsq(xr, f, qp.scale, qp.zero, qp.global_scale)
    assert torch.equal(out.detach(), ref)
    out.sum().backward()
    assert set(xr.grad.unique().tolist()) <= {0.0, 1.0} and xr.grad.sum() > 0
