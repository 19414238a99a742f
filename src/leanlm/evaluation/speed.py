"""Generation speed: prefill, time to first token, decode and end-to-end tokens/s (PROTOCOL.md).

A *generator* is any callable ``gen(input_ids, max_new_tokens, on_token) -> output_ids`` that calls
``on_token()`` right after each new token's logits are computed. `hf_generator` wraps transformers'
own ``generate``; faster engines (leanlm's runtime) provide their own. The first ``on_token`` marks
the end of prefill (time to first token); the rest is decode.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from ..core.data import evaluation_texts
from ..core.errors import LeanLMError

Generator = Callable[[torch.Tensor, int, Callable[[], None]], torch.Tensor]


def hf_generator(model, tokenizer=None) -> Generator:
    """Greedy decoding through transformers' `generate`, with no early stop (min_new_tokens)."""
    from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

    pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
    if pad is None:
        pad = getattr(model.config, "pad_token_id", None) or getattr(model.config, "eos_token_id", 0)
    if isinstance(pad, list):
        pad = pad[0]

    class _Tick(LogitsProcessor):
        def __init__(self, on_token):
            self.on_token = on_token

        def __call__(self, input_ids, scores):
            self.on_token()
            return scores

    @torch.inference_mode()
    def gen(input_ids: torch.Tensor, max_new_tokens: int, on_token: Callable[[], None]) -> torch.Tensor:
        cfg = GenerationConfig(
            max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
            pad_token_id=pad, eos_token_id=getattr(model.config, "eos_token_id", None),
        )
        return model.generate(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids), generation_config=cfg,
            logits_processor=LogitsProcessorList([_Tick(on_token)]),
        )

    return gen


def protocol_prompts(tokenizer, batch: int = 1, prompt_tokens: int = 128, source: str | Path = "wiki") -> torch.Tensor:
    """[batch, prompt_tokens]: the first `prompt_tokens` tokens of the first `batch` evaluation articles."""
    rows = []
    for text in evaluation_texts(source):
        ids = tokenizer(text, return_attention_mask=False)["input_ids"]
        if len(ids) >= prompt_tokens:
            rows.append(ids[:prompt_tokens])
        if len(rows) == batch:
            return torch.tensor(rows, dtype=torch.long)
    raise LeanLMError(
        f"the evaluation text has only {len(rows)} articles of at least {prompt_tokens} tokens, {batch} needed; "
        "use a smaller --batch or --prompt-tokens"
    )


@dataclass
class SpeedResult:
    batch: int
    prompt_tokens: int
    new_tokens: int
    runs: int
    prefill_tps: float      # prompt tokens (all rows) / time to first token
    ttft_s: float           # time to first token: prefill + first token
    decode_tps: float       # new tokens after the first (all rows) / their time
    e2e_tps: float          # all new tokens (all rows) / total time
    raw: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _one_run(gen: Generator, prompts: torch.Tensor, new_tokens: int) -> dict:
    ticks: list[float] = []
    t0 = time.perf_counter()
    out = gen(prompts, new_tokens, lambda: ticks.append(time.perf_counter()))
    t1 = time.perf_counter()
    got = out.shape[-1] - prompts.shape[-1]
    if got != new_tokens or len(ticks) != new_tokens:
        raise LeanLMError(f"the generator produced {got} tokens ({len(ticks)} ticks), {new_tokens} were asked; it must not stop early")
    b, p = prompts.shape
    ttft = ticks[0] - t0
    return {
        "ttft_s": ttft,
        "prefill_tps": b * p / ttft,
        "decode_tps": b * (new_tokens - 1) / max(t1 - ticks[0], 1e-9),
        "e2e_tps": b * new_tokens / (t1 - t0),
    }


def _summarise(raw: list[dict], prompts: torch.Tensor, new_tokens: int) -> SpeedResult:
    med = {k: statistics.median(r[k] for r in raw) for k in raw[0]}
    return SpeedResult(prompts.shape[0], prompts.shape[1], new_tokens, len(raw), raw=raw, **med)


def measure_speed(gen: Generator, prompts: torch.Tensor, new_tokens: int = 128, runs: int = 5, warmup: int = 1, progress: bool = True) -> SpeedResult:
    """Median over `runs` timed runs after `warmup` untimed ones."""
    return compare_speed({"model": gen}, prompts, new_tokens, runs, warmup, progress)["model"]


def compare_speed(
    gens: dict[str, Generator], prompts: torch.Tensor, new_tokens: int = 128, runs: int = 5, warmup: int = 1, progress: bool = True,
    on_round: Callable[[dict[str, SpeedResult]], None] | None = None,
) -> dict[str, SpeedResult]:
    """Time several generators interleaved (A B A B ...) so machine noise hits them alike.

    on_round: called after each complete round with the medians so far (a long run can checkpoint)."""
    if runs < 1 or new_tokens < 2:
        raise LeanLMError(f"need runs >= 1 and new_tokens >= 2, got runs={runs}, new_tokens={new_tokens}")
    for gen in gens.values():
        for _ in range(warmup):
            gen(prompts, min(new_tokens, 8), lambda: None)
    raw: dict[str, list[dict]] = {k: [] for k in gens}
    bar = tqdm(total=runs * len(gens), desc="speed", unit="run", disable=not progress, leave=False)
    for _ in range(runs):
        for name, gen in gens.items():
            raw[name].append(_one_run(gen, prompts, new_tokens))
            bar.update()
        if on_round is not None:
            on_round({k: _summarise(v, prompts, new_tokens) for k, v in raw.items()})
    bar.close()
    return {k: _summarise(v, prompts, new_tokens) for k, v in raw.items()}
