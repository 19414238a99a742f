"""Where a `LLMEngine` decode step spends its time with N sequences in the batch (in process, no HTTP).

    python bench/serve_profile.py --seqs 16 64 --weights int4

Admits N requests (prompts: evaluation-text paragraphs cut at 128 tokens), runs the prefill, then times
decode steps (all N decoding) and prints the mean step time, tokens/s and torch.profiler's top operators.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

from leanlm.core.data import evaluation_texts  # noqa: E402
from leanlm.core.models import load  # noqa: E402
from leanlm.serving import LLMEngine, SamplingParams  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqs", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--weights", default="int4")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--top", type=int, default=12)
    a = ap.parse_args()
    model, tok = load("smollm2-135m")
    paras = [p for art in evaluation_texts() for p in art.split("\n") if len(p) >= 200]
    for n in a.seqs:
        eng = LLMEngine(model, tok, a.weights, kv_cache_mb=1024, max_num_seqs=n, max_num_batched_tokens=2048)
        for j in range(n):
            eng.add_request(str(j), tok(paras[j])["input_ids"][:128], SamplingParams(max_tokens=a.steps * 3 + 8, ignore_eos=True))
        while any(s.computed < len(s.prompt) for s in eng.seqs.values()):
            eng.step()
        eng.step()
        t = time.perf_counter()
        for _ in range(a.steps):
            eng.step()
        dt = (time.perf_counter() - t) / a.steps
        print(f"{n} sequences, {a.weights}: {1000 * dt:.1f} ms per decode step, {n / dt:.1f} tok/s")
        with torch.profiler.profile() as prof:
            for _ in range(a.steps):
                eng.step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=a.top))


if __name__ == "__main__":
    main()
