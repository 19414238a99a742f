"""Trainable fake quantization: straight-through rounding and learnable scales (LSQ).

`fake_quantize_lsq(x, fmt, scale, zero, global_scale)` computes exactly the values of
`formats.fake_quantize(x, fmt, QParams(scale, zero, global_scale))` (same operations in the same
order, so a folded weight equals what training saw), but is differentiable in both `x` and `scale`:
rounding onto the element grid passes gradients straight through (Bengio et al. 2013), clipping
passes none for values outside the representable range, and the scale gets the LSQ gradient
(Esser et al. 2020, "Learned Step Size Quantization"): ``round(v) - v`` inside the range, the
clipping bound outside.

`QATQuantizer` is the in-place class swap of a weight `TensorQuantizer` used during training: the
calibrated scales live in buffers (so checkpoints restore them exactly), and with learnable scales
a parameter ``log_scale`` (one per scale) sets ``scale = scale0 * exp(k * log_scale)``.
`QATActQuantizer` is the same swap for activation and KV-cache quantizers (straight-through).

Fused kernels: the fake-quantization math is a chain of a dozen elementwise operations per tensor
(NVFP4: frexp, exp2, round, clamp, where ...), which eager PyTorch runs one pass at a time. With
``compiled=True`` both quantizers run it through `torch.compile` (inductor fuses the chain into one
loop, forward and backward); the values are bit-identical to the eager path (tests check it), and an
NVFP4 training step on SmolLM2-135M runs 1.5x faster on this CPU (bench/qat_speed.py).
"""

from __future__ import annotations

import functools
import warnings

import torch
from torch import nn

from ..quantization.formats import (_E4M3, QFormat, QParams, _elem, _exp2i, _grouped, _int_range, _nf4_codebook, _nf4_index,
                                    fake_quantize_and_mask, fake_quantize_ste, round_minifloat)
from ..quantization.modules import TensorQuantizer


class _RoundSTE(torch.autograd.Function):
    """Forward: `fn(v)` exactly. Backward: identity (straight-through)."""

    @staticmethod
    def forward(ctx, v, fn):  # noqa: D102
        return fn(v)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        return grad, None


def _round_int(v):
    return torch.round(v)


def _nf4_values(v):
    return _nf4_codebook(v.device)[_nf4_index(v)]


def _element_grid(fmt: QFormat):
    """(rounding function on scaled values, representable bound) of a format's elements."""
    if fmt.kind == "nf4":
        return _nf4_values, 1.0
    ebits, mbits, fmax = _elem(fmt)
    return (lambda v: round_minifloat(v, ebits, mbits, fmax)), fmax


def effective_scale(fmt: QFormat, scale: torch.Tensor) -> torch.Tensor:
    """Project a (learned) scale onto the values the format can store, straight-through.

    NVFP4 block scales are E4M3 numbers and MX scales powers of two (E8M0); int, fp8 and nf4 scales
    are stored as float32 and need no projection.
    """
    if fmt.kind == "nvfp4":
        return _RoundSTE.apply(scale, lambda s: round_minifloat(s, *_E4M3))
    if fmt.kind in ("mxfp4", "mxfp8"):
        def pow2(s):
            _, ex = torch.frexp(s)
            return torch.where(s > 0, _exp2i((ex - 1).clamp(-127, 127)), s)
        return _RoundSTE.apply(scale, pow2)
    return scale


def fake_quantize_lsq(x: torch.Tensor, fmt: QFormat, scale: torch.Tensor, zero: torch.Tensor | None = None,
                      global_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Differentiable fake quantization of `x` with the given scales (see the module docstring)."""
    xg = _grouped(x, fmt)
    if fmt.kind == "int":
        lo, hi = _int_range(fmt)
        s = scale
        if zero is not None:  # asymmetric: codes round(v) + zero in [0, 2^n - 1], i.e. round(v) in [-zero, 2^n - 1 - zero]
            lo, hi = -zero, hi - zero
        v = torch.clamp(xg / s, lo, hi)
        out = _RoundSTE.apply(v, _round_int) * s
    elif fmt.kind == "nf4":
        rnd, top = _element_grid(fmt)
        v = torch.clamp(xg / scale, -top, top)
        out = _RoundSTE.apply(v, rnd) * scale
    else:
        rnd, top = _element_grid(fmt)
        s = scale * global_scale if fmt.kind == "nvfp4" else scale
        v = torch.clamp(xg / _nonzero_ste(s), -top, top)
        q = _RoundSTE.apply(v, rnd)
        if fmt.kind == "nvfp4":
            q = torch.where(s == 0, torch.zeros_like(q), q)
            out = (q * scale) * global_scale
        else:
            out = q * s
    return out.reshape(x.shape).to(x.dtype)


def _nonzero_ste(s: torch.Tensor) -> torch.Tensor:
    """`formats._nonzero` (a zero scale divides as 1) keeping the gradient of non-zero scales."""
    return torch.where(s == 0, torch.ones_like(s), s)


@functools.cache
def compiled(name: str):
    """The torch.compile'd version of one of this module's functions (compiled on first call, per shape)."""
    import torch._dynamo

    # Static shapes: kernels specialised to each shape, and a model has only a handful of weight and activation
    # shapes per format (a cache of 64 leaves room for several formats).
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    return torch.compile({"lsq": fake_quantize_lsq, "act": fake_quantize_and_mask}[name], dynamic=False)


@functools.cache
def compile_works(device_type: str = "cpu") -> bool:
    """Whether torch.compile can build kernels here (on CPU it needs a C++ compiler); tried once."""
    try:
        fn = torch.compile(lambda t: torch.round(t * 3.0) + 1.0)
        dev = torch.device(device_type)
        return bool(torch.equal(fn(torch.ones(4, device=dev)), torch.full((4,), 4.0, device=dev)))
    except Exception as e:  # noqa: BLE001 - any failure means "cannot compile here"
        warnings.warn(f"torch.compile does not work on this machine ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                      "QAT runs its fake quantization eagerly, up to 1.5x slower per step (install a C++ compiler, e.g. g++)",
                      stacklevel=2)
        return False


class QATActQuantizer(TensorQuantizer):
    """An activation / KV-cache quantizer during QAT: the scheme's fake quantization with a clipped
    straight-through gradient (`formats.fake_quantize_ste`), optionally through fused kernels."""

    def fake_quantize(self, x: torch.Tensor, qp: QParams | None) -> torch.Tensor:
        if not self.compiled:
            return super().fake_quantize(x, qp)
        return fake_quantize_ste(x, self.fmt, qp, kernel=compiled("act"))


class QATQuantizer(TensorQuantizer):
    """A weight quantizer during QAT: fake-quantizes the latent float weight with fixed or learned scales.

    Buffers ``qat_scale`` / ``qat_zero`` / ``qat_global_scale`` hold the calibrated QParams (zero
    points and the NVFP4 tensor scale stay fixed). With ``learn_scales`` the parameter
    ``log_scale`` (zeros at the start) gives ``scale = qat_scale * exp(scale_mult * log_scale)``:
    Adam moves every parameter by about ``lr`` per step whatever its gradient's size, so the
    multiplier gives the log-scales their own effective learning rate (``scale_mult * lr``) within
    the trainer's single parameter group.
    """

    def start_qat(self, learn_scales: bool, scale_mult: float, compiled: bool = False) -> None:
        qp = self.qparams
        self.register_buffer("qat_scale", qp.scale.detach().float().clone())
        self.register_buffer("qat_zero", None if qp.zero is None else qp.zero.detach().float().clone())
        self.register_buffer("qat_global_scale", None if qp.global_scale is None else qp.global_scale.detach().float().clone())
        self.scale_mult = float(scale_mult)
        self.log_scale = nn.Parameter(torch.zeros_like(self.qat_scale)) if learn_scales else None
        self.folded = False
        self.ste = True
        self.compiled = compiled

    def current_qparams(self) -> QParams:
        """The scales the forward uses now (learned ones projected onto the format's scale grid)."""
        s = self.qat_scale
        if self.log_scale is not None:
            s = effective_scale(self.fmt, s * torch.exp(self.scale_mult * self.log_scale))
        return QParams(s, self.qat_zero, self.qat_global_scale)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if self.fmt is None:
            return w
        qp = self.current_qparams()
        fn = compiled("lsq") if getattr(self, "compiled", False) else fake_quantize_lsq
        return fn(w, self.fmt, qp.scale, qp.zero, qp.global_scale)

    def extra_repr(self) -> str:
        return super().extra_repr() + (", learned scales" if self.log_scale is not None else ", fixed scales") + ", QAT"
