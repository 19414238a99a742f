"""`LLMEngine`: continuous batching on a paged KV cache, over the runtime's packed decoder.

    eng = LLMEngine(model, tok, weights="int4", kv_cache_mb=256)
    eng.add_request("a", tok("Hello")["input_ids"], SamplingParams(max_tokens=32))
    while eng.has_unfinished():
        for out in eng.step(): ...        # RequestOutput: new tokens / text of one request

Each step runs ONE forward of the runtime `Decoder` over the scheduled tokens of all sequences, flattened
into a single row (prefill chunks and decodes alike; each token carries its own position for RoPE). The
decoder's attention is replaced by `_PagedAttention`: the new K/V are written into per-layer block pools
(`KVPool`: [num_blocks, block_size, kv_heads, head_dim], float32 or int8) at each token's slot, and each
sequence attends over the blocks of its block table (gathered with index_select) under a causal mask; all
decoding sequences of a step attend in one batched call over their padded block tables.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from ..core.errors import LeanLMError
from ..runtime.model import Decoder
from ..runtime.sampling import next_token
from ..speculative.drafters import PromptLookupDrafter
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


class KVPool:
    """Per-layer K and V block pools [num_blocks, block_size, kv_heads, head_dim]: float32, or int8 with one
    float32 scale per (block, slot, head) (symmetric per token and head: about a quarter of the bytes).
    Slot-major blocks make a step's write one index_copy_ over (block * block_size + offset)."""

    def __init__(self, layers: int, num_blocks: int, kv_heads: int, block_size: int, head_dim: int, dtype: str):
        shape = (num_blocks, block_size, kv_heads, head_dim)
        self.int8 = dtype == "int8"
        t = torch.int8 if self.int8 else torch.float32
        self.k = [torch.zeros(shape, dtype=t) for _ in range(layers)]
        self.v = [torch.zeros(shape, dtype=t) for _ in range(layers)]
        self.ks = [torch.zeros(shape[:3]) for _ in range(layers)] if self.int8 else None
        self.vs = [torch.zeros(shape[:3]) for _ in range(layers)] if self.int8 else None

    @staticmethod
    def block_bytes(layers: int, kv_heads: int, block_size: int, head_dim: int, dtype: str) -> int:
        per = head_dim + 4 if dtype == "int8" else head_dim * 4
        return layers * 2 * kv_heads * block_size * per

    def write(self, i: int, slot: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v [N, kv_heads, head_dim] float32 into the flat slots block * block_size + offset."""
        for pool, scales, x in ((self.k, self.ks, k), (self.v, self.vs, v)):
            if self.int8:
                sc = x.abs().amax(-1).clamp_min(1e-8) / 127
                scales[i].view(-1, sc.shape[1]).index_copy_(0, slot, sc)
                x = (x / sc[..., None]).round_().to(torch.int8)
            pool[i].view(-1, *x.shape[1:]).index_copy_(0, slot, x)

    def gather(self, i: int, tables: torch.Tensor, ctx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `ctx` slots of each row of block tables [S, blocks] as float32 [S, kv_heads, ctx, head_dim]
        K and V (one index_select per pool for every sequence at once)."""
        S, nb = tables.shape
        out = []
        for pool, scales in ((self.k, self.ks), (self.v, self.vs)):
            x = pool[i].index_select(0, tables.reshape(-1))
            if self.int8:
                x = x.float() * scales[i].index_select(0, tables.reshape(-1))[..., None]
            _, bs, h, d = x.shape
            out.append(x.view(S, nb * bs, h, d)[:, :ctx].transpose(1, 2))
        return out[0], out[1]


class _PagedAttention:
    """The `attend` callback of `Decoder.forward` for one engine step.

    Decoding sequences (one new token each) attend together: their block tables are padded to the longest
    one, gathered with one index_select per pool, and masked per row, so one batched matmul pair serves them
    all. Prefill chunks attend one sequence at a time under a causal mask."""

    def __init__(self, dec: Decoder, pool: KVPool, sched: list[Scheduled], tables: dict, block_size: int):
        self.dec, self.pool = dec, pool
        s = dec.spec
        g = s.heads // s.kv_heads
        windows = set(s.windows)
        pos, self.seqs, dec_rows, dec_tabs, dec_pos = [], [], [], [], []
        t0 = 0
        for sc in sched:
            p = torch.arange(sc.start, sc.start + sc.length)
            pos.append(p)
            ctx = sc.start + sc.length
            table = tables[sc.seq.request_id][: -(-ctx // block_size)]
            if sc.length == 1:
                dec_rows.append(t0)
                dec_tabs.append(table)
                dec_pos.append(sc.start)
            else:
                keys = torch.arange(ctx)
                allowed = keys[None, :] <= p[:, None]
                biases = {}
                for w in windows:
                    m = allowed if w is None else allowed & (p[:, None] - keys[None, :] < w)
                    biases[w] = torch.zeros(m.shape).masked_fill_(~m, float("-inf")).repeat(g, 1)
                self.seqs.append((t0, sc.length, torch.tensor(table), ctx, biases))
            t0 += sc.length
        self.n = t0
        self.pos = torch.cat(pos)
        self.dec_rows = torch.tensor(dec_rows, dtype=torch.long)
        if dec_rows:
            nb = max(len(t) for t in dec_tabs)
            self.dec_tables = torch.tensor([t + [t[0]] * (nb - len(t)) for t in dec_tabs])
            dp = torch.tensor(dec_pos)
            self.dec_ctx = int(dp.max()) + 1
            keys = torch.arange(self.dec_ctx)
            self.dec_bias = {}
            for w in windows:
                m = keys[None, :] <= dp[:, None]
                if w is not None:
                    m &= dp[:, None] - keys[None, :] < w
                b = torch.zeros(m.shape).masked_fill_(~m, float("-inf"))        # [S, ctx]
                self.dec_bias[w] = b[:, None, None, :].expand(-1, s.kv_heads, 1, -1).reshape(-1, 1, self.dec_ctx)
        tab = torch.cat([torch.tensor(tables[sc.seq.request_id]) for sc in sched])
        offs = torch.tensor([0] + [len(tables[sc.seq.request_id]) for sc in sched[:-1]]).cumsum(0)
        seq_of = torch.repeat_interleave(torch.arange(len(sched)), torch.tensor([sc.length for sc in sched]))
        self.slot = tab[offs[seq_of] + self.pos // block_size] * block_size + self.pos % block_size

    def __call__(self, i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self.pool.write(i, self.slot, k[0], v[0])
        window = self.dec.spec.windows[i]
        if not self.seqs:   # decodes only: the common step under load
            K, V = self.pool.gather(i, self.dec_tables, self.dec_ctx)
            return self.dec._attend(q[0][:, None], K, V, self.dec_bias[window]).view(1, self.n, -1)
        out = q.new_empty(1, self.n, q.shape[2] * q.shape[3])
        if len(self.dec_rows):
            K, V = self.pool.gather(i, self.dec_tables, self.dec_ctx)
            out[0, self.dec_rows] = self.dec._attend(q[0, self.dec_rows][:, None], K, V, self.dec_bias[window])[:, 0]
        for t0, T, table, ctx, biases in self.seqs:
            K, V = self.pool.gather(i, table[None], ctx)
            out[:, t0:t0 + T] = self.dec._attend(q[:, t0:t0 + T], K, V, biases[window])
        return out


class LLMEngine:
    def __init__(self, model: nn.Module, tokenizer=None, weights: str | None = None, *, group_size: int = 64,
                 head: str | None = None, kv_cache_mb: float = 256, block_size: int = 16, max_num_seqs: int = 16,
                 max_num_batched_tokens: int = 512, max_model_len: int = 2048, prefix_caching: bool = True,
                 kv_dtype: str = "float32", allow_fallback: bool = False, speculative: str | None = None,
                 num_draft: int = 4):
        if max_model_len < 2 or max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise LeanLMError(f"max_model_len >= 2, max_num_seqs >= 1 and max_num_batched_tokens >= 1 needed, got "
                              f"{max_model_len}, {max_num_seqs}, {max_num_batched_tokens}")
        with torch.no_grad():
            self.model = Decoder(model, weights, group_size=group_size, head=head, max_seq_len=max_model_len,
                                 max_batch=1, allow_fallback=allow_fallback).eval()
        for L in self.model.layers:   # the paged pools below replace the decoder's dense cache
            L.k_cache = L.v_cache = torch.empty(0)
        self.tokenizer, self.max_model_len = tokenizer, max_model_len
        s = self.model.spec
        if kv_dtype not in ("float32", "int8"):
            raise LeanLMError(f"unknown KV-cache dtype {kv_dtype!r}; choose float32 or int8")
        per_block = KVPool.block_bytes(s.n_layers, s.kv_heads, block_size, s.head_dim, kv_dtype)
        num_blocks = int(kv_cache_mb * 2**20) // per_block
        if num_blocks < 1:
            raise LeanLMError(f"--kv-cache-mb {kv_cache_mb} holds no block of {block_size} tokens "
                              f"({per_block / 2**20:.2f} MB each); raise it")
        self.pool = KVPool(s.n_layers, num_blocks, s.kv_heads, block_size, s.head_dim, kv_dtype)
        self.blocks = BlockManager(num_blocks, block_size, prefix_caching)
        self.scheduler = Scheduler(self.blocks, max_num_seqs, max_num_batched_tokens)
        eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
        if eos is None:
            eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None) or getattr(model.config, "eos_token_id", None)
        self.eos = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
        self.seqs: dict[str, Sequence] = {}
        self.stats = Stats()
        if speculative not in (None, "prompt-lookup"):
            raise LeanLMError(f"unknown speculation {speculative!r}; choose prompt-lookup (or none)")
        if num_draft < 1:
            raise LeanLMError(f"num_draft must be >= 1, got {num_draft}")
        self.drafter = PromptLookupDrafter() if speculative else None
        self.num_draft = num_draft

    # ------------------------------------------------------------------ requests
    def add_request(self, request_id: str, prompt: list[int], params: SamplingParams | None = None) -> None:
        params = params or SamplingParams()
        params.config()   # validates temperature / top_k / top_p
        if request_id in self.seqs:
            raise LeanLMError(f"request id {request_id!r} is already in use")
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
        gen = None
        if params.temperature > 0:
            gen = torch.Generator().manual_seed(params.seed if params.seed is not None else torch.seed())
        seq = Sequence(request_id, list(prompt), params, time.perf_counter(), generator=gen)
        self.seqs[request_id] = seq
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> bool:
        """Cancel a request and free its blocks at once; False when it is unknown or already finished."""
        seq = self.seqs.pop(request_id, None)
        if seq is None:
            return False
        self.scheduler.remove(seq)
        return True

    def has_unfinished(self) -> bool:
        return bool(self.seqs)

    def num_unfinished(self) -> int:
        return len(self.seqs)

    # ------------------------------------------------------------------ one iteration
    def _draft(self) -> None:
        """Prompt-lookup drafts for greedy sequences that are decoding (speculation inside the batch): the
        draft is verified in the same forward as the other sequences' steps; a greedy output is unchanged."""
        for seq in self.scheduler.running:
            seq.draft = []
            room = seq.params.max_tokens - len(seq.output) - 1   # the verified step also yields one token of its own
            if seq.params.temperature > 0 or room < 1 or seq.computed != len(seq.tokens) - 1:
                continue
            d = self.drafter.lookup(torch.tensor(seq.tokens), min(self.num_draft, room))
            seq.draft = d.tolist()

    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        if self.drafter is not None:
            self._draft()
        sched = self.scheduler.schedule()
        if not sched:
            return []
        ids = torch.tensor([t for sc in sched for t in sc.seq.feed[sc.start:sc.start + sc.length]])
        attend = _PagedAttention(self.model, self.pool, sched, self.blocks.tables, self.blocks.block_size)
        ends = torch.tensor([sc.length for sc in sched]).cumsum(0) - 1
        rows = []   # logits rows: the last token of each sampling chunk, and the positions of its draft
        for sc, e in zip(sched, ends.tolist()):
            if sc.samples:
                rows.extend(range(e - len(sc.seq.draft), e + 1))
        logits = self.model(ids[None], attend.pos, 0, attend=attend, rows=torch.tensor(rows, dtype=torch.long))[0]   # only rows that sample
        outs, r, now = [], 0, time.perf_counter()
        for sc in sched:
            seq = sc.seq
            if not sc.samples:
                seq.computed += sc.length
                self.blocks.commit(seq.request_id, seq.tokens, seq.computed)
                continue
            d = len(seq.draft)
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
            text = self.tokenizer.decode(seq.output, skip_special_tokens=True)
            cut = min((i for i in (text.find(s) for s in p.stop) if i >= 0), default=-1)
            if cut >= 0:
                text, seq.finish_reason = text[:cut], "stop"
            seq.text = text
            if seq.finish_reason is None:   # hold back a possible start of a stop string or a partial UTF-8 character
                held = max([len(s) - 1 for s in p.stop] + [1 if text.endswith("\ufffd") else 0])
        end = max(seq.sent, len(seq.text) - held)
        delta, seq.sent = seq.text[seq.sent:end], end
        finished = seq.finish_reason is not None
        if finished:
            self.seqs.pop(seq.request_id, None)
            self.scheduler.remove(seq)
            self.stats.e2e.observe(now - seq.arrival)
        return RequestOutput(seq.request_id, [tok], delta, finished, seq.finish_reason, len(seq.prompt), len(seq.output))
