"""Trainable fake quantization: the quantizer modules QAT swaps in.

The math is the format table's (`formats.fake_quantize_lsq`: exactly the values of
`formats.fake_quantize`, so a folded weight equals what training saw, but differentiable in the
weight and the scales, with the LSQ scale gradient of Esser et al. 2020).

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

from ..quantization.formats import QParams, fake_quantize_and_mask, fake_quantize_lsq, fake_quantize_ste, project_scale
from ..quantization.modules import TensorQuantizer


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
            s = project_scale(self.fmt, s * torch.exp(self.scale_mult * self.log_scale))
        return QParams(s, self.qat_zero, self.qat_global_scale)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if self.fmt is None:
            return w
        qp = self.current_qparams()
        fn = compiled("lsq") if getattr(self, "compiled", False) else fake_quantize_lsq
        return fn(w, self.fmt, qp.scale, qp.zero, qp.global_scale)

    def extra_repr(self) -> str:
        return super().extra_repr() + (", learned scales" if self.log_scale is not None else ", fixed scales") + ", QAT"
