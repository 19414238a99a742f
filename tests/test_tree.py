"""Tree drafts (leanlm.speculative.tree): the flattened tree and its mask, greedy output identical to plain decoding
with EAGLE heads and with an oracle drafter whose right tokens sit off the first branch, KV compaction (the next
logits equal a fresh forward's) on the Hugging Face and runtime targets, and a chi-square test of tree speculative
sampling on a tiny vocabulary."""

from __future__ import annotations

import pytest
import torch

from conftest import make_gemma3, make_llama
from leanlm.core.errors import LeanLMError
from leanlm.runtime import Engine
from leanlm.runtime.sampling import Sampling
from leanlm.speculative import HFStepModel, PromptLookupDrafter, generate, speculative_generate
from leanlm.speculative.eagle import EagleDrafter, make_head
from leanlm.speculative.tree import DEFAULT_TREE, DraftTree, RankCounts, parse_tree, tree_from_acceptance, verify_tree

PATHS = [[0], [1], [2], [0, 0], [0, 1], [1, 0], [1, 1], [0, 0, 0], [0, 1, 0], [1, 1, 0], [1, 1, 0, 0]]


@pytest.fixture(scope="module")
def model():
    return make_llama(vocab_size=120, hidden=32, layers=2, heads=4, kv_heads=2, intermediate=64, seed=3)


def _targets(model):
    return {"hf": HFStepModel(model), "fp32": Engine(model, "fp32", max_seq_len=128), "int8": Engine(model, "int8", max_seq_len=128)}


def test_tree_structure_and_bad_trees():
    t = DraftTree.from_paths([[1, 0], [0], [1], [0, 0]])
    assert t.paths == ((0,), (1,), (0, 0), (1, 0)) and t.size == 4 and t.max_depth == 2
    assert t.parent.tolist() == [-1, 0, 0, 1, 2] and t.depth.tolist() == [0, 1, 1, 2, 2] and t.rank.tolist() == [-1, 0, 1, 0, 0]
    assert t.children == ((1, 2), (3,), (4,), (), ())
    # node 4 = path (1, 0): sees the root, node 2 and itself only
    assert t.mask[4].tolist() == [True, False, True, False, True] and t.mask.diagonal().all()
    assert parse_tree("default").paths == tuple(sorted(DEFAULT_TREE, key=lambda p: (len(p), p)))
    assert parse_tree("chain:3").paths == ((0,), (0, 0), (0, 0, 0)) and parse_tree("[[0],[1]]").size == 2
    assert t.truncate(1).paths == ((0,), (1,))
    for bad, msg in [([[0, 0]], "not its parent [0]"), ([[0], [0]], "repeats a path"), ([[-1]], "integers >= 0"),
                     ([], "at least one path"), ([[]], "path is empty"), ([[0]] * 0 + [[i] for i in range(65)], "at most 64")]:
        with pytest.raises(LeanLMError, match=msg.replace("[", r"\[").replace("]", r"\]")):
            DraftTree.from_paths(bad)
    for bad, msg in [("chain:0", "1..64"), ("nope.json", "does not exist"), ("[[0],", "cannot read"), ('{"a": 1}', "JSON list")]:
        with pytest.raises(LeanLMError, match=msg):
            parse_tree(bad)


def test_tree_from_acceptance_is_best_first():
    acc = [[0.8, 0.1, 0.05], [0.7, 0.2], [0.6]]
    t = tree_from_acceptance(acc, 4)
    # path probabilities: (0)=.8, (0,0)=.56, (0,0,0)=.336, (0,1)=.16 > (1)=.1
    assert set(t.paths) == {(0,), (0, 0), (0, 0, 0), (0, 1)}
    counts = RankCounts()
    tree = DraftTree.from_paths([[0], [1], [0, 0]])
    counts.add(tree, [1, 3])    # took rank 0 at depth 1, then rank 0 at depth 2
    counts.add(tree, [2])       # took rank 1 at depth 1
    assert counts.acceptance() == [[0.5, 0.5], [1.0]]


class OracleTreeDrafter:
    """Knows the target's greedy continuation: the right tokens lie on the path of ranks `ranks` (clipped to the
    widths), every other node holds a wrong token, so accepted paths leave the first branch (and compaction must
    gather non-adjacent cache entries)."""

    def __init__(self, ref: torch.Tensor, vocab: int, ranks=(1, 1, 0, 0)):
        self.ref, self.vocab, self.ranks = ref, vocab, ranks

    def start(self, prompt):
        pass

    def propose_tree(self, ctx, tree, sampling, generator=None):
        L = ctx.shape[1]
        tokens = torch.zeros(tree.size + 1, dtype=torch.long)
        right = {0}
        for c in range(1, tree.size + 1):
            d, par = int(tree.depth[c]), int(tree.parent[c])
            width = len(tree.children[par])
            truth = int(self.ref[0, L + d - 1]) if L + d - 1 < self.ref.shape[1] else 0
            if par in right and int(tree.rank[c]) == min(self.ranks[d - 1], width - 1):
                tokens[c] = truth
                right.add(c)
            else:
                tokens[c] = (truth + 1 + c) % self.vocab
        return tokens[1:][None], None


def test_greedy_tree_identical_to_plain_decoding(model):
    """Oracle, random-head and default trees on the Hugging Face target and the runtime's float32 and int8 targets:
    the output is plain greedy decoding token for token; the oracle's paths (off the first branch) get accepted."""
    ids = torch.tensor([[5, 17, 33, 8, 91, 2, 64]])
    head = make_head(model, torch.arange(0, 120, 2))
    for name, target in _targets(model).items():
        ref = generate(target, ids, 24)
        out, st = speculative_generate(target, OracleTreeDrafter(ref, 120), ids, 24, tree=PATHS)
        assert torch.equal(out, ref), name
        assert st.accepted >= 2 * st.rounds and st.rank_acceptance()[1][1] == 1.0   # depth 2: the rank-1 child is right
        for tree in ("default", "chain:4") if name == "fp32" else ("default",):
            out, st = speculative_generate(target, EagleDrafter(head), ids, 24, tree=tree)
            assert torch.equal(out, ref), (name, tree)
            assert not target.keep_hidden


def test_kv_compaction_gives_a_fresh_forwards_logits(model):
    """After a tree forward and keeping one path (through branch 1), the next step's logits equal those of one forward
    over the whole kept sequence, on every target (the packed int4 engine too)."""
    tree = DraftTree.from_paths(PATHS)
    g = torch.Generator().manual_seed(0)
    prefix = torch.randint(0, 120, (1, 9), generator=g)
    nodes = torch.randint(0, 120, (1, tree.size), generator=g)
    path = [2, 7, 10, 11]              # nodes (1,), (1,1), (1,1,0), (1,1,0,0)
    assert [int(tree.parent[c]) for c in path] == [0, 2, 7, 10]
    kept = torch.cat([prefix, nodes[:, [c - 1 for c in path]]], 1)
    nxt = torch.tensor([[42]])
    targets = {**_targets(model), "int4": Engine(model, "int4", group_size=32, max_seq_len=128)}
    for name, target in targets.items():
        target.reset()
        target.forward(prefix[:, :-1])
        base = target.length
        tl = target.forward_tree(torch.cat([prefix[:, -1:], nodes], 1), base + tree.depth, tree.mask)
        target.compact(base, torch.tensor([0] + path))
        assert target.length == kept.shape[1]
        got = target.forward(nxt)[0, -1]
        target.reset()
        want = target.forward(torch.cat([kept, nxt], 1))[0]
        tol = 1e-4 if name in ("hf", "fp32") else 1e-2   # packed: bfloat16 activations; a wrong cache moves these by ~0.07
        assert torch.allclose(got, want[-1], atol=tol), name
        # the tree forward's logits at the kept nodes are the fresh forward's at those positions
        assert torch.allclose(tl[0, [0] + path], want[base:base + len(path) + 1], atol=tol), name


def _chi2(counts: torch.Tensor, probs: torch.Tensor) -> float:
    from scipy.stats import chisquare

    keep = probs > 0
    assert counts[~keep].sum() == 0
    n = counts.sum()
    return chisquare(counts[keep].numpy(), (probs[keep] * n).numpy()).pvalue


def test_tree_speculative_sampling_keeps_the_target_distribution():
    """Markov target over 5 tokens: two emitted tokens of tree speculative sampling (deterministic children, and
    children drawn i.i.d. from q) are distributed as the target's p(x1) p(x2 | x1), chi-square p > 0.001."""
    V = 5
    g = torch.Generator().manual_seed(1)
    P = torch.softmax(torch.randn(V, V, generator=g) * 1.5, -1)     # target: p(next | token)
    Q = torch.softmax(torch.randn(V, V, generator=g), -1)           # a proposal unlike the target
    tree = DraftTree.from_paths([[0], [1], [2], [0, 0], [0, 1], [1, 0]])
    sampling = Sampling(1.0)
    root = 3

    def one_round(last, iid):
        toks = torch.zeros(tree.size + 1, dtype=torch.long)
        q = torch.zeros(tree.size + 1, V) if iid else None
        for c in range(1, tree.size + 1):
            par = int(tree.parent[c])
            src = last if par == 0 else int(toks[par])
            if iid:
                q[c] = Q[src]
                toks[c] = torch.multinomial(Q[src], 1, generator=g)
            else:
                toks[c] = (src + 1 + int(tree.rank[c])) % V      # distinct deterministic siblings
        toks[0] = last
        logits = P[toks].log()
        path, y = verify_tree(logits, toks[1:], tree, sampling, q[1:] if iid else None, g)
        return [int(toks[c]) for c in path] + [y]

    for iid in (False, True):
        joint = torch.zeros(V, V)
        for _ in range(6000):
            out = one_round(root, iid)
            if len(out) == 1:
                out += one_round(out[0], iid)[:1]
            joint[out[0], out[1]] += 1
        want = (P[root][:, None] * P).reshape(-1)
        assert _chi2(joint.reshape(-1), want) > 1e-3, iid
        assert _chi2(joint.sum(1), P[root]) > 1e-3, iid


def test_tree_refusals(model):
    ids = torch.tensor([[1, 2, 3, 4]])
    head = make_head(model, torch.arange(60))
    with pytest.raises(LeanLMError, match="cannot draft a tree"):
        speculative_generate(HFStepModel(model), PromptLookupDrafter(), ids, 8, tree="default")
    with pytest.raises(LeanLMError, match="one prompt row"):
        speculative_generate(HFStepModel(model), EagleDrafter(head), ids.repeat(2, 1), 8, tree="default")
    with pytest.raises(LeanLMError, match="drop adaptive k or the tree"):
        speculative_generate(HFStepModel(model), EagleDrafter(head), ids, 8, k="adaptive", tree="default")


def test_tree_on_a_sliding_window_model():
    """Gemma-3 (sliding-window layers, window 6) on the runtime Engine: oracle trees across the window give plain greedy
    decoding token for token; through transformers a tree is refused once the context reaches the window."""
    gemma = make_gemma3(120)
    ids = torch.tensor([[5, 17, 33, 8, 91, 2, 64, 7, 9]])
    eng = Engine(gemma, "fp32", max_seq_len=96)
    ref = generate(eng, ids, 20)
    out, st = speculative_generate(eng, OracleTreeDrafter(ref, 120), ids, 20, tree=PATHS)
    assert torch.equal(out, ref) and st.accepted >= 2 * st.rounds
    with pytest.raises(LeanLMError, match="sliding window"):
        speculative_generate(HFStepModel(gemma), OracleTreeDrafter(ref, 120), ids, 20, tree=PATHS)


def test_cli_generate_with_a_tree(tiny_folder, tiny_model, tmp_path, capsys):
    """leanlm generate --draft HEAD --tree (the default shape, and a JSON tree) returns plain decoding's text."""
    import json

    from leanlm.cli import main
    from leanlm.speculative.eagle import save_head

    save_head(make_head(tiny_model, torch.arange(0, tiny_model.config.vocab_size, 2)), tmp_path / "head")
    base = ["generate", str(tiny_folder), "--prompt", "The quick brown fox", "--max-new-tokens", "12", "--no-stop", "--json"]
    texts = []
    for extra in ([], ["--draft", str(tmp_path / "head"), "--tree"], ["--draft", str(tmp_path / "head"), "--tree", "[[0],[1],[0,0]]"]):
        assert main(base + extra) == 0
        r = json.loads(capsys.readouterr().out)
        texts.append(r["text"])
        if extra:
            assert "tree of" in r["mode"] and r["stats"]["ranks"] is not None
    assert texts[0] == texts[1] == texts[2]


def test_draft_model_trees(model):
    """A draft model fills trees one depth per forward: the target drafting for itself (Hugging Face and runtime
    drafts) gets nearly every rank-0 path accepted, a random other model's trees change nothing; output always equals
    plain greedy decoding."""
    from leanlm.speculative import ModelDrafter

    ids = torch.tensor([[5, 17, 33, 8, 91, 2, 64]])
    target = Engine(model, "fp32", max_seq_len=128)
    ref = generate(target, ids, 24)
    other = make_llama(vocab_size=120, hidden=32, layers=1, heads=4, kv_heads=2, intermediate=64, seed=9)
    for draft, good in ((HFStepModel(model), True), (Engine(model, "fp32", max_seq_len=128), True), (HFStepModel(other), False)):
        out, st = speculative_generate(target, ModelDrafter(draft), ids, 24, tree="default")
        assert torch.equal(out, ref)
        if good:   # depth 5 along the rank-0 path: 5 drafts kept per round but near a tie or at the truncated end
            assert st.accepted >= 0.8 * (out.shape[1] - ids.shape[1] - 1 - st.rounds) and st.rounds <= 6, (st.accepted, st.rounds)
