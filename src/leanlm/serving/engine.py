"""`LLMEngine`: continuous batching on a paged KV cache, over the runtime's packed decoder.

    eng = LLMEngine(model, tok, weights="int4", kv_cache_mb=256)
    eng.add_request("a", tok("Hello")["input_ids"], SamplingParams(max_tokens=32))
    while eng.has_unfinished():
        for out in eng.step(): ...        # RequestOutput: new tokens / text of one request

Each step runs ONE forward of the runtime `Decoder` over the scheduled tokens of all sequences, flattened
into a single row (prefill chunks and decodes alike; each token carries its own position for RoPE). The
decoder's attention is replaced by `_PagedAttention`: the new K/V are written into per-layer block pools
(`KVPool`: [kv_heads, num_blocks, block_size, head_dim], float32 or int8) at each token's slot, and each
sequence attends over the blocks of its block table (gathered with index_select into a reused workspace) under
a causal mask; all decoding sequences of a step attend in one batched call over their padded block tables.
int4/int8 weight-only layers run from bfloat16 copies in steps of at least `dense_rows` token rows (`RowSwitch`).

A step whose only work is ONE sequence's one-token decode (a single client) runs the runtime's one-call fused step
(`Decoder.fused_step`, the batch-1 path of `leanlm generate`) over a dense copy of that sequence's KV cache: the copy is
loaded from the paged pools when another sequence (or a resumed one) takes the solo path, and each solo step mirrors
its new K/V into the pools, so the paged cache stays the one source of truth for batches, the prefix cache and
preemption (float32 KV blocks, CPU, fused kernels built; `fused_step=False` turns it off).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from ..core.errors import LeanLMError
from ..runtime import kernels
from ..runtime.layouts import DenseWeight
from ..runtime.model import Decoder
from ..runtime.sampling import Sampling, next_token
from ..speculative.drafters import ModelDrafter, PromptLookupDrafter
from .block_manager import BlockManager
from .metrics import Stats
from .scheduler import SamplingParams, Scheduled, Scheduler, Sequence


@dataclass
class RequestOutput:
    request_id: str
    token_ids: list[int]          # tokens generated this step
    text: str                     # text released this step (held back while it may be part of a stop string)
    finished: bool
    finish_reason: str | None     # "stop" (EOS or a stop string), "length" or "abort"
    prompt_tokens: int
    completion_tokens: int


KV_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int8": torch.int8}


class KVPool:
    """Per-layer K and V block pools [kv_heads, num_blocks, block_size, head_dim]: float32, bfloat16 (half the bytes;
    K and V are rounded to bfloat16 as they are written), or int8 with one float32 scale per (head, block, slot)
    (symmetric per token and head: about a quarter of the bytes).

    Head-major pools make a gather of block tables land as [kv_heads, sequences, context, head_dim] with one
    index_select into a reused workspace: attention reads it as one batched matmul without any transpose
    copy, and no step allocates (and page-faults in) fresh megabytes per layer."""

    def __init__(self, layers: int, num_blocks: int, kv_heads: int, block_size: int, head_dim: int, dtype: str,
                 device: torch.device = torch.device("cpu")):
        shape = (kv_heads, num_blocks, block_size, head_dim)
        self.int8 = dtype == "int8"
        self.device = device
        t = KV_DTYPES[dtype]
        self.k = [torch.zeros(shape, dtype=t, device=device) for _ in range(layers)]
        self.v = [torch.zeros(shape, dtype=t, device=device) for _ in range(layers)]
        self.ks = [torch.zeros(shape[:3], device=device) for _ in range(layers)] if self.int8 else None
        self.vs = [torch.zeros(shape[:3], device=device) for _ in range(layers)] if self.int8 else None
        self.kv_heads, self.block_size, self.head_dim = kv_heads, block_size, head_dim
        self._ws: dict[str, torch.Tensor] = {}
        # decode attention reads the CPU pools in place with the runtime's C++ kernel (LEANLM_KERNELS=0: off)
        self.paged_kernel = self.device.type == "cpu" and kernels.available()

    @staticmethod
    def block_bytes(layers: int, kv_heads: int, block_size: int, head_dim: int, dtype: str) -> int:
        per = head_dim + 4 if dtype == "int8" else head_dim * KV_DTYPES[dtype].itemsize
        return layers * 2 * kv_heads * block_size * per

    def workspace(self, name: str, shape: tuple, dtype=torch.float32) -> torch.Tensor:
        """A reused buffer (grown, never shrunk) viewed as `shape`."""
        n = 1
        for x in shape:
            n *= x
        buf = self._ws.get(name)
        if buf is None or buf.numel() < n or buf.dtype != dtype:
            buf = self._ws[name] = torch.empty(max(n, 2 * (0 if buf is None else buf.numel())), dtype=dtype, device=self.device)
        return buf[:n].view(shape)

    def write(self, i: int, slot: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v [N, kv_heads, head_dim] float32 into the flat slots block * block_size + offset (rounded to the pool's dtype)."""
        h, d = self.kv_heads, self.head_dim
        for pool, scales, x in ((self.k, self.ks, k), (self.v, self.vs, v)):
            x = x.transpose(0, 1)   # [kv_heads, N, head_dim]
            if self.int8:
                sc = x.abs().amax(-1).clamp_min(1e-8) / 127
                scales[i].view(h, -1).index_copy_(1, slot, sc)
                x = (x / sc[..., None]).round_()
            pool[i].view(h, -1, d).index_copy_(1, slot, x.to(pool[i].dtype))

    def gather(self, i: int, tables: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every slot of each row of block tables [S, blocks] as float32 K and V [kv_heads, S, blocks * block_size,
        head_dim], views of the workspace (valid until the next gather)."""
        S, nb = tables.shape
        flat = tables.reshape(-1)
        shape = (self.kv_heads, S * nb, self.block_size, self.head_dim)
        out = []
        for name, pool, scales in (("k", self.k, self.ks), ("v", self.v, self.vs)):
            buf = self.workspace(name, shape)
            if self.int8:
                codes = self.workspace(name + "8", shape, torch.int8)
                sc = self.workspace(name + "s", shape[:3])
                torch.index_select(pool[i], 1, flat, out=codes)
                torch.index_select(scales[i], 1, flat, out=sc)
                torch.mul(codes, sc[..., None], out=buf)
            elif pool[i].dtype != torch.float32:
                part = self.workspace(name + "16", shape, pool[i].dtype)
                torch.index_select(pool[i], 1, flat, out=part)
                buf.copy_(part)
            else:
                torch.index_select(pool[i], 1, flat, out=buf)
            out.append(buf.view(self.kv_heads, S, nb * self.block_size, self.head_dim))
        return out[0], out[1]


class _PagedAttention:
    """The `attend` callback of `Decoder.forward` for one engine step.

    Decoding sequences (one new token each) attend together: their block tables are padded to the longest
    one, gathered head-major (`KVPool.gather`), and masked per row, so one batched matmul pair serves them
    all. Prefill chunks attend one sequence at a time under a causal mask."""

    def __init__(self, dec: Decoder, pool: KVPool, sched: list[Scheduled], tables: dict, block_size: int):
        self.dec, self.pool = dec, pool
        s = dec.spec
        g = s.heads // s.kv_heads
        windows = set(s.windows)
        pos, self.seqs, dec_rows, dec_tabs, dec_pos = [], [], [], [], []
        t0 = 0
        for sc in sched:
            table = tables[sc.seq.request_id]
            ctx = sc.start + sc.length
            nb = -(-ctx // block_size)
            if sc.length == 1:
                dec_rows.append(t0)
                dec_tabs.append(table[:nb])
                dec_pos.append(sc.start)
                pos.append(sc.start)
            else:
                p = torch.arange(sc.start, ctx)
                pos.extend(p.tolist())
                keys = torch.arange(ctx)
                allowed = keys[None, :] <= p[:, None]
                biases = {}
                for w in windows:
                    m = allowed if w is None else allowed & (p[:, None] - keys[None, :] < w)
                    biases[w] = torch.zeros(m.shape).masked_fill_(~m, float("-inf")).repeat(g, 1)
                self.seqs.append((t0, sc.length, torch.tensor(table[:nb]), ctx, biases))
            t0 += sc.length
        self.n = t0
        self.pos = torch.tensor(pos)
        self.dec_rows = torch.tensor(dec_rows, dtype=torch.long)
        self.dec_pos = torch.tensor(dec_pos, dtype=torch.long)
        self.all_decode = len(dec_rows) == t0
        if dec_rows:
            nb = max(len(t) for t in dec_tabs)
            self.dec_tables = torch.tensor([t + [t[0]] * (nb - len(t)) for t in dec_tabs])
            dp = self.dec_pos
            keys = torch.arange(nb * block_size)
            S = len(dec_rows)
            self.dec_bias = {}
            for w in ([] if pool.paged_kernel else windows):   # the in-place kernel masks by position itself
                m = keys[None, :] <= dp[:, None]
                if w is not None:
                    m &= dp[:, None] - keys[None, :] < w
                b = torch.zeros(m.shape).masked_fill_(~m, float("-inf"))        # [S, keys]
                self.dec_bias[w] = b[None, :, None, :].expand(s.kv_heads, -1, -1, -1).reshape(s.kv_heads * S, 1, -1)
        # each token's cache slot: its sequence's block at pos // block_size, offset pos % block_size
        self.slot = torch.tensor([tables[sc.seq.request_id][p // block_size] * block_size + p % block_size
                                  for sc in sched for p in range(sc.start, sc.start + sc.length)])
        dev = pool.device
        if dev.type != "cpu":   # built on the CPU (small index and mask tensors), moved once per step
            self.pos, self.dec_rows, self.slot = self.pos.to(dev), self.dec_rows.to(dev), self.slot.to(dev)
            if dec_rows:
                self.dec_tables = self.dec_tables.to(dev)
                self.dec_bias = {w: b.to(dev) for w, b in self.dec_bias.items()}
            self.seqs = [(t0, T, table.to(dev), ctx, {w: b.to(dev) for w, b in biases.items()})
                         for t0, T, table, ctx, biases in self.seqs]

    def _decode(self, i: int, q: torch.Tensor, window) -> torch.Tensor:
        """q [S, H, D] of the decoding rows -> [S, H*D]: the C++ kernel reading the pools in place (`paged_kernel`),
        else a gather and one baddbmm / softmax / bmm over [kv_heads * S] batches."""
        s = self.dec.spec
        if self.pool.paged_kernel:
            p, flat = self.pool, (self.pool.kv_heads, -1, self.pool.head_dim)
            ks, vs = (p.ks[i], p.vs[i]) if p.int8 else (None, None)
            return torch.ops.leanlm.paged_attention(q.float().contiguous(), p.k[i].view(flat), p.v[i].view(flat), ks, vs,
                                                    self.dec_tables, self.dec_pos, p.block_size, window or 0, s.attn_scale)
        S, H, D = q.shape
        g = H // s.kv_heads
        K, V = self.pool.gather(i, self.dec_tables)             # [Hkv, S, N, D]
        N = K.shape[2]
        q3 = q.view(S, s.kv_heads, g, D).transpose(0, 1).reshape(s.kv_heads * S, g, D)
        att = torch.baddbmm(self.dec_bias[window], q3, K.view(-1, N, D).transpose(1, 2), alpha=s.attn_scale)
        o = torch.bmm(att.softmax(-1), V.view(-1, N, D))        # [Hkv * S, g, D]
        return o.view(s.kv_heads, S, g, D).transpose(0, 1).reshape(S, H * D)

    def __call__(self, i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self.pool.write(i, self.slot, k[0], v[0])
        window = self.dec.spec.windows[i]
        if self.all_decode:   # decodes only: the common step under load
            return self._decode(i, q[0], window).view(1, self.n, -1)
        out = q.new_empty(1, self.n, q.shape[2] * q.shape[3])
        if len(self.dec_rows):
            out[0, self.dec_rows] = self._decode(i, q[0, self.dec_rows], window)
        for t0, T, table, ctx, biases in self.seqs:
            K, V = self.pool.gather(i, table[None])              # [Hkv, 1, N, D]
            K, V = K.transpose(0, 1)[:, :, :ctx], V.transpose(0, 1)[:, :, :ctx]
            out[:, t0:t0 + T] = self.dec._attend(q[:, t0:t0 + T], K, V, biases[window])
        return out


class RowSwitch(nn.Module):
    """A packed int4/int8 weight-only layer plus a bfloat16 copy of its dequantized weight: a matmul over at least
    `rows` token rows runs the copy (one oneDNN bf16 GEMM), fewer rows the packed kernel. PyTorch's int4/int8 kernels
    win at a few rows (they read 2-4x fewer bytes) and lose from about 16 rows on, by about 2x at 64
    (bench/results/serve_profile.md, serve_layouts.md),
    so a continuous batch picks its layout by its size every step. The copy costs 2 bytes per weight."""

    def __init__(self, packed: nn.Module, rows: int):
        super().__init__()
        self.packed, self.rows = packed, rows
        self.dense = DenseWeight(packed.dequantize(), torch.bfloat16)
        self.out_features, self.in_features = packed.out_features, packed.in_features
        for name in ("tiled", "fast"):   # Decoder.one_row_kernels() looks at the packed layout's batch-1 kernels
            if hasattr(packed, name):
                setattr(self, name, getattr(packed, name))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() >= self.rows * self.in_features:
            return self.dense(x.to(torch.bfloat16))
        return self.packed(x)


def _switch_layouts(dec: Decoder, rows: int) -> int:
    """Wrap every int4/int8 weight-only layer of `dec` (body and head) in a `RowSwitch`; returns the copies' bytes."""
    extra = 0
    targets = [(L, n) for L in dec.layers for n in ("qkv", "o", "gate_up", "down")] + [(dec, "head")]
    for mod, name in targets:
        lay = getattr(mod, name)
        if type(lay).__name__ in ("Int4Weight", "Int8Weight"):
            sw = RowSwitch(lay, rows)
            setattr(mod, name, sw)
            extra += sw.dense.weight.numel() * sw.dense.weight.element_size()
    return extra


class LLMEngine:
    def __init__(self, model: nn.Module, tokenizer=None, weights: str | None = None, *, group_size: int = 64,
                 head: str | None = None, kv_cache_mb: float = 256, block_size: int = 16, max_num_seqs: int = 16,
                 max_num_batched_tokens: int = 512, max_model_len: int = 2048, prefix_caching: bool = True,
                 kv_dtype: str = "auto", allow_fallback: bool = False, speculative: str | None = None,
                 num_draft: int = 4, spec_max_batch: int = 2, dense_rows: int = 16, device: str = "cpu",
                 fused_step: bool = True, draft_model: nn.Module | None = None):
        if max_model_len < 2 or max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise LeanLMError(f"max_model_len >= 2, max_num_seqs >= 1 and max_num_batched_tokens >= 1 needed, got "
                              f"{max_model_len}, {max_num_seqs}, {max_num_batched_tokens}")
        if kv_dtype not in ("auto", *KV_DTYPES):
            raise LeanLMError(f"unknown KV-cache dtype {kv_dtype!r}; choose auto, {', '.join(KV_DTYPES)}")
        if speculative not in (None, "prompt-lookup", "draft"):
            raise LeanLMError(f"unknown speculation {speculative!r}; choose prompt-lookup or draft (or none)")
        if (speculative == "draft") != (draft_model is not None):
            raise LeanLMError("speculative='draft' needs a draft model (CLI: --draft-model), and a draft model needs "
                              "speculative='draft'")
        if num_draft < 1:
            raise LeanLMError(f"num_draft must be >= 1, got {num_draft}")
        if spec_max_batch < 1:
            raise LeanLMError(f"spec_max_batch must be >= 1, got {spec_max_batch}")
        with torch.no_grad():
            self.model = Decoder(model, weights, group_size=group_size, head=head, max_seq_len=max_model_len,
                                 max_batch=1, allow_fallback=allow_fallback).eval()
        self.device = torch.device(device)
        # auto: the KV cache in the dtype the weights' matmuls run in (vLLM's "auto" does the same): float32 for float32
        # weights, where the tests hold batched outputs exactly equal to a lone decode; else bfloat16, half the bytes
        # the decode attention reads (V leaves a bfloat16 matmul exactly representable; K is rounded after RoPE)
        if kv_dtype == "auto":
            kv_dtype = "float32" if self.model.dtype == torch.float32 else "bfloat16"
        self.kv_dtype = kv_dtype
        # one sequence decoding alone runs the one-call step over the decoder's dense caches (built before the layouts
        # are wrapped: it holds the packed tensors themselves); otherwise the paged pools below replace those caches
        if fused_step and self.device.type == "cpu" and kv_dtype != "int8":
            self.model.step, self.model.step_why = self.model.fused_step()
        self._solo_at: tuple[str, int] | None = None   # (request id, tokens) whose KV the dense caches hold
        if self.model.step is None:
            for L in self.model.layers:
                L.k_cache = L.v_cache = torch.empty(0)
        if dense_rows < 0:
            raise LeanLMError(f"dense_rows must be >= 0 (0: never use bfloat16 copies), got {dense_rows}")
        # steps of >= dense_rows token rows run int4/int8 layers from bfloat16 copies (memory: dense_copy_bytes)
        self.dense_copy_bytes = _switch_layouts(self.model, dense_rows) if dense_rows else 0
        self.model.to_device(self.device)   # a GPU: PyTorch's CUDA kernels for every layout (runtime/model.py)
        self.tokenizer, self.max_model_len = tokenizer, max_model_len
        s = self.model.spec
        per_block = KVPool.block_bytes(s.n_layers, s.kv_heads, block_size, s.head_dim, kv_dtype)
        num_blocks = int(kv_cache_mb * 2**20) // per_block
        if num_blocks < 1:
            raise LeanLMError(f"--kv-cache-mb {kv_cache_mb} holds no block of {block_size} tokens "
                              f"({per_block / 2**20:.2f} MB each); raise it")
        self.pool = KVPool(s.n_layers, num_blocks, s.kv_heads, block_size, s.head_dim, kv_dtype, self.device)
        self.blocks = BlockManager(num_blocks, block_size, prefix_caching)
        self.scheduler = Scheduler(self.blocks, max_num_seqs, max_num_batched_tokens)
        eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
        if eos is None:
            eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None) or getattr(model.config, "eos_token_id", None)
        self.eos = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
        self.seqs: dict[str, Sequence] = {}
        self.stats = Stats()
        if draft_model is not None:
            dv = getattr(getattr(draft_model, "config", None), "vocab_size", None)
            if dv != s.vocab:
                raise LeanLMError(f"the draft model's vocabulary ({dv}) is not the target's ({s.vocab}); "
                                  "draft with a model of the same tokenizer")
        self.drafter = PromptLookupDrafter() if speculative == "prompt-lookup" else None
        # a draft model drafts for each sequence through its own KV cache (a `ModelDrafter` around the shared model,
        # rewound to what the sequence has committed), made when the sequence first drafts, dropped when it ends
        self.draft_model = draft_model.eval() if draft_model is not None else None
        self._drafters: dict[str, ModelDrafter] = {}
        self.num_draft, self.spec_max_batch = num_draft, spec_max_batch

    # ------------------------------------------------------------------ requests
    def add_request(self, request_id: str, prompt: list[int], params: SamplingParams | None = None,
                    arrival: float | None = None) -> None:
        """Queue a request (``arrival``: its ``time.perf_counter()`` when it reached the server, for TTFT)."""
        params = params or SamplingParams()
        if request_id in self.seqs:
            raise LeanLMError(f"request id {request_id!r} is already in use")
        self.check_request(prompt, params)
        gen = None
        if params.temperature > 0:
            gen = torch.Generator().manual_seed(params.seed if params.seed is not None else torch.seed())
        seq = Sequence(request_id, list(prompt), params, time.perf_counter() if arrival is None else arrival, generator=gen)
        self.seqs[request_id] = seq
        self.scheduler.add(seq)

    def check_request(self, prompt: list[int], params: SamplingParams) -> None:
        """Raise LeanLMError if the engine can never serve this request. Reads only the engine's fixed
        configuration, so another thread may call it while the engine steps (the server does)."""
        params.config()   # validates temperature / top_k / top_p
        if not prompt:
            raise LeanLMError("the prompt is empty; give at least one token")
        if params.max_tokens < 1:
            raise LeanLMError(f"max_tokens must be >= 1, got {params.max_tokens}")
        if any(not 0 <= t < self.model.spec.vocab for t in prompt):
            raise LeanLMError(f"prompt token ids must lie in [0, {self.model.spec.vocab})")
        need = len(prompt) + params.max_tokens
        if need > self.max_model_len:
            raise LeanLMError(f"{len(prompt)} prompt tokens + max_tokens {params.max_tokens} exceed the context of "
                              f"{self.max_model_len} tokens; shorten the prompt or lower max_tokens")
        if self.blocks.blocks_for(need) > self.blocks.num_blocks:
            raise LeanLMError(f"{need} tokens need more KV blocks than the whole cache holds ({self.blocks.num_blocks} x "
                              f"{self.blocks.block_size}); lower max_tokens or raise --kv-cache-mb")

    def abort(self, request_id: str) -> bool:
        """Cancel a request and free its blocks at once; False when it is unknown or already finished."""
        seq = self.seqs.pop(request_id, None)
        if seq is None:
            return False
        self.scheduler.remove(seq)
        self._drafters.pop(request_id, None)
        return True

    def has_unfinished(self) -> bool:
        return bool(self.seqs)

    def num_unfinished(self) -> int:
        return len(self.seqs)

    # ------------------------------------------------------------------ one iteration
    def _draft(self) -> None:
        """Drafts (prompt lookup, or the draft model's greedy chain) for greedy sequences that are decoding
        (speculation inside the batch), while at most `spec_max_batch` sequences run: the draft is verified in the same
        forward as the other sequences' steps; a greedy output is unchanged."""
        busy = len(self.scheduler.running) > self.spec_max_batch   # drafts pay at a small batch only (docs/serving.md)
        for seq in self.scheduler.running:
            seq.draft = []
            if busy:
                continue
            room = seq.params.max_tokens - len(seq.output) - 1   # the verified step also yields one token of its own
            if seq.params.temperature > 0 or room < 1 or seq.computed != seq.num_tokens - 1:
                continue
            k = min(self.num_draft, room)
            if self.drafter is not None:
                seq.draft = self.drafter.lookup(torch.tensor(seq.tokens), k).tolist()
                continue
            dr = self._drafters.get(seq.request_id)
            if dr is None:
                dr = self._drafters[seq.request_id] = ModelDrafter(self.draft_model)
                dr.start(torch.tensor([seq.prompt]))
            seq.draft = dr.propose(torch.tensor([seq.tokens]), k, Sampling())[0][0].tolist()

    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        if self.drafter is not None or self.draft_model is not None:
            self._draft()
        sched = self.scheduler.schedule()
        if not sched:
            return []
        logits = self._solo_step(sched)
        if logits is None:
            ids = torch.tensor([t for sc in sched for t in sc.seq.feed[sc.start:sc.start + sc.length]], device=self.device)
            attend = _PagedAttention(self.model, self.pool, sched, self.blocks.tables, self.blocks.block_size)
            ends = torch.tensor([sc.length for sc in sched]).cumsum(0) - 1
            rows = []   # logits rows: the last token of each sampling chunk, and the positions of its draft
            for sc, e in zip(sched, ends.tolist()):
                if sc.samples:
                    rows.extend(range(e - len(sc.seq.draft), e + 1))
            logits = self.model(ids[None], attend.pos, 0, attend=attend, rows=torch.tensor(rows, dtype=torch.long, device=self.device))[0]   # only rows that sample
        greedy = logits.argmax(-1).tolist()   # one call for every greedy row of the step
        if logits.device.type != "cpu" and any(sc.samples and sc.seq.params.temperature > 0 for sc in sched):
            logits = logits.cpu()   # sampled rows draw with their request's CPU generator
        outs, r, now = [], 0, time.perf_counter()
        for sc in sched:
            seq = sc.seq
            if not sc.samples:
                seq.computed += sc.length
                self.blocks.commit(seq.request_id, seq.tokens, seq.computed)
                continue
            d = len(seq.draft)
            if seq.params.temperature == 0:
                toks = greedy[r:r + d + 1]
            else:
                toks = next_token(logits[r:r + d + 1], seq.params.config(), seq.generator).tolist()
            r += d + 1
            keep = 0   # accepted draft tokens: greedy verification keeps the draft while it equals the argmax
            while keep < d and toks[keep] == seq.draft[keep]:
                keep += 1
            self.stats.spec_draft_tokens += d
            self.stats.spec_accepted_tokens += keep
            seq.draft = []
            seq.computed += sc.length - d + keep
            for tok in toks[:keep + 1]:
                outs.append(self._append(seq, tok, now))
                if outs[-1].finished:
                    break
            else:
                self.blocks.commit(seq.request_id, seq.tokens, seq.computed)
        return outs

    def _solo_step(self, sched: list[Scheduled]) -> torch.Tensor | None:
        """Logits [1, V] when the step is one sequence's one-token decode and the one-call step is built, else None."""
        if self.model.step is None or len(sched) != 1 or sched[0].length != 1 or sched[0].seq.draft:
            return None
        seq, pos = sched[0].seq, sched[0].start
        bs, table = self.blocks.block_size, self.blocks.tables[seq.request_id]
        layers = self.model.layers
        if self._solo_at != (seq.request_id, pos):   # load the sequence's cached tokens from the pools
            if pos:
                tab = torch.tensor(table[: -(-pos // bs)])[None]
                for i, L in enumerate(layers):
                    K, V = self.pool.gather(i, tab)            # [Hkv, 1, blocks * bs, D]
                    L.k_cache[0, :, :pos] = K[:, 0, :pos]
                    L.v_cache[0, :, :pos] = V[:, 0, :pos]
            self.stats.solo_loads += 1
        logits = self.model.fused_one(torch.tensor([seq.feed[pos]]), pos).view(1, -1)
        slot = torch.tensor([table[pos // bs] * bs + pos % bs])
        for i, L in enumerate(layers):   # mirror the new K/V into the pools
            self.pool.write(i, slot, L.k_cache[0, :, pos][None], L.v_cache[0, :, pos][None])
        self._solo_at = (seq.request_id, pos + 1)
        self.stats.solo_steps += 1
        return logits

    def _detokenize(self, seq: Sequence, final: bool) -> str:
        """The text the newest output tokens add, decoding only them and a few tokens of context before them
        (the incremental detokenization of vLLM and TGI; decoding the whole output per token costs O(length^2)
        over a stream). A token that ends inside a UTF-8 character adds nothing until the character is complete
        (or the sequence finishes)."""
        a, b = seq.detok
        prefix = self.tokenizer.decode(seq.output[a:b], skip_special_tokens=True)
        full = self.tokenizer.decode(seq.output[a:], skip_special_tokens=True)
        if len(full) > len(prefix) and (final or not full.endswith("\ufffd")):
            seq.detok = (b, len(seq.output))
            return full[len(prefix):]
        return ""

    def _append(self, seq: Sequence, tok: int, now: float) -> RequestOutput:
        seq.output.append(tok)
        self.stats.generation_tokens += 1
        if seq.first_token_time is None:
            seq.first_token_time = now
            self.stats.prompt_tokens += len(seq.prompt)
            self.stats.ttft.observe(now - seq.arrival)
        else:
            self.stats.itl.observe(now - seq.last_token_time)
        seq.last_token_time = now
        p = seq.params
        if tok in self.eos and not p.ignore_eos:
            seq.finish_reason = "stop"
        elif len(seq.output) >= p.max_tokens:
            seq.finish_reason = "length"
        held = 0
        if self.tokenizer is not None:
            text = seq.text + self._detokenize(seq, seq.finish_reason is not None)
            cut = min((i for i in (text.find(s) for s in p.stop) if i >= 0), default=-1)
            if cut >= 0:
                text, seq.finish_reason = text[:cut], "stop"
            seq.text = text
            if seq.finish_reason is None:   # hold back a possible start of a stop string
                held = max([len(s) - 1 for s in p.stop] + [0])
        end = max(seq.sent, len(seq.text) - held)
        delta, seq.sent = seq.text[seq.sent:end], end
        finished = seq.finish_reason is not None
        if finished:
            self.seqs.pop(seq.request_id, None)
            self.scheduler.remove(seq)
            self._drafters.pop(seq.request_id, None)
            self.stats.e2e.observe(now - seq.arrival)
        return RequestOutput(seq.request_id, [tok], delta, finished, seq.finish_reason, len(seq.prompt), len(seq.output))
