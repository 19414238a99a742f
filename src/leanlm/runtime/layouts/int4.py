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
activation row and output, float32 accumulation); up to `kernels.MAX_ROWS` rows (a speculative verification,
a small decode batch) run the same kernel row by row, and more rows (a prefill) PyTorch's kernel (the reference path).

On CUDA (`for_device`) the codes are repacked for PyTorch's CUDA int4 kernel (`_convert_weight_to_int4pack`
+ `_weight_int4pack_mm`, the tinygemm kernel: bfloat16 activations, the same scales/zeros table and formula).
"""

from __future__ import annotations

import torch
from torch import nn

from .. import kernels

INT4_GROUPS = (32, 64, 128, 256)
INT4_GRIDS = ("sym", "asym")   # Int4Weight.from_float's round-to-nearest grids


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

    @staticmethod
    def _table(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group_size: int):
        """The kernel's view of codes/scale/zero: unsigned codes u [out, in], per-group scale and additive term
        [out, in/g] (float32; stored in the activation dtype) with W = (u - 8) * scale + term."""
        out_f, in_f = codes.shape
        scale = scale.reshape(out_f, in_f // group_size).float()
        if zero is None:
            return codes.to(torch.int32) + 8, scale, torch.zeros_like(scale)
        return codes.to(torch.int32), scale, (8 - zero.reshape(out_f, in_f // group_size).float()) * scale

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group_size: int, dtype: torch.dtype) -> "Int4Weight":
        """codes [out, in] (int8 in [-8, 7] when `zero` is None, else uint8 in [0, 15]); scale/zero [out, in/g, 1]."""
        return cls._from_table(*cls._table(codes, scale, zero, group_size), group_size, dtype)

    @classmethod
    def _from_table(cls, u: torch.Tensor, scale: torch.Tensor, z: torch.Tensor, group_size: int, dtype: torch.dtype) -> "Int4Weight":
        out_f, in_f = u.shape
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u.contiguous(), 2)
        sz = torch.stack([scale, z], dim=-1).transpose(0, 1).contiguous().to(dtype)  # [in/g, out, 2]
        tiled = None
        if dtype == torch.bfloat16 and out_f % 16 == 0 and group_size % 32 == 0 and kernels.available():
            tiled = kernels.tile16(u)
        return cls(packed, sz, group_size, out_f, in_f, tiled)

    @classmethod
    def from_float(cls, w: torch.Tensor, group_size: int, dtype: torch.dtype, grid: str = "auto") -> "Int4Weight":
        """Round-to-nearest in groups of `group_size` on the symmetric grid (`sym`: codes -8..7 times amax / 7,
        leanlm's `int4_g*` format) or the asymmetric one (`asym`: 16 levels over the group's range widened to hold 0,
        an integer zero point: `int4_g*_asym`), or (`auto`) on whichever reconstructs `w` with the lower squared error
        as the kernel computes it (scale and term rounded to `dtype`). Both cost the same bytes and time: the layout
        keeps a scale and a term per group either way. The symmetric grid alone was the default until Gemma-3-270M
        measured +231% perplexity on it, +57% on the asymmetric one (bench/results/int4_grid.md). A min-max grid
        (llama.cpp's Q4_1, the range not widened to 0) had the lowest squared error on every matrix of both real
        models but a higher perplexity than the asymmetric grid on both, so it is not a candidate."""
        from ...quantization.formats import compute_qparams, quantize

        if grid not in ("auto", *INT4_GRIDS):
            raise ValueError(f"int4 grid must be auto, {', '.join(INT4_GRIDS)}, got {grid!r}")
        w = w.float()
        cands = []
        for name in (INT4_GRIDS if grid == "auto" else (grid,)):
            fmt = f"int4_g{group_size}" + ("_asym" if name == "asym" else "")
            qp = compute_qparams(w, fmt)
            cands.append(cls._table(quantize(w, fmt, qp), qp.scale, qp.zero, group_size))
        rs = lambda t: t.to(dtype).float().repeat_interleave(group_size, 1)  # noqa: E731
        err = lambda c: float(((c[0] - 8) * rs(c[1]) + rs(c[2]) - w).square().sum())  # noqa: E731
        return cls._from_table(*min(cands, key=err), group_size, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tiled is not None:
            if x.numel() == self.in_features:   # batch 1: the fused kernel
                y = (torch.ops.leanlm.int4_gemv_q8 if self.q8 else torch.ops.leanlm.int4_gemv)(x.reshape(-1), self.tiled, self.scales_zeros, self.group_size, self.out_features)
                return y.reshape(*x.shape[:-1], self.out_features)
            if not self.q8 and kernels.few_rows(x, self.in_features):   # a few rows: the same kernel per row
                y = torch.ops.leanlm.int4_gemv(x.reshape(-1, self.in_features), self.tiled, self.scales_zeros, self.group_size, self.out_features)
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
