"""W8A8: int8 per-output-channel weights and int8 activations (symmetric, per token and dynamic, or
one static per-tensor scale). `torch._int_mm(x_int8 [M, in], w_int8.T [in, out])` accumulates in
int32 (exact), then `* x_scale * w_scale` in float32. Activation scales and codes come from the
format table (`leanlm.quantization.formats`, ``int8_token`` / ``int8_tensor``)."""

from __future__ import annotations

import torch
from torch import nn

from ...quantization.formats import QParams, compute_qparams, parse_format, quantize

_PER_TOKEN = parse_format("int8_token")
_PER_TENSOR = parse_format("int8_tensor")


class W8A8Weight(nn.Module):
    fallback: str | None = None

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, static_amax: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("qweight", codes.to(torch.int8).contiguous())
        self.register_buffer("scale", scale.reshape(1, -1).float().contiguous())
        self.register_buffer("x_scale", None if static_amax is None else
                             compute_qparams(static_amax.float().reshape(1), _PER_TENSOR).scale)
        self.out_features, self.in_features = self.qweight.shape

    @classmethod
    def from_float(cls, w: torch.Tensor, dtype: torch.dtype) -> "W8A8Weight":
        from .int8 import int8_rtn

        return cls(*int8_rtn(w), dtype)

    def for_device(self, device: torch.device) -> None:
        if device.type != "cpu":
            from ...core.errors import LeanLMError

            raise LeanLMError(f"w8a8 weights run on the CPU only (torch._int_mm's {device.type} kernel takes no small batches); "
                              "use int8 or int4 weight-only formats there")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).float()
        fmt, qp = (_PER_TOKEN, compute_qparams(x2, _PER_TOKEN)) if self.x_scale is None else (_PER_TENSOR, QParams(self.x_scale))
        s = qp.scale
        q = quantize(x2, fmt, qp)
        y = torch._int_mm(q, self.qweight.t()).float() * s * self.scale
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def dequantize(self) -> torch.Tensor:
        return self.qweight.float() * self.scale.reshape(-1, 1)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        return self.qweight[ids].float() * self.scale.reshape(-1)[ids].unsqueeze(-1)
