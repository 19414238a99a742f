import math

import pytest
import torch
import torch.nn.functional as F

from leanlm import LeanLMError
from leanlm.core.data import join_and_tokenize
from leanlm.evaluation import (
    compare_speed, cost_per_million_tokens, decode_costs, hf_generator, measure_speed, perplexity, roofline, tensor_bytes,
)
from leanlm.evaluation.speed import protocol_prompts


def test_perplexity_matches_hand_computation(tiny_model, tiny_tokenizer, text_file):
    r = perplexity(tiny_model, tiny_tokenizer, source=text_file, window=32, max_windows=5, batch_size=2, progress=False)
    ids = join_and_tokenize(tiny_tokenizer, [text_file.read_text()])
    # The user file is split on blank lines and re-joined with blank lines: the same text.
    nll, n = 0.0, 0
    for w in range(5):
        x = ids[w * 32 : (w + 1) * 32][None]
        with torch.no_grad():
            logits = tiny_model(x).logits[0, :-1]
        nll += F.cross_entropy(logits, x[0, 1:], reduction="sum").item()
        n += 31
    assert r.windows == 5 and r.tokens == 5 * 31 and r.window == 32
    assert r.perplexity == pytest.approx(math.exp(nll / n), rel=1e-5)
    # A random model over a 300-token vocabulary is near-uniform.
    assert 100 < r.perplexity < 1000


def test_perplexity_short_text_errors(tiny_model, tiny_tokenizer):
    with pytest.raises(LeanLMError, match="fewer than one window"):
        perplexity(tiny_model, tiny_tokenizer, texts=["too short"], window=512, progress=False)
    with pytest.warns(UserWarning, match="only 1 windows"):
        perplexity(tiny_model, tiny_tokenizer, ids=torch.arange(40) % 200, window=32, max_windows=40, progress=False)


def test_hf_generator_speed(tiny_model, tiny_tokenizer):
    prompts = torch.randint(1, 250, (2, 16))
    gen = hf_generator(tiny_model, tiny_tokenizer)
    r = measure_speed(gen, prompts, new_tokens=8, runs=2, progress=False)
    assert r.batch == 2 and r.runs == 2 and len(r.raw) == 2
    assert r.prefill_tps > 0 and r.decode_tps > 0 and r.e2e_tps > 0 and r.ttft_s > 0
    # greedy output is deterministic and has exactly the asked length (no early stop)
    out = gen(prompts, 8, lambda: None)
    assert out.shape == (2, 24) and torch.equal(out, gen(prompts, 8, lambda: None))


def test_compare_speed_interleaves_and_reports_ratios():
    calls = []

    def fake(name, dt):
        def gen(ids, n, on_token):
            calls.append(name)
            for _ in range(n):
                on_token()
            return torch.cat([ids, torch.zeros(ids.shape[0], n, dtype=ids.dtype)], 1)
        return gen

    rounds = []
    res = compare_speed({"a": fake("a", 0), "b": fake("b", 0)}, torch.zeros(1, 4, dtype=torch.long), new_tokens=4, runs=3, warmup=1, progress=False,
                        on_round=lambda s: rounds.append({k: v.runs for k, v in s.items()}))
    assert calls == ["a", "b"] + ["a", "b"] * 3  # warm-up each, then A B A B A B
    assert res["a"].runs == 3 and res["b"].runs == 3
    assert rounds == [{"a": 1, "b": 1}, {"a": 2, "b": 2}, {"a": 3, "b": 3}]  # a checkpoint after each complete round


def test_early_stop_is_an_error():
    def short(ids, n, on_token):
        on_token()
        return torch.cat([ids, ids[:, :1]], 1)

    with pytest.raises(LeanLMError, match="must not stop early"):
        measure_speed(short, torch.zeros(1, 4, dtype=torch.long), new_tokens=4, runs=1, warmup=0, progress=False)


def test_protocol_prompts(tiny_tokenizer):
    p = protocol_prompts(tiny_tokenizer, batch=3, prompt_tokens=64)
    assert p.shape == (3, 64)
    assert len({tuple(r.tolist()) for r in p}) == 3  # three different articles


def test_cost():
    assert cost_per_million_tokens(100.0, 3.6) == pytest.approx(10.0)


def test_tensor_bytes_counts_tied_weights_once(tiny_model):
    n = sum(p.numel() for p in tiny_model.parameters())  # parameters() already dedups tied weights
    buf = sum(b.numel() * b.element_size() for b in tiny_model.buffers())
    assert tensor_bytes(tiny_model) == n * 4 + buf


def test_decode_costs_by_hand(tiny_model):
    c = decode_costs(tiny_model, context=10)
    cfg = tiny_model.config
    linears = sum(m.weight.numel() for m in tiny_model.modules() if isinstance(m, torch.nn.Linear))
    norms = sum(p.numel() for n, p in tiny_model.named_parameters() if "norm" in n)
    buf = sum(b.numel() * b.element_size() for b in tiny_model.buffers())
    # tied embedding: read whole by the head, so all linears (incl. the head) + norms + buffers
    assert c["weight_bytes"] == (linears + norms) * 4 + buf
    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 10 * 4
    assert c["kv_bytes"] == kv
    assert c["flops_per_token"] == 2 * linears + 4 * cfg.num_hidden_layers * cfg.hidden_size * 10


def test_decode_costs_untied_embedding_reads_one_row():
    from conftest import make_llama

    m = make_llama(tie=False)
    c = decode_costs(m, context=0)
    emb = m.model.embed_tokens.weight
    full = sum(p.numel() * 4 for p in m.parameters()) + sum(b.numel() * b.element_size() for b in m.buffers())
    assert c["weight_bytes"] == full - emb.numel() * 4 + emb.shape[1] * 4


def test_roofline_verdicts(tiny_model):
    c = decode_costs(tiny_model, 16)
    bw, fl = 1e10, 1e12  # machine balance 100 FLOP/byte: decode (~0.5 FLOP/byte) is memory-bound
    limit = bw / c["bytes_per_token"]
    fast = roofline(tiny_model, 0.8 * limit, context=16, bandwidth=bw, flops=fl)
    assert fast.roofline_bound == "memory" and fast.verdict.startswith("memory-bound")
    assert fast.fraction_of_bandwidth_limit == pytest.approx(0.8)
    slow = roofline(tiny_model, 0.1 * limit, context=16, bandwidth=bw, flops=fl)
    assert slow.verdict.startswith("overhead-bound")
    comp = roofline(tiny_model, None, context=16, bandwidth=1e15, flops=1e6)
    assert comp.roofline_bound == "compute"
