"""Dense float weights (float32 or bfloat16).

float32, with the fused kernels built (the default): [out, in] storage, and up to `kernels.MAX_ROWS` activation rows
(decode steps, speculative verification) run `torch.ops.leanlm.f32_gemv`, which reads the weight once for all rows
and sums each row's dot products in the same order whatever the number of rows, so a verification of T tokens
gives the logits of T one-token steps exactly (bench/results/kernel_rows.md); more rows (a prefill) run
`F.linear` (MKL). Without the kernels, float32 weights are stored transposed ([in, out], `x @ stored`): MKL's
float32 kernels for a few rows were slow on [out, in] (SmolLM2-135M's layers read cold, 2 threads: 26.0 ms for
one row and 38.0 ms for five, against 21.9 and 27.2 ms transposed).
bfloat16 keeps [out, in] (`F.linear`: 9.9 / 10.5 ms, where transposed measured 13.2 / 14.1 ms).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels


class DenseWeight(nn.Module):
    fallback: str | None = None

    def __init__(self, w: torch.Tensor, dtype: torch.dtype):
        super().__init__()
        w = w.detach().to(dtype)
        # the fused float32 kernel for a few rows (Engine(kernels=False) and a GPU turn it off: F.linear on the same storage)
        self.f32_rows = dtype == torch.float32 and w.device.type == "cpu" and kernels.available()
        self.transposed = dtype == torch.float32 and not self.f32_rows
        self.register_buffer("stored", (w.t() if self.transposed else w).contiguous())
        self.out_features, self.in_features = w.shape

    @property
    def weight(self) -> torch.Tensor:
        """[out, in] (a view of the transposed storage for float32)."""
        return self.stored.t() if self.transposed else self.stored

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.transposed:
            return torch.matmul(x, self.stored)
        if self.f32_rows and x.dtype == torch.float32 and kernels.few_rows(x, self.in_features):
            return torch.ops.leanlm.f32_gemv(x.reshape(-1, self.in_features), self.stored).reshape(*x.shape[:-1], self.out_features)
        return F.linear(x, self.stored)

    def for_device(self, device: torch.device) -> None:
        if device.type != "cpu":
            self.f32_rows = False   # CPU code

    def dequantize(self) -> torch.Tensor:
        return self.weight.float()

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Embedding lookup through the same storage (tied embedding)."""
        return F.embedding(ids, self.weight)
