"""Speed, memory and money of one deployment of a candidate model, measured on this machine.

A deployment is how a model runs: the leanlm runtime at batch 1 (PyTorch's kernels or the fused
batch-1 kernels, optionally with prompt-lookup speculative decoding, which is lossless under greedy
decoding), or the serving engine (`LLMEngine`, continuous batching on a paged KV cache, float32 or int8
KV blocks, optionally with prompt-lookup drafts verified inside the batch) with `concurrency` requests
in flight. Every measurement is interleaved with the baseline, naive transformers bfloat16 `generate` at
batch 1, one request at a time (PROTOCOL.md, Serving: naive serving), so the ratios hold on a loaded
machine; $ per 1M tokens = price per hour / (3600 x generated tokens/s) x 1e6.

Departure from the protocol, for the budget: serving is measured in-process (the engine's own loop,
no HTTP), with `runs` rounds rather than 5.
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import asdict, dataclass

import torch

from ..core.errors import LeanLMError
from ..evaluation.memory import cost_per_million_tokens
from ..evaluation.speed import compare_speed, hf_generator


@dataclass(frozen=True)
class Deployment:
    engine: str = "runtime"          # runtime (batch 1) or serving (LLMEngine at `max_num_seqs` concurrent requests)
    prompt_lookup: bool = False      # prompt-lookup speculative decoding, k drafted tokens per round (serving: per sequence and step)
    k: int = 8
    kv_dtype: str = "float32"        # serving: KV blocks float32 or int8
    max_num_seqs: int = 1            # serving: sequences in the running batch
    kernels: bool = False            # runtime: the fused batch-1 kernels (runtime/kernels.py) rather than PyTorch's

    def label(self) -> str:
        spec = f" + prompt lookup k={self.k}" if self.prompt_lookup else ""
        if self.engine == "runtime":
            return "runtime batch 1" + (", fused kernels" if self.kernels else "") + spec
        return f"serving x{self.max_num_seqs}, KV {self.kv_dtype}" + spec

    def to_dict(self) -> dict:
        return asdict(self)


def baseline_generator(model, tokenizer):
    """Naive deployment: a bfloat16 copy of the original model through transformers' `generate`."""
    bf = copy.deepcopy(model).to(torch.bfloat16).eval()
    return hf_generator(bf, tokenizer)


def _runtime_generator(engine, dep: Deployment):
    if not dep.prompt_lookup:
        return engine.generator()
    from ..speculative.decode import speculative_generate
    from ..speculative.drafters import PromptLookupDrafter

    def gen(ids, n, on_token):
        return speculative_generate(engine, PromptLookupDrafter(), ids, n, dep.k, on_token=on_token)[0]

    return gen


def measure_runtime(model, dep: Deployment, prompts: torch.Tensor, base_gen, new_tokens: int, runs: int,
                    price_per_hour: float, progress: bool = False) -> dict:
    """Batch-1 decode through the leanlm runtime, interleaved with the baseline."""
    from ..runtime import Engine

    eng = Engine(model, max_seq_len=prompts.shape[1] + new_tokens + dep.k + 1, allow_fallback=True, kernels=dep.kernels)
    if dep.kernels and not eng.kernels.startswith(("avx", "scalar")):
        raise LeanLMError(f"the fused kernels do not run here: {eng.kernels}")
    gen = _runtime_generator(eng, dep)
    res = compare_speed({"baseline": base_gen, "candidate": gen}, prompts, new_tokens, runs, 1, progress)
    b, c = res["baseline"], res["candidate"]
    fig = {"decode_tps": c.decode_tps, "e2e_tps": c.e2e_tps, "ttft_s": c.ttft_s, "baseline_decode_tps": b.decode_tps,
           "baseline_e2e_tps": b.e2e_tps, "tokens_per_s": c.e2e_tps, "speedup": c.e2e_tps / b.e2e_tps,
           "decode_speedup": c.decode_tps / b.decode_tps, "weights_bytes": eng.weight_bytes(), "fallbacks": len(eng.fallbacks),
           "kernels": eng.kernels}
    kv = 2 * eng.model.spec.n_layers * eng.model.spec.kv_heads * eng.model.spec.head_dim * 4 * (prompts.shape[1] + new_tokens)
    fig["memory_bytes"] = fig["weights_bytes"] + kv
    if dep.prompt_lookup:   # lossless claim checked in the same run (PROTOCOL.md)
        plain = eng.generate(prompts, new_tokens)
        fig["identical_to_greedy"] = bool(torch.equal(plain, gen(prompts, new_tokens, lambda: None)))
    return _money(fig, price_per_hour)


def _serve_round(eng, prompts: list[list[int]], concurrency: int, new_tokens: int) -> tuple[int, float, list[list[int]]]:
    """Closed loop: `concurrency` requests in flight, the next one added as soon as one finishes.
    Returns the generated tokens, the seconds and each request's output tokens."""
    from ..serving.scheduler import SamplingParams

    todo = list(enumerate(prompts))
    outs: dict[str, list[int]] = {}
    t0 = time.perf_counter()
    tokens = 0

    def add():
        i, p = todo.pop(0)
        rid = f"r{i}-{time.perf_counter_ns()}"
        outs[rid] = []
        eng.add_request(rid, p, SamplingParams(max_tokens=new_tokens, ignore_eos=True))

    for _ in range(min(concurrency, len(todo))):
        add()
    while eng.has_unfinished():
        for out in eng.step():
            tokens += len(out.token_ids)
            outs[out.request_id] += out.token_ids
            if out.finished and todo:
                add()
    return tokens, time.perf_counter() - t0, list(outs.values())


def measure_serving(model, tokenizer, dep: Deployment, prompts: list[list[int]], base_gen, base_prompt: torch.Tensor,
                    new_tokens: int, runs: int, price_per_hour: float) -> dict:
    """Total generated tokens/s of the serving engine at `max_num_seqs` concurrent requests (2 x that many
    requests per round), rounds alternating with the naive baseline's one-request-at-a-time tokens/s.
    `fig["outputs"]` holds the first round's output tokens per request (not logged: the search compares a
    speculative deployment's outputs with the plain one's)."""
    from ..serving.engine import KVPool, LLMEngine

    longest = max(len(p) for p in prompts) + new_tokens
    s = None
    eng = None
    spec = "prompt-lookup" if dep.prompt_lookup else None
    for mb in (64, 256, 1024):   # the smallest KV cache that holds every request in flight
        eng = LLMEngine(model, tokenizer, kv_cache_mb=mb, max_num_seqs=dep.max_num_seqs, max_model_len=longest + 1,
                        kv_dtype=dep.kv_dtype, allow_fallback=True, speculative=spec, num_draft=dep.k)
        s = eng.model.spec
        if eng.blocks.num_blocks >= dep.max_num_seqs * eng.blocks.blocks_for(longest):
            break
    kv_bytes = dep.max_num_seqs * eng.blocks.blocks_for(longest) * KVPool.block_bytes(s.n_layers, s.kv_heads, eng.blocks.block_size,
                                                                                          s.head_dim, dep.kv_dtype)
    _serve_round(eng, prompts[: dep.max_num_seqs], dep.max_num_seqs, 4)   # warm-up
    base_gen(base_prompt, 4, lambda: None)
    drafted0, accepted0 = eng.stats.spec_draft_tokens, eng.stats.spec_accepted_tokens
    cand, base, outputs = [], [], None
    for _ in range(runs):
        t0 = time.perf_counter()
        base_gen(base_prompt, new_tokens, lambda: None)
        base.append(new_tokens / (time.perf_counter() - t0))
        n, sec, outs = _serve_round(eng, prompts, dep.max_num_seqs, new_tokens)
        if n != len(prompts) * new_tokens:
            raise LeanLMError(f"the serving engine generated {n} tokens, {len(prompts) * new_tokens} were asked")
        outputs = outputs or outs
        cand.append(n / sec)
    c, b = statistics.median(cand), statistics.median(base)
    fig = {"tokens_per_s": c, "baseline_e2e_tps": b, "speedup": c / b, "requests": len(prompts), "concurrency": dep.max_num_seqs,
           "weights_bytes": eng.model.weight_bytes(), "kv_bytes": kv_bytes, "raw_tokens_per_s": cand, "raw_baseline_tps": base}
    fig["memory_bytes"] = fig["weights_bytes"] + kv_bytes
    if spec:   # the share of drafted tokens the batch's verification kept
        d = eng.stats.spec_draft_tokens - drafted0
        fig["draft_acceptance"] = (eng.stats.spec_accepted_tokens - accepted0) / d if d else 0.0
    fig = _money(fig, price_per_hour)
    fig["outputs"] = outputs
    return fig


def _money(fig: dict, price_per_hour: float) -> dict:
    fig["usd_per_mtok"] = cost_per_million_tokens(fig["tokens_per_s"], price_per_hour)
    fig["baseline_usd_per_mtok"] = cost_per_million_tokens(fig["baseline_e2e_tps"], price_per_hour)
    fig["cost_ratio"] = fig["baseline_usd_per_mtok"] / fig["usd_per_mtok"]   # how many times cheaper than the baseline
    return fig


def serving_prompts(tokenizer, texts: list[str], n: int, lengths: tuple[int, ...] = (64, 128, 192)) -> list[list[int]]:
    """`n` prompts cut from paragraphs of the evaluation text, cycling through `lengths` tokens."""
    ids = []
    for t in texts:
        ids += tokenizer(t, return_attention_mask=False)["input_ids"]
        if len(ids) > n * max(lengths):
            break
    out, pos = [], 0
    for i in range(n):
        L = lengths[i % len(lengths)]
        if pos + L > len(ids):
            pos = 0
        if len(ids) < L:
            raise LeanLMError(f"the quality text has {len(ids)} tokens; serving prompts need {L}")
        out.append(ids[pos : pos + L])
        pos += L
    return out


def format_costs(weight: torch.Tensor, kinds: tuple[str, ...] = ("bf16", "int8", "int4"), calls: int = 50) -> dict:
    """Measured cost of each packed weight format on this machine, for one of the model's own weights at batch 1:
    microseconds per matmul (median of 5 rounds of `calls`, formats interleaved) and bytes per weight (scales included).
    The cost side of the mixed-precision candidate (AutoQuantize scores formats by bits; here they are timed): the
    same cost model as `leanlm quantize --mixed --cost latency|bytes` (`quantization.mixed.format_costs`)."""
    from ..quantization.mixed import format_costs as measured

    names = {"int4": "int4_g64"}   # the runtime's int4 layout packs groups of 64 by default
    got = measured(tuple(weight.shape), tuple(names.get(k, k) for k in kinds), calls=calls)
    return {k: got[names.get(k, k)] for k in kinds}
