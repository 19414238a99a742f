"""A lean decoder for every family `core.arch` knows (Llama, Mistral, Qwen2, Qwen3, Gemma-3, Phi-3), read
from a loaded `transformers` model through its architecture adapter.

Weights are packed per layer (q/k/v fused into one matmul, gate/up fused into one), the KV cache is
preallocated (one [batch, kv_heads, max_seq_len, head_dim] buffer per layer), and one `forward` call runs T new
tokens at tensor positions `input_pos` with attention over the first `kv_len` cache slots (a
static size, so a compiled decode step sees fixed shapes). RoPE tables come from the HF model's
own rotary embedding; norms, activations and attention scaling follow the HF code of each family.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..core.arch import Arch, arch_of
from ..core.errors import LeanLMError
from .layouts import DenseWeight, pack_linear, pack_weight

MAX_STEP_ROWS = 16   # tokens of one sequence the one-call step runs at once (Step.rows)


def _fused(linears: list, kind, dtype, group_size, allow_fallback):
    """Pack linears that read the same input as one matmul. Quantized layers keep their own codes
    and scales (row-wise formats concatenate exactly). Returns (layout, bias or None): biases (Qwen2's
    q/k/v) are added after the matmul, zeros where a layer has none."""
    biases = [getattr(m, "bias", None) for m in linears]
    bias = None
    if any(b is not None for b in biases):
        bias = torch.cat([torch.zeros(m.out_features) if b is None else b.detach().float() for m, b in zip(linears, biases)])
    if len(linears) == 1 and bias is None:
        return pack_linear(linears[0], kind, dtype, group_size, allow_fallback), None
    big = nn.Linear(linears[0].in_features, sum(m.out_features for m in linears), bias=False)
    big.weight = nn.Parameter(torch.cat([m.weight.detach() for m in linears]), requires_grad=False)
    qs = [getattr(m, "weight_quantizer", None) for m in linears]
    if any(q is not None and q.enabled for q in qs):
        from ..quantization.formats import QParams, compute_qparams
        from ..quantization.modules import TensorQuantizer

        if len({(q.fmt if q is not None and q.enabled else None) for q in qs}) != 1:
            raise LeanLMError("q/k/v (or gate/up) layers quantized in different formats cannot be fused; quantize them alike")
        qps = [q.qparams if q.qparams is not None else compute_qparams(m.weight.detach().float(), q.fmt) for q, m in zip(qs, linears)]
        wq = TensorQuantizer(qs[0].cfg, "weight")
        wq.qparams = QParams(torch.cat([p.scale for p in qps]), None if qps[0].zero is None else torch.cat([p.zero for p in qps]))
        big.weight_quantizer = wq
    iq = getattr(linears[0], "input_quantizer", None)
    if iq is not None and iq.enabled:
        if not iq.cfg.dynamic and len(linears) > 1:
            amax = torch.stack([m.input_quantizer.amax.reshape(()) for m in linears])
            if not torch.all(amax == amax[0]):
                raise LeanLMError("layers sharing an input have different static activation ranges; cannot fuse them")
        big.input_quantizer = iq
    return pack_linear(big, kind, dtype, group_size, allow_fallback), bias


class Layer(nn.Module):
    pass


def _norm_w(norm: nn.Module, arch: Arch) -> torch.Tensor:
    """RMSNorm scale in float32 (the residual stream is float32): Gemma scales by (1 + w), the others by w."""
    # a copy (offset + w is one): a view would keep the whole HF checkpoint's storage alive after it is freed
    return norm.weight.detach().float() + arch.norm_offset


class Decoder(nn.Module):
    """Packed weights + static KV cache. `forward(ids [B, T], input_pos [T], kv_len) -> logits [B, T, V]`."""

    def __init__(self, model: nn.Module, weights: str | None = None, *, group_size: int = 64, head: str | None = None,
                 max_seq_len: int = 2048, max_batch: int = 1, allow_fallback: bool = False):
        super().__init__()
        spec = self.spec = arch_of(model)
        if spec.rope_type in ("longrope", "dynamic"):
            raise LeanLMError(f"{spec.model_type}: {spec.rope_type} RoPE scaling changes with the sequence length; the leanlm "
                              "runtime does not run it (use --engine hf)")
        quantized = any(getattr(m, "weight_quantizer", None) is not None and m.weight_quantizer.enabled for m in model.modules())
        if quantized:
            # A leanlm-quantized model is packed in its own formats; float layers stay bfloat16.
            if weights not in (None, "auto"):
                raise LeanLMError(f"this model is already quantized (leanlm.quantize); pack it with weights='auto', not {weights!r}")
            w8a8 = any(getattr(m, "input_quantizer", None) is not None and m.input_quantizer.enabled for m in model.modules())
            weights = "w8a8" if w8a8 else "auto"
        elif weights in (None, "auto"):
            weights = "bf16"
        if weights not in ("auto", "fp32", "bf16", "int8", "int4", "w8a8"):
            raise LeanLMError(f"unknown weight format {weights!r}; choose one of: fp32, bf16, int8, int4, w8a8")
        # Activations: float32 for fp32 and w8a8 weights (exact integer matmuls), bfloat16 for the others
        # (the int8/int4 weight-only kernels are fast with bfloat16 activations only).
        self.dtype = torch.float32 if weights in ("fp32", "w8a8") else torch.bfloat16
        self.weights, self.group_size = weights, group_size
        body = spec.body(model)
        self.fallbacks: list[str] = []
        kind = "bf16" if weights == "auto" else weights

        def pk(linears, L=None, name=None):
            layout, bias = _fused(linears, kind, self.dtype, group_size, allow_fallback)
            if layout.fallback:
                self.fallbacks.append(layout.fallback)
            if L is not None:
                L.register_buffer(f"{name}_bias", bias)
            return layout

        self.layers = nn.ModuleList()
        for hl in body.layers:
            L = Layer()
            for name, group in zip(("qkv", "o", "gate_up", "down"), spec.groups):
                setattr(L, name, pk([hl.get_submodule(n) for n in group], L, name))
            # an online rotation of down_proj's input (quantization/rotate.py), shared with the HF module
            L.down_in = getattr(hl.get_submodule(spec.down), "input_transform", None)
            for name, norm in zip(("ln1", "ln2", "ln3", "ln4"), spec.layer_norms):
                L.register_buffer(name, _norm_w(hl.get_submodule(norm), spec))
            for name, norm in zip(("qn", "kn"), spec.qk_norms):
                L.register_buffer(name, _norm_w(hl.get_submodule(norm), spec))
            self.layers.append(L)
        self.register_buffer("norm", _norm_w(body.norm, spec))

        # Output head (and the embedding, which shares its storage when tied).
        lm_head = model.get_output_embeddings()
        emb = model.get_input_embeddings().weight.detach()
        hq = getattr(lm_head, "weight_quantizer", None)
        if head in (None, "auto"):   # the fastest measured head: int8 under a low-bit body, else the compute dtype
            low_bit = any(type(getattr(L, n)).__name__ in ("Int4Weight", "Int8Weight") for L in self.layers for n in ("qkv", "down"))
            head = "int8" if low_bit and (hq is None or not hq.enabled) else "dense"
        if hq is not None and hq.enabled and head == "dense":
            self.head = pk([lm_head])
        elif head == "dense":
            self.head = DenseWeight(lm_head.weight.detach(), self.dtype)
        elif head in ("bf16", "fp32", "int8", "int4"):
            self.head = pack_weight(lm_head.weight.detach(), head, self.dtype, group_size, allow_fallback)
        else:
            raise LeanLMError(f"unknown head format {head!r}; choose auto, dense, fp32, bf16, int8 or int4")
        names = {"Int8Weight": "int8", "Int4Weight": "int4", "W8A8Weight": "w8a8"}
        self.head_format = names.get(type(self.head).__name__, str(getattr(self.head, "weight", torch.empty(0)).dtype).replace("torch.", ""))
        # A tied embedding is looked up in the head's storage (int8 rows are dequantized on lookup);
        # an int4 head keeps a separate embedding table in the compute dtype.
        tied = lm_head.weight.data_ptr() == emb.data_ptr() and type(self.head).__name__ != "Int4Weight"
        self.embed = self.head if tied else DenseWeight(emb, self.dtype)
        self.tied = tied

        # RoPE tables (float32) from the model's own rotary embedding, per layer type; the sine carries the
        # sign of rotate_half so that rope(x) = x * cos + roll(x, D/2) * sin.
        self.max_seq_len, self.max_batch = max_seq_len, max_batch
        pos = torch.arange(max_seq_len).unsqueeze(0)
        dummy = torch.zeros(1, dtype=torch.float32)
        rot = body.rotary_emb
        kinds = sorted({w is not None for w in spec.windows})
        half = spec.rotary_dim // 2
        for sliding in kinds:
            kw = {"layer_type": "sliding_attention" if sliding else "full_attention"} if spec.rope_by_layer_type else {}
            cos, sin = rot(dummy, pos, **kw)
            cos, sin = cos[0].float(), sin[0].float()
            sin = torch.cat([-sin[:, :half], sin[:, half:]], dim=-1)
            self.register_buffer(f"cos{int(sliding)}", cos.contiguous())
            self.register_buffer(f"sin{int(sliding)}", sin.contiguous())
        idx = torch.arange(max_seq_len)
        causal = idx[None, :] <= idx[:, None]
        self.register_buffer("mask0", causal)
        win = next((w for w in spec.windows if w), None)
        if win:
            self.register_buffer("mask1", causal & (idx[:, None] - idx[None, :] < win))
        # Gemma multiplies embeddings by sqrt(hidden) rounded to the model dtype, as HF does.
        self.embed_scale = float(torch.tensor(spec.embed_scale, dtype=self.dtype)) if spec.embed_scale != 1.0 else 1.0
        # One float32 cache per layer (PyTorch's bfloat16 batched matmul is far slower than float32 at these
        # tiny shapes); separate buffers let torch.compile update each in place instead of copying a big one.
        self.one_row_f32 = self.one_row_kernels()   # Engine(kernels=False) turns it off
        shape = (max_batch, spec.kv_heads, max_seq_len, spec.head_dim)
        for L in self.layers:
            L.register_buffer("k_cache", torch.zeros(shape, dtype=torch.float32))
            L.register_buffer("v_cache", torch.zeros(shape, dtype=torch.float32))
        # the one-call step is built by `Engine` (fused_step); a Decoder driven through `attend=` (the serving engine,
        # which frees the dense cache) never runs it
        self.step, self.step_why = None, "not built (Engine builds it: Decoder.fused_step)"

    def to_device(self, device) -> "Decoder":
        """Move the packed weights, tables and cache to `device` ("cpu" or "cuda[:N]"). Layouts whose packing is
        device-specific repack themselves (`for_device`); the fused batch-1 kernels and the one-call step are CPU
        code, so on a GPU every matmul runs PyTorch's kernel for its layout (docs/runtime.md, "On a GPU")."""
        device = torch.device(device)
        if device.type == "cpu":
            return self
        if device.type != "cuda":
            raise LeanLMError(f"unknown device {str(device)!r}; choose cpu or cuda")
        if not torch.cuda.is_available():
            raise LeanLMError("--device cuda: no CUDA GPU is visible to PyTorch here (torch.cuda.is_available() is False); "
                              "use --device cpu")
        for m in list(self.modules()):
            if hasattr(m, "for_device"):
                m.for_device(device)
        self.step, self.step_why = None, f"the one-call step is CPU code (this decoder runs on {device})"
        self.one_row_f32 = False
        return self.to(device)

    @property
    def device(self) -> torch.device:
        return self.norm.device

    def fused_step(self):
        """(`torch.classes.leanlm.Step`, None) when a batch-1 decode step can run as one C++ call over this
        decoder's own buffers (every matmul a fused int4/int8 kernel, no biases, no online rotation), else
        (None, why). It computes what `forward` computes, with the same bfloat16 roundings."""
        from . import kernels

        s = self.spec
        if not kernels.available() or kernels.mode() != "float":
            return None, "the fused kernels are off"
        mats = [getattr(L, n) for L in self.layers for n in ("qkv", "o", "gate_up", "down")] + [self.head]
        if not all(getattr(m, "tiled", None) is not None or (getattr(m, "fast", False) and not m.q8) for m in mats):
            return None, "a matmul has no fused kernel (bf16, fp32 or w8a8 weights, or an int4 shape it does not take)"
        if any(getattr(L, f"{n}_bias") is not None for L in self.layers for n in ("qkv", "o", "gate_up", "down")) or \
                any(L.down_in is not None for L in self.layers):
            return None, "biases or an online rotation"
        if s.rotary_dim % 2 or s.rotary_dim > 1024 or s.heads % s.kv_heads:
            return None, "a RoPE or head layout the fused step does not take"

        def ab(m):   # int4: tile16 codes + scale/zero table; int8: its tiled (or row-major) codes + scales
            if hasattr(m, "scales_zeros"):
                return [m.tiled, m.scales_zeros]
            return [m.qweight if m.tiled is None else m.tiled, m.scale]

        def grp(m):
            return m.group_size if hasattr(m, "scales_zeros") else 0

        none = torch.empty(0)
        t, per = [], []
        for i, L in enumerate(self.layers):
            for n in ("qkv", "o", "gate_up", "down"):
                t += ab(getattr(L, n))
            t += [getattr(L, n, None) if getattr(L, n, None) is not None else none for n in ("ln1", "ln2", "ln3", "ln4", "qn", "kn")]
            t += [L.k_cache, L.v_cache]
            per += [grp(getattr(L, n)) for n in ("qkv", "o", "gate_up", "down")] + [s.windows[i] or 0, 1 if s.windows[i] else 0]
        t += ab(self.head) + [self.norm]
        for w in (0, 1):
            t += [getattr(self, f"cos{w}", none), getattr(self, f"sin{w}", none)]
        ints = [s.n_layers, s.heads, s.kv_heads, s.head_dim, s.rotary_dim, s.intermediate, 0 if s.act == "silu" else 1,
                int(bool(s.ffn_norms)), int(bool(s.qk_norms)), s.hidden, grp(self.head)] + per
        return torch.classes.leanlm.Step(t, ints, [float(s.eps), float(s.attn_scale), float(s.final_softcap or 0.0)]), None

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        """The float32 residual stream's first value: embedding rows, times Gemma's scale."""
        x = self.embed.rows(ids).float()
        if self.embed_scale != 1.0:
            x.mul_(self.embed_scale)
        return x

    def fused_one(self, token: torch.Tensor, pos: int) -> torch.Tensor:
        """Logits [V] of one token at `pos` through the one-call step (`self.step`), which reads and writes the
        dense caches `k_cache` / `v_cache` of every layer."""
        return self.step.step(self._embed(token).view(-1), pos)

    def fused_rows(self, ids: torch.Tensor, input_pos: torch.Tensor, kv_len: int, rows=None, hidden: bool = False, tree=None):
        """`forward` of T <= MAX_STEP_ROWS tokens of one sequence (a speculative verification, a draft tree) through the
        one-call step: each row's logits are the bits a one-token step computes over the same keys."""
        x = self._embed(ids)
        none = torch.empty(0)
        if tree is None:
            rpos, mask = input_pos, none
        else:
            win = next((w for w in self.spec.windows if w), None)
            kinds = [None] + ([win] if win and hasattr(self, "mask1") else [])
            rpos, mask = tree[0], torch.stack([_tree_mask(tree, input_pos, kv_len, w) for w in kinds])
        out = self.step.rows(x.contiguous(), input_pos, rpos, mask, int(kv_len), none if rows is None else rows, hidden)
        return (out[0][None], out[1][None]) if hidden else out[0][None]

    def one_row_kernels(self) -> bool:
        """Whether every matmul of a one-row step runs a fused kernel (they take and return float32, so such a
        step skips the bfloat16 casts around each matmul)."""
        lays = [getattr(L, n) for L in self.layers for n in ("qkv", "o", "gate_up", "down")] + [self.head]
        return all(getattr(m, "tiled", None) is not None or getattr(m, "fast", False) for m in lays)

    def weight_bytes(self) -> int:
        """Bytes of every packed weight, norm and RoPE table (not the KV cache), each storage once. An int4
        or int8 layer's codes count once: its tiled copy for the batch-1 kernel holds the same codes as `packed` /
        `qweight` (the resident memory of both is measured by bench/decode.py)."""
        seen, n = set(), 0
        tiled = {name.removesuffix(".tiled") for name, b in self.named_buffers() if name.endswith(".tiled")}
        for name, b in self.named_buffers():
            if name.endswith(("k_cache", "v_cache")) or b.data_ptr() in seen or name.removesuffix(".packed") in tiled \
                    or name.removesuffix(".qweight") in tiled:
                continue
            seen.add(b.data_ptr())
            n += b.numel() * b.element_size()
        return n

    def bytes_per_token(self, context: int) -> int:
        """Bytes one batch-1 decode step reads: every packed weight once (an embedding table that is not
        the head only one row), norms, and the float32 KV cache at `context` tokens."""
        n = self.weight_bytes()
        if not self.tied:
            e = self.embed.weight
            n -= e.numel() * e.element_size() - e.shape[1] * e.element_size()
        n -= sum(getattr(self, f"{t}{w}").numel() * getattr(self, f"{t}{w}").element_size()
                 for t in ("cos", "sin", "mask") for w in (0, 1) if hasattr(self, f"{t}{w}"))
        s = self.spec
        return n + 2 * s.n_layers * s.kv_heads * s.head_dim * context * 4

    def _rms(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """float32 in, float32 out: one fused op (normalize, then scale, as HF does in float32)."""
        return F.rms_norm(x, (x.shape[-1],), weight=w, eps=self.spec.eps)

    def _rope(self, x, cos, sin):
        """x [B, T, n, D]; cos/sin [1, T, 1, R] with the rotate_half sign folded into sin; the first R of
        each head's D dimensions rotate (R < D: Phi-3's partial rotary)."""
        r = self.spec.rotary_dim
        if r < x.shape[-1]:
            return torch.cat([self._rope(x[..., :r], cos, sin), x[..., r:]], dim=-1)
        return torch.addcmul(x * cos, x.roll(r // 2, -1), sin)

    def _attend(self, q, k, v, bias):
        """Grouped-query attention as two batched matmuls (PyTorch's CPU flash-attention kernel is slow for
        one query row). q [B, T, H, D] float32, k/v [B, Hkv, S, D], bias [g*T, S] additive mask -> [B, T, H*D]."""
        s = self.spec
        B, T, H, D = q.shape
        g = H // s.kv_heads
        if T == 1:   # heads are kv-group major (HF's repeat_kv), so one query row needs no permute
            q3 = q.reshape(B * s.kv_heads, g, D)
        else:
            q3 = q.reshape(B, T, s.kv_heads, g, D).permute(0, 2, 3, 1, 4).reshape(B * s.kv_heads, g * T, D)
        S = k.shape[2]
        att = torch.baddbmm(bias, q3, k.reshape(B * s.kv_heads, S, D).transpose(1, 2), alpha=s.attn_scale)
        o = torch.bmm(att.softmax(-1), v.reshape(B * s.kv_heads, S, D))
        if T == 1:
            return o.view(B, 1, H * D)
        return o.view(B, s.kv_heads, g, T, D).permute(0, 3, 1, 2, 4).reshape(B, T, H * D)

    def forward(self, ids: torch.Tensor, input_pos: torch.Tensor, kv_len: int, attend=None, rows=None,
                hidden: bool = False, tree=None) -> torch.Tensor:
        """The residual stream and attention run in float32; matmul inputs are cast to the weights'
        activation dtype (bfloat16 for the bf16/int8/int4 layouts). Written for few PyTorch calls per
        layer: at batch 1 a 135M model's decode step is bound by per-op overhead as much as by weights.
        `attend(layer, q [B,T,H,D], k, v [B,T,Hkv,D]) -> [B, T, H*D]` replaces the static cache and its
        attention (the serving engine's paged KV cache); `rows` [R] limits the output head to those token rows
        (logits [B, R, V]); `hidden`: return (logits, the final norm's output [B, T, hidden] float32) for an EAGLE head;
        `tree` = (rope_pos [T], mask [T, S] bool, S >= T): the T tokens are draft-tree nodes written to cache slots
        `input_pos`, rotated at `rope_pos`, each attending to the slots before the last S (all of them) and to those
        of the last S its mask row marks."""
        s = self.spec
        B, T = ids.shape
        if self.step is not None and attend is None and not torch.compiler.is_compiling():
            if B * T == 1 and not hidden and tree is None and rows is None:
                return self.fused_one(ids.view(1), int(input_pos)).view(1, 1, -1)
            if B == 1 and T <= MAX_STEP_ROWS:
                return self.fused_rows(ids[0], input_pos, kv_len, rows, hidden, tree)
        dt = torch.float32 if B * T == 1 and self.one_row_f32 else self.dtype   # fused kernels: float32 in and out
        x = self._embed(ids)
        H, Hkv, D = s.heads, s.kv_heads, s.head_dim
        q_dim, kv_dim = H * D, Hkv * D
        g = H // Hkv
        ropes, biases = {}, {}
        for w in (0, 1):
            if hasattr(self, f"cos{w}"):
                rp = input_pos if tree is None else tree[0]
                ropes[w] = (getattr(self, f"cos{w}")[rp][None, :, None], getattr(self, f"sin{w}")[rp][None, :, None])
                if attend is not None:
                    continue
                m = getattr(self, f"mask{w}")[input_pos, :kv_len] if tree is None else \
                    _tree_mask(tree, input_pos, kv_len, next((x for x in s.windows if x), None) if w == 1 else None)
                biases[w] = torch.zeros(m.shape, device=m.device).masked_fill_(~m, float("-inf")).repeat(g, 1)
        for i, L in enumerate(self.layers):
            sl = 1 if s.windows[i] else 0
            cos, sin = ropes[sl]
            qkv = L.qkv(self._rms(x, L.ln1).to(dt)).float()
            if L.qkv_bias is not None:
                qkv = qkv + L.qkv_bias
            v = qkv[..., q_dim + kv_dim:].view(B, T, Hkv, D)
            if s.qk_norms:
                q = self._rope(self._rms(qkv[..., :q_dim].view(B, T, H, D), L.qn), cos, sin)
                k = self._rope(self._rms(qkv[..., q_dim:q_dim + kv_dim].view(B, T, Hkv, D), L.kn), cos, sin)
            else:   # q and k rotate together
                qk = self._rope(qkv[..., :q_dim + kv_dim].view(B, T, H + Hkv, D), cos, sin)
                q, k = qk[:, :, :H], qk[:, :, H:]
            if attend is not None:
                o = L.o(attend(i, q, k, v).to(dt))
            else:
                kc, vc = (L.k_cache, L.v_cache) if B == self.max_batch else (L.k_cache[:B], L.v_cache[:B])
                kc.index_copy_(2, input_pos, k.transpose(1, 2))
                vc.index_copy_(2, input_pos, v.transpose(1, 2))
                o = L.o(self._attend(q, kc[:, :, :kv_len], vc[:, :, :kv_len], biases[sl]).to(dt))
            if L.o_bias is not None:
                o = o + L.o_bias
            if s.ffn_norms:   # Gemma's sandwich norms
                x = x + self._rms(o.float(), L.ln2)
                h = self._rms(x, L.ln3)
            else:
                x = x + o
                h = self._rms(x, L.ln2)
            gu = L.gate_up(h.to(dt))
            if dt != self.dtype:   # fused one-row kernels return float32: the activation runs in bfloat16 as the reference's does
                gu = gu.to(self.dtype)
            if L.gate_up_bias is not None:
                gu = gu + L.gate_up_bias.to(gu.dtype)
            g_, u = gu[..., : s.intermediate], gu[..., s.intermediate:]
            h = (F.silu(g_) if s.act == "silu" else F.gelu(g_, approximate="tanh")) * u
            if L.down_in is not None:
                h = L.down_in(h.float()).to(dt)
            h = L.down(h)
            if L.down_bias is not None:
                h = h + L.down_bias
            x = x + (self._rms(h.float(), L.ln4) if s.ffn_norms else h)
        if rows is not None:
            x = x[:, rows]
        xn = self._rms(x, self.norm)
        logits = self.head(xn.to(dt)).float()
        if s.final_softcap:
            logits = torch.tanh(logits / s.final_softcap) * s.final_softcap
        return (logits, xn) if hidden else logits


def _tree_mask(tree, input_pos: torch.Tensor, kv_len: int, window: int | None) -> torch.Tensor:
    """The [T, kv_len] attention mask of T draft-tree nodes (the last T of kv_len slots): every slot before the last S,
    plus those of the last S the tree mask [T, S] marks; with a sliding `window`, only keys less than a window behind
    the node's position (a slot before the new nodes counts as its own position: exact for the committed text, which
    is all a verification sees)."""
    rope_pos, tmask = tree
    t, s = tmask.shape
    m = torch.ones(t, kv_len, dtype=torch.bool, device=input_pos.device)
    m[:, kv_len - s:] = tmask.to(m.device)
    if window:
        kpos = torch.arange(kv_len, device=m.device)
        kpos[input_pos] = rope_pos.to(m.device)
        m &= (rope_pos.to(m.device)[:, None] - kpos[None, :]) < window
    return m
