"""The runtime's int4 grid: held-out perplexity and batch-1 decode of each round-to-nearest grid, packed.

    python bench/int4_grid.py --models gemma3-270m,smollm2-135m --windows 40 --name int4_grid

Rows per model, every packed one decoded through the runtime's fused one-call step in this process:
- float32 (transformers): the reference perplexity;
- `int4_g64` symmetric and `int4_g64_asym` (leanlm's asymmetric format: the range always holds 0), fake-quantized by
  `leanlm.quantize` (round to nearest), then packed in their own format (`Engine(model, "auto")`);
- the runtime's default `Engine(model, "int4")` (group 64, each matrix on the symmetric or the asymmetric grid,
  whichever reconstructs it better: `Int4Weight.from_float(grid="auto")`), with the share of matrices on the
  asymmetric grid (a nonzero offset), and the same with groups of 32;
- `int4_g32_asym` (the `w4a16-rtn-asym` preset's weights).
Perplexity: `leanlm.evaluation.perplexity` on the protocol's evaluation split (`--windows` x 512 tokens). Decode:
median of 3 x 128 greedy tokens from one prompt. SmolLM2's float weights sit on an asymmetric g32 grid, so its
asymmetric rows make no quality claim (README).
"""

from __future__ import annotations

import argparse
import copy
import os
import time

import torch
from common import md_table, setup_threads, write_results

import leanlm
from leanlm.evaluation import perplexity
from leanlm.quantization import QuantConfig
from leanlm.quantization.config import HEAD, _w
from leanlm.runtime import Engine
from leanlm.runtime.layouts import Int4Weight

PROMPT = "The history of the city of Paris begins with a small settlement"


def decode_tps(e: Engine, ids: torch.Tensor, n: int = 128) -> float:
    e.generate(ids, max_new_tokens=8)
    ts = []
    for _ in range(3):
        t0 = time.perf_counter()
        e.generate(ids, max_new_tokens=n)
        ts.append(n / (time.perf_counter() - t0))
    return sorted(ts)[1]


def asym_share(e: Engine) -> str:
    mats = [m for m in e.model.modules() if isinstance(m, Int4Weight)]
    asym = sum(bool(m.scales_zeros[..., 1].float().abs().max() > 0) for m in mats)
    return f"{asym}/{len(mats)}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="gemma3-270m,smollm2-135m")
    ap.add_argument("--windows", type=int, default=40, help="evaluation windows of 512 tokens")
    ap.add_argument("--name", default="int4_grid")
    a = ap.parse_args()
    setup_threads()
    rows, data = [], {"load_average_start": os.getloadavg()[0], "models": {}}
    for name in a.models.split(","):
        model, tok = leanlm.load(name)
        ids = torch.tensor([tok(PROMPT)["input_ids"]])
        ppl = lambda m, **kw: perplexity(m, tok, max_windows=a.windows, progress=False, **kw).perplexity  # noqa: E731
        res = {"float32 (transformers)": {"ppl": ppl(model)}}
        for label, fmt in (("int4_g64 sym RTN", "int4_g64"), ("int4_g64_asym RTN (range holds 0)", "int4_g64_asym"),
                           ("runtime default int4 (g64, grid by error)", 64), ("runtime int4 --group-size 32", 32),
                           ("int4_g32_asym RTN (range holds 0)", "int4_g32_asym")):
            if isinstance(fmt, int):
                e = Engine(model, "int4", group_size=fmt, max_seq_len=1024)
            else:
                m = copy.deepcopy(model)
                leanlm.quantize(m, QuantConfig([_w(fmt), HEAD]), progress=False)
                e = Engine(m, "auto", max_seq_len=1024)
            r = {"ppl": ppl(e.as_lm(), batch_size=1), "tok_s": decode_tps(e, ids), "asym_matrices": asym_share(e),
                 "head": e.model.head_format, "fused_step": e.model.step is not None}
            res[label] = r
            print(name, label, r, flush=True)
            del e
        base = res["float32 (transformers)"]["ppl"]
        for label, r in res.items():
            rows.append([name, label, f"{r['ppl']:.2f}", f"{100 * (r['ppl'] / base - 1):+.1f}%" if "tok_s" in r else "",
                         f"{r['tok_s']:.1f}" if "tok_s" in r else "", r.get("asym_matrices", "")])
        data["models"][name] = res
        del model
    data["load_average_end"] = os.getloadavg()[0]
    md = ("# The runtime's int4 grid: held-out perplexity and batch-1 decode\n\n"
          f"Perplexity on {a.windows} x 512 evaluation tokens; decode: batch 1, 128 greedy tokens, median of 3, packed int4 "
          "with the int8 head, fused one-call step, this process. 1-minute load average "
          f"{data['load_average_start']:.1f} at the start, {data['load_average_end']:.1f} at the end (2 cores).\n\n"
          + md_table(["model", "weights", "perplexity", "vs float32", "decode tok/s", "matrices with an offset"], rows))
    print(write_results(a.name, data, md))


if __name__ == "__main__":
    main()
