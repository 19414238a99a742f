"""EAGLE draft heads (leanlm.speculative.eagle): lossless greedy output with random and trained heads, the reduced
vocabulary mapping back exactly, resume after an interrupt, refusal of a head for another model, budgets."""

from __future__ import annotations

import pytest
import torch

from conftest import make_llama
from leanlm.core.errors import LeanLMError
from leanlm.runtime import Engine
from leanlm.runtime.sampling import Sampling
from leanlm.speculative import HFStepModel, generate, speculative_generate
from leanlm.speculative.eagle import (
    EagleDrafter, EagleLoss, _frequent_tokens, load_head, make_head, measure_tree, save_head, self_distill_data, train_head,
)


@pytest.fixture(scope="module")
def setup():
    """A tiny target, its own greedy text (no calibration corpus: fast) and a few prompts."""
    from conftest import TRAIN_TEXT, make_tokenizer

    tok = make_tokenizer()
    model = make_llama(vocab_size=len(tok))
    ids = tok(TRAIN_TEXT)["input_ids"]
    prompts = [torch.tensor([ids[i: i + 12] for i in range(0, 96, 12)])]
    data = self_distill_data(model, tok, new_tokens=24, batch=8, prompts=prompts, progress=False)
    return model, tok, data


def _prompt(tok):
    return torch.tensor([tok("Paris is the capital of France. The quick brown")["input_ids"]])


def _drafter_after_prompt(d, model, tok):
    """A head drafter attached to a Hugging Face target that has run the prompt; ctx = the prompt + the token the
    target chose after it (so the last feature the target computed is the prompt's last)."""
    target = HFStepModel(model)
    d.attach(target)
    ids = _prompt(tok)
    target.reset()
    target.forward(ids)
    d.start(ids)
    return target, d, ids, torch.cat([ids, torch.tensor([[5]])], 1)


def _train(model, tok, data, tokens, ckpt=None):
    return train_head(model, tok, tokens, draft_vocab=64, seq_len=16, batch=2, lr=3e-3, data=data, checkpoint_dir=ckpt,
                       progress=False, tree_nodes=0)


def test_greedy_identical_with_random_and_trained_heads(setup):
    """Chain and tree drafts of a random and of a trained head: the output is plain greedy decoding token for token, on
    the Hugging Face target and on the runtime's float32 and int8 targets; a trained head gets drafts accepted."""
    model, tok, data = setup
    ids = _prompt(tok)
    random_head = make_head(model, torch.arange(0, model.config.vocab_size, 3))
    trained = _train(model, tok, data, 1024)
    assert trained.leanlm_draft["steps"] == 1024 // 32
    accepted = 0
    runs = [("hf", random_head, 4), ("hf", trained, 1), ("hf", trained, 4), ("fp32", random_head, 4), ("int8", trained, 4),
            ("hf", trained, "default"), ("fp32", trained, "default"), ("int8", trained, "[[0],[1],[0,0],[1,0],[0,0,0]]"),
            ("fp32", random_head, "default")]
    targets = {"hf": HFStepModel(model), "fp32": Engine(model, "fp32", max_seq_len=96), "int8": Engine(model, "int8", max_seq_len=96)}
    refs = {name: generate(t, ids, 32) for name, t in targets.items()}
    for name, head, k in runs:
        tree = k if isinstance(k, str) else None
        out, st = speculative_generate(targets[name], EagleDrafter(head), ids, 32, k=4 if tree else k, tree=tree)
        assert torch.equal(out, refs[name]), (name, k)
        assert not targets[name].keep_hidden      # plain decoding afterwards pays nothing
        accepted += st.accepted if head is trained else 0
    assert accepted > 0
    # the tree measured from the trained head's acceptance (what train_head stores for generate --tree)
    paths, acc = measure_tree(model, trained, [ids], nodes=6, new_tokens=16)
    assert len(paths) == 6 and acc and all(0 <= a < 1 for row in acc for a in row)
    out, st = speculative_generate(targets["fp32"], EagleDrafter(trained), ids, 32, tree=paths)
    assert torch.equal(out, refs["fp32"]) and st.accepted > 0
    # sampling: runs through the loop's rejection sampling with the head's q (zero outside the draft vocabulary)
    gen = torch.Generator().manual_seed(0)
    out, st = speculative_generate(HFStepModel(model), EagleDrafter(trained), ids, 30, k=3, sampling=Sampling(0.9), generator=gen)
    assert out.shape[1] == ids.shape[1] + 30 and st.drafted > 0
    out, st = speculative_generate(Engine(model, "fp32", max_seq_len=96), EagleDrafter(trained), ids, 30, sampling=Sampling(0.9),
                                   generator=gen, tree="default")
    assert out.shape[1] == ids.shape[1] + 30 and st.drafted > 0


def test_reduced_vocabulary_maps_back_exactly(setup):
    """The draft vocabulary is the most frequent ids of the text; a draft token is the target id of the reduced argmax,
    and the head's rows are the target's lm_head rows of those ids."""
    model, tok, data = setup
    counts = torch.bincount(data["tokens"], minlength=model.config.vocab_size)
    vmap = _frequent_tokens(data["tokens"], model.config.vocab_size, 20)
    assert vmap.numel() == 20 and torch.all(vmap[1:] > vmap[:-1])
    assert counts[vmap].min() >= counts[~torch.isin(torch.arange(counts.numel()), vmap)].max()
    head = make_head(model, vmap)
    assert torch.equal(head.head_rows, model.get_output_embeddings().weight[vmap].float())
    target, d, ids, ctx = _drafter_after_prompt(EagleDrafter(head), model, tok)
    toks, q = d.propose(ctx, 3, Sampling())
    assert q is None and torch.isin(toks, vmap).all()
    # the first draft: the head's reduced argmax on the target's features, mapped through vocab_map
    feats = target.hidden
    _, logits = head(feats, ctx[:, 1:])
    assert toks[0, 0] == vmap[logits[0, -1].argmax()]
    gen = torch.Generator().manual_seed(1)
    d.start(ids)
    _, q = d.propose(ctx, 2, Sampling(1.0), gen)
    outside = ~torch.isin(torch.arange(model.config.vocab_size), vmap)
    assert torch.all(q[..., outside] == 0) and torch.allclose(q.sum(-1), torch.ones(1, 2))


@pytest.mark.parametrize("method", ["eagle", "medusa"])
def test_interrupted_and_resumed_training_gives_the_same_head(setup, tmp_path, monkeypatch, method):
    """EAGLE and Medusa heads train through train_head: stopped by Ctrl-C and started again, the head equals an
    uninterrupted one."""
    from leanlm.speculative.medusa import MedusaLoss

    model, tok, data = setup
    loss_cls = MedusaLoss if method == "medusa" else EagleLoss

    def run(ckpt=None):
        return train_head(model, tok, 384, method=method, heads=3, draft_vocab=64, seq_len=16, batch=2, lr=3e-3, data=data,
                          checkpoint_dir=ckpt, progress=False, tree_nodes=0)

    straight = run()
    calls = {"n": 0}
    real = loss_cls.__call__

    def interrupting(self, head, idx):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(self, head, idx)

    monkeypatch.setattr(loss_cls, "__call__", interrupting)
    from leanlm.distill import TrainingInterrupted

    with pytest.raises(TrainingInterrupted, match="run the same command again"):
        run(tmp_path / "ck")
    monkeypatch.setattr(loss_cls, "__call__", real)
    resumed = run(tmp_path / "ck")
    a, b = straight.trained_state(), resumed.trained_state()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_head_folder_round_trip_and_refusals(setup, tmp_path):
    model, tok, data = setup
    head = make_head(model, torch.arange(0, 50))
    save_head(head, tmp_path / "h", {"steps": 0})
    back = load_head(tmp_path / "h", model)
    assert all(torch.equal(v, back.trained_state()[k]) for k, v in head.trained_state().items())
    other = make_llama(vocab_size=model.config.vocab_size, seed=7)     # same shapes, another checkpoint
    with pytest.raises(LeanLMError, match="another checkpoint"):
        load_head(tmp_path / "h", other)
    wider = make_llama(vocab_size=model.config.vocab_size, hidden=32, heads=2, kv_heads=1)
    with pytest.raises(LeanLMError, match="hidden size 64"):
        load_head(tmp_path / "h", wider)
    with pytest.raises(LeanLMError, match="not a draft head folder"):
        load_head(tmp_path, model)


def test_zero_budget_is_an_error(setup):
    model, tok, data = setup
    for bad in ("0", "0m", 0):
        with pytest.raises(LeanLMError, match="must be positive"):
            _train(model, tok, data, bad)


def test_corpus_features_are_the_targets_own_and_join_after_the_generated_text(setup):
    """The calibration corpus adds positions: windows of corpus tokens with the target's final-norm features (as its
    own forward computes them), numbered as sequences after the generated text, so no training pair crosses them."""
    from leanlm.core.data import calibration_texts, join_and_tokenize
    from leanlm.speculative.eagle import _hidden_of, _join, corpus_features

    model, tok, data = setup
    c = corpus_features(model, tok, max_tokens=40, seq_len=16, batch=2, progress=False)
    assert c["tokens"].shape == (32,) and c["feats"].shape == (32, model.config.hidden_size)
    assert torch.equal(c["seq"], torch.arange(2).repeat_interleave(16))
    ids = join_and_tokenize(tok, calibration_texts("wiki"))[:32]
    assert torch.equal(c["tokens"], ids)
    torch.testing.assert_close(c["feats"].float(), _hidden_of(model, ids.view(2, 16)).reshape(32, -1), atol=0.02, rtol=0.01)
    both = _join(data, c)
    n = data["tokens"].numel()
    assert torch.equal(both["tokens"][n:], c["tokens"]) and int(both["seq"][n]) == int(data["seq"].max()) + 1
    loss, parts = EagleLoss(both)(make_head(model, torch.arange(64)), torch.arange(n - 8, n + 8)[None])
    assert torch.isfinite(loss)
    with pytest.raises(LeanLMError, match="corpus_share"):
        train_head(model, tok, 64, corpus_share=1.0, progress=False, tree_nodes=0)
    from leanlm.recipe import DraftStep

    with pytest.raises(LeanLMError, match=r"--corpus-share must lie in \[0, 1\)"):   # a recipe file's draft step
        DraftStep(method="eagle", budget="1m", corpus_share=1.5).validate()
