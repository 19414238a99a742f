"""SmoothQuant migration strength on SmolLM2-135M: W8A8 (int8 per-channel weights, dynamic per-token
int8 activations) at several alphas, and the per-layer alpha search, on the same wiki calibration
tokens; held-out perplexity on the wiki evaluation split and, as an out-of-sample check of the
chosen alpha, on the news articles (PROTOCOL.md's second domain), 40 x 512 tokens each.

    python bench/sq_alpha.py                      # alphas 0.5 and 0.65 (about 10 minutes on 2 quiet cores)
    python bench/sq_alpha.py --alphas 0.5,0.65,0.8 --search
"""

from __future__ import annotations

import argparse

from common import md_table, setup_threads, write_results

import leanlm
from leanlm.core.data import calibration_batches, evaluation_texts
from leanlm.evaluation import perplexity
from leanlm.quantization import SmoothQuant, preset


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--alphas", default="0.5,0.65")
    ap.add_argument("--search", action="store_true", help="also the per-layer alpha search (SmoothQuant(search=True))")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--windows", type=int, default=40)
    a = ap.parse_args()
    setup_threads()
    model, tok = leanlm.load("smollm2-135m")
    ids = calibration_batches(tok, a.samples, 512)
    domains = {"wiki": evaluation_texts("wiki"), "news": evaluation_texts("news")}

    def ppl(m):
        return {d: perplexity(m, tok, texts=t, max_windows=a.windows, progress=False).perplexity for d, t in domains.items()}

    base = ppl(model)
    print("float32", base, flush=True)
    runs = {f"alpha {x}": SmoothQuant(float(x)) for x in a.alphas.split(",")}
    if a.search:
        runs["per-layer search"] = SmoothQuant(search=True)
    rows = {}
    for name, algo in runs.items():
        model, tok = leanlm.load("smollm2-135m")
        cfg = preset("w8a8-smoothquant")
        cfg.algorithms = [algo]
        leanlm.quantize(model, cfg, ids, progress=False)
        rows[name] = ppl(model)
        print(name, rows[name], flush=True)
    table = md_table(["W8A8 SmoothQuant", "wiki perplexity", "vs float32", "news perplexity", "vs float32"],
                     [["float32", f"{base['wiki']:.4f}", "-", f"{base['news']:.4f}", "-"]]
                     + [[k, f"{v['wiki']:.4f}", f"{v['wiki'] / base['wiki'] - 1:+.2%}", f"{v['news']:.4f}", f"{v['news'] / base['news'] - 1:+.2%}"]
                        for k, v in rows.items()])
    md = (f"# SmoothQuant alpha, SmolLM2-135M, W8A8 (int8 per channel, dynamic per-token int8 activations)\n\n"
          f"Calibration {a.samples} x 512 wiki tokens; held-out perplexity on {a.windows} x 512 tokens of each domain.\n\n{table}")
    print(write_results("sq_alpha", {"float": base, "rows": rows, "samples": a.samples, "windows": a.windows}, md).read_text())


if __name__ == "__main__":
    main()
