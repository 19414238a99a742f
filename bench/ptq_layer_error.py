"""Layer-level output error of int4 g64 algorithms on real SmolLM2 activations, cheap enough for a loaded machine.

One decoder layer k is quantized (the layers before it stay float) with each variant, on N x 512 calibration
tokens; its output error (mean squared difference from the float layer) is measured on 4 calibration rows,
4 held-out wiki rows and 4 held-out news rows, for the first (attention-sink) position and the rest apart.

    python bench/ptq_layer_error.py LAYERS VARIANTS N      # e.g. 3,15 rtn,gptq,gptq-sink,autoround 32

Writes bench/.work/layer-LAYERS-N.json as it goes; `python bench/ptq_layer_error.py --render JSON [JSON ...]` turns
such files into bench/results/ptq_layer_error.md/.json (JSON@" (8 rows)" tags a file's variants, e.g. another N;
bench/results/ptq_layer_error.json itself can be passed to keep the rows already there). Exploratory (docs/quantization.md quotes it); not a perplexity.
"""
import copy, json, sys, time
import torch
HERE = __import__("pathlib").Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import setup_threads
import leanlm
from leanlm.core.data import calibration_batches, evaluation_texts, join_and_tokenize
from leanlm.quantization import GPTQ, AWQ, AutoRound, QuantConfig, QuantizerConfig


def render(files: list[str]) -> None:
    import os
    import platform
    from common import md_table, write_results

    res = {}
    for f in files:  # a run's file, or a rendered results file (its "rows": keeps earlier rows); FILE@SUFFIX tags its variants
        f, _, tag = f.partition("@")
        d = json.load(open(f))
        d = d["rows"] if "rows" in d and isinstance(d["rows"], dict) else d
        res.update({f"{k} {tag}" if tag else k: v for k, v in d.items()})
    cols = ["calib", "wiki", "news", "calib_sink", "wiki_sink", "news_sink"]
    rows = []
    for key, r in res.items():
        k, v = key.split(" ", 1)
        tag = v[v.index(" ("):] if " (" in v else ""  # e.g. "awq (8 rows)" is compared with "rtn (8 rows)"
        rtn = res.get(f"{k} rtn{tag}", {})
        rows.append([k, v, r["seconds"]] + [f"{r[c]:.4g}" + (f" ({r[c] / rtn[c]:.2f}x)" if rtn.get(c) else "") for c in cols])
    md = ("# Layer output error on SmolLM2 activations, int4 g64 (one layer quantized)\n\n"
          f"Mean squared error of the layer's output against the float layer; (ratio to round-to-nearest). Positions 1..511 "
          f"and the first (attention-sink) position apart. Rows made by `python bench/ptq_layer_error.py` "
          f"(files {', '.join(files)}). {platform.processor() or 'CPU'}, {os.cpu_count()} cores, torch {torch.__version__}. "
          "**Machine loaded** (load average above 20 on 2 cores): seconds are wall times under that load.\n\n"
          + md_table(["layer", "variant", "seconds", "calibration rows", "held-out wiki", "held-out news",
                      "calib sink pos.", "wiki sink pos.", "news sink pos."], rows))
    print(write_results("ptq_layer_error", {"rows": res}, md).read_text())


if len(sys.argv) > 1 and sys.argv[1] == "--render":
    render(sys.argv[2:])
    sys.exit(0)
setup_threads()
K = [int(x) for x in sys.argv[1].split(",")]
variants = sys.argv[2].split(",")
n = int(sys.argv[3])
full, tok = leanlm.load("smollm2-135m")
ids = calibration_batches(tok, n, 512)
held = join_and_tokenize(tok, evaluation_texts("wiki"))[: 4 * 512].view(4, 512)
news = join_and_tokenize(tok, evaluation_texts("news"))[: 4 * 512].view(4, 512)
algs = {"rtn": [], "gptq": [GPTQ()], "gptq-sink": [GPTQ(sink_tokens=1)], "awq": [AWQ()],
        "autoround": [AutoRound()], "autoround-20x1": [AutoRound(iters=20, batch=1)], "autoround-100x2": [AutoRound(iters=100, batch=2)],
        "gptq-damp0.1": [GPTQ(damp=0.1)], "gptq-damp1": [GPTQ(damp=1.0)], "gptq-mse": [GPTQ()], "awq-gptq": [AWQ(clip=False), GPTQ()],
        "awq-signed": [AWQ(clip_signed=True)], "awq-duo": [AWQ(scales="both")], "awq-clip4096": [AWQ(clip_samples=4096)],
        "awq-autoround": [AWQ(), AutoRound()], "awq-signed-autoround": [AWQ(clip_signed=True), AutoRound()]}
res = {}
def out_k(m, k, x):
    got = []
    h = m.model.layers[k].register_forward_hook(lambda mod, a, o: got.append(o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        m(x, use_cache=False)
    h.remove()
    return got[0]
for k in K:
    base = copy.deepcopy(full)
    base.model.layers = base.model.layers[: k + 1]
    base.config.num_hidden_layers = k + 1
    refs = {t: out_k(base, k, x) for t, x in (("calib", ids[:4]), ("wiki", held), ("news", news))}
    for v in variants:
        m = copy.deepcopy(base)
        cfg = QuantConfig([(f"model.layers.{k}.*weight_quantizer", QuantizerConfig("int4_g64", method="mse" if v.endswith("mse") else "max"))], algs[v], calib_batch=8)
        # layers before k stay float: only layer k is quantized
        t0 = time.perf_counter()
        leanlm.quantize(m, cfg, ids, progress=False)
        dt = time.perf_counter() - t0
        r = {"seconds": round(dt, 1)}
        for t, x in (("calib", ids[:4]), ("wiki", held), ("news", news)):
            d = (out_k(m, k, x) - refs[t]).pow(2)
            r[t] = d[:, 1:].mean().item()
            r[t + "_sink"] = d[:, 0].mean().item()
        res[f"{k} {v}"] = r
        print(k, v, {a: (f"{b:.4g}" if isinstance(b, float) else b) for a, b in r.items()}, flush=True)
        json.dump(res, open(HERE / ".work" / f"layer-{sys.argv[1]}-{n}.json", "w"), indent=1)
