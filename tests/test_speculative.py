"""Speculative decoding: exact greedy output, exact sampling distribution, cache rollback, drafters, adaptive k, bad input."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

import leanlm
from conftest import make_llama

from leanlm import LeanLMError
from leanlm.speculative import (
    AdaptiveK, HFStepModel, ModelDrafter, PromptLookupDrafter, Sampling, check_vocab, generate, make_shallow_draft,
    parse_budget, speculative_generate, truncate_layers,
)

V = 64


@pytest.fixture(scope="module")
def target():
    return make_llama(vocab_size=V, layers=2, seed=0)


def prompts(batch=1, length=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, V, (batch, length), generator=g)


class WrongDrafter:
    """Always proposes a token the target's greedy decoding will not pick (argmax + 1)."""

    def __init__(self, model):
        self.m = model

    def start(self, prompt):
        pass

    def propose(self, ctx, k, sampling, generator=None):
        seq, out = ctx, []
        for _ in range(k):
            t = (self.m(input_ids=seq).logits[:, -1].argmax(-1) + 1) % V
            out.append(t)
            seq = torch.cat([seq, t[:, None]], 1)
        return torch.stack(out, 1), None


# ---- greedy: token-for-token the target's greedy output ----

@pytest.mark.parametrize("k", [1, 3, 6, "adaptive"])
def test_greedy_equals_plain_with_random_draft(target, k):
    draft = make_llama(vocab_size=V, layers=1, hidden=32, heads=2, kv_heads=1, intermediate=64, seed=1)
    ids = prompts()
    ref = generate(target, ids, 24)
    out, st = speculative_generate(target, draft, ids, 24, k=k)
    assert torch.equal(out, ref)
    assert st.new_tokens == 24 and sum(st.ks) == st.drafted and st.new_tokens - 1 == st.rounds + st.accepted


def test_greedy_always_right_and_always_wrong(target):
    ids = prompts(seed=3)
    ref = generate(target, ids, 30)
    out, st = speculative_generate(target, target, ids, 30, k=4)  # the target drafting for itself: always right
    assert torch.equal(out, ref) and st.acceptance_rate == 1.0 and st.rounds == 6  # 1 + 5 x 5 + 4
    out, st = speculative_generate(target, WrongDrafter(target), ids, 30, k=4)
    assert torch.equal(out, ref) and st.accepted == 0 and st.drafted > 0 and st.rounds == 29


def test_greedy_prompt_lookup_and_batch(target):
    ids = prompts(batch=3, seed=5)
    ids = torch.cat([ids, ids, ids[:, :4]], 1)  # repeated text so lookups hit
    ref = generate(target, ids, 25)
    for drafter in (PromptLookupDrafter(), ModelDrafter(make_llama(vocab_size=V, layers=1, seed=2))):
        out, st = speculative_generate(target, drafter, ids, 25, k=5)
        assert torch.equal(out, ref)
    out, st = speculative_generate(target, target, ids, 25, k=5)
    assert torch.equal(out, ref) and st.acceptance_rate == 1.0


def test_eos_stops(target):
    ids = prompts(seed=7)
    ref = generate(target, ids, 20)
    eos = int(ref[0, ids.shape[1] + 5])
    first = int((ref[0, ids.shape[1]:] == eos).nonzero()[0]) + 1
    out, _ = speculative_generate(target, target, ids, 20, k=4, eos_token_id=eos)
    assert torch.equal(out, ref[:, : ids.shape[1] + first])
    assert torch.equal(generate(target, ids, 20, eos_token_id=eos), out)


def test_eos_in_a_batch_pads_finished_rows_and_stops_when_all_are_done(target):
    ids = prompts(batch=2, seed=11)
    L = ids.shape[1]
    ref = generate(target, ids, 16)
    for eos in {int(ref[0, L + 2]), int(ref[1, L + 6])}:
        want = ref.clone()
        firsts = []
        for r in range(2):
            hit = (ref[r, L:] == eos).nonzero()
            if len(hit):
                firsts.append(int(hit[0]))
                want[r, L + firsts[-1] + 1:] = eos
        if len(firsts) == 2:  # every row reached eos: cut after the last row's first eos
            want = want[:, : L + max(firsts) + 1]
        assert torch.equal(generate(target, ids, 16, eos_token_id=eos), want)
        out, _ = speculative_generate(target, target, ids, 16, k=3, eos_token_id=eos)
        assert torch.equal(out, want)


# ---- sampling: exactly the target's distribution (chi-square on a tiny vocabulary) ----

class TableModel:
    """A hand-made StepModel: logits = table[previous token] + bias[position]. Exact distributions are enumerable."""

    def __init__(self, vocab, seed, scale=1.5):
        g = torch.Generator().manual_seed(seed)
        self.table = torch.randn(vocab, vocab, generator=g) * scale
        self.bias = torch.randn(64, vocab, generator=g) * scale
        self.vocab_size = vocab
        self.length = 0
        self.calls = 0

    def reset(self):
        self.length = 0

    def forward(self, ids, last_only=False):
        t = ids.shape[1]
        out = self.table[ids] + self.bias[self.length : self.length + t]
        self.length += t
        self.calls += 1
        return out[:, -1] if last_only else out

    def rewind(self, length):
        assert 0 <= length <= self.length
        self.length = length


def exact_joint(model, prompt, n, sampling):
    """Probability of every n-token continuation under the target's sampling distribution."""
    probs = {}
    for seq in itertools.product(range(model.vocab_size), repeat=n):
        p, prev, pos = 1.0, int(prompt[-1]), len(prompt) - 1
        for tok in seq:
            p *= float(sampling.probs(model.table[prev] + model.bias[pos])[tok])
            prev, pos = tok, pos + 1
        probs[seq] = p
    return probs


def chi_square_p(samples, probs):
    from scipy.stats import chisquare

    keys = list(probs)
    counts = torch.zeros(len(keys))
    index = {k: i for i, k in enumerate(keys)}
    for s in samples:
        counts[index[tuple(s)]] += 1
    exp = torch.tensor([probs[k] for k in keys]) * len(samples)
    big = exp >= 5  # pool the rare outcomes into one cell so the test's approximation holds
    obs = torch.cat([counts[big], counts[~big].sum()[None]]).numpy()
    ex = torch.cat([exp[big], exp[~big].sum()[None]]).numpy()
    ex = ex * obs.sum() / ex.sum()
    return chisquare(obs, ex).pvalue


@pytest.mark.parametrize("case", ["draft-batch", "draft-rows", "lookup-batch", "topk-batch"])
def test_sampling_matches_target_distribution(case):
    vocab, n_new = 4, 3
    target, draft = TableModel(vocab, seed=10), TableModel(vocab, seed=11)
    sampling = Sampling(temperature=1.0, top_k=3 if case == "topk-batch" else 0)
    prompt = torch.tensor([1, 2, 0, 1, 2])
    g = torch.Generator().manual_seed(123)
    drafter = PromptLookupDrafter() if case.startswith("lookup") else ModelDrafter(draft)
    if case == "draft-rows":  # batch 1, one sequence at a time
        samples = []
        for _ in range(1500):
            out, _ = speculative_generate(target, drafter, prompt[None], n_new, k=2, sampling=sampling, generator=g)
            samples.append(out[0, -n_new:].tolist())
    else:  # 6000 rows at once: also checks the batch rule (every row keeps the smallest accepted count)
        ids = prompt.expand(6000, -1).contiguous()
        out, st = speculative_generate(target, drafter, ids, n_new, k=3, sampling=sampling, generator=g)
        samples = out[:, -n_new:].tolist()
    p = chi_square_p(samples, exact_joint(target, prompt.tolist(), n_new, sampling))
    assert p > 1e-3, f"speculative samples do not follow the target's distribution (chi-square p = {p:.2e})"


def test_chi_square_detects_wrong_rule():
    """The test has power: sampling from the draft's distribution instead is rejected."""
    vocab, n_new = 4, 3
    target, draft = TableModel(vocab, seed=10), TableModel(vocab, seed=11)
    s = Sampling(temperature=1.0)
    g = torch.Generator().manual_seed(1)
    prompt = torch.tensor([1, 2, 0, 1, 2])
    out = generate(draft, prompt.expand(6000, -1).contiguous(), n_new, s, generator=g)
    assert chi_square_p(out[:, -n_new:].tolist(), exact_joint(target, prompt.tolist(), n_new, s)) < 1e-6


# ---- caches ----

def test_hf_cache_rollback(target):
    ids = prompts(length=10, seed=9)
    step = HFStepModel(target)
    step.reset()
    step.forward(ids)
    step.forward(torch.tensor([[5, 6, 7, 8]]))
    step.rewind(12)  # keep the prompt and 2 of the 4 tokens
    assert step.length == 12
    got = step.forward(torch.tensor([[9, 10]]))
    full = target(input_ids=torch.cat([ids, torch.tensor([[5, 6, 9, 10]])], 1)).logits[:, -2:]
    torch.testing.assert_close(got, full, atol=1e-5, rtol=1e-5)
    with pytest.raises(LeanLMError, match="cannot rewind"):
        step.rewind(99)


def test_draft_cache_follows_committed_text(target):
    d = ModelDrafter(make_llama(vocab_size=V, layers=1, seed=4))
    ids = prompts(seed=11)
    d.start(ids)
    toks, q = d.propose(ids, 4, Sampling())
    assert toks.shape == (1, 4) and q is None and d.step.length == ids.shape[1] + 3
    committed = torch.cat([ids, toks[:, :1], torch.tensor([[3]])], 1)  # one draft kept, then a correction
    toks2, _ = d.propose(committed, 3, Sampling())
    assert d.step.length == committed.shape[1] + 2
    fresh = ModelDrafter(d.step.model)
    fresh.start(committed)
    assert torch.equal(fresh.propose(committed, 3, Sampling())[0], toks2)


# ---- prompt lookup and adaptive k ----

def test_prompt_lookup():
    pl = PromptLookupDrafter(max_ngram=3)
    row = torch.tensor([1, 2, 3, 4, 5, 9, 9, 1, 2, 3, 7, 8, 2, 3])
    assert pl.lookup(row, 3).tolist() == [7, 8, 2]  # latest earlier match of [2, 3] is followed by 7 8 2
    assert pl.lookup(torch.tensor([1, 2, 3, 4]), 3).tolist() == []
    toks, q = pl.propose(torch.stack([row, row]), 2, Sampling())
    assert toks.tolist() == [[7, 8], [7, 8]] and q is None


def test_adaptive_k_rule():
    ak = AdaptiveK(k_max=8)
    for _ in range(30):  # cheap draft that is always right: draft as far as allowed
        ak.observe(k=4, accepted=4, draft_s=0.001 * 4, target_tokens=5, target_s=0.05)
    assert ak.alpha > 0.9 and ak.choose() == 8
    ak = AdaptiveK(k_max=8)
    for _ in range(30):  # costly draft that is mostly wrong: the smallest k
        ak.observe(k=4, accepted=0, draft_s=0.03 * 4, target_tokens=5, target_s=0.05)
    assert ak.alpha < 0.1 and ak.choose() == 1
    ak = AdaptiveK(k_max=8)
    for i in range(30):  # in between: geometric model optimum for a = 0.7, d = 0.1 t
        ak.observe(k=4, accepted=[4, 2, 3][i % 3], draft_s=0.005 * 4, target_tokens=5, target_s=0.05)
    a = ak.alpha
    rates = {k: (1 - a ** (k + 1)) / (1 - a) / (k * 0.005 + 0.05 / 1.25 * (1 + 0.05 * (k + 1))) for k in range(1, 9)}
    assert ak.choose() == max(rates, key=rates.get) and 1 < ak.choose() < 8


# ---- drafts ----

def test_shallow_draft_distills_and_saves(tmp_path, tiny_tokenizer, target):
    big = make_llama(vocab_size=len(tiny_tokenizer), layers=3, seed=5)
    d = make_shallow_draft(big, 1, budget="60s", max_tokens=6 * 64 * 4, tokenizer=tiny_tokenizer,
                           calib_ids=tiny_tokenizer(" ".join(["The quick brown fox jumps."] * 200), return_tensors="pt")["input_ids"][0],
                           seq_len=64, batch=4, lr=3e-3, progress=False)
    log = d.leanlm_draft
    assert d.config.num_hidden_layers == 1 and log["steps"] == 6 and log["loss_last"] < log["loss_first"]
    assert d.lm_head.weight.data_ptr() == d.model.embed_tokens.weight.data_ptr()  # head still tied
    out = leanlm.save(d, tmp_path / "draft", tokenizer=tiny_tokenizer)

    again, _ = leanlm.load(out)
    ids = tiny_tokenizer("The quick brown", return_tensors="pt")["input_ids"]
    torch.testing.assert_close(again(input_ids=ids).logits, d(input_ids=ids).logits)
    ref = generate(big, ids, 12)
    assert torch.equal(speculative_generate(big, again, ids, 12, k=3)[0], ref)


# ---- bad input ----

def test_bad_input(target, tiny_tokenizer):
    ids = prompts()
    other = make_llama(vocab_size=V + 8, layers=1, seed=1)
    with pytest.raises(LeanLMError, match="vocabulary has 72 tokens, the target's 64"):
        speculative_generate(target, other, ids, 5)
    with pytest.raises(LeanLMError, match="vocabulary"):
        check_vocab(target, other)
    for k in (0, 65, -1, "fast", 2.5):
        with pytest.raises(LeanLMError, match="out of range"):
            speculative_generate(target, PromptLookupDrafter(), ids, 5, k=k)
    with pytest.raises(LeanLMError, match="out of range"):
        truncate_layers(target, 2)
    with pytest.raises(LeanLMError, match="budget"):
        parse_budget("soon")
    assert parse_budget("5m")["max_minutes"] == 5 and parse_budget("1.5h")["max_minutes"] == 90
    assert parse_budget(20) == {"max_tokens": 20, "max_minutes": None}  # the one syntax: a bare number counts tokens
    with pytest.raises(LeanLMError, match="temperature"):
        Sampling(temperature=-1)


# ---- CLI ----

def test_cli_generate_and_draft(capsys, tiny_folder, tmp_path, text_file):
    from leanlm.cli import main

    assert main(["draft", str(tiny_folder), "--layers", "1", "--budget", "30s", "--tokens", "128", "--seq-len", "32",
                 "--batch", "2", "--calib", str(text_file), "--out", str(tmp_path / "d"), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["layers"] == 1 and (tmp_path / "d" / "config.json").is_file()
    outs = {}
    for extra in ([], ["--draft", str(tmp_path / "d"), "--num-draft", "3"], ["--prompt-lookup", "--adaptive"]):
        assert main(["generate", str(tiny_folder), "--prompt", "The quick brown fox", "--max-new-tokens", "10", "--json", *extra]) == 0
        outs[len(extra)] = json.loads(capsys.readouterr().out)
    assert outs[0]["text"] == outs[4]["text"] == outs[2]["text"]  # greedy: identical with or without speculation
    assert "mode" not in outs[0] and outs[4]["mode"].startswith("draft")  # plain: the runtime engine, no speculation and outs[4]["stats"]["drafted"] > 0
    with pytest.raises(SystemExit) as e:   # argparse's usage error: --num-draft must be >= 1
        main(["generate", str(tiny_folder), "--prompt", "x", "--prompt-lookup", "--num-draft", "0"])
    assert e.value.code == 2
    assert "argument --num-draft: must be >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: --draft and --prompt-lookup exclude each other
        main(["generate", str(tiny_folder), "--prompt", "x", "--draft", str(tiny_folder), "--prompt-lookup"])
