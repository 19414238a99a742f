"""Medusa draft heads (leanlm.speculative.medusa): lossless greedy output with random and trained heads, chain and
tree; what each head is trained to predict; the head folder (shared with EAGLE) round trip and refusals; the CLI.
(Resume after an interrupt: tests/test_eagle.py, for both kinds of head.)"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import make_llama
from leanlm.core.errors import LeanLMError
from leanlm.runtime import Engine
from leanlm.runtime.sampling import Sampling
from leanlm.speculative import HFStepModel, generate, speculative_generate
from leanlm.speculative.eagle import _hidden_of, drafter_for, load_head, make_head, save_head, self_distill_data, train_head
from leanlm.speculative.medusa import MedusaDrafter, MedusaHead, MedusaLoss
from test_eagle import _drafter_after_prompt, _prompt, setup  # noqa: F401  (the tiny target and its own text, a fixture shared with EAGLE's tests)


def _train(model, tok, data, tokens, ckpt=None, heads=3):
    return train_head(model, tok, tokens, method="medusa", heads=heads, draft_vocab=64, seq_len=16, batch=2, lr=3e-3, data=data,
                      checkpoint_dir=ckpt, progress=False, tree_nodes=0)


def test_greedy_identical_with_random_and_trained_heads(setup):
    """Chains and trees of a random and of a trained Medusa head: plain greedy decoding token for token, on the Hugging
    Face target and on the runtime's float32 and int8 targets; the trained head gets drafts accepted."""
    model, tok, data = setup
    ids = _prompt(tok)
    rnd = make_head(model, torch.arange(0, model.config.vocab_size, 3), method="medusa", heads=3, seed=1)
    for b in rnd.blocks:   # a random head, not the zero-initialised one
        torch.nn.init.normal_(b[0].linear.weight, std=0.5)
    trained = _train(model, tok, data, 2048)
    assert trained.leanlm_draft["method"] == "medusa" and trained.leanlm_draft["steps"] == 2048 // 32
    targets = {"hf": HFStepModel(model), "fp32": Engine(model, "fp32", max_seq_len=96), "int8": Engine(model, "int8", max_seq_len=96)}
    refs = {name: generate(t, ids, 32) for name, t in targets.items()}
    accepted = 0
    for name, head, k in [("hf", rnd, 3), ("hf", trained, 3), ("fp32", trained, 5), ("int8", trained, 2), ("fp32", rnd, "[[0],[1],[0,0],[1,0],[0,0,0]]"),
                          ("fp32", trained, "[[0],[1],[2],[0,0],[0,1],[0,0,0]]"), ("hf", trained, "[[0],[1],[0,0]]")]:
        tree = k if isinstance(k, str) else None
        d = drafter_for(head)
        assert isinstance(d, MedusaDrafter)
        out, st = speculative_generate(targets[name], d, ids, 32, k=4 if tree else k, tree=tree)
        assert torch.equal(out, refs[name]), (name, k)
        assert not targets[name].keep_hidden
        if k == 5:   # more drafts asked than heads: one per head
            assert max(st.ks) == 3
        accepted += st.accepted if head is trained else 0
    assert accepted > 0
    gen = torch.Generator().manual_seed(0)
    out, st = speculative_generate(HFStepModel(model), drafter_for(trained), ids, 30, k=3, sampling=Sampling(0.9), generator=gen)
    assert out.shape[1] == ids.shape[1] + 30 and st.drafted > 0


def test_each_head_predicts_further_ahead(setup):
    """A fresh head (zero blocks) scores every head with the target's own head rows; the loss pairs head i's logits on
    the feature of position t with the target's distribution after position t + 1 + i; the drafter reads the feature of
    the last position the target ran (ctx[-2])."""
    model, tok, data = setup
    vmap = torch.arange(0, model.config.vocab_size)
    head = make_head(model, vmap, method="medusa", heads=2)
    f = data["feats"][:10].float()
    rows = model.get_output_embeddings().weight.float()
    assert torch.allclose(head(f), (f @ rows.T)[:, None].expand(-1, 2, -1), atol=1e-5)
    # head 0 alone (decay 0): its logits on f_t against the target's distribution after position t + 1
    idx = torch.arange(0, 8)[None]
    loss, stats = MedusaLoss(data, decay=0.0)(head, idx)   # decay 0: head 0 alone (0.0**0 = 1)
    p = (data["feats"][1:8].float() @ rows.T).softmax(-1)
    logq = (data["feats"][0:7].float() @ rows.T).log_softmax(-1)
    valid = (data["seq"][0:7] == data["seq"][1:8]).float()
    want = ((-(p * logq).sum(-1)) * valid).sum() / valid.sum()
    assert torch.allclose(loss, want, atol=1e-5) and 0 <= stats["top1"] <= 1
    # the drafter: the heads' argmax on the target's feature of ctx[-2]
    target, d, ids, ctx = _drafter_after_prompt(MedusaDrafter(head), model, tok)
    toks, q = d.propose(ctx, 2, Sampling())
    fl = _hidden_of(model, ids)[0, -1]
    assert q is None and toks.shape == (1, 2) and toks[0, 0] == (fl @ rows.T).argmax()
    d.detach()


def test_head_folder_round_trip_refusals_and_tree_depth(setup, tmp_path):
    model, tok, data = setup
    head = make_head(model, torch.arange(0, 50), method="medusa", heads=2)
    save_head(head, tmp_path / "h", {"method": "medusa", "heads": 2})
    assert json.loads((tmp_path / "h" / "eagle.json").read_text())["format"] == "leanlm-medusa-1"
    back = load_head(tmp_path / "h", model)
    assert isinstance(back, MedusaHead) and back.cfg.heads == 2
    assert all(torch.equal(v, back.trained_state()[k]) for k, v in head.trained_state().items())
    other = make_llama(vocab_size=model.config.vocab_size, seed=7)
    with pytest.raises(LeanLMError, match="another checkpoint.*--method medusa"):
        load_head(tmp_path / "h", other)
    ids = _prompt(tok)
    with pytest.raises(LeanLMError, match="trees of depth at most 2"):
        speculative_generate(HFStepModel(model), drafter_for(back), ids, 8, tree="[[0],[0,0],[0,0,0]]")
    with pytest.raises(LeanLMError, match="--heads >= 1"):
        make_head(model, torch.arange(10), method="medusa", heads=0)
    with pytest.raises(LeanLMError, match="choose eagle or medusa"):
        make_head(model, torch.arange(10), method="hydra")


def test_cli_draft_medusa_then_generate(tiny_folder, tmp_path, capsys):
    """leanlm draft --method medusa writes a head folder; generate --draft with it (chain and --tree) returns plain
    decoding's text."""
    from leanlm.cli import main

    assert main(["draft", str(tiny_folder), "--method", "medusa", "--heads", "2", "--tokens", "2000", "--samples", "4",
                 "--corpus-share", "0", "--seq-len", "16", "--out", str(tmp_path / "head"), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["method"] == "medusa" and r["heads"] == 2 and r["steps"] > 0
    base = ["generate", str(tiny_folder), "--prompt", "The quick brown fox", "--max-new-tokens", "12", "--no-stop", "--json"]
    texts = []
    for extra in ([], ["--draft", str(tmp_path / "head")], ["--draft", str(tmp_path / "head"), "--tree"]):
        assert main(base + extra) == 0
        out = json.loads(capsys.readouterr().out)
        texts.append(out["text"])
        if extra:
            assert out["mode"].startswith("medusa head")
    assert texts[0] == texts[1] == texts[2]
