"""Serving: block allocator, scheduler, LLMEngine on a tiny float32 Llama, and the OpenAI-compatible server."""

from __future__ import annotations

import asyncio
import json
import random
import socket
import threading
import time

import pytest
import torch

from conftest import make_gemma3, make_llama
from leanlm.core.errors import LeanLMError
from leanlm.serving import BlockManager, LLMEngine, SamplingParams, Scheduler
from leanlm.serving.scheduler import Sequence

TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"


@pytest.fixture(scope="module")
def tok():
    from conftest import make_tokenizer

    t = make_tokenizer()
    t.chat_template = TEMPLATE
    return t


@pytest.fixture(scope="module")
def model(tok):
    m = make_llama(vocab_size=len(tok))
    with torch.no_grad():   # larger weights than the default init, so greedy outputs vary from token to token
        for p in m.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15)
    return m


PROMPTS = ["The quick brown fox", "Paris is the capital of France. Language models predict the next token", "Quantization",
           "Pruning removes them; distillation teaches a small model. The lazy dog"]


def ids(tok, text):
    return tok(text)["input_ids"]


def run(eng, reqs):
    """Add (id, prompt, params) requests and step until all finish; returns id -> generated token ids."""
    for rid, p, sp in reqs:
        eng.add_request(rid, p, sp)
    out = {}
    while eng.has_unfinished():
        for o in eng.step():
            out.setdefault(o.request_id, []).extend(o.token_ids)
    return out


def all_free(eng_or_blocks):
    b = getattr(eng_or_blocks, "blocks", eng_or_blocks)
    return b.num_free == b.num_blocks and not any(b.ref) and not b.tables


# ---------------------------------------------------------------------------- allocator and scheduler units
def test_block_manager_prefix_sharing_and_lru_eviction():
    b = BlockManager(num_blocks=6, block_size=4)
    toks = list(range(10))
    assert b.match_prefix("a", toks) == 0
    b.grow("a", 10)
    assert len(b.tables["a"]) == 3 and b.num_free == 3
    b.commit("a", toks, 10)              # two full blocks hashed
    assert b.match_prefix("b", toks + [99]) == 8   # shares a's two full blocks
    assert b.tables["b"] == b.tables["a"][:2] and b.ref[b.tables["a"][0]] == 2
    b.free_seq("a")
    b.free_seq("b")
    assert all_free(b) and len(b.evictable) == 2    # kept for reuse, still counted free
    assert b.match_prefix("c", toks) == 8
    b.free_seq("c")
    b.grow("d", 24)                      # needs all 6 blocks: evicts the cached ones
    assert not b.cached and b.num_free == 0
    assert not b.can_grow("e", 1)
    b.free_seq("d")
    assert all_free(b)


def test_allocator_random_mix_of_finish_abort_preemption_frees_every_block():
    rng = random.Random(0)
    b = BlockManager(num_blocks=12, block_size=4)
    s = Scheduler(b, max_num_seqs=4, max_num_batched_tokens=10)
    shared = [7] * 9
    seqs = [Sequence(str(i), (shared if i % 2 else []) + [rng.randrange(50) for _ in range(rng.randrange(1, 12))],
                     SamplingParams(max_tokens=8), i) for i in range(12)]
    for q in seqs:
        s.add(q)
    done = set()
    for _ in range(400):
        if not s.has_work():
            break
        for sc in s.schedule():
            q = sc.seq
            q.computed += sc.length
            b.commit(q.request_id, q.tokens, q.computed)
            if sc.samples:
                q.output.append(rng.randrange(50))
                if len(q.output) >= q.params.max_tokens or rng.random() < 0.05:
                    s.remove(q)
                    done.add(q.request_id)
        if rng.random() < 0.05 and s.running:   # abort a random running request
            q = rng.choice(s.running)
            s.remove(q)
            done.add(q.request_id)
    assert done == {q.request_id for q in seqs}
    assert s.num_preemptions > 0 and b.prefix_hits > 0
    assert all_free(b)


def test_scheduler_runs_decodes_before_an_older_prefill():
    b = BlockManager(num_blocks=64, block_size=4)
    s = Scheduler(b, max_num_seqs=4, max_num_batched_tokens=8)
    old, new = Sequence("old", list(range(40)), SamplingParams(), 0.0), Sequence("new", [1, 2], SamplingParams(), 1.0)
    s.add(old)
    s.schedule()                 # old's first chunk of 8
    old.computed += 8
    s.running.append(new)        # a decoding request that arrived later (e.g. readmitted after preemption)
    b.grow("new", 2)
    new.computed = 1
    sched = s.schedule()
    assert [(x.seq.request_id, x.length) for x in sched] == [("new", 1), ("old", 7)]


def test_scheduler_fcfs_and_preempts_newest():
    b = BlockManager(num_blocks=4, block_size=2)
    s = Scheduler(b, max_num_seqs=8, max_num_batched_tokens=100)
    a, c = Sequence("a", [1, 2, 3], SamplingParams()), Sequence("c", [4, 5, 6], SamplingParams())
    s.add(a)
    s.add(c)
    assert [x.seq.request_id for x in s.schedule()] == ["a", "c"]   # arrival order, both fit (2 blocks each)
    for q in (a, c):
        q.computed = 3
        q.output.append(9)
    # each now needs a third... a needs 2 blocks for 4 tokens (still fits), then grows past: the newest is preempted
    s.schedule()
    for q in (a, c):
        q.computed = 4
        q.output.append(9)
    sched = s.schedule()      # a needs a 3rd block, none free: c (newest) is preempted, a runs
    assert [x.seq.request_id for x in sched] == ["a"] and s.num_preemptions == 1
    assert s.waiting[0] is c and c.computed == 0                   # back at the front of the queue
    s.remove(a)
    assert [x.seq.request_id for x in s.schedule()] == ["c"]       # and it is next
    s.remove(c)
    assert all_free(b)


# ---------------------------------------------------------------------------- engine on a tiny model
def test_continuous_batch_equals_runtime_engine_and_transformers(model, tok):
    from leanlm.runtime import Engine

    eng = LLMEngine(model, tok, "fp32", kv_cache_mb=1, block_size=4, max_num_seqs=3, max_num_batched_tokens=12)
    prompts = [ids(tok, p) for p in PROMPTS]
    sp = lambda n: SamplingParams(max_tokens=n, ignore_eos=True)
    # staggered arrivals: request 3 joins while the others decode
    eng.add_request("0", prompts[0], sp(10))
    eng.add_request("1", prompts[1], sp(7))
    eng.step()
    got = run(eng, [("2", prompts[2], sp(12)), ("3", prompts[3], sp(9))])
    ref = Engine(model, "fp32", max_seq_len=128)
    for i, (p, n) in enumerate(zip(prompts, (10, 7, 12, 9))):
        alone = ref.generate(torch.tensor([p]), n)[0, len(p):].tolist()
        hf = model.generate(torch.tensor([p]), max_new_tokens=n, do_sample=False, eos_token_id=None)[0, len(p):].tolist()
        assert got[str(i)][-n:] == alone == hf, i
    assert all_free(eng)


def test_preemption_by_recompute_keeps_outputs(model, tok):
    prompts = [ids(tok, p) for p in PROMPTS]
    big = LLMEngine(model, tok, "fp32", kv_cache_mb=1, block_size=4)
    want = run(big, [(str(i), p, SamplingParams(max_tokens=12, ignore_eos=True)) for i, p in enumerate(prompts)])
    per_block = 2 * 2 * 2 * 4 * 16 * 4   # layers * (k, v) * kv_heads * block_size * head_dim * float32
    small = LLMEngine(model, tok, "fp32", kv_cache_mb=14 * per_block / 2**20, block_size=4, prefix_caching=False)
    assert small.blocks.num_blocks == 14   # room for about two of the four sequences
    got = run(small, [(str(i), p, SamplingParams(max_tokens=12, ignore_eos=True)) for i, p in enumerate(prompts)])
    assert small.scheduler.num_preemptions > 0
    assert got == want
    assert all_free(small)


def test_prefix_cache_hits_give_identical_outputs(model, tok):
    system = ids(tok, "The quick brown fox jumps over the lazy dog. Paris is the capital of France. ")
    qs = [system + ids(tok, q) for q in ("Language models", "Quantization stores", "Pruning")]
    sp = SamplingParams(max_tokens=8, ignore_eos=True)
    cold = LLMEngine(model, tok, "fp32", kv_cache_mb=1, block_size=4, prefix_caching=False)
    want = {str(i): run(cold, [(str(i), q, sp)])[str(i)] for i, q in enumerate(qs)}
    warm = LLMEngine(model, tok, "fp32", kv_cache_mb=1, block_size=4)
    got = {str(i): run(warm, [(str(i), q, sp)])[str(i)] for i, q in enumerate(qs)}   # one after another: later ones hit
    assert got == want
    assert warm.blocks.prefix_hits >= 2 * (len(system) // 4) * 4
    assert cold.blocks.prefix_hits == 0
    assert all_free(warm)


def test_chunked_prefill_equals_one_shot_and_interleaves_decodes(model, tok):
    long = ids(tok, PROMPTS[1] + " " + PROMPTS[3])
    sp = lambda: SamplingParams(max_tokens=8, ignore_eos=True)
    want = run(LLMEngine(model, tok, "fp32", kv_cache_mb=1, max_num_batched_tokens=512), [("x", long, sp())])["x"]
    eng = LLMEngine(model, tok, "fp32", kv_cache_mb=1, block_size=4, max_num_batched_tokens=5)
    eng.add_request("d", ids(tok, "Paris"), SamplingParams(max_tokens=30, ignore_eos=True))
    eng.step()
    eng.add_request("x", long, sp())
    got, prefill_steps = {}, 0
    while eng.has_unfinished():
        outs = eng.step()
        if "x" not in got and not any(o.request_id == "x" for o in outs):
            prefill_steps += 1
            assert [o.request_id for o in outs] == ["d"]   # the running decode advances during every prefill chunk
        for o in outs:
            got.setdefault(o.request_id, []).extend(o.token_ids)
    assert prefill_steps >= len(long) // 4 - 1
    assert got["x"] == want and all_free(eng)


def test_sampling_seed_stop_and_validation(model, tok):
    eng = LLMEngine(model, tok, "fp32", kv_cache_mb=1, max_model_len=64)
    p = ids(tok, PROMPTS[0])
    sp = lambda: SamplingParams(max_tokens=10, temperature=0.8, top_k=20, top_p=0.9, seed=3, ignore_eos=True)
    a, b = run(eng, [("a", p, sp())]), run(eng, [("b", p, sp())])
    assert a["a"] == b["b"]
    full = tok.decode(run(eng, [("g", p, SamplingParams(max_tokens=10, ignore_eos=True))])["g"])
    stop = full[3:6]
    eng.add_request("s", p, SamplingParams(max_tokens=10, ignore_eos=True, stop=[stop]))
    outs = []
    while eng.has_unfinished():
        outs += eng.step()
    assert outs[-1].finish_reason == "stop" and "".join(o.text for o in outs) == full[:full.find(stop)]
    with pytest.raises(LeanLMError, match="context"):
        eng.add_request("long", p, SamplingParams(max_tokens=64))
    with pytest.raises(LeanLMError, match="empty"):
        eng.add_request("e", [], SamplingParams())
    eng.add_request("ab", p, SamplingParams(max_tokens=20))
    eng.step()
    assert eng.abort("ab") and not eng.abort("ab") and all_free(eng)


# ---------------------------------------------------------------------------- the HTTP server
@pytest.fixture(scope="module")
def server(model, tok):
    pytest.importorskip("fastapi")   # the `serve` extra
    pytest.importorskip("openai")
    import uvicorn

    from leanlm.serving.api import create_app

    eng = LLMEngine(model, tok, "fp32", kv_cache_mb=1, block_size=4, max_num_seqs=2, max_model_len=256)
    app = create_app(eng, "tiny", api_key="sekret", max_waiting=2)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    for _ in range(200):
        if srv.started:
            break
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", eng, app.state.llm
    srv.should_exit = True
    th.join(10)


def http(url, method="GET", body=None, key="sekret"):
    """(status, text) of one plain HTTP request (stdlib, so the test needs no extra client)."""
    import urllib.error
    import urllib.request

    headers = {"Content-Type": "application/json"} if body is not None else {}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url, data=None if body is None else body.encode(), headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def client(url, key="sekret"):
    from openai import OpenAI

    return OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)


def test_openai_client_completions_chat_streaming(server, model, tok):
    from leanlm.runtime import Engine

    url, eng, llm = server
    c = client(url)
    assert [m.id for m in c.models.list().data] == ["tiny"]
    p = ids(tok, PROMPTS[0])
    want = Engine(model, "fp32", max_seq_len=64).generate(torch.tensor([p]), 8)[0, len(p):].tolist()
    r = c.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=8, extra_body={"ignore_eos": True})
    assert r.choices[0].text == tok.decode(want, skip_special_tokens=True)
    assert r.usage.prompt_tokens == len(p) and r.usage.completion_tokens == 8 and r.choices[0].finish_reason == "length"
    chunks = list(c.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=8, stream=True,
                                       stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == r.choices[0].text
    assert chunks[-1].usage.completion_tokens == 8
    chat = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Paris is"}], max_tokens=6,
                                     extra_body={"ignore_eos": True})
    cp = tok(tok.apply_chat_template([{"role": "user", "content": "Paris is"}], tokenize=False, add_generation_prompt=True),
             add_special_tokens=False)["input_ids"]
    cw = Engine(model, "fp32", max_seq_len=64).generate(torch.tensor([cp]), 6)[0, len(cp):].tolist()
    assert chat.choices[0].message.content == tok.decode(cw, skip_special_tokens=True)
    assert chat.usage.prompt_tokens == len(cp)
    stream = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Paris is"}], max_tokens=6,
                                       stream=True, extra_body={"ignore_eos": True})
    assert "".join(ch.choices[0].delta.content or "" for ch in stream) == chat.choices[0].message.content
    m = http(url + "/metrics")[1]
    assert "vllm:generation_tokens_total" in m and "vllm:time_to_first_token_seconds_count" in m
    assert http(url + "/health")[0] == 200
    assert all_free(eng)


@pytest.mark.parametrize("body, param", [
    ('{"model": "tiny", "prompt": ', "body"),
    ('{"model": "tiny", "prompt": "hi", "max_tokens": "lots"}', "max_tokens"),
    ('{"model": "other", "prompt": "hi"}', "model"),
    ('{"model": "tiny", "prompt": ""}', "prompt"),
    ('{"model": "tiny", "prompt": "hi", "max_tokens": 100000}', "max_tokens"),
    ('{"model": "tiny", "prompt": "hi", "logit_bias": {"1": 2}}', "logit_bias"),
    ('{"model": "tiny", "prompt": "hi", "temperature": -1}', "temperature"),
    ('{"model": "tiny"}', "prompt"),
])
def test_malformed_requests_get_400_naming_the_field(server, body, param):
    url, _, _ = server
    status, text = http(url + "/v1/completions", "POST", body)
    assert status == 400, text
    err = json.loads(text)["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error"


def test_api_key_401_and_queue_429(server):
    import openai

    url, eng, llm = server
    with pytest.raises(openai.AuthenticationError):
        client(url, "wrong").models.list()
    assert http(url + "/v1/models", key=None)[0] == 401
    # max_num_seqs 2 + max_waiting 2: the fifth concurrent request is refused. Four long requests are opened
    # through the server's own front door (AsyncLLM.add, from an event loop of the test's) and held open.
    loop = asyncio.new_event_loop()
    t = threading.Thread(target=loop.run_forever, daemon=True)
    t.start()

    async def fill():
        for i in range(4):
            llm.add(f"filler{i}", [5, 6, 7], SamplingParams(max_tokens=200, ignore_eos=True))

    try:
        asyncio.run_coroutine_threadsafe(fill(), loop).result(timeout=10)
        with pytest.raises(openai.RateLimitError):
            client(url).completions.create(model="tiny", prompt="hi", max_tokens=2)
    finally:
        for i in range(4):
            llm.abort(f"filler{i}")
    for _ in range(100):   # the engine thread takes the aborts before its next step
        if not eng.has_unfinished():
            break
        time.sleep(0.05)
    loop.call_soon_threadsafe(loop.stop)
    t.join(timeout=10)
    assert all_free(eng)


def test_disconnect_aborts_and_frees_blocks(server):
    import http.client

    url, eng, llm = server
    body = {"model": "tiny", "prompt": "The quick brown fox", "max_tokens": 200, "stream": True, "ignore_eos": True}
    conn = http.client.HTTPConnection(url.removeprefix("http://"), timeout=30)
    conn.request("POST", "/v1/completions", json.dumps(body), {"Authorization": "Bearer sekret", "Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200
    line = r.readline()
    while not line.startswith(b"data:"):
        line = r.readline()
    assert json.loads(line[5:])["choices"][0]["finish_reason"] is None
    assert eng.num_unfinished() == 1
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    for _ in range(100):    # closed: the server notices, aborts the sequence and frees its blocks
        if not eng.has_unfinished():
            break
        time.sleep(0.05)
    assert not eng.has_unfinished() and all_free(eng)


def test_cli_serve_rejects_a_kv_budget_without_a_block(tiny_folder, capsys):
    from leanlm.cli import main

    assert main(["serve", str(tiny_folder), "--kv-cache-mb", "0.0001", "--threads", "1"]) == 2
    assert "--kv-cache-mb" in capsys.readouterr().err
    assert main(["serve", str(tiny_folder), "--speculative", "draft", "--threads", "1"]) == 2
    assert "--draft-model" in capsys.readouterr().err


@pytest.mark.parametrize("kv_dtype,per_token", [("int8", lambda D: D + 4), ("bfloat16", lambda D: 2 * D)])
def test_low_precision_kv_blocks_hold_more_tokens_and_keep_greedy_outputs(model, tok, kv_dtype, per_token):
    prompts = [ids(tok, p) for p in PROMPTS]
    reqs = lambda: [(str(i), p, SamplingParams(max_tokens=6, ignore_eos=True)) for i, p in enumerate(prompts)]
    f32 = LLMEngine(model, tok, "fp32", kv_cache_mb=1, block_size=4)
    low = LLMEngine(model, tok, "fp32", kv_cache_mb=1, block_size=4, kv_dtype=kv_dtype)
    D = model.config.hidden_size // model.config.num_attention_heads
    assert f32.kv_dtype == "float32"   # auto, for float32 weights
    assert low.blocks.num_blocks == f32.blocks.num_blocks * (4 * D) // per_token(D)
    assert low.pool.k[0].dtype == {"int8": torch.int8, "bfloat16": torch.bfloat16}[kv_dtype]
    assert run(low, reqs()) == run(f32, reqs())
    assert all_free(low)


def test_auto_kv_dtype_follows_the_weights(model, tok):
    """auto: bfloat16 KV blocks for weights whose matmuls run in bfloat16 (int4 here), float32 for float32 weights;
    a lone request on bfloat16 blocks still takes the fused one-call step; an unknown dtype is refused."""
    eng = LLMEngine(model, tok, "int4", kv_cache_mb=1, block_size=4, group_size=32, allow_fallback=True)
    assert eng.kv_dtype == "bfloat16" and eng.pool.k[0].dtype == torch.bfloat16
    out = run(eng, [("a", ids(tok, PROMPTS[0]), SamplingParams(max_tokens=6, ignore_eos=True))])
    assert len(out["a"]) == 6 and all_free(eng)
    if eng.model.step is not None:   # the fused kernels are built here
        assert eng.stats.solo_steps == 5
    with pytest.raises(LeanLMError, match="KV-cache dtype"):
        LLMEngine(model, tok, "fp32", kv_dtype="float16")


def test_prompt_lookup_speculation_in_the_batch_keeps_greedy_outputs(model, tok):
    """Drafts verified in the same forward as other sequences' decodes (and prefill chunks), with preemption:
    every greedy output equals plain continuous batching; sampled requests are not speculated."""
    prompts = [ids(tok, p) for p in PROMPTS] + [ids(tok, "the fox the fox the fox the fox the fox the")]
    reqs = lambda: [(str(i), p, SamplingParams(max_tokens=14, ignore_eos=True)) for i, p in enumerate(prompts)] + [
        ("s", prompts[1], SamplingParams(max_tokens=6, temperature=0.8, seed=3, ignore_eos=True))]
    plain = LLMEngine(model, tok, "fp32", kv_cache_mb=1, block_size=4, max_num_batched_tokens=16)
    want = run(plain, reqs())
    per_block = 2 * 2 * 2 * 4 * 16 * 4
    for mb in (1, 16 * per_block / 2**20):   # ample blocks, and few enough to preempt
        spec = LLMEngine(model, tok, "fp32", kv_cache_mb=mb, block_size=4, max_num_batched_tokens=16,
                         speculative="prompt-lookup", num_draft=3, spec_max_batch=8)
        got = run(spec, reqs())
        assert got == want
        assert spec.stats.spec_draft_tokens > 0 and spec.stats.spec_accepted_tokens > 0
        assert spec.stats.generation_tokens == plain.stats.generation_tokens
        assert all_free(spec)
    with pytest.raises(LeanLMError, match="prompt-lookup or draft"):
        LLMEngine(model, tok, "fp32", kv_cache_mb=1, speculative="medusa")


def test_draft_model_speculation_in_the_batch_keeps_greedy_outputs(model, tok):
    """A draft model (each sequence drafting through its own cache of the shared draft) in the continuous batch, with
    preemption: greedy outputs equal plain continuous batching; the target itself as the draft keeps every draft token;
    every sequence's drafter is dropped when it ends; a draft of another vocabulary, or one without
    speculative='draft', is refused."""
    prompts = [ids(tok, p) for p in PROMPTS]
    reqs = lambda: [(str(i), p, SamplingParams(max_tokens=10, ignore_eos=True)) for i, p in enumerate(prompts)]  # noqa: E731
    plain = LLMEngine(model, tok, "fp32", kv_cache_mb=1, block_size=4, max_num_batched_tokens=16)
    want = run(plain, reqs())
    other = make_llama(vocab_size=len(tok), layers=1)
    per_block = 2 * 2 * 2 * 4 * 16 * 4
    for draft, mb in ((model, 1), (other, 1), (other, 16 * per_block / 2**20)):   # few blocks: preemptions
        spec = LLMEngine(model, tok, "fp32", kv_cache_mb=mb, block_size=4, max_num_batched_tokens=16,
                         speculative="draft", draft_model=draft, num_draft=3, spec_max_batch=8)
        assert run(spec, reqs()) == want
        assert spec.stats.spec_draft_tokens > 0 and all_free(spec) and not spec._drafters
        if draft is model:
            assert spec.stats.spec_accepted_tokens == spec.stats.spec_draft_tokens
    with pytest.raises(LeanLMError, match="vocabulary"):
        LLMEngine(model, tok, "fp32", speculative="draft", draft_model=make_llama(vocab_size=len(tok) + 8))
    with pytest.raises(LeanLMError, match="draft model"):
        LLMEngine(model, tok, "fp32", speculative="draft")
    with pytest.raises(LeanLMError, match="draft model"):
        LLMEngine(model, tok, "fp32", draft_model=other)


def test_speculation_drafts_only_at_a_small_batch(model, tok):
    """spec_max_batch: no sequence drafts while more than that many run; greedy outputs stay those of plain batching."""
    prompts = [ids(tok, "the fox the fox the fox the fox the fox the"), ids(tok, PROMPTS[0]), ids(tok, PROMPTS[2])]
    reqs = lambda: [(str(i), p, SamplingParams(max_tokens=4 + 6 * i, ignore_eos=True)) for i, p in enumerate(prompts)]
    want = run(LLMEngine(model, tok, "fp32", kv_cache_mb=1, block_size=4), reqs())
    spec = LLMEngine(model, tok, "fp32", kv_cache_mb=1, block_size=4, speculative="prompt-lookup", num_draft=3, spec_max_batch=1)
    seen = []
    lookup = spec.drafter.lookup
    spec.drafter.lookup = lambda *a: (seen.append(len(spec.scheduler.running)), lookup(*a))[1]
    assert run(spec, reqs()) == want
    assert seen and max(seen) == 1 and spec.stats.spec_draft_tokens > 0
    assert all_free(spec)
    with pytest.raises(LeanLMError, match="spec_max_batch"):
        LLMEngine(model, tok, "fp32", kv_cache_mb=1, speculative="prompt-lookup", spec_max_batch=0)


def test_int4_layers_run_bf16_copies_from_dense_rows(model, tok):
    """dense_rows: int4/int8 layers keep a bfloat16 copy of their dequantized weight, used by matmuls of at least that
    many token rows (close to the packed kernel's result); 0 keeps no copy; outputs and block accounting hold."""
    from leanlm.serving.engine import RowSwitch

    eng = LLMEngine(model, tok, "int4", kv_cache_mb=1, block_size=4, dense_rows=3)
    switched = [m for m in eng.model.modules() if isinstance(m, RowSwitch)]
    assert len(switched) == 4 * model.config.num_hidden_layers + 1   # qkv, o, gate_up, down per layer, and the head
    assert eng.dense_copy_bytes == sum(2 * m.in_features * m.out_features for m in switched)
    sw = eng.model.layers[0].gate_up
    used = []
    for name in ("packed", "dense"):
        mod = getattr(sw, name)
        mod.register_forward_hook(lambda m, i, o, name=name: used.append(name))
    x = torch.randn(3, sw.in_features).bfloat16()
    y_dense, y_packed = sw(x), sw(x[:2])
    assert used == ["dense", "packed"]
    torch.testing.assert_close(y_dense[:2].float(), y_packed.float(), rtol=0.05, atol=0.05)
    outs = run(eng, [(str(i), ids(tok, p), SamplingParams(max_tokens=5, ignore_eos=True)) for i, p in enumerate(PROMPTS)])
    assert sorted(len(v) for v in outs.values()) == [5] * 4 and "dense" in used and all_free(eng)
    assert LLMEngine(model, tok, "int4", kv_cache_mb=1, dense_rows=0).dense_copy_bytes == 0
    with pytest.raises(LeanLMError, match="dense_rows"):
        LLMEngine(model, tok, "int4", kv_cache_mb=1, dense_rows=-1)


def test_one_sequence_decodes_through_the_fused_step(model, tok):
    """A request decoding alone runs the runtime's one-call step over a dense KV copy that mirrors into the pools:
    its greedy tokens equal the runtime engine's batch-1 decode; when a second request joins (paged batch) and the
    first finishes, the second takes the solo path again from the pools; outputs equal those of an engine with
    the solo path off, and every block is freed."""
    from leanlm.runtime import Engine
    from leanlm.runtime import kernels

    if not kernels.available():
        pytest.skip("the fused kernels are not built here")
    prompts = [ids(tok, p) for p in PROMPTS[:2]]
    sp = lambda n: SamplingParams(max_tokens=n, ignore_eos=True)
    eng = LLMEngine(model, tok, "int4", kv_cache_mb=1, block_size=4, dense_rows=0)
    assert eng.model.step is not None
    got = run(eng, [("a", prompts[0], sp(12))])
    alone = Engine(model, "int4", max_seq_len=128).generate(torch.tensor([prompts[0]]), 12)[0, len(prompts[0]):].tolist()
    assert got["a"] == alone and eng.stats.solo_steps == 11 and eng.stats.solo_loads == 1
    outs = {}
    for fused in (True, False):
        e = LLMEngine(model, tok, "int4", kv_cache_mb=1, block_size=4, dense_rows=0, fused_step=fused)
        e.add_request("a", prompts[0], sp(6))
        for _ in range(3):   # a decodes alone for a while
            e.step()
        got = run(e, [("b", prompts[1], sp(14))])   # b joins; a finishes; b decodes alone
        outs[fused] = (got, e.stats.solo_steps, e.stats.solo_loads)
        assert all_free(e)
    assert outs[True][0] == outs[False][0] and outs[False][1] == 0
    assert outs[True][1] > 0 and outs[True][2] >= 2   # a's solo steps, then b's (loaded from the pools)


@pytest.mark.parametrize("kv_dtype", ["float32", "bfloat16", "int8"])
def test_paged_attention_kernel_keeps_batch_outputs_with_sliding_windows(kv_dtype):
    """Decode steps read the paged pools in place (the C++ kernel) or through a gather and batched matmuls: the same
    greedy tokens on a Gemma-3 model whose sliding window is shorter than the outputs, in a continuous batch."""
    from leanlm.runtime import kernels

    if not kernels.available():
        pytest.skip("the C++ kernels are not built here")
    m = make_gemma3(300)
    prompts = [torch.randint(1, 300, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (3, 9, 14)]
    reqs = lambda: [(str(i), p, SamplingParams(max_tokens=12, ignore_eos=True)) for i, p in enumerate(prompts)]
    outs = []
    for in_place in (True, False):
        eng = LLMEngine(m, None, "fp32", kv_cache_mb=1, block_size=4, kv_dtype=kv_dtype, fused_step=False)
        assert eng.pool.paged_kernel
        eng.pool.paged_kernel = in_place
        outs.append(run(eng, reqs()))
        assert all_free(eng)
    assert outs[0] == outs[1]
    if kv_dtype == "float32":   # and both equal the runtime engine's one-sequence decode
        from leanlm.runtime import Engine

        ref = Engine(m, "fp32", max_seq_len=64)
        for i, p in enumerate(prompts):
            assert outs[0][str(i)] == ref.generate(torch.tensor([p]), 12)[0, len(p):].tolist(), i


def test_incremental_detokenization_equals_whole_decode(model, tok):
    """Streamed text, decoded a few tokens at a time, equals decoding the whole output: with multi-byte UTF-8
    characters split over byte-level tokens (held back until complete, never sent as U+FFFD) and special tokens."""
    from leanlm.serving.scheduler import Sequence

    eng = LLMEngine(model, tok, "fp32", kv_cache_mb=1, block_size=4)
    texts = ["héllo wörld, 日本語 and emoji 🙂 end", "Paris is the capital of France.<eos> more"]
    rng = torch.Generator().manual_seed(0)
    cases = [ids(tok, t) for t in texts] + [torch.randint(0, len(tok), (60,), generator=rng).tolist() for _ in range(3)]
    for out in cases:
        seq = Sequence("x", [1], SamplingParams(max_tokens=len(out)))
        pieces = []
        for i, t in enumerate(out):
            seq.output.append(t)
            pieces.append(eng._detokenize(seq, final=i == len(out) - 1))
        assert "".join(pieces) == tok.decode(out, skip_special_tokens=True)
        if out in cases[:2]:   # valid UTF-8: no piece carries a replacement character
            assert not any("\ufffd" in p for p in pieces)


def test_serve_steps_the_engine_in_the_main_thread(model, tok, monkeypatch):
    """`serve` runs uvicorn in a second thread and the engine loop in the calling one: torch's OpenMP pool lives in
    the thread that loaded the model, and a second pool made every decode step about twice as slow (docs/serving.md).
    uvicorn is replaced by a stand-in whose run() makes one request through the app's own front door."""
    pytest.importorskip("fastapi")
    import uvicorn

    from leanlm.serving import api

    eng = LLMEngine(model, tok, "fp32", kv_cache_mb=1, block_size=4, max_num_seqs=2, max_model_len=64)
    stepped = set()
    step = eng.step
    monkeypatch.setattr(eng, "step", lambda: (stepped.add(threading.current_thread()), step())[1])
    got = []

    class FakeServer:
        def __init__(self, config):
            self.app, self.started = config.app, False

        def handle_exit(self, sig, frame):
            pass

        def run(self):
            self.started = True

            async def one():
                q = self.app.state.llm.add("r1", [5, 6, 7], SamplingParams(max_tokens=3, ignore_eos=True))
                while not got or not got[-1].finished:
                    got.append(await q.get())

            asyncio.run(one())

    monkeypatch.setattr(uvicorn, "Server", FakeServer)
    api.serve(eng, "tiny")
    assert stepped == {threading.main_thread()} and len(got) == 3 and got[-1].finished
    assert not eng.has_unfinished()

    class DeadServer(FakeServer):   # a server that never starts (a port in use): a clear error, not a silent return
        def run(self):
            pass

    monkeypatch.setattr(uvicorn, "Server", DeadServer)
    with pytest.raises(LeanLMError, match="did not start"):
        api.serve(eng, "tiny")
