"""Exact definitions of the quantization number formats leanlm supports.

Every format is defined once here, one row per kind in the table ``FORMATS`` (like ggml's type
traits): how its scales are derived from a range, how values are rounded onto its grid (round half
to even, saturating), how codes are decoded and packed, and its fake quantizer (differentiable for
QAT: ``fake_quantize_with(..., ste=True)``). PTQ (GPTQ, AWQ, SmoothQuant), QAT, the runtime layouts
and the exporters build on these functions; no other module repeats the math.

Formats (``QFormat.kind``):

* ``int`` (INT2..INT8).
  Symmetric: ``scale = amax / qmax`` with ``qmax = 2**(n-1) - 1``; codes are
  ``clamp(round(x / scale), qmin, qmax)`` with ``qmin = -2**(n-1)`` (the extra negative code is
  reached only when the range is clipped below the observed amax).
  Asymmetric: ``xmin = min(min(x), 0)``, ``xmax = max(max(x), 0)``,
  ``scale = (xmax - xmin) / (2**n - 1)``, integer zero point ``zero = round(-xmin / scale)``,
  codes ``clamp(round(x / scale) + zero, 0, 2**n - 1)``; decode ``(q - zero) * scale``.
  Granularity: per tensor, per channel (dim 0, reduced over all other dims), per group of
  ``group_size`` along the last dim, or per token (reduced over the last dim only, dynamic).
* ``fp8_e4m3`` (the "fn" variant: max 448, no inf) and ``fp8_e5m2`` (max 57344), following
  Micikevicius et al. 2022, "FP8 Formats for Deep Learning" (arXiv:2209.05433).
  ``scale = amax / fmax``; ``x / scale`` is clamped to ``[-fmax, fmax]`` and then rounded to
  nearest even. Per tensor (default), per channel or per token.
* ``nvfp4``: E2M1 elements in blocks of 16 along the last dim, FP8 E4M3 block scales and one
  FP32 per-tensor scale (NVIDIA, "Introducing NVFP4 for Efficient and Accurate Low-Precision
  Inference", NVIDIA Technical Blog 2025; TensorRT Model Optimizer recipe):
  ``global_scale = global_amax / (6 * 448)``,
  ``block_scale = e4m3_sat(block_amax / 6 / global_scale)``, elements
  ``e2m1_sat(x / (block_scale * global_scale))``, decode ``(q * block_scale) * global_scale``.
* ``mxfp4`` / ``mxfp8``: OCP Microscaling Formats (MX) Specification v1.0 (2023), section 6.3.
  Blocks of 32 along the last dim share an E8M0 scale
  ``X = 2**(floor(log2(block_amax)) - emax_elem)`` (``emax_elem`` = 2 for E2M1, 8 for E4M3;
  exponent clamped to the E8M0 range [-127, 127]; an all-zero block gets 2**-127). Elements
  are ``x / X`` rounded to nearest even with saturation.
* ``nf4``: the 16-value NormalFloat codebook of Dettmers et al. 2023 ("QLoRA: Efficient
  Finetuning of Quantized LLMs"), absmax scaling per block of ``group_size`` (default 64) along
  the last dim, nearest-codebook rounding (exact ties go to the lower codebook entry). No double
  quantization of the absmax values.

A zero range (all-zero tensor/group, or an amax override of 0) gives scale 1 for int, fp8 and nf4,
so an all-zero input stays exactly zero and never produces NaN. Group and block sizes must divide
the last dimension; nothing is ever padded. Inputs of any float dtype are computed in float32;
``fake_quantize`` returns the input dtype. Non-finite inputs: +-inf saturates, NaN stays NaN in
the element cast (but poisons the scale of its group).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import torch

__all__ = [
    "QFormat",
    "QParams",
    "parse_format",
    "compute_qparams",
    "quantize",
    "dequantize",
    "fake_quantize",
    "fake_quantize_ste",
    "fake_quantize_with",
    "fake_quantize_lsq",
    "project_scale",
    "pack_codes",
    "unpack_codes",
    "FormatSpec",
    "FORMATS",
    "round_to_grid",
    "round_minifloat",
    "NF4_CODEBOOK",
    "FP8_E4M3_MAX",
    "FP8_E5M2_MAX",
    "FP4_E2M1_MAX",
    "KINDS",
]

FP8_E4M3_MAX = 448.0
FP8_E5M2_MAX = 57344.0
FP4_E2M1_MAX = 6.0

# (exponent bits, mantissa bits, largest finite value) of the element formats.
_E4M3 = (4, 3, FP8_E4M3_MAX)
_E5M2 = (5, 2, FP8_E5M2_MAX)
_E2M1 = (2, 1, FP4_E2M1_MAX)

# NormalFloat4 codebook as published with QLoRA (Dettmers et al. 2023, appendix E).
NF4_CODEBOOK: tuple[float, ...] = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip


@dataclass(frozen=True)
class FormatSpec:
    """One row of the format table: everything fixed about a format kind (``FORMATS[kind]``).

    bits: element bits (None: chosen per format, ints 2..8). elem: the element grid as a
    minifloat ``(exponent bits, mantissa bits, largest value)``, None for ints and the NF4
    codebook. block: fixed block size along the last dim (nvfp4, MX); default_block: default for
    a variable one (nf4). scale: how one scale is stored ("f16", "f32", "e4m3", "e8m0"), and
    scale_bits its size for ``bits_per_weight``. emax: largest element exponent (MX shared
    scales). granularities: the ones the kind accepts. packing: how ``pack_codes`` stores codes.
    """

    bits: int | None
    elem: tuple[int, int, float] | None
    granularities: tuple[str, ...]
    scale: str
    scale_bits: int
    packing: str
    block: int | None = None
    default_block: int | None = None
    emax: int | None = None

    @property
    def blockwise(self) -> bool:
        """Always in blocks along the last dim (nvfp4, MX, nf4)."""
        return self.granularities == ("group",)


_GRANULARITIES = ("tensor", "channel", "group", "token")
_NOT_GROUP = ("tensor", "channel", "token")
# The format table: add a format by adding its row here (and its branch in compute_qparams if its
# scales are derived in a new way). Scale bits: int scales are stored as fp16, fp8 scales as fp32.
FORMATS: dict[str, FormatSpec] = {
    "int": FormatSpec(None, None, _GRANULARITIES, "f16", 16, "int"),
    "fp8_e4m3": FormatSpec(8, _E4M3, _NOT_GROUP, "f32", 32, "float8"),
    "fp8_e5m2": FormatSpec(8, _E5M2, _NOT_GROUP, "f32", 32, "float8"),
    "nvfp4": FormatSpec(4, _E2M1, ("group",), "e4m3", 8, "e2m1x2", block=16),
    "mxfp4": FormatSpec(4, _E2M1, ("group",), "e8m0", 8, "e2m1x2", block=32, emax=2),
    "mxfp8": FormatSpec(8, _E4M3, ("group",), "e8m0", 8, "float8", block=32, emax=8),
    "nf4": FormatSpec(4, None, ("group",), "f32", 32, "u4x2", default_block=64),
}
KINDS = tuple(FORMATS)


@dataclass(frozen=True)
class QFormat:
    """A quantization format.

    kind: one of ``KINDS``. bits: storage bits per element (int: 2..8; fixed for the others).
    symmetric: ints only (float formats are always symmetric).
    granularity: "tensor" | "channel" | "group" | "token"; nvfp4/mxfp*/nf4 are always blockwise
    and are normalized to "group" with their block size (16 for nvfp4, 32 for MX, default 64
    for nf4). group_size: required for int "group".
    """

    kind: str
    bits: int
    symmetric: bool = True
    granularity: str = "channel"
    group_size: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown format kind {self.kind!r}; valid kinds: {', '.join(KINDS)}")
        if self.kind == "int":
            if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
                raise ValueError(f"int formats need 2..8 bits, got {self.bits!r}")
        else:
            if self.bits != self.spec.bits:
                raise ValueError(f"{self.kind} has {self.spec.bits} bits, got {self.bits!r}")
            if not self.symmetric:
                raise ValueError(f"{self.kind} is symmetric only; symmetric=False applies to int formats")
        spec = self.spec
        if spec.blockwise:
            if self.granularity not in ("channel", "group"):  # "channel" is the dataclass default
                raise ValueError(f"{self.kind} is always blockwise along the last dim; granularity "
                                 f"{self.granularity!r} is not available")
            fixed = spec.block
            size = self.group_size
            if fixed is not None:
                if size not in (None, fixed):
                    raise ValueError(f"{self.kind} uses blocks of {fixed}, got group_size={size}")
                size = fixed
            elif size is None:
                size = spec.default_block
            object.__setattr__(self, "granularity", "group")
            object.__setattr__(self, "group_size", size)
        else:
            if self.granularity not in _GRANULARITIES:
                raise ValueError(f"unknown granularity {self.granularity!r}; valid: {', '.join(_GRANULARITIES)}")
            if self.granularity not in spec.granularities:
                raise ValueError(f"{self.kind} supports granularity {', '.join(spec.granularities)}, not {self.granularity}")
            if self.granularity == "group" and self.group_size is None:
                raise ValueError("granularity 'group' needs group_size (e.g. 32, 64 or 128)")
            if self.granularity != "group" and self.group_size is not None:
                raise ValueError(f"group_size={self.group_size} given with granularity {self.granularity!r}; "
                                 "use granularity='group'")
        if self.group_size is not None and (not isinstance(self.group_size, int) or self.group_size < 1):
            raise ValueError(f"group_size must be a positive int, got {self.group_size!r}")

    @property
    def spec(self) -> FormatSpec:
        """This format's row of the format table."""
        return FORMATS[self.kind]

    @property
    def qmax(self) -> float:
        """Largest element of the symmetric grid: ``amax / qmax`` is the scale (int: 2**(n-1) - 1,
        float formats: their element maximum, nf4: 1)."""
        if self.kind == "int":
            return float(2 ** (self.bits - 1) - 1)
        return 1.0 if self.kind == "nf4" else self.spec.elem[2]

    @property
    def name(self) -> str:
        """Canonical short name; ``parse_format(fmt.name) == fmt``."""
        if self.kind == "int":
            s = f"int{self.bits}"
            if self.granularity == "group":
                s += f"_g{self.group_size}"
            elif self.granularity != "channel":
                s += f"_{self.granularity}"
            return s if self.symmetric else s + "_asym"
        if self.kind.startswith("fp8"):
            return self.kind if self.granularity == "tensor" else f"{self.kind}_{self.granularity}"
        if self.kind == "nf4" and self.group_size != self.spec.default_block:
            return f"nf4_g{self.group_size}"
        return self.kind

    def __str__(self) -> str:
        return self.name

    def bits_per_weight(self, in_features: int | None = None) -> float:
        """Storage bits per element including scale/zero overhead.

        Scales: fp16 for int, fp32 for fp8, E4M3 (8 bit) for nvfp4, E8M0 (8 bit) for MX, fp32
        absmax for nf4. Asymmetric ints add an ``bits``-wide packed zero point per group/row.
        Per-tensor scales (and the nvfp4 fp32 tensor scale) count as 0. Per-channel/token
        overhead is counted only when ``in_features`` (the row length) is given.
        Examples: int4_g64 -> 4.25, int4_g128_asym -> 4.15625, nvfp4 -> 4.5, mxfp4 -> 4.25,
        mxfp8 -> 8.25, nf4 (block 64) -> 4.5.
        """
        if self.spec.blockwise:
            return self.bits + self.spec.scale_bits / self.group_size
        overhead = self.spec.scale_bits + (0 if self.symmetric else self.bits)
        if self.granularity == "group":
            return self.bits + overhead / self.group_size
        if self.granularity in ("channel", "token") and in_features:
            return self.bits + overhead / in_features
        return float(self.bits)


@dataclass(frozen=True)
class QParams:
    """Quantization parameters, broadcastable to the grouped view of the tensor.

    Grouped view: x itself for "tensor"/"channel"/"token", ``x.reshape(*x.shape[:-1], n, g)``
    for groups/blocks. scale shapes: tensor ``[]``; channel ``[out, 1, ...]``; token
    ``[..., 1]``; group ``[..., n, 1]``. All float32.

    scale: int/fp8 scale; nvfp4 block scales (values on the E4M3 grid, before the global scale);
    MX shared scales (powers of two, exact in E8M0); nf4 block absmax.
    zero: asymmetric int only, integer-valued float32 in [0, 2**bits - 1].
    global_scale: nvfp4 only, 0-d FP32 per-tensor scale.
    """

    scale: torch.Tensor
    zero: torch.Tensor | None = None
    global_scale: torch.Tensor | None = None


# ----------------------------------------------------------------------------- parsing

_VALID_FORMS = (
    "int<n>[_g<size>|_tensor|_channel|_token][_asym|_sym] with n in 2..8 (e.g. int8, int4_g64, "
    "int4_g32_asym, int8_tensor, int8_token, int3_g64); fp8_e4m3[_tensor|_channel|_token]; "
    "fp8_e5m2[_tensor|_channel|_token]; nvfp4; mxfp4; mxfp8; nf4[_g<size>]"
)
_INT_RE = re.compile(r"int(\d+)(?:_(?:g(\d+)|(tensor|channel|token)))?(?:_(asym|sym))?")
_FP8_RE = re.compile(r"(fp8_e4m3|fp8_e5m2)(?:_(tensor|channel|token))?")
_NF4_RE = re.compile(r"nf4(?:_g(\d+))?")


def parse_format(s: str | QFormat) -> QFormat:
    """Parse a short format name (see ``QFormat.name``); a QFormat is returned unchanged.

    Defaults: ints are per-channel symmetric, fp8 is per-tensor, nf4 uses blocks of 64.
    """
    if isinstance(s, QFormat):
        return s
    if not isinstance(s, str):
        raise TypeError(f"format must be a str or QFormat, got {type(s).__name__}")
    t = s.strip().lower()
    try:
        if m := _INT_RE.fullmatch(t):
            bits, g, gran, sym = m.groups()
            return QFormat("int", int(bits), symmetric=sym != "asym",
                           granularity="group" if g else (gran or "channel"),
                           group_size=int(g) if g else None)
        if m := _FP8_RE.fullmatch(t):
            return QFormat(m.group(1), 8, granularity=m.group(2) or "tensor")
        if m := _NF4_RE.fullmatch(t):
            return QFormat("nf4", 4, group_size=int(m.group(1)) if m.group(1) else None)
        if t in ("nvfp4", "mxfp4", "mxfp8"):
            return QFormat(t, FORMATS[t].bits)
    except ValueError as e:
        raise ValueError(f"invalid format {s!r}: {e}") from None
    raise ValueError(f"unknown format {s!r}; valid forms: {_VALID_FORMS}")


# ----------------------------------------------------------------------------- element grids


def _exp2i(e: torch.Tensor) -> torch.Tensor:
    """Exact float32 2**e for integer tensor e in [-149, 127], built from the bit pattern."""
    e = e.to(torch.int32)
    normal = (e + 127).clamp(min=1) << 23
    sub = torch.ones_like(e) << (e + 149).clamp(0, 22)
    return torch.where(e >= -126, normal, sub).view(torch.float32)


# Minifloats torch has as dtypes (sign/ebits/mbits/max): round_minifloat casts to them (tests/test_formats.py checks the
# cast equals the arithmetic rounding below on every float32 pattern class: ties, subnormals, saturation, NaN).
_NATIVE_FP8 = {(4, 3, 448.0): torch.float8_e4m3fn, (5, 2, 57344.0): torch.float8_e5m2}


@functools.cache
def _fp8_values(dtype: torch.dtype) -> torch.Tensor:
    """The float32 value of each of the 256 codes of a float8 dtype (NaN codes included)."""
    return torch.arange(256, dtype=torch.uint8).view(dtype).float()


def _widen_fp8(q: torch.Tensor) -> torch.Tensor:
    """float8 -> float32. On a CPU torch widens float8 element by element; a table of the 256 codes' values is 1.6x
    faster on SmolLM2's weight shapes (1.1 against 1.8 ms per 885K elements, 2 threads)."""
    if q.device.type != "cpu":
        return q.float()
    return torch.take(_fp8_values(q.dtype), q.view(torch.uint8).long())


def round_minifloat(v: torch.Tensor, ebits: int, mbits: int, fmax: float) -> torch.Tensor:
    """Round float32 ``v`` to the nearest value of a sign/ebits/mbits minifloat (IEEE-style bias,
    subnormals), ties to even mantissa, saturating to ``[-fmax, fmax]`` (inf saturates, NaN stays).

    Exact: values are scaled by powers of two only, so ``torch.round`` (half to even) on the
    scaled magnitude is the only rounding.
    """
    native = _NATIVE_FP8.get((ebits, mbits, fmax))
    if native is not None and v.dtype == torch.float32 and not v.requires_grad and not torch.compiler.is_compiling():
        # torch's own cast: the same values at a fraction of the time (eager, no autograd: round() has no gradient,
        # a cast would pass one)
        return _widen_fp8(v.clamp(-fmax, fmax).to(native))
    emin = 2 - 2 ** (ebits - 1)  # 1 - bias
    grad = v.requires_grad and torch.is_grad_enabled()
    a = v.abs().clamp(max=fmax) if grad else v.abs().clamp_(max=fmax)
    # the grid step of a's binade: 2**floor(log2 a) is a's float32 exponent bits alone (0 for 0 and float32
    # subnormals, inf for NaN, which stays NaN below); the minifloat's subnormals share the step of its binade emin
    step = (a.detach().view(torch.int32) & 0x7F800000).view(torch.float32).clamp_(min=2.0**emin).mul_(2.0**-mbits)
    if grad:
        return torch.copysign(torch.round(a / step) * step, v)
    return a.div_(step).round_().mul_(step).copysign_(v)  # in place: two fresh tensors instead of a dozen


def _nf4_codebook(device: torch.device) -> torch.Tensor:
    return torch.tensor(NF4_CODEBOOK, dtype=torch.float32, device=device)


def _nf4_index(v: torch.Tensor) -> torch.Tensor:
    """Index of the nearest NF4 codebook entry (ties to the lower entry; saturates outside [-1, 1])."""
    cb = _nf4_codebook(v.device)
    mid = (cb[:-1] + cb[1:]) / 2
    return torch.bucketize(v.contiguous(), mid, right=False)


def _int_range(fmt: QFormat) -> tuple[int, int]:
    if fmt.symmetric:
        return -(2 ** (fmt.bits - 1)), 2 ** (fmt.bits - 1) - 1
    return 0, 2**fmt.bits - 1


def round_to_grid(v: torch.Tensor, fmt: QFormat | str) -> torch.Tensor:
    """Round already-scaled values onto the format's element grid (float32 result).

    int: ``clamp(round(v), qmin, qmax)`` (asymmetric: ``v`` must already include the zero point);
    fp8/nvfp4/mx: minifloat RNE with saturation; nf4: nearest codebook value (``v`` = x / absmax).
    """
    fmt = parse_format(fmt)
    v = v.to(torch.float32)
    if fmt.kind == "int":
        lo, hi = _int_range(fmt)
        return torch.round(v).clamp(lo, hi)
    if fmt.kind == "nf4":
        return _nf4_codebook(v.device)[_nf4_index(v)]
    return round_minifloat(v, *fmt.spec.elem)


# ----------------------------------------------------------------------------- layout


def _divisor_hint(dim: int, g: int) -> str:
    ok = [c for c in (256, 128, 64, 32, 16, 8) if c < g and dim % c == 0][:2]
    return f"use {' or '.join(map(str, ok))}, or " if ok else ""


def _grouped(x: torch.Tensor, fmt: QFormat) -> torch.Tensor:
    """float32 grouped view of x (see QParams)."""
    xf = x.to(torch.float32)
    gran = fmt.granularity
    if gran == "channel" and xf.dim() < 2:
        raise ValueError(f"per-channel {fmt.name} needs a tensor with >= 2 dims (dim 0 = output channels), "
                         f"got shape {list(x.shape)}; use per-tensor granularity for 1-D tensors")
    if gran in ("token", "group") and xf.dim() < 1:
        raise ValueError(f"{fmt.name} needs a tensor with >= 1 dim, got a scalar")
    if gran != "group":
        return xf
    g, n = fmt.group_size, xf.shape[-1]
    if n % g:
        what = "block size" if fmt.kind in ("nvfp4", "mxfp4", "mxfp8") else "group size"
        fix = (f"{_divisor_hint(n, g)}keep this tensor in a higher-precision format, or pad it explicitly"
               if fmt.kind in ("int", "nf4") else "keep this tensor in another format, or pad it explicitly")
        raise ValueError(f"{fmt.name}: {what} {g} does not divide input dimension {n}; {fix} "
                         f"(tensor shape {list(x.shape)})")
    return xf.reshape(*xf.shape[:-1], n // g, g)


def _reduce(t: torch.Tensor, fmt: QFormat, op: str) -> torch.Tensor:
    f = getattr(torch, op)
    if fmt.granularity == "tensor":
        return f(t)
    if fmt.granularity == "channel":
        return f(t, dim=tuple(range(1, t.dim())), keepdim=True)
    return f(t, dim=-1, keepdim=True)


def _stat_like(xg: torch.Tensor, fmt: QFormat) -> torch.Tensor:
    """An empty tensor of ``_reduce``'s result shape: the statistics shape, without reading ``xg``."""
    if fmt.granularity == "tensor":
        shape = ()
    elif fmt.granularity == "channel":
        shape = (xg.shape[0],) + (1,) * (xg.dim() - 1)
    else:
        shape = (*xg.shape[:-1], 1)
    return torch.empty(shape, dtype=torch.float32, device=xg.device)


def _as_stat(v, ref: torch.Tensor, what: str) -> torch.Tensor:
    """Bring a range override to the statistics shape of ``ref``."""
    t = torch.as_tensor(v, dtype=torch.float32, device=ref.device)
    if t.shape == ref.shape:
        return t
    if t.numel() == ref.numel() and t.numel() > 1:
        return t.reshape(ref.shape)
    try:
        return torch.broadcast_to(t, ref.shape).clone()
    except RuntimeError:
        raise ValueError(f"{what} override of shape {list(t.shape)} does not fit the statistics shape "
                         f"{list(ref.shape)}") from None


def max_abs(xg: torch.Tensor, fmt: QFormat) -> torch.Tensor:
    """max |x| per statistics cell, from the largest and the smallest value (no copy of |x|: one fewer pass)."""
    return torch.maximum(_reduce(xg, fmt, "amax"), -_reduce(xg, fmt, "amin"))


def _nonzero(s: torch.Tensor) -> torch.Tensor:
    return torch.where(s == 0, torch.ones_like(s), s)


# ----------------------------------------------------------------------------- public API


@torch.no_grad()
def compute_qparams(
    x: torch.Tensor,
    fmt: QFormat | str,
    *,
    amax=None,
    xmin=None,
    xmax=None,
    global_amax=None,
) -> QParams:
    """Scales (and zero point / global scale) for quantizing ``x`` in ``fmt``.

    ``amax`` (symmetric formats) or ``xmin``/``xmax`` (asymmetric int) override the observed
    range, e.g. with clipped ranges from a calibration search; they must broadcast to (or have
    as many elements as) the statistics shape described in ``QParams``. For symmetric formats
    ``xmin``/``xmax`` are turned into ``amax = max(|xmin|, |xmax|)``; for asymmetric ints
    ``amax`` means the range ``[-amax, amax]``. ``global_amax`` (nvfp4 only) overrides the
    tensor-level amax that sets the FP32 global scale (default: max of the block amaxes).
    """
    fmt = parse_format(fmt)
    if amax is not None and (xmin is not None or xmax is not None):
        raise ValueError("pass either amax or xmin/xmax, not both")
    if global_amax is not None and fmt.kind != "nvfp4":
        raise ValueError(f"global_amax applies to nvfp4 only, not {fmt.name}")
    xg = _grouped(x, fmt)
    ref = _stat_like(xg, fmt)  # the shape an override is brought to; the observed range is read only when needed

    if fmt.kind == "int" and not fmt.symmetric:
        if amax is not None:
            a = _as_stat(amax, ref, "amax").abs()
            lo, hi = -a, a
        else:
            lo = _reduce(xg, fmt, "amin") if xmin is None else _as_stat(xmin, ref, "xmin")
            hi = _reduce(xg, fmt, "amax") if xmax is None else _as_stat(xmax, ref, "xmax")
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)
        qmax = 2**fmt.bits - 1
        scale = _nonzero((hi - lo) / qmax)
        zero = torch.round(-lo / scale).clamp(0, qmax)
        return QParams(scale=scale, zero=zero)

    observed = None if amax is not None or (xmin is not None and xmax is not None) else max_abs(xg, fmt)
    if amax is not None:
        a = _as_stat(amax, ref, "amax").abs()
    elif xmin is not None or xmax is not None:
        lo = observed if xmin is None else _as_stat(xmin, ref, "xmin").abs()
        hi = observed if xmax is None else _as_stat(xmax, ref, "xmax").abs()
        a = torch.maximum(lo, hi)
    else:
        a = observed

    if fmt.spec.scale in ("f16", "f32"):  # int, fp8, nf4: scale = amax / qmax
        return QParams(scale=_nonzero(a / fmt.qmax))
    if fmt.kind == "nvfp4":
        g_amax = a.amax() if global_amax is None else torch.as_tensor(
            global_amax, dtype=torch.float32, device=a.device).reshape(())
        global_scale = _nonzero(g_amax / (FP4_E2M1_MAX * FP8_E4M3_MAX))
        block = round_minifloat(a / FP4_E2M1_MAX / global_scale, *_E4M3)
        return QParams(scale=block, global_scale=global_scale)
    # MX: shared power-of-two scale, OCP MX v1.0 section 6.3.
    emax_elem = fmt.spec.emax
    _, ex = torch.frexp(a)
    shared = torch.where(a > 0, ex - 1 - emax_elem, torch.full_like(ex, -127)).clamp(-127, 127)
    return QParams(scale=_exp2i(shared))


def _check_qp(fmt: QFormat, qp: QParams) -> None:
    if fmt.kind == "int" and not fmt.symmetric and qp.zero is None:
        raise ValueError(f"{fmt.name} needs QParams.zero")
    if fmt.kind == "nvfp4" and qp.global_scale is None:
        raise ValueError("nvfp4 needs QParams.global_scale")


def _eff_scale(fmt: QFormat, qp: QParams) -> torch.Tensor:
    return qp.scale * qp.global_scale if fmt.kind == "nvfp4" else qp.scale


@torch.no_grad()
def quantize(x: torch.Tensor, fmt: QFormat | str, qp: QParams) -> torch.Tensor:
    """Codes of ``x`` (same shape as x).

    int: int8 codes (symmetric) or uint8 codes (asymmetric); nf4: uint8 codebook indices;
    fp8/nvfp4/mx: float32 element values on the element grid (unscaled; exactly representable,
    so e.g. ``.to(torch.float8_e4m3fn)`` is lossless).
    """
    fmt = parse_format(fmt)
    _check_qp(fmt, qp)
    xg = _grouped(x, fmt)
    if fmt.kind == "int":
        v = xg / qp.scale
        if not fmt.symmetric:
            v = torch.round(v) + qp.zero
        q = round_to_grid(v, fmt).to(torch.int8 if fmt.symmetric else torch.uint8)
    elif fmt.kind == "nf4":
        q = _nf4_index(xg / qp.scale).to(torch.uint8)
    else:
        s = _eff_scale(fmt, qp)
        q = round_to_grid(xg / _nonzero(s), fmt)
        if fmt.kind == "nvfp4":  # a block scale that is 0 in E4M3 decodes to 0
            q = torch.where(s == 0, torch.zeros_like(q), q)
    return q.reshape(x.shape)


def dequantize(q: torch.Tensor, fmt: QFormat | str, qp: QParams) -> torch.Tensor:
    """Decode codes from ``quantize`` to float32 values (same shape as q)."""
    fmt = parse_format(fmt)
    _check_qp(fmt, qp)
    if fmt.kind == "nf4":
        qg = _grouped(_nf4_codebook(q.device)[q.long()], fmt)
    else:
        qg = _grouped(q, fmt)
    if fmt.kind == "int" and not fmt.symmetric:
        out = (qg - qp.zero) * qp.scale
    elif fmt.kind == "nvfp4":
        out = (qg * qp.scale) * qp.global_scale
    else:
        out = qg * qp.scale
    return out.reshape(q.shape)


def fake_quantize(x: torch.Tensor, fmt: QFormat | str, qp: QParams | None = None) -> torch.Tensor:
    """``dequantize(quantize(x))`` in x's dtype and shape; ``qp`` is computed from x when None.

    Not differentiable (use ``fake_quantize_ste`` for training).
    """
    fmt = parse_format(fmt)
    if qp is None:
        qp = compute_qparams(x, fmt)
    with torch.no_grad():
        if fmt.kind == "int":
            return _fake_quantize_int(x, fmt, qp)
        native = _NATIVE_FP8.get(fmt.spec.elem) if fmt.kind not in ("nf4", "nvfp4") else None
        if native is not None:
            return _fake_quantize_fp8(x, fmt, qp, native)
        return dequantize(quantize(x, fmt, qp), fmt, qp).to(x.dtype)


def _fake_quantize_int(x: torch.Tensor, fmt: QFormat, qp: QParams) -> torch.Tensor:
    """``dequantize(quantize(x))`` for int formats in one float32 buffer, in place: the same operations on the same
    values (codes are exact in float32), so the same bits, in a third of the memory passes (round to nearest on
    SmolLM2 is memory-bound: 0.9 s of passes over 106M weights on 2 cores before this)."""
    _check_qp(fmt, qp)
    lo, hi = _int_range(fmt)
    v = torch.div(_grouped(x, fmt), qp.scale)
    if fmt.symmetric:
        v.round_().clamp_(lo, hi)
    else:
        v.round_().add_(qp.zero).clamp_(lo, hi).sub_(qp.zero)
    return v.mul_(qp.scale).reshape(x.shape).to(x.dtype)


def _fake_quantize_fp8(x: torch.Tensor, fmt: QFormat, qp: QParams, native: torch.dtype) -> torch.Tensor:
    """``dequantize(quantize(x))`` for the formats whose elements torch has as a float8 dtype (fp8, mxfp8): the
    same division, saturation and cast as ``quantize``, the codes widened and scaled in place as
    ``dequantize`` scales them: the same bits with two fresh float32 tensors instead of five."""
    _check_qp(fmt, qp)
    fmax = fmt.spec.elem[2]
    v = torch.div(_grouped(x, fmt), _nonzero(qp.scale)).clamp_(-fmax, fmax)
    v = _widen_fp8(v.to(native)).mul_(qp.scale)
    return v.reshape(x.shape).to(x.dtype)


def _clip_bounds(fmt: QFormat, qp: QParams) -> tuple[torch.Tensor, torch.Tensor]:
    """Representable [lo, hi] per group, in the grouped statistics shape."""
    if fmt.kind == "int":
        lo, hi = _int_range(fmt)
        if fmt.symmetric:
            return lo * qp.scale, hi * qp.scale
        return (lo - qp.zero) * qp.scale, (hi - qp.zero) * qp.scale
    s = _eff_scale(fmt, qp)
    return -fmt.qmax * s, fmt.qmax * s


class _RoundSTE(torch.autograd.Function):
    """Forward: ``fn(v)`` exactly. Backward: identity (straight-through, Bengio et al. 2013)."""

    @staticmethod
    def forward(ctx, v, fn):  # noqa: D102
        return fn(v)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        return grad, None


def fake_quantize_with(x: torch.Tensor, fmt: QFormat, scale: torch.Tensor, zero: torch.Tensor | None = None,
                       global_scale: torch.Tensor | None = None, *, ste: bool = False) -> torch.Tensor:
    """Fake-quantize ``x`` with given scales that broadcast to it (a grouped view, or one column
    with its rows' scales): the values of ``dequantize(quantize(x))``, float32.

    ``ste=True`` makes it differentiable in ``x`` and the scales: rounding passes gradients
    straight through, clipping passes none for values outside the representable range, and a
    scale gets the LSQ gradient (Esser et al. 2020): ``round(v) - v`` inside the range, the
    clipping bound outside. GPTQ (no ste) and QAT (ste) both use this one definition.
    """
    def rnd(v, fn):
        return _RoundSTE.apply(v, fn) if ste else fn(v)

    if fmt.kind == "int":
        lo, hi = _int_range(fmt)
        if zero is not None:  # asymmetric codes round(v) + zero in [0, 2^n - 1]
            lo, hi = -zero, hi - zero
        return rnd(torch.clamp(x / scale, lo, hi), torch.round) * scale
    top = fmt.qmax
    if fmt.kind == "nf4":
        return rnd(torch.clamp(x / scale, -top, top), lambda v: round_to_grid(v, fmt)) * scale
    s = scale * global_scale if fmt.kind == "nvfp4" else scale
    q = rnd(torch.clamp(x / _nonzero(s), -top, top), lambda v: round_to_grid(v, fmt))
    if fmt.kind == "nvfp4":  # a block scale that is 0 in E4M3 decodes to 0
        return (torch.where(s == 0, torch.zeros_like(q), q) * scale) * global_scale
    return q * s


def fake_quantize_lsq(x: torch.Tensor, fmt: QFormat, scale: torch.Tensor, zero: torch.Tensor | None = None,
                      global_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Differentiable ``fake_quantize(x, fmt, QParams(scale, zero, global_scale))`` (bit-identical
    forward; see ``fake_quantize_with(ste=True)``), in x's dtype and shape."""
    out = fake_quantize_with(_grouped(x, fmt), fmt, scale, zero, global_scale, ste=True)
    return out.reshape(x.shape).to(x.dtype)


def _pow2_floor(s: torch.Tensor) -> torch.Tensor:
    _, ex = torch.frexp(s)
    return torch.where(s > 0, _exp2i((ex - 1).clamp(-127, 127)), s)


def project_scale(fmt: QFormat, scale: torch.Tensor) -> torch.Tensor:
    """Project a (learned) scale onto the values the format stores, straight-through: E4M3 for
    NVFP4 block scales, a power of two (E8M0) for MX; float scales are returned unchanged."""
    if fmt.spec.scale == "e4m3":
        return _RoundSTE.apply(scale, lambda t: round_minifloat(t, *_E4M3))
    if fmt.spec.scale == "e8m0":
        return _RoundSTE.apply(scale, _pow2_floor)
    return scale


class _STE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, mask):  # noqa: D102
        ctx.save_for_backward(mask)
        return y

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        (mask,) = ctx.saved_tensors
        return grad * mask, None, None


def fake_quantize_and_mask(x: torch.Tensor, fmt: QFormat, qp: QParams | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``fake_quantize(x, fmt, qp)`` and the mask of values inside their group's representable range.

    A pure tensor function (no autograd), so ``torch.compile`` can fuse it (QAT does).
    """
    if qp is None:
        qp = compute_qparams(x, fmt)
    y = dequantize(quantize(x, fmt, qp), fmt, qp).to(x.dtype)
    lo, hi = _clip_bounds(fmt, qp)
    xg = _grouped(x, fmt)
    return y, ((xg >= lo) & (xg <= hi)).reshape(x.shape).to(x.dtype)


def fake_quantize_ste(x: torch.Tensor, fmt: QFormat | str, qp: QParams | None = None, *, kernel=None) -> torch.Tensor:
    """Fake quantization with a clipped straight-through estimator.

    Forward: exactly ``fake_quantize(x, fmt, qp)``. Backward: d out / d x is 1 where x lies in
    its group's representable range (bounds included) and 0 outside (clipped values). No
    gradient flows to the scales (``qp`` is treated as a constant). ``kernel``: a compiled
    ``fake_quantize_and_mask`` to use instead of the eager one.
    """
    fmt = parse_format(fmt)
    with torch.no_grad():
        y, mask = (kernel or fake_quantize_and_mask)(x.detach(), fmt, qp)
    return _STE.apply(x, y, mask)


# ----------------------------------------------------------------------------- packing

_E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
_E2M1_INDEX = torch.zeros(13, dtype=torch.uint8).index_put_(
    (torch.tensor([int(2 * v) for v in _E2M1_VALUES]),), torch.arange(8, dtype=torch.uint8))


def _pack4(u: torch.Tensor) -> torch.Tensor:
    u = u.to(torch.uint8).reshape(-1)
    if u.numel() % 2:
        u = torch.cat([u, u.new_zeros(1)])
    return (u[0::2] | (u[1::2] << 4)).contiguous()


def _unpack4(p: torch.Tensor, n: int) -> torch.Tensor:
    return torch.stack([p & 0xF, p >> 4], dim=1).reshape(-1)[:n]


def pack_codes(codes: torch.Tensor, fmt: QFormat) -> tuple[torch.Tensor, str]:
    """Storage tensor and packing name for the codes returned by ``quantize``: 8-bit ints as
    int8/uint8; ints of 4 bits or fewer and NF4 indices as two 4-bit codes per byte (``u4x2``);
    E2M1 values as sign + 3-bit magnitude index, two per byte (``e2m1x2``); FP8 elements as float8."""
    packing = fmt.spec.packing
    if packing == "int":
        if fmt.bits <= 4:
            off = 2 ** (fmt.bits - 1) if fmt.symmetric else 0
            return _pack4(codes.to(torch.int16) + off), "u4x2"
        return codes.contiguous(), "int8" if fmt.symmetric else "uint8"
    if packing == "u4x2":
        return _pack4(codes), "u4x2"
    if packing == "e2m1x2":
        # twice an E2M1 magnitude is an integer in 0..12: a 13-entry table gives its index (codes are on the grid)
        twice = (codes.abs().reshape(-1) * 2).nan_to_num_(0.0).clamp_(0, 12).long()
        mag = torch.take(_E2M1_INDEX.to(codes.device), twice)
        sign = (codes.reshape(-1) < 0).to(torch.uint8) << 3
        return _pack4(mag | sign), "e2m1x2"
    dt = torch.float8_e5m2 if fmt.kind == "fp8_e5m2" else torch.float8_e4m3fn
    return codes.to(dt).contiguous(), "float8"


def unpack_codes(stored: torch.Tensor, packing: str, fmt: QFormat, shape: list[int]) -> torch.Tensor:
    """Inverse of ``pack_codes``: the codes ``quantize`` returned, in ``shape``."""
    n = 1
    for s in shape:
        n *= s
    if packing == "u4x2":
        u = _unpack4(stored, n).to(torch.int16)
        if fmt.kind == "int":
            return (u - (2 ** (fmt.bits - 1) if fmt.symmetric else 0)).to(torch.int8 if fmt.symmetric else torch.uint8).reshape(shape)
        return u.to(torch.uint8).reshape(shape)
    if packing == "e2m1x2":
        u = _unpack4(stored, n)
        val = torch.tensor(_E2M1_VALUES, device=stored.device)[(u & 7).long()]
        return torch.where((u & 8) > 0, -val, val).reshape(shape)
    if packing == "float8":
        return stored.float().reshape(shape)
    return stored.reshape(shape)
