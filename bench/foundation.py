"""Foundation benchmark: float32 vs bfloat16 SmolLM2-135M through transformers, per PROTOCOL.md.

Held-out perplexity (40 windows x 512 tokens), generation speed at batch 1 and 8 (interleaved,
median of 5 runs after a warm-up), memory, and the roofline profile of batch-1 decode.

    python bench/foundation.py [--model smollm2-135m] [--runs 5]
"""

from __future__ import annotations

import argparse

from common import md_table, setup_threads, write_results

import leanlm
from leanlm.evaluation import measure_bandwidth, measure_matmul_flops, roofline
from leanlm.evaluation.harness import EvalSettings, evaluate


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--batches", default="1,8")
    a = ap.parse_args()
    setup_threads()
    import torch

    models = {f"{a.model} float32": leanlm.load(a.model, dtype="float32"), f"{a.model} bfloat16": leanlm.load(a.model, dtype="bfloat16")}
    results = {}
    for i, b in enumerate(int(x) for x in a.batches.split(",")):
        results[f"batch{b}"] = evaluate(models, EvalSettings(ppl=(i == 0), speed=True, batch=b, runs=a.runs))
    bw = measure_bandwidth()
    prof = {}
    for label, (m, _) in models.items():
        dec = results["batch1"]["models"][label]["speed"]["decode_tps"]
        fl = measure_matmul_flops(dtype=next(m.parameters()).dtype)
        prof[label] = roofline(m, dec, context=192, bandwidth=bw, flops=fl).to_dict()

    r1 = results["batch1"]
    mach = r1["machine"]
    md = [f"# Foundation: float32 vs bfloat16 through transformers\n\nMachine: {mach['cpu']}, {mach['cores']} cores, "
          f"{mach['torch_threads']} torch threads, torch {mach['torch']}. Peak RSS {r1['peak_rss_bytes'] / 1e9:.2f} GB.\n"]
    rows = [[k, f"{v['perplexity']['perplexity']:.3f}", f"{v['perplexity']['increase_vs_baseline']:+.2%}"] for k, v in r1["models"].items()]
    p0 = next(iter(r1["models"].values()))["perplexity"]
    md.append(f"## Held-out perplexity (wiki eval split, {p0['windows']} x {p0['window']} tokens, {p0['tokens']} predicted)\n\n"
              + md_table(["model", "perplexity", "vs float32"], rows))
    for key, r in results.items():
        s0 = next(iter(r["models"].values()))["speed"]
        rows = [[k, f"{v['speed']['prefill_tps']:.1f}", f"{v['speed']['ttft_s'] * 1e3:.0f}", f"{v['speed']['decode_tps']:.2f}",
                 f"{v['speed']['e2e_tps']:.2f}", f"{v['speed']['decode_ratio_vs_baseline']:.2f}x"] for k, v in r["models"].items()]
        md.append(f"## Generation speed, batch {s0['batch']} ({s0['prompt_tokens']} prompt + {s0['new_tokens']} new tokens, greedy, "
                  f"transformers generate, median of {s0['runs']} interleaved runs)\n\n"
                  + md_table(["model", "prefill tok/s", "TTFT ms", "decode tok/s", "end-to-end tok/s", "decode vs float32"], rows))
    rows = [[k, f"{p['bandwidth_gbs']:.1f}", f"{p['matmul_gflops']:.0f}", f"{p['weight_bytes'] / 1e6:.0f}", f"{p['memory_limit_tps']:.1f}",
             f"{p['compute_limit_tps']:.0f}", f"{p['measured_decode_tps']:.2f}", f"{p['fraction_of_bandwidth_limit']:.1%}", p["verdict"]]
            for k, p in prof.items()]
    md.append("## Roofline of batch-1 decode (context 192)\n\n" + md_table(
        ["model", "read GB/s", "matmul GFLOP/s", "weight MB/token", "bandwidth limit tok/s", "compute limit tok/s",
         "measured tok/s", "of bandwidth limit", "verdict"], rows))
    path = write_results("foundation", {"eval": results, "profile": prof}, "\n\n".join(md))
    print(path.read_text())


if __name__ == "__main__":
    main()
