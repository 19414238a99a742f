"""Paged KV-cache bookkeeping (vLLM's PagedAttention): fixed-size blocks, a free list, one block table
per sequence, reference counts, and automatic prefix caching.

A block that is full of computed tokens gets a hash of (its parent block's hash, its token ids), so the
hash names the whole prefix up to the block's end. A new sequence whose prompt starts with hashed blocks
shares them (reference count + 1) instead of recomputing them. A block whose count drops to zero keeps
its contents and its hash in an LRU list of evictable blocks; allocation takes the free list first,
then evicts the least recently used evictable block.
"""

from __future__ import annotations

from collections import OrderedDict

from ..core.errors import LeanLMError


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise LeanLMError(f"the KV cache needs >= 1 block of >= 1 token, got {num_blocks} blocks of {block_size}; raise --kv-cache-mb")
        self.num_blocks, self.block_size, self.prefix_caching = num_blocks, block_size, prefix_caching
        self.free: list[int] = list(range(num_blocks - 1, -1, -1))   # pop() hands out block 0 first
        self.ref = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.cached: dict[int, int] = {}                 # prefix hash -> block
        self.evictable: OrderedDict[int, None] = OrderedDict()   # ref 0 blocks with a hash, LRU first
        self.tables: dict[str, list[int]] = {}           # sequence id -> block table
        self.hashed: dict[str, int] = {}                 # sequence id -> number of its leading blocks hashed
        self.prefix_queries = self.prefix_hits = 0       # in tokens, as vLLM counts them

    # ------------------------------------------------------------------ state
    @property
    def num_free(self) -> int:
        """Blocks a sequence can get now (free + evictable)."""
        return len(self.free) + len(self.evictable)

    def usage(self) -> float:
        return 1.0 - self.num_free / self.num_blocks

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    # ------------------------------------------------------------------ allocation
    def _take(self) -> int:
        if self.free:
            b = self.free.pop()
        else:
            b, _ = self.evictable.popitem(last=False)
            del self.cached[self.block_hash[b]]
            self.block_hash[b] = None
        self.ref[b] = 1
        return b

    def _release(self, b: int) -> None:
        self.ref[b] -= 1
        if self.ref[b] == 0:
            if self.block_hash[b] is not None:
                self.evictable[b] = None
            else:
                self.free.append(b)

    def match_prefix(self, seq_id: str, tokens: list[int]) -> int:
        """Start `seq_id`'s block table with the cached blocks of its prompt; returns the tokens reused
        (whole blocks, and never the last prompt token: its logits are needed)."""
        if seq_id in self.tables:
            raise LeanLMError(f"sequence {seq_id!r} already has blocks")
        table, h = [], None
        usable = (len(tokens) - 1) // self.block_size if self.prefix_caching else 0
        for i in range(usable):
            h = hash((h, tuple(tokens[i * self.block_size:(i + 1) * self.block_size])))
            b = self.cached.get(h)
            if b is None:
                break
            if self.ref[b] == 0:
                del self.evictable[b]
            self.ref[b] += 1
            table.append(b)
        self.tables[seq_id], self.hashed[seq_id] = table, len(table)
        return len(table) * self.block_size

    def can_grow(self, seq_id: str, tokens: int) -> bool:
        return self.blocks_for(tokens) - len(self.tables.get(seq_id, ())) <= self.num_free

    def grow(self, seq_id: str, tokens: int) -> list[int]:
        """Make `seq_id`'s table cover `tokens` slots (check `can_grow` first)."""
        table = self.tables.setdefault(seq_id, [])
        self.hashed.setdefault(seq_id, 0)
        need = self.blocks_for(tokens) - len(table)
        if need > self.num_free:
            raise LeanLMError(f"out of KV blocks: need {need}, {self.num_free} free")
        table.extend(self._take() for _ in range(need))
        return table

    def commit(self, seq_id: str, tokens: list[int], computed: int) -> None:
        """Hash the blocks now full of computed tokens so later prompts can share them."""
        if not self.prefix_caching:
            return
        table, n = self.tables[seq_id], self.hashed[seq_id]
        full = min(computed // self.block_size, len(table))
        h = self.block_hash[table[n - 1]] if n else None
        for i in range(n, full):
            h = hash((h, tuple(tokens[i * self.block_size:(i + 1) * self.block_size])))
            b = table[i]
            if h in self.cached:       # the same prefix already lives in another block: keep that one
                if self.block_hash[b] is None:
                    break              # this sequence's chain stops here (its later hashes would dangle)
            else:
                self.cached[h], self.block_hash[b] = b, h
            n = i + 1
        self.hashed[seq_id] = n

    def free_seq(self, seq_id: str) -> None:
        """Release every block of a finished, aborted or preempted sequence."""
        for b in reversed(self.tables.pop(seq_id, [])):   # the tail first: it is the least useful prefix
            self._release(b)
        self.hashed.pop(seq_id, None)
