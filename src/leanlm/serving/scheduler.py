"""Iteration-level scheduling (Orca) with chunked prefill and preemption by recompute (vLLM).

Every engine step the scheduler picks, within a budget of `max_num_batched_tokens`, the next tokens of
each running sequence (decodes first, one token each, then chunks of prompts still being prefilled, so a
long prompt never freezes the decodes), then admits waiting requests first-come-first-served while KV
blocks and `max_num_seqs` allow. Fairness: running sequences are served before waiting ones, in arrival
order within decodes and within prefills; when blocks run out the newest running sequence is preempted
(its blocks freed, its tokens recomputed later) and goes back to the FRONT of the waiting queue; the head
of the waiting queue is never skipped. So the oldest request always makes progress and none starves.
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass, field

import torch

from ..runtime.sampling import Sampling
from .block_manager import BlockManager


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0     # 0: greedy
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False

    def config(self) -> Sampling:
        return Sampling(self.temperature, self.top_k, self.top_p, self.seed)


@dataclass(eq=False)   # identity: queue membership tests compared every field (1 ms per 64-sequence step)
class Sequence:
    request_id: str
    prompt: list[int]
    params: SamplingParams
    arrival: float = 0.0
    output: list[int] = field(default_factory=list)
    computed: int = 0            # tokens whose K/V is in the cache
    text: str = ""               # detokenized output (stop strings cut off)
    sent: int = 0                # characters of `text` already returned
    detok: tuple[int, int] = (0, 0)   # incremental detokenization: output[a:b] is the context decoded before output[b:]
    finish_reason: str | None = None
    generator: torch.Generator | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    draft: list[int] = field(default_factory=list)   # speculated next tokens, verified in this step's forward

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + len(self.output)

    @property
    def feed(self) -> list[int]:
        """The tokens a step may compute: the sequence and its draft."""
        return self.prompt + self.output + self.draft


@dataclass
class Scheduled:
    seq: Sequence
    start: int                   # first position computed this step
    length: int                  # tokens computed this step

    @property
    def samples(self) -> bool:
        """True when this chunk reaches the end of the sequence (and its draft): its last logits give the next token."""
        return self.start + self.length == self.seq.num_tokens + len(self.seq.draft)


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int = 16, max_num_batched_tokens: int = 512):
        self.blocks = blocks
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, seq: Sequence) -> None:
        """A finished or aborted sequence leaves the queues and frees its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free_seq(seq.request_id)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free_seq(seq.request_id)
        seq.computed, seq.draft = 0, []
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def schedule(self) -> list[Scheduled]:
        budget = self.max_num_batched_tokens
        out: list[Scheduled] = []
        preempted = False
        # decodes first (one token each), then prompt chunks, each group in arrival order
        for seq in sorted(self.running, key=lambda q: q.num_tokens - q.computed > 1):
            if budget == 0:
                break
            if seq not in self.running:   # preempted earlier in this loop
                continue
            need = seq.num_tokens - seq.computed
            if seq.draft:   # a draft fits in the budget and the free blocks, or is dropped: it never costs a preemption
                seq.draft = seq.draft[:max(0, budget - need)]
                if not self.blocks.can_grow(seq.request_id, seq.computed + need + len(seq.draft)):
                    seq.draft = []
            n = min(need + len(seq.draft), budget)
            while not self.blocks.can_grow(seq.request_id, seq.computed + n):
                victim = self.running[-1]
                budget += sum(x.length for x in out if x.seq is victim)
                out = [x for x in out if x.seq is not victim]
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            else:
                self.blocks.grow(seq.request_id, seq.computed + n)
                out.append(Scheduled(seq, seq.computed, n))
                budget -= n
        while self.waiting and not preempted and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            cached = self.blocks.match_prefix(seq.request_id, seq.tokens)
            n = min(seq.num_tokens - cached, budget)
            if not self.blocks.can_grow(seq.request_id, cached + n):
                self.blocks.free_seq(seq.request_id)   # give back the shared prefix; retry next step
                break
            seq.computed = cached
            if self.blocks.prefix_caching:
                self.blocks.prefix_queries += seq.num_tokens
                self.blocks.prefix_hits += cached
            self.blocks.grow(seq.request_id, cached + n)
            self.waiting.popleft()
            bisect.insort(self.running, seq, key=lambda q: q.arrival)   # a readmitted old request keeps its rank
            out.append(Scheduled(seq, cached, n))
            budget -= n
        return out
