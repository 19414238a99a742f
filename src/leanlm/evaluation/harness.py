"""`evaluate`: perplexity, speed, memory and cost of one or more models, side by side, in one call.

The CLI's `leanlm eval` and the benchmarks both call this, so every figure comes from one code path.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..core.modules import facts
from .memory import checkpoint_bytes, cost_per_million_tokens, model_folder, peak_rss_bytes, tensor_bytes
from .perplexity import perplexity
from .profile import machine_info
from .speed import Generator, compare_speed, hf_generator, protocol_prompts


@dataclass
class EvalSettings:
    ppl: bool = True
    speed: bool = True
    source: str = "wiki"
    window: int = 512
    max_windows: int | None = 40
    batch: int = 1
    prompt_tokens: int = 128
    new_tokens: int = 128
    runs: int = 5
    warmup: int = 1
    price_per_hour: float | None = None
    progress: bool = True


def evaluate(models: dict[str, tuple], settings: EvalSettings | None = None, generators: dict[str, Generator] | None = None) -> dict:
    """Evaluate `models` ({label: (model, tokenizer)}); the first one is the baseline for ratios.

    Speed runs are interleaved across models. `generators` may supply a faster engine per label
    (default: transformers' `generate`).
    """
    s = settings or EvalSettings()
    labels = list(models)
    base = labels[0]
    out: dict = {"machine": machine_info(), "settings": vars(s).copy(), "models": {}}
    for label, (model, tok) in models.items():
        folder = model_folder(model)
        out["models"][label] = {
            "facts": facts(model).to_dict(),
            "weights_in_memory_bytes": tensor_bytes(model),
            "checkpoint_bytes": checkpoint_bytes(folder) if folder else None,
            "checkpoint": str(folder) if folder else None,
        }
    if s.ppl:
        for label, (model, tok) in models.items():
            r = perplexity(model, tok, source=s.source, window=s.window, max_windows=s.max_windows, progress=s.progress)
            out["models"][label]["perplexity"] = r.to_dict()
        b = out["models"][base]["perplexity"]["perplexity"]
        for label in labels:
            p = out["models"][label]["perplexity"]["perplexity"]
            out["models"][label]["perplexity"]["increase_vs_baseline"] = p / b - 1
    if s.speed:
        tok = models[base][1]
        prompts = protocol_prompts(tok, s.batch, s.prompt_tokens, s.source)
        gens = {label: (generators or {}).get(label) or hf_generator(m, t) for label, (m, t) in models.items()}
        res = compare_speed(gens, prompts, s.new_tokens, s.runs, s.warmup, s.progress)
        for label, r in res.items():
            d = r.to_dict()
            d["decode_ratio_vs_baseline"] = r.decode_tps / res[base].decode_tps
            d["e2e_ratio_vs_baseline"] = r.e2e_tps / res[base].e2e_tps
            if s.price_per_hour:
                d["usd_per_million_tokens"] = cost_per_million_tokens(r.e2e_tps, s.price_per_hour)
            out["models"][label]["speed"] = d
    out["peak_rss_bytes"] = peak_rss_bytes()
    return out
