"""`Engine`: a packed model with its static KV cache; the StepModel interface plus `generate`.

    eng = Engine(model, weights="int4")           # or a leanlm-quantized model (weights="auto")
    out = eng.generate(ids, max_new_tokens=64)     # greedy; temperature/top_k/top_p/seed to sample
    eng.reset(); logits = eng.forward(ids); eng.rewind(n)   # StepModel (speculative decoding)

A long prompt is prefilled in chunks of `prefill_chunk` tokens, each attending to the cache so far, so the
attention scores held at once are [chunk, context] rather than [prompt, prompt] (same logits).

Batch-1 steps run the fused int4/int8 kernels of `leanlm.runtime.kernels` when they are built (the default;
LEANLM_KERNELS=0 or ``kernels=False``: PyTorch's kernels, the reference path), as one C++ call per step
(`Decoder.fused_step`) when every matmul has a fused kernel; `Engine.kernels` names the path that runs.

With ``device="cuda"`` the packed model runs on a GPU (PyTorch's CUDA kernels for each layout, no fused CPU
kernels); `forward` takes ids on any device and returns logits on the CPU, where the decode loop and the sampler run.

With ``compile=True`` the one-token decode step is compiled by torch.compile (inductor, fixed shapes:
the attention reads a bucket of `kv_block` cache slots, so a new bucket compiles once); prefill and
multi-token verification steps run eagerly.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..core.errors import LeanLMError
from .model import Decoder
from .sampling import Sampling


class Engine:
    def __init__(self, model: nn.Module, weights: str | None = None, *, group_size: int = 64, head: str | None = None,
                 max_seq_len: int = 1024, max_batch: int = 1, compile: bool = False, kv_block: int = 256,
                 allow_fallback: bool = False, prefill_chunk: int = 512, kernels: bool = True, device: str = "cpu"):
        if max_seq_len < 1 or max_batch < 1 or prefill_chunk < 1:
            raise LeanLMError(f"max_seq_len, max_batch and prefill_chunk must be >= 1, got {max_seq_len}, {max_batch} and {prefill_chunk}")
        with torch.no_grad():
            self.model = Decoder(model, weights, group_size=group_size, head=head, max_seq_len=max_seq_len,
                                 max_batch=max_batch, allow_fallback=allow_fallback).eval()
        self.device = torch.device(device)
        if self.device.type != "cpu":
            self.model.to_device(self.device)
        elif not kernels:   # PyTorch's own int4/int8 kernels at batch 1 too (the reference path)
            for m in self.model.modules():
                if hasattr(m, "tiled"):
                    m.tiled = None
                if hasattr(m, "fast"):
                    m.fast = False
                if hasattr(m, "f32_rows"):
                    m.f32_rows = False
            self.model.one_row_f32 = False
            self.model.step_why = "kernels=False"
        else:   # the whole batch-1 step in one C++ call where every matmul has a fused kernel
            self.model.step, self.model.step_why = self.model.fused_step()
        from . import kernels as _k

        self.kernels = f"PyTorch's {self.device.type} kernels" if self.device.type != "cpu" else \
            "reference (kernels=False)" if not kernels else _k.path()
        if self.model.step is not None:
            self.kernels += ", one-call decode step"
        self.config = getattr(model, "config", None)
        self.fallbacks = self.model.fallbacks
        self.kv_block = kv_block
        self.prefill_chunk = prefill_chunk
        self.length = 0
        self.batch = None
        # keep_hidden (set by an EAGLE drafter): each forward keeps the final norm's output of its tokens in `hidden`
        # ([B, T, hidden], positions hidden_start..), run eagerly; off, plain decoding is unchanged
        self.keep_hidden, self.hidden, self.hidden_start = False, None, 0
        self.compiled = compile
        self._step = self.model.forward
        if compile:
            self._step = _compile(self.model.forward)

    # ------------------------------------------------------------------ StepModel
    def reset(self) -> None:
        self.length = 0
        self.batch = None

    def rewind(self, length: int) -> None:
        if not 0 <= length <= self.length:
            raise LeanLMError(f"cannot rewind to {length}: the cache holds {self.length} tokens")
        self.length = length

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """Append `ids` [B, T] after the cached tokens; float32 logits [B, T, vocab] ([B, vocab] of the last
        token with `last_only`, which keeps a long prefill's memory bounded)."""
        if ids.dim() != 2 or ids.dtype not in (torch.long, torch.int):
            raise LeanLMError(f"ids must be a 2-D LongTensor [batch, tokens], got {tuple(ids.shape)} {ids.dtype}")
        B, T = ids.shape
        if T == 0:
            raise LeanLMError("forward() needs at least one new token")
        if B > self.model.max_batch:
            raise LeanLMError(f"batch {B} exceeds the engine's max_batch={self.model.max_batch}; create the Engine with max_batch={B}")
        if self.batch is not None and self.length and B != self.batch:
            raise LeanLMError(f"the cache holds {self.batch} rows, got {B}; call reset() first")
        end = self.length + T
        if end > self.model.max_seq_len:
            raise LeanLMError(f"{self.length} cached + {T} new tokens exceed the cache of {self.model.max_seq_len} tokens; "
                              f"create the Engine with max_seq_len >= {end} (or a shorter prompt / fewer new tokens)")
        lo, hi = (v := int(ids), v) if ids.numel() == 1 else (int(ids.min()), int(ids.max()))   # one read for a decode step
        if lo < 0 or hi >= self.model.spec.vocab:
            raise LeanLMError(f"token ids must lie in [0, {self.model.spec.vocab}); got {lo}..{hi}")
        if ids.device != self.device:
            ids = ids.to(self.device)
        if T > self.prefill_chunk:   # chunked prefill: each chunk attends to the cache filled so far
            outs, hid, start = [], [], self.length
            for i in range(0, T, self.prefill_chunk):
                logits = self._run(ids[:, i:i + self.prefill_chunk], B)
                outs = [logits[:, -1]] if last_only else outs + [logits]
                if self.keep_hidden:
                    hid.append(self.hidden)
            if self.keep_hidden:
                self.hidden, self.hidden_start = torch.cat(hid, 1), start
            out = outs[0] if last_only else torch.cat(outs, dim=1)
            return out if out.device.type == "cpu" else out.cpu()
        logits = self._run(ids, B)
        logits = logits[:, -1] if last_only else logits
        return logits if logits.device.type == "cpu" else logits.cpu()

    @torch.inference_mode()
    def forward_tree(self, ids: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Append T draft-tree nodes `ids` [B, T] (leanlm.speculative.tree): node i is rotated at position pos[i] and
        sees what mask[i] ([T, S], S >= T) marks among the last S - T cached entries and the T new ones, every earlier
        cached entry too; float32 logits [B, T, vocab]. Every weight layout takes it (the mask lives in the
        attention, which is float32 for all)."""
        B, T = ids.shape
        end = self.length + T
        if end > self.model.max_seq_len:
            raise LeanLMError(f"{self.length} cached tokens + a draft tree of {T} exceed the cache of {self.model.max_seq_len} "
                              f"tokens; create the Engine with max_seq_len >= {end}")
        if self.batch is not None and self.length and B != self.batch:
            raise LeanLMError(f"the cache holds {self.batch} rows, got {B}; call reset() first")
        dev = self.device
        slots = torch.arange(self.length, end, device=dev)
        out = self.model.forward(ids.to(dev), slots, end, hidden=self.keep_hidden, tree=(pos.to(dev).long(), mask.to(dev).bool()))
        if self.keep_hidden:
            out, self.hidden = out
        self.hidden_start, self.length, self.batch = self.length, end, B
        return out if out.device.type == "cpu" else out.cpu()

    def compact(self, start: int, keep: torch.Tensor) -> None:
        """Keep the cached positions start + keep (ascending offsets) at start.. and drop the others after start
        (the accepted path of a draft tree)."""
        keep = keep.long()
        if not 0 <= start <= self.length or (len(keep) and (int(keep.min()) < 0 or start + int(keep.max()) >= self.length)):
            raise LeanLMError(f"cannot keep offsets {keep.tolist()} after position {start}: the cache holds {self.length}")
        idx = (start + keep).to(self.device)
        n = len(keep)
        for L in self.model.layers:
            for c in (L.k_cache, L.v_cache):
                c[:, :, start:start + n] = c.index_select(2, idx)
        if self.keep_hidden and self.hidden is not None and self.hidden_start == start:
            self.hidden = self.hidden[:, keep.to(self.hidden.device)]
        self.length = start + n

    def _run(self, ids: torch.Tensor, B: int) -> torch.Tensor:
        end = self.length + ids.shape[1]
        pos = torch.arange(self.length, end, device=self.device)
        if self.keep_hidden:
            logits, self.hidden = self.model.forward(ids, pos, end, hidden=True)
            self.hidden_start, self.length, self.batch = self.length, end, B
            return logits
        if ids.shape[1] == 1 and self.compiled:   # fixed shapes for the compiled step: a bucket of kv_block cache slots
            fn, kv_len = self._step, min(self.model.max_seq_len, -(-end // self.kv_block) * self.kv_block)
        else:                          # eager: attend over exactly the filled slots
            fn, kv_len = self.model.forward, end
        logits = fn(ids, pos, kv_len)
        self.length, self.batch = end, B
        return logits.clone() if ids.shape[1] == 1 and self.compiled else logits

    @torch.inference_mode()
    def warmup(self, prompt_tokens: int, new_tokens: int) -> float:
        """Run (and so compile) the decode steps a generation of `new_tokens` after a `prompt_tokens` prompt will
        use, one per cache bucket, then reset; returns the seconds it took (the compile time, for `compile=True`)."""
        import time

        t0 = time.perf_counter()
        end = min(self.model.max_seq_len, prompt_tokens + new_tokens)
        one = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        ends = [max(1, prompt_tokens)]   # one step ending in each kv_block bucket the generation reaches
        if self.compiled:
            ends += [k * self.kv_block + 1 for k in range(1, end // self.kv_block + 1) if prompt_tokens < k * self.kv_block + 1 <= end]
        for e in ends:
            self.reset()
            self.length = e - 1   # garbage cache slots are fine: the steps run for their shapes, and reset() follows
            self.forward(one)
        self.reset()
        return time.perf_counter() - t0

    # ------------------------------------------------------------------ generation
    @torch.inference_mode()
    def generate(self, ids: torch.Tensor, max_new_tokens: int = 32, *, temperature: float = 0.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int | None = None, eos_token_id: int | None = None,
                 on_token: Callable[[], None] | None = None) -> torch.Tensor:
        """Prompt rows of equal length [B, T] -> [B, T + new] (stops early only when every row hit `eos_token_id`;
        a row's tokens after its eos are eos). Runs `leanlm.speculative.decode.generate` on this engine."""
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
        sampling = Sampling(temperature, top_k, top_p, seed)
        need = ids.shape[1] + max_new_tokens - 1
        if need > self.model.max_seq_len:
            raise LeanLMError(f"a prompt of {ids.shape[1]} tokens + {max_new_tokens} new tokens needs a cache of {need} tokens, "
                              f"this engine holds {self.model.max_seq_len}; create it with max_seq_len >= {need}")
        from ..speculative.decode import generate  # the one decode loop over StepModels (this engine is one)

        return generate(self, ids, max_new_tokens, sampling, generator=sampling.generator(), eos_token_id=eos_token_id,
                        on_token=on_token)

    def generator(self):
        """A `leanlm.evaluation.speed` generator (greedy, no early stop)."""

        def gen(input_ids, max_new_tokens, on_token):
            return self.generate(input_ids, max_new_tokens, on_token=on_token)

        return gen

    def weight_bytes(self) -> int:
        return self.model.weight_bytes()

    def as_lm(self) -> nn.Module:
        """A module whose forward(input_ids) returns full-sequence logits (cache reset each call), for
        `leanlm.evaluation.perplexity`."""
        return _LMView(self)


class _LMView(nn.Module):
    def __init__(self, engine: Engine):
        super().__init__()
        self.engine = engine
        self._device = nn.Parameter(torch.empty(0), requires_grad=False)  # perplexity() reads the device from a parameter

    def forward(self, input_ids: torch.Tensor, **_) -> torch.Tensor:
        self.engine.reset()
        out = self.engine.forward(input_ids)
        self.engine.reset()
        return out


def compile_cache_key() -> str:
    """Key of the on-disk compiled-step cache: leanlm's version, torch's, and the fused kernels' build key (a
    change of any of them starts a fresh cache). Within it inductor keys each graph by its code, shapes and
    dtypes, so another model (or another packing) compiles anew, while the weights are graph inputs, never
    baked in: a cached step cannot run with stale weights."""
    import hashlib

    from .. import __version__
    from . import kernels

    return hashlib.sha256(f"{__version__}|{torch.__version__}|{kernels.build_key()}".encode()).hexdigest()[:16]


def _compile(fn):
    import os

    import torch._dynamo
    import torch._inductor.config as ic

    from ..core.models import cache_dir

    # inductor's FX graph cache on disk, under leanlm's cache (a user's TORCHINDUCTOR_CACHE_DIR wins)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir() / "compiled" / compile_cache_key()))
    ic.fx_graph_cache = True

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    ic.cpp_wrapper = True   # C++ wrapper: no per-kernel Python dispatch in the compiled step
    return torch.compile(fn, fullgraph=True, dynamic=False)
