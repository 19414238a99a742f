"""int4 group-wise weights, two per byte, activations in bfloat16 (or float32):
`torch.ops.aten._convert_weight_to_int4pack_for_cpu` packs once, then
`torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group, scales_and_zeros [in/group, out, 2])`
computes x @ W.T with W = (u - 8) * scale + zero for the unsigned 4-bit code u.

A symmetric code q in [-8, 7] is stored as u = q + 8 with zero 0 (exact); an asymmetric code u in
[0, 15] with integer zero point z as u with zero = (8 - z) * scale (exact up to the rounding of
that product to the activation dtype).

A batch-1 call (one activation row) runs the fused kernel of `leanlm.runtime.kernels` instead when it is
built (the default; LEANLM_KERNELS=0 turns it off): it reads the same codes from its own tiled copy (`tiled`,
16 rows x 8 k per 64 bytes) and the same scales/zeros table, with the reference's arithmetic (bfloat16
activation row and output, float32 accumulation); several rows (prefill, batches) always run PyTorch's
kernel (the reference path).

On CUDA (`for_device`) the codes are repacked for PyTorch's CUDA int4 kernel (`_convert_weight_to_int4pack`
+ `_weight_int4pack_mm`, the tinygemm kernel: bfloat16 activations, the same scales/zeros table and formula).
"""

from __future__ import annotations

import torch
from torch import nn

from .. import kernels

INT4_GROUPS = (32, 64, 128, 256)


class Int4Weight(nn.Module):
    fallback: str | None = None

    def __init__(self, packed: torch.Tensor, scales_zeros: torch.Tensor, group_size: int, out_features: int, in_features: int,
                 tiled: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("packed", packed)
        self.register_buffer("tiled", tiled)
        self.register_buffer("scales_zeros", scales_zeros)
        self.group_size, self.out_features, self.in_features = group_size, out_features, in_features
        self.q8 = tiled is not None and kernels.mode() == "q8"   # the opt-in int8-activation kernel

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group_size: int, dtype: torch.dtype) -> "Int4Weight":
        """codes [out, in] (int8 in [-8, 7] when `zero` is None, else uint8 in [0, 15]); scale/zero [out, in/g, 1]."""
        out_f, in_f = codes.shape
        scale = scale.reshape(out_f, in_f // group_size).float()
        if zero is None:
            u = codes.to(torch.int32) + 8
            z = torch.zeros_like(scale)
        else:
            u = codes.to(torch.int32)
            z = (8 - zero.reshape(out_f, in_f // group_size).float()) * scale
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u.contiguous(), 2)
        sz = torch.stack([scale, z], dim=-1).transpose(0, 1).contiguous().to(dtype)  # [in/g, out, 2]
        tiled = None
        if dtype == torch.bfloat16 and out_f % 16 == 0 and group_size % 32 == 0 and kernels.available():
            tiled = kernels.tile16(u)
        return cls(packed, sz, group_size, out_f, in_f, tiled)

    @classmethod
    def from_float(cls, w: torch.Tensor, group_size: int, dtype: torch.dtype) -> "Int4Weight":
        from ...quantization.formats import compute_qparams, quantize

        fmt = f"int4_g{group_size}"
        qp = compute_qparams(w.float(), fmt)
        return cls.from_codes(quantize(w.float(), fmt, qp), qp.scale, None, group_size, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tiled is not None and x.numel() == self.in_features:   # batch 1: the fused kernel
            y = (torch.ops.leanlm.int4_gemv_q8 if self.q8 else torch.ops.leanlm.int4_gemv)(x.reshape(-1), self.tiled, self.scales_zeros, self.group_size, self.out_features)
            return y.reshape(*x.shape[:-1], self.out_features)
        return self.reference(x)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """PyTorch's int4 kernel (any number of rows)."""
        x2 = x.reshape(-1, self.in_features)
        if self.packed.is_cuda:
            y = torch.ops.aten._weight_int4pack_mm(x2.to(torch.bfloat16), self.packed, self.group_size, self.scales_zeros)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, self.group_size, self.scales_zeros)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def codes(self) -> torch.Tensor:
        """The unsigned codes u [out, in] (int32 in [0, 15]), recovered exactly from the dequantized weight:
        W = (u - 8) * scale + zero, and the bfloat16 rounding of W (at most |W| / 256 <= scale / 16) is far
        below half a step."""
        w = self.dequantize()
        sz = self.scales_zeros.float().transpose(0, 1)   # [out, in/g, 2]
        s = sz[..., 0].repeat_interleave(self.group_size, 1)
        z = sz[..., 1].repeat_interleave(self.group_size, 1)
        u = torch.where(s == 0, torch.zeros_like(w), (w - z) / s.masked_fill(s == 0, 1)).round_() + 8
        return u.clamp_(0, 15).to(torch.int32)

    def for_device(self, device: torch.device) -> None:
        """Repack for `device` before the module moves there (CPU: nothing to do). CUDA takes groups of
        32-256 and in_features a multiple of 32 (the int4 layouts here always are), out_features a multiple of 8."""
        if device.type == "cpu" or self.packed.is_cuda:
            return
        from ...core.errors import LeanLMError

        if device.type != "cuda":
            raise LeanLMError(f"int4 weights run on the CPU or CUDA, not {device.type}; use --device cpu or cuda")
        if self.out_features % 8 or self.in_features % 32:
            raise LeanLMError(f"the CUDA int4 kernel needs out_features % 8 == 0 and in_features % 32 == 0, got "
                              f"{self.out_features} x {self.in_features}; run this model with int8 or bf16 weights on CUDA")
        u = self.codes()
        pairs = ((u[:, ::2] << 4) | u[:, 1::2]).to(torch.uint8).to(device)   # two codes a byte, the first in the high nibble
        tiles = next(t for t in (8, 4, 2) if self.in_features % (16 * t) == 0)
        self.packed = torch.ops.aten._convert_weight_to_int4pack(pairs.contiguous(), tiles)
        self.tiled, self.q8 = None, False   # the fused batch-1 kernels are CPU code
        self.scales_zeros = self.scales_zeros.to(torch.bfloat16)

    def dequantize(self) -> torch.Tensor:
        eye = torch.eye(self.in_features, dtype=self.scales_zeros.dtype, device=self.packed.device)
        return self.reference(eye).float().t().contiguous()

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError  # the runtime never packs an embedding table as int4 (see docs/runtime.md)
