"""Serving counters and latency histograms, rendered as Prometheus text with vLLM's metric names."""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)


@dataclass
class Histogram:
    counts: list[int] = field(default_factory=lambda: [0] * (len(_BUCKETS) + 1))
    total: float = 0.0
    n: int = 0

    def observe(self, v: float) -> None:
        self.counts[bisect.bisect_left(_BUCKETS, v)] += 1
        self.total += v
        self.n += 1

    def lines(self, name: str) -> list[str]:
        out, cum = [], 0
        for b, c in zip(_BUCKETS, self.counts):
            cum += c
            out.append(f'{name}_bucket{{le="{b}"}} {cum}')
        out += [f'{name}_bucket{{le="+Inf"}} {self.n}', f"{name}_sum {self.total}", f"{name}_count {self.n}"]
        return out


@dataclass
class Stats:
    prompt_tokens: int = 0
    generation_tokens: int = 0
    ttft: Histogram = field(default_factory=Histogram)
    itl: Histogram = field(default_factory=Histogram)
    e2e: Histogram = field(default_factory=Histogram)
    spec_draft_tokens: int = 0
    spec_accepted_tokens: int = 0
    solo_steps: int = 0     # steps run by the one-call fused step (one sequence decoding alone)
    solo_loads: int = 0     # times its dense KV copy was loaded from the paged pools


def render(engine, model_name: str) -> str:
    """Prometheus text exposition of an LLMEngine's state and counters."""
    s, b, sch = engine.stats, engine.blocks, engine.scheduler
    lab = f'{{model_name="{model_name}"}}'
    rows = [
        ("vllm:num_requests_running", "gauge", "Requests in the running batch.", len(sch.running)),
        ("vllm:num_requests_waiting", "gauge", "Requests waiting to be scheduled.", len(sch.waiting)),
        ("vllm:kv_cache_usage_perc", "gauge", "Fraction of KV-cache blocks in use (1 = full).", b.usage()),
        ("vllm:num_preemptions_total", "counter", "Preemptions (recompute) so far.", sch.num_preemptions),
        ("vllm:prefix_cache_queries_total", "counter", "Prompt tokens looked up in the prefix cache.", b.prefix_queries),
        ("vllm:prefix_cache_hits_total", "counter", "Prompt tokens found in the prefix cache.", b.prefix_hits),
        ("vllm:prompt_tokens_total", "counter", "Prompt tokens processed.", s.prompt_tokens),
        ("vllm:generation_tokens_total", "counter", "Tokens generated.", s.generation_tokens),
        ("vllm:spec_decode_num_draft_tokens_total", "counter", "Speculated tokens verified.", s.spec_draft_tokens),
        ("vllm:spec_decode_num_accepted_tokens_total", "counter", "Speculated tokens accepted.", s.spec_accepted_tokens),
    ]
    out = []
    for name, kind, doc, v in rows:
        out += [f"# HELP {name} {doc}", f"# TYPE {name} {kind}", f"{name}{lab} {v}"]
    for name, h, doc in (("vllm:time_to_first_token_seconds", s.ttft, "Time to first token."),
                         ("vllm:inter_token_latency_seconds", s.itl, "Time between two generated tokens."),
                         ("vllm:e2e_request_latency_seconds", s.e2e, "Request latency from arrival to finish.")):
        out += [f"# HELP {name} {doc}", f"# TYPE {name} histogram"]
        out += [line.replace("{", lab[:-1] + ",", 1) if "{" in line else line.replace(" ", lab + " ", 1) for line in h.lines(name)]
    return "\n".join(out) + "\n"
