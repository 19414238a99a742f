"""Static draft trees: the token tree a drafter fills, its tree attention mask, and its verification.

A tree is given as paths of child ranks (Medusa's and EAGLE's "choices", Cai et al. 2024, "Medusa";
Li et al. 2024, "EAGLE"): ``(0,)`` is the drafter's best token after the committed text, ``(1,)`` its
second best, ``(0, 2)`` the third best after ``(0,)``, and so on. It is flattened into nodes: node 0 is
the root (the last committed token, not yet seen by the target), nodes 1..N the drafts in order of depth,
each with its parent, depth, rank and a mask row marking itself and its ancestors.

The target scores every node in ONE forward pass (SpecInfer, Miao et al. 2024, "SpecInfer: Accelerating
Generative LLM Serving with Tree-based Speculative Inference and Verification"): node i sits at
position ``context + depth[i]`` (RoPE by position) and attends to the committed context plus its
ancestors only. `verify_tree` then walks down from the root:

- greedy: follow the child whose token is the target's argmax at the current node; the target's argmax
  after the last accepted node follows. The output is the target's greedy output, token for token.
- sampling (multi-candidate speculative sampling, SpecInfer's tree verification as in EAGLE's code): at a
  node, try its children in rank order; child c with proposal q_c is accepted with probability
  min(1, p(c) / q_c(c)); after a rejection p becomes the residual norm(max(0, p - q_c)) for the next
  sibling. A deterministic child (q = None, EAGLE's top-k drafts) is the one-hot case: accepted with
  probability p(c), else p loses c and is renormalised. If no child is accepted a token is drawn from the
  residual; at a leaf, from p. Each emitted token is distributed exactly as the target's p given its
  prefix (recursive rejection sampling; exact for deterministic siblings and for siblings drawn i.i.d.
  from q).

The target's cache then keeps only the accepted path's entries (`compact` of the StepModel).

The default tree (`DEFAULT_TREE`, 12 drafts, depth 5) is a fixed shape, chosen for a CPU target: a
verification over 13 tokens costs little more than over 5 (batch-1 decode is overhead- and weight-bound),
and a head's rank-0 draft is accepted far more often than its rank-1, so the depth goes to rank-0 paths
and the width to shallow levels. `tree_from_acceptance` builds a tree of any size from measured
per-depth, per-rank acceptance (`SpecStats.rank_acceptance()` of a run with a wide tree): best-first on
the path probability, the product of the acceptance rates along the path (Medusa's construction), which
maximises the expected accepted length under its independence assumption. `eagle.measure_tree` runs that
measurement on calibration prompts after a head is trained (`leanlm draft --method eagle`) and stores the
tree in the head's eagle.json, which `generate --tree` then uses.
"""

from __future__ import annotations

import heapq
import json
from dataclasses import dataclass, field

import torch

from ..core.errors import LeanLMError
from ..runtime.sampling import Sampling, sample

TREE_MAX = 64   # most draft nodes a tree may hold (as K_MAX for chains)

DEFAULT_TREE = ((0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (0, 0, 0), (0, 0, 1), (0, 1, 0), (1, 0, 0), (0, 0, 0, 0),
                (0, 0, 0, 0, 0))


@dataclass(frozen=True)
class DraftTree:
    """A flattened static tree. Node 0 is the root; `paths[i - 1]` is node i's path of child ranks."""

    paths: tuple[tuple[int, ...], ...]
    parent: torch.Tensor = field(repr=False)     # [N+1] long, parent[0] = -1
    depth: torch.Tensor = field(repr=False)      # [N+1] long, depth[0] = 0
    rank: torch.Tensor = field(repr=False)       # [N+1] long, rank among siblings (-1 for the root)
    mask: torch.Tensor = field(repr=False)       # [N+1, N+1] bool: mask[i, j] = j is i or an ancestor of i
    children: tuple[tuple[int, ...], ...] = field(repr=False)   # per node, its children in rank order

    @classmethod
    def from_paths(cls, paths) -> "DraftTree":
        """Paths of child ranks (lists or tuples of ints >= 0); every prefix of a path must be a path too."""
        try:
            ps = [tuple(int(r) for r in p) for p in paths]
            if any(isinstance(r, bool) or not isinstance(r, int) or r < 0 for p in paths for r in p):
                raise TypeError
        except (TypeError, ValueError):
            raise LeanLMError(f"a draft tree is a list of paths of child ranks (integers >= 0), e.g. [[0], [1], [0, 0]]; "
                              f"got {paths!r}") from None
        if not ps:
            raise LeanLMError("a draft tree needs at least one path, e.g. [[0]]")
        if any(not p for p in ps):
            raise LeanLMError("a draft tree path is empty; each path names a node by its child ranks, e.g. [0, 1]")
        if len(set(ps)) != len(ps):
            raise LeanLMError(f"the draft tree repeats a path ({next(p for p in ps if ps.count(p) > 1)}); list each node once")
        if len(ps) > TREE_MAX:
            raise LeanLMError(f"the draft tree has {len(ps)} nodes; use at most {TREE_MAX}")
        have = set(ps)
        for p in ps:
            if len(p) > 1 and p[:-1] not in have:
                raise LeanLMError(f"the draft tree has path {list(p)} but not its parent {list(p[:-1])}; add the parent")
        ps.sort(key=lambda p: (len(p), p))
        index = {p: i + 1 for i, p in enumerate(ps)}
        n = len(ps) + 1
        parent = torch.full((n,), -1, dtype=torch.long)
        depth = torch.zeros(n, dtype=torch.long)
        rank = torch.full((n,), -1, dtype=torch.long)
        mask = torch.eye(n, dtype=torch.bool)
        mask[:, 0] = True
        kids: list[list[int]] = [[] for _ in range(n)]
        for p, i in index.items():
            par = index[p[:-1]] if len(p) > 1 else 0
            parent[i], depth[i], rank[i] = par, len(p), p[-1]
            mask[i] |= mask[par]
            kids[par].append(i)
        for k in kids:
            k.sort(key=lambda c: int(rank[c]))
        return cls(tuple(ps), parent, depth, rank, mask, tuple(tuple(k) for k in kids))

    @classmethod
    def chain(cls, k: int) -> "DraftTree":
        return cls.from_paths([(0,) * d for d in range(1, k + 1)])

    @property
    def size(self) -> int:
        """Draft nodes (the root not counted)."""
        return len(self.paths)

    @property
    def max_depth(self) -> int:
        return int(self.depth.max())

    def truncate(self, max_depth: int) -> "DraftTree":
        """The nodes at depth <= max_depth (>= 1)."""
        return self if max_depth >= self.max_depth else DraftTree.from_paths([p for p in self.paths if len(p) <= max_depth])

    def to_list(self) -> list[list[int]]:
        return [list(p) for p in self.paths]

    # ---- filling a tree one depth at a time (the drafters' shared loop)
    def inner(self, d: int) -> list[int]:
        """The nodes at depth d that have children."""
        return [u for u in range(self.size + 1) if int(self.depth[u]) == d and self.children[u]]

    def fill_children(self, u: int, logits: torch.Tensor, tokens: torch.Tensor, ids: torch.Tensor | None = None) -> None:
        """Set `tokens` of node u's children to the top ranks of `logits` (through `ids`, a reduced vocabulary's map)."""
        kids = self.children[u]
        top = logits.topk(min(int(self.rank[kids[-1]]) + 1, logits.numel())).indices
        for c in kids:
            t = top[min(int(self.rank[c]), len(top) - 1)]
            tokens[c] = t if ids is None else ids[t]

    def feed_mask(self, grow: list[int], slot: dict[int, int], width: int) -> torch.Tensor:
        """[len(grow), width] bool for feeding the nodes `grow` together as the last len(grow) of `width` cache entries:
        each sees itself and its ancestors (fed earlier at the entries `slot[a]`)."""
        m = torch.zeros(len(grow), width, dtype=torch.bool)
        for i, c in enumerate(grow):
            m[i, width - len(grow) + i] = True
            a = int(self.parent[c])
            while a > 0:
                m[i, slot[a]] = True
                a = int(self.parent[a])
        return m


def parse_tree(spec) -> DraftTree:
    """A `DraftTree` from "default", "chain:K", a JSON list of paths, a .json file holding one, or a list of paths."""
    if isinstance(spec, DraftTree):
        return spec
    if not isinstance(spec, str):
        return DraftTree.from_paths(spec)
    s = spec.strip()
    if s in ("default", "auto"):   # auto: the head's measured tree where one is known (the CLI), else the default
        return DraftTree.from_paths(DEFAULT_TREE)
    if s.startswith("chain:"):
        k = s[len("chain:"):]
        if not k.isdigit() or not 1 <= int(k) <= TREE_MAX:
            raise LeanLMError(f"--tree {spec}: the chain length must be an integer in 1..{TREE_MAX}")
        return DraftTree.chain(int(k))
    if not s.startswith("["):   # a file (not 'default', 'chain:K' nor JSON)
        from ..core.data import read_text_file

        s = read_text_file(s, "tree file (--tree takes default, chain:K, a JSON list of paths such as [[0],[1],[0,0]] or a "
                              ".json file holding one)")
    try:
        paths = json.loads(s)
    except ValueError:
        raise LeanLMError(f"--tree: cannot read {spec[:60]!r} as JSON; give a list of paths such as [[0],[1],[0,0]]") from None
    if isinstance(paths, dict):   # {"tree": paths}, or a head's eagle.json (its measured tree)
        paths = paths.get("tree") or (paths.get("training") or {}).get("tree") or paths
    if not isinstance(paths, list) or not all(isinstance(p, list) for p in paths):
        raise LeanLMError(f"--tree: a draft tree is a JSON list of paths such as [[0],[1],[0,0]], got {spec[:60]!r}")
    return DraftTree.from_paths(paths)


def tree_from_acceptance(acc, nodes: int) -> DraftTree:
    """The `nodes`-node tree of highest expected accepted length, given ``acc[d][r]``: the measured probability
    that the target takes the drafter's rank-r token at depth d + 1, given it took the path to its parent.
    Best-first on the path probability (a child's is at most its parent's, so every chosen node's parent is chosen)."""
    if not 1 <= nodes <= TREE_MAX:
        raise LeanLMError(f"a tree of {nodes} nodes: use 1..{TREE_MAX}")
    acc = [[float(a) for a in row] for row in acc]
    if not acc or not acc[0]:
        raise LeanLMError("no acceptance measured: run a tree with some nodes first (SpecStats.rank_acceptance())")
    heap = [(-acc[0][r], (r,)) for r in range(len(acc[0]))]
    heapq.heapify(heap)
    chosen = []
    while heap and len(chosen) < nodes:
        v, p = heapq.heappop(heap)
        chosen.append(p)
        if len(p) < len(acc):
            for r, a in enumerate(acc[len(p)]):
                heapq.heappush(heap, (v * a, p + (r,)))
    return DraftTree.from_paths(chosen)


def verify_tree(logits: torch.Tensor, tokens: torch.Tensor, tree: DraftTree, sampling: Sampling, q: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> tuple[list[int], int]:
    """Walk the tree. logits [N+1, V]: the target's at each node (node 0 the root); tokens [N]: node i's token is
    tokens[i - 1]; q [N, V] or None: each node's proposal distribution (None: deterministic drafts).

    Returns (the accepted nodes, root excluded, in order; the token the target emits after them)."""
    path, node = [], 0
    if sampling.greedy:
        tgt = logits.argmax(-1)
        while True:
            want = int(tgt[node])
            nxt = next((c for c in tree.children[node] if int(tokens[c - 1]) == want), None)
            if nxt is None:
                return path, want
            path.append(nxt)
            node = nxt
    while True:
        p = sampling.probs(logits[node])
        nxt = None
        for c in tree.children[node]:
            t = int(tokens[c - 1])
            u = float(torch.rand((), generator=generator))
            if q is None:
                if u < float(p[t]):
                    nxt = c
                    break
                res = p.clone()
                res[t] = 0
            else:
                qc = q[c - 1]
                if u * float(qc[t]) < float(p[t]):   # accept with probability min(1, p/q)
                    nxt = c
                    break
                res = (p - qc).clamp_min(0)
            s = res.sum()
            p = res / s if s > 0 else p
        if nxt is None:
            return path, int(sample(p[None], generator)[0])
        path.append(nxt)
        node = nxt


@dataclass
class RankCounts:
    """Per depth and rank: how often a node of that rank was tried (its parent reached) and accepted."""

    tried: list[list[int]] = field(default_factory=list)
    hits: list[list[int]] = field(default_factory=list)

    def add(self, tree: DraftTree, path: list[int]) -> None:
        for node in [0] + path:
            for c in tree.children[node]:
                d, r = int(tree.depth[c]) - 1, int(tree.rank[c])
                while len(self.tried) <= d:
                    self.tried.append([])
                    self.hits.append([])
                for row in (self.tried[d], self.hits[d]):
                    row.extend([0] * (r + 1 - len(row)))
                self.tried[d][r] += 1
        for c in path:
            self.hits[int(tree.depth[c]) - 1][int(tree.rank[c])] += 1

    def merge(self, other: "RankCounts") -> None:
        for mine, theirs in ((self.tried, other.tried), (self.hits, other.hits)):
            for d, row in enumerate(theirs):
                while len(mine) <= d:
                    mine.append([])
                mine[d].extend([0] * (len(row) - len(mine[d])))
                for r, v in enumerate(row):
                    mine[d][r] += v

    def acceptance(self, prior: float = 0.0) -> list[list[float]]:
        """acc[d][r] = hits / (tried + prior) (0 where never tried), the input of `tree_from_acceptance`; `prior`
        phantom rejections keep a rank tried once or twice from counting as certain."""
        return [[h / (t + prior) if t else 0.0 for h, t in zip(hs, ts)] for hs, ts in zip(self.hits, self.tried)]
