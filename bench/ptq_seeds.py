"""AutoRound's seed spread: leanlm's AutoRound preset and llm-compressor's AutoRound, several seeds each.

AutoRound draws its training rows at random each step, so one run's perplexity moves with the seed. This
benchmark runs a leanlm preset (default `w4a16`) with AutoRound seeds 0..N-1 and llm-compressor's AutoRound (same
iterations and rows a step, seeds 42 = its default, 1, 2, ...), all on the same 64 x 512 calibration tokens, and
compares the mean perplexity increases on both held-out texts. Each run is cached (leanlm rows under
bench/.work/ptq_seeds/, peer rows in bench/ptq.py's peer cache), so an interrupted run resumes.

    python bench/ptq_seeds.py [--scheme w4a16] [--seeds 3] [--batch ROWS] [--name ptq_seeds]
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import replace
from pathlib import Path

from common import md_table, setup_threads, write_results

import leanlm
from leanlm.core.data import calibration_batches
from leanlm.quantization import AutoRound, preset
from ptq import RUN, _ar_args, float_baselines, peer_key, run_leanlm, run_peer

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench" / ".work"
PEER_SEEDS = [42, 1, 2, 3, 4]  # 42: the tool's own default


def with_seed(scheme: str, seed: int, batch: int | None = None):
    """The preset with its AutoRound step's seed (and rows a step, if given) set; the other steps as they are."""
    cfg = preset(scheme)
    over = {"seed": seed} if batch is None else {"seed": seed, "batch": batch}
    algos = [replace(a, **over) if isinstance(a, AutoRound) else a for a in cfg.algorithms]
    if not any(isinstance(a, AutoRound) for a in algos):
        raise SystemExit(f"{scheme} has no AutoRound step: the seed changes nothing")
    return replace(cfg, algorithms=algos), next(a for a in algos if isinstance(a, AutoRound))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scheme", default="w4a16", help="leanlm preset with an AutoRound step")
    ap.add_argument("--seeds", type=int, default=3, help="seeds per tool")
    ap.add_argument("--batch", type=int, default=None, help="AutoRound rows a step for both tools (default: the preset's)")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--name", default="ptq_seeds")
    a = ap.parse_args()
    if not 1 <= a.seeds <= len(PEER_SEEDS):
        raise SystemExit(f"--seeds must be 1..{len(PEER_SEEDS)}")
    setup_threads()
    model, tok = leanlm.load("smollm2-135m")
    float_dir = Path(model.config._name_or_path)
    base, base_news = float_baselines(model, tok, a.windows)
    ids = calibration_batches(tok, a.samples, a.seq_len)
    del model

    rows = {}
    ar = None
    for seed in range(a.seeds):
        cfg, ar = with_seed(a.scheme, seed, a.batch)
        rows_tag = "" if a.batch is None else f"-b{a.batch}"
        cache = WORK / "ptq_seeds" / f"leanlm-{a.scheme}{rows_tag}-seed{seed}-{a.samples}x{a.seq_len}-w{a.windows}.json"
        if cache.exists():
            r = json.loads(cache.read_text())
        else:
            r = run_leanlm(a.scheme, cfg, ids, a.windows)
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(".tmp")
            tmp.write_text(json.dumps(r, indent=1))
            tmp.replace(cache)
        rows[f"leanlm {a.scheme}{'' if a.batch is None else f' ({a.batch} rows a step)'}, seed {seed}"] = r
        print(f"leanlm seed {seed}: {r['perplexity'] / base - 1:+.2%} / {r['perplexity_news'] / base_news - 1:+.2%}", flush=True)
    peers = {}
    if not a.no_peer:
        for seed in PEER_SEEDS[: a.seeds]:
            extra = _ar_args(ar, None if seed == 42 else seed)
            r = run_peer("llmcompressor", "w4a16-autoround", float_dir, a.samples, a.seq_len, WORK / "ptq", 3600,
                         windows=a.windows, extra=extra)
            key = peer_key("llmcompressor", "w4a16-autoround", extra) + (" (seed 42, the tool's default)" if seed == 42 else "")
            peers[key] = r
            print(f"{key}: {r.get('perplexity', r.get('error'))}", flush=True)

    def inc(r, k, b):
        return r[k] / b - 1

    def load(r):
        la = r.get("load_average_1min")
        return f"{la['before_calibration']:.1f} / {la['after_calibration']:.1f}" if la else "-"

    table = [[k, f"{inc(r, 'perplexity', base):+.2%}", f"{inc(r, 'perplexity_news', base_news):+.2%}",
              f"{r.get('calib_seconds', float('nan')):.1f}", load(r)] for k, r in [*rows.items(), *peers.items()] if "error" not in r]
    summary = {}
    for who, group in (("leanlm", rows), ("peer", {k: v for k, v in peers.items() if "error" not in v})):
        if not group:
            continue
        for key, b, text in (("perplexity", base, "wiki"), ("perplexity_news", base_news, "news")):
            v = [inc(r, key, b) for r in group.values()]
            summary[f"{who} {text}"] = {"mean": statistics.mean(v), "min": min(v), "max": max(v), "n": len(v)}
    lines = [f"# AutoRound's seed spread: leanlm `{a.scheme}` against llm-compressor's AutoRound\n",
             f"SmolLM2-135M; calibration {a.samples} x {a.seq_len} wiki tokens for every run; perplexity increase over float32 "
             f"({base:.4f} wiki, {base_news:.4f} news) on {a.windows} x 512 held-out tokens of each text. leanlm's AutoRound: "
             f"{ar.iters} steps of {ar.batch} rows; the peer runs the same. Only the AutoRound seed differs between a tool's runs.\n",
             md_table(["run", "wiki", "news", "calibration s", "load (1-min average before / after, 2 cores)"], table)]
    if "peer wiki" in summary and "leanlm wiki" in summary:
        rat = []
        for text in ("wiki", "news"):
            lm, pm = summary[f"leanlm {text}"], summary[f"peer {text}"]
            summary[f"ratio {text}"] = lm["mean"] / pm["mean"]
            rat.append([text, f"{lm['mean']:+.2%} ({lm['min']:+.2%} .. {lm['max']:+.2%})",
                        f"{pm['mean']:+.2%} ({pm['min']:+.2%} .. {pm['max']:+.2%})", f"{lm['mean'] / pm['mean']:.2f}"])
        lines.append("\nMeans over the seeds (range), and the ratio of the means (below 1: leanlm better):\n\n"
                     + md_table(["text", f"leanlm {a.scheme}", "llm-compressor AutoRound", "ratio"], rat))
    path = write_results(a.name, {"scheme": a.scheme, "float_perplexity": base, "float_perplexity_news": base_news,
                                 "leanlm": rows, "peers": peers, "summary": summary, "run": RUN}, "\n".join(lines))
    print(path.read_text())


if __name__ == "__main__":
    main()
