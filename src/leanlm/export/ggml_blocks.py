"""GGML block packing that the `gguf` package does not provide: packing given integer codes and
scales (so leanlm's own codes and scales go into the file unchanged), and Q4_K / Q6_K quantizers.

Block layouts follow ggml's block format (ggml-common.h); `gguf.quants` dequantizes every type,
and the tests check each packer against it.

* Q8_0: 32 values, fp16 d, int8 q; x = d * q.
* Q4_0: 32 values, fp16 d, 16 bytes: value j in the low nibble of byte j, value j+16 in the high
  nibble, stored as q + 8; x = d * q with q in -8..7.
* Q5_0: 32 values, fp16 d, uint32 qh (bit j = 5th bit of value j), 16 bytes of low nibbles as in
  Q4_0, stored as q + 16; x = d * q with q in -16..15.
* Q4_1: 32 values, fp16 d, fp16 m, nibbles as in Q4_0; x = d * q + m with q in 0..15.
* Q4_K: 256 values = 8 sub-blocks of 32; fp16 d, fp16 dmin, 12 bytes of 6-bit sub-block scales
  and mins, 128 bytes of nibbles (sub-block 2i in the low nibbles of bytes 32i..32i+31, 2i+1 in
  the high ones); x = d * sc * q - dmin * mn with q in 0..15.
* Q6_K: 256 values = 16 sub-blocks of 16; 128 bytes of low nibbles, 64 bytes of high 2-bit
  pairs, 16 int8 sub-block scales, fp16 d; x = d * sc * q with q in -32..31.

The Q4_K / Q6_K scale choice here is leanlm's own: per sub-block a least-squares fit of
(scale, min) alternated with rounding (a few iterations, from the min/max start), then 6-bit /
8-bit quantization of the sub-block scales against the super-block scale and a final rounding
of the values with the quantized scales.
"""

from __future__ import annotations

import numpy as np

QK = 32
QK_K = 256


def _f16(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float32).astype(np.float16)


def _nibbles(u: np.ndarray) -> np.ndarray:
    """[n, 32] values 0..15 -> [n, 16] bytes (value j low nibble, j+16 high nibble)."""
    u = u.astype(np.uint8)
    return u[:, :16] | (u[:, 16:] << np.uint8(4))


def pack_q8_0(codes: np.ndarray, d: np.ndarray) -> np.ndarray:
    """codes [n, 32] in -128..127, d [n] -> [n, 34] bytes."""
    return np.concatenate([_f16(d).reshape(-1, 1).view(np.uint8), codes.astype(np.int8).view(np.uint8)], axis=1)


def pack_q4_0(codes: np.ndarray, d: np.ndarray) -> np.ndarray:
    """codes [n, 32] in -8..7, d [n] -> [n, 18] bytes."""
    return np.concatenate([_f16(d).reshape(-1, 1).view(np.uint8), _nibbles(codes.astype(np.int16) + 8)], axis=1)


def pack_q5_0(codes: np.ndarray, d: np.ndarray) -> np.ndarray:
    """codes [n, 32] in -16..15, d [n] -> [n, 22] bytes."""
    u = (codes.astype(np.int16) + 16).astype(np.uint32)
    qh = ((u >> 4) & 1) << np.arange(32, dtype=np.uint32)
    qh = np.bitwise_or.reduce(qh, axis=1).astype("<u4").reshape(-1, 1).view(np.uint8)
    return np.concatenate([_f16(d).reshape(-1, 1).view(np.uint8), qh, _nibbles(u & 0xF)], axis=1)


def pack_q4_1(codes: np.ndarray, d: np.ndarray, m: np.ndarray) -> np.ndarray:
    """codes [n, 32] in 0..15, d [n], m [n] -> [n, 20] bytes; x = d * q + m."""
    return np.concatenate([_f16(d).reshape(-1, 1).view(np.uint8), _f16(m).reshape(-1, 1).view(np.uint8), _nibbles(codes)], axis=1)


SYM_PACKERS = {"Q8_0": (8, pack_q8_0), "Q5_0": (5, pack_q5_0), "Q4_0": (4, pack_q4_0)}


def _fit_affine(x: np.ndarray, qmax: int, iters: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Per row of x, (scale, mn >= 0) so that x ~ scale * q - mn with q in 0..qmax (least squares,
    alternated with rounding, starting from the row's min/max)."""
    lo = np.minimum(x.min(axis=-1), 0.0)
    hi = x.max(axis=-1)
    scale = np.where(hi > lo, (hi - lo) / qmax, 1.0).astype(np.float32)
    mn = -lo
    best_err = None
    best = (scale, mn)
    for _ in range(iters):
        q = np.clip(np.rint((x + mn[..., None]) / scale[..., None]), 0, qmax)
        err = ((scale[..., None] * q - mn[..., None] - x) ** 2).sum(-1)
        if best_err is None:
            best_err = err
        else:
            better = err < best_err
            best = (np.where(better, scale, best[0]), np.where(better, mn, best[1]))
            best_err = np.minimum(err, best_err)
        # least squares for x = s*q - m given q
        n = x.shape[-1]
        sq, sqq, sx, sqx = q.sum(-1), (q * q).sum(-1), x.sum(-1), (q * x).sum(-1)
        det = n * sqq - sq * sq
        ok = det > 0
        s_new = np.where(ok, (n * sqx - sq * sx) / np.where(ok, det, 1), scale)
        m_new = np.where(ok, (s_new * sq - sx) / n, mn)
        good = ok & (s_new > 0) & (m_new >= 0)
        scale = np.where(good, s_new, scale).astype(np.float32)
        mn = np.where(good, m_new, mn).astype(np.float32)
    q = np.clip(np.rint((x + mn[..., None]) / scale[..., None]), 0, qmax)
    err = ((scale[..., None] * q - mn[..., None] - x) ** 2).sum(-1)
    better = err < best_err
    return np.where(better, scale, best[0]).astype(np.float32), np.where(better, mn, best[1]).astype(np.float32)


def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    """x [n, 256] float -> [n, 144] bytes of Q4_K blocks."""
    x = np.asarray(x, dtype=np.float32).reshape(-1, 8, 32)
    n = x.shape[0]
    sc, mn = _fit_affine(x, 15)                                   # [n, 8] each
    d = _f16(sc.max(-1) / 63).astype(np.float32)                  # super-block scales, as stored
    dmin = _f16(mn.max(-1) / 63).astype(np.float32)
    isc = np.clip(np.rint(sc / np.where(d > 0, d, 1)[:, None]), 0, 63).astype(np.uint8)
    imn = np.clip(np.rint(mn / np.where(dmin > 0, dmin, 1)[:, None]), 0, 63).astype(np.uint8)
    eff_s = d[:, None] * isc
    eff_m = dmin[:, None] * imn
    q = np.clip(np.rint((x + eff_m[..., None]) / np.where(eff_s > 0, eff_s, 1)[..., None]), 0, 15).astype(np.uint8)
    q = np.where(eff_s[..., None] > 0, q, 0).astype(np.uint8)
    scales = np.empty((n, 12), dtype=np.uint8)
    scales[:, 0:4] = isc[:, :4] | ((isc[:, 4:] >> 4) << 6)
    scales[:, 4:8] = imn[:, :4] | ((imn[:, 4:] >> 4) << 6)
    scales[:, 8:12] = (isc[:, 4:] & 0xF) | ((imn[:, 4:] & 0xF) << 4)
    q = q.reshape(n, 4, 2, 32)
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(n, 128)
    return np.concatenate([_f16(d).reshape(-1, 1).view(np.uint8), _f16(dmin).reshape(-1, 1).view(np.uint8), scales, qs], axis=1)


def quantize_q6_k(x: np.ndarray) -> np.ndarray:
    """x [n, 256] float -> [n, 210] bytes of Q6_K blocks."""
    x = np.asarray(x, dtype=np.float32).reshape(-1, 16, 16)
    n = x.shape[0]
    # per sub-block: the largest-magnitude value maps to code -32 (as Q4_0 does for -8)
    imax = np.abs(x).argmax(-1)[..., None]
    s = (np.take_along_axis(x, imax, -1)[..., 0] / -32).astype(np.float32)      # [n, 16]
    jmax = np.abs(s).argmax(-1)[:, None]
    d = _f16(np.take_along_axis(s, jmax, -1)[:, 0] / -128).astype(np.float32)    # [n]
    isc = np.clip(np.rint(s / np.where(d != 0, d, 1)[:, None]), -128, 127).astype(np.int8)
    eff = d[:, None] * isc
    q = np.clip(np.rint(x / np.where(eff != 0, eff, 1)[..., None]), -32, 31)
    q = np.where(eff[..., None] != 0, q, 0)
    u = (q + 32).astype(np.uint8).reshape(n, 2, 4, 32)                            # halves of 128; 4 rows of 32
    ql = np.concatenate([u[:, :, 0] & 0xF | ((u[:, :, 2] & 0xF) << 4), u[:, :, 1] & 0xF | ((u[:, :, 3] & 0xF) << 4)], axis=2)
    qh = (u[:, :, 0] >> 4) | ((u[:, :, 1] >> 4) << 2) | ((u[:, :, 2] >> 4) << 4) | ((u[:, :, 3] >> 4) << 6)
    return np.concatenate([ql.reshape(n, 128), qh.reshape(n, 64), isc.view(np.uint8), _f16(d).reshape(-1, 1).view(np.uint8)], axis=1)


KQUANTIZERS = {"Q4_K": quantize_q4_k, "Q6_K": quantize_q6_k}
