"""int8 per-output-channel symmetric weights, activations in bfloat16 (or float32):
`torch.ops.aten._weight_int8pack_mm(x, w_int8 [out, in], scales [out])` = x @ (w * s).T; a batch-1 call
(one activation row) runs the fused kernel of `leanlm.runtime.kernels` on the same codes and scales when it
is built (bfloat16 scales; the opt-in int8-activation kernel also needs in_features a multiple of 32), and so do
up to `kernels.MAX_ROWS` rows (row by row, each as a one-row call computes it). That kernel reads its own tiled copy
of the codes (`tiled`, `kernels.tile8`: 16 rows interleaved per 64 bytes, one linear stream per thread) where
out_features % 16 == 0 and in_features % 4 == 0; `qweight` stays for PyTorch's kernel (prefill), lookups and export,
so the codes sit in memory twice, as the int4 layout's do. On CUDA
the codes are converted to the activation dtype inside the matmul (x @ w.T * s: the same product)."""

from __future__ import annotations

import torch
from torch import nn

from .. import kernels


def int8_rtn(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest int8 codes and per-channel scales of a float weight (leanlm's ``int8`` format)."""
    from ...quantization.formats import compute_qparams, quantize

    qp = compute_qparams(w.float(), "int8")
    return quantize(w.float(), "int8", qp), qp.scale


class Int8Weight(nn.Module):
    fallback: str | None = None

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype):
        super().__init__()
        self.register_buffer("qweight", codes.to(torch.int8).contiguous())
        self.register_buffer("scale", scale.reshape(-1).to(dtype).contiguous())
        self.out_features, self.in_features = self.qweight.shape
        self.fast = dtype == torch.bfloat16 and kernels.available()
        self.q8 = self.fast and kernels.mode() == "q8"
        self.fast = self.fast and (self.in_features % 32 == 0 or not self.q8)
        tile = self.fast and not self.q8 and self.out_features % 16 == 0 and self.in_features % 4 == 0
        self.register_buffer("tiled", kernels.tile8(self.qweight) if tile else None)

    @classmethod
    def from_float(cls, w: torch.Tensor, dtype: torch.dtype) -> "Int8Weight":
        return cls(*int8_rtn(w), dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        codes = self.qweight if self.tiled is None else self.tiled
        if self.fast and x.numel() == self.in_features:   # batch 1: the fused kernel
            return (torch.ops.leanlm.int8_gemv_q8 if self.q8 else torch.ops.leanlm.int8_gemv)(x.reshape(-1), codes, self.scale).reshape(*x.shape[:-1], self.out_features)
        if self.fast and not self.q8 and kernels.few_rows(x, self.in_features):   # a few rows: the same kernel per row
            return torch.ops.leanlm.int8_gemv(x.reshape(-1, self.in_features), codes, self.scale).reshape(*x.shape[:-1], self.out_features)
        return self.reference(x)

    def for_device(self, device: torch.device) -> None:
        if device.type != "cpu":
            self.fast = self.q8 = False   # the fused batch-1 kernels are CPU code
            self.tiled = None

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """PyTorch's int8 kernel (any number of rows)."""
        if self.qweight.is_cuda:
            return torch.nn.functional.linear(x, self.qweight.to(x.dtype)) * self.scale.to(x.dtype)
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, self.in_features), self.qweight, self.scale)
        return y.reshape(*x.shape[:-1], self.out_features)

    def dequantize(self) -> torch.Tensor:
        return self.qweight.float() * self.scale.float()[:, None]

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        return self.qweight[ids].to(self.scale.dtype) * self.scale[ids].unsqueeze(-1)
