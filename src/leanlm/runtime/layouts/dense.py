"""Dense float weights (float32 or bfloat16): `F.linear`, i.e. oneDNN/MKL GEMM."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DenseWeight(nn.Module):
    fallback: str | None = None

    def __init__(self, w: torch.Tensor, dtype: torch.dtype):
        super().__init__()
        self.register_buffer("weight", w.detach().to(dtype).contiguous())
        self.out_features, self.in_features = self.weight.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def dequantize(self) -> torch.Tensor:
        return self.weight.float()

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Embedding lookup through the same storage (tied embedding)."""
        return F.embedding(ids, self.weight)
