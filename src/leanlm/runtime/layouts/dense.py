"""Dense float weights (float32 or bfloat16): oneDNN/MKL GEMM.

float32 weights are stored transposed (`stored` is [in, out], the layer computes `x @ stored`): MKL's float32
kernels for a few activation rows were slow on the usual [out, in] layout (SmolLM2-135M's layers read cold, 2
threads: 26.0 ms for one row and 38.0 ms for five, against 21.9 and 27.2 ms transposed), and a few rows is what
decoding and speculative verification run.
bfloat16 keeps [out, in] (`F.linear`: 9.9 / 10.5 ms, where transposed measured 13.2 / 14.1 ms).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DenseWeight(nn.Module):
    fallback: str | None = None

    def __init__(self, w: torch.Tensor, dtype: torch.dtype):
        super().__init__()
        w = w.detach().to(dtype)
        self.register_buffer("stored", (w.t() if dtype == torch.float32 else w).contiguous())
        self.out_features, self.in_features = w.shape

    @property
    def transposed(self) -> bool:
        return self.stored.dtype == torch.float32

    @property
    def weight(self) -> torch.Tensor:
        """[out, in] (a view of the transposed storage for float32)."""
        return self.stored.t() if self.transposed else self.stored

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.transposed:
            return torch.matmul(x, self.stored)
        return F.linear(x, self.stored)

    def dequantize(self) -> torch.Tensor:
        return self.weight.float()

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Embedding lookup through the same storage (tied embedding)."""
        return F.embedding(ids, self.weight)
