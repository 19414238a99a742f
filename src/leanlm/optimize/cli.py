"""`leanlm optimize` options and its before/after table."""

from __future__ import annotations

import argparse

from ..cli_args import COUNT, POSITIVE


def _loss(text: str) -> float:
    from ..core.errors import LeanLMError
    from .search import parse_loss

    try:
        return parse_loss(text)
    except LeanLMError as e:
        raise argparse.ArgumentTypeError(f"must be {_loss.range}, got {text!r}") from e


_loss.range = "a positive percentage such as 5 or 2.5 (a trailing percent sign is optional)"
_loss.__name__ = "percentage"


def optimize_args(sp) -> None:
    sp.add_argument("--max-quality-loss", type=_loss, required=True, help="largest perplexity increase on held-out text, e.g. 5%%")
    sp.add_argument("--quality-text", help="held-out text (.txt or .jsonl) for quality (default: the protocol's Wikipedia evaluation split); "
                    "never used for calibration")
    sp.add_argument("--objective", default="cost", help="cost (default: $ per 1M tokens at --concurrency), latency (batch-1 decode), "
                    "throughput (tokens/s at --concurrency) or memory")
    sp.add_argument("--concurrency", type=COUNT, default=16, help="concurrent requests for cost and throughput")
    sp.add_argument("--price-per-hour", type=POSITIVE, default=0.10, help="machine price in $/hour (default 0.10)")
    sp.add_argument("--budget", default="30m", help="search time: 30m (default), 90s, 1h; the search ends within it plus 10%%")
    sp.add_argument("--export", default="", help="also export the chosen model: gguf, compressed-tensors, hf, onnx (comma-separated)")
    sp.add_argument("--out", dest="out_dir", required=True, help="output folder; an interrupted search resumes when run again with it")
    sp.add_argument("--overwrite", action="store_true", help="start over in an existing --out")


def cmd_optimize(a) -> dict:
    from rich.console import Console

    from .search import OptimizeConfig, optimize, parse_search_budget

    cfg = OptimizeConfig(model=a.model, out=a.out_dir, max_quality_loss=a.max_quality_loss, objective=a.objective,
                         quality_text=a.quality_text, concurrency=a.concurrency, price_per_hour=a.price_per_hour,
                         budget_s=parse_search_budget(a.budget), exports=[x.strip() for x in a.export.split(",") if x.strip()],
                         dtype=a.dtype, trust_remote_code=a.trust_remote_code, overwrite=a.overwrite, progress=not a.json)
    cfg.check()
    r = optimize(cfg, console=None if a.json else Console(stderr=True))
    return {k: r[k] for k in ("chosen", "check", "why", "deploy_command", "exports", "seconds", "budget_s", "objective", "target")
            } | {"out": a.out_dir, "baseline": _baseline(r)}


def _baseline(r: dict) -> dict:
    from .report import baseline_figures

    return baseline_figures(r["trials"], r)


def show_optimize(r: dict, console) -> None:
    from ..cli import _table

    c, s, q, b = r["chosen"], r["chosen"]["speed"], r["check"]["quality"], r["baseline"]
    from .report import _fmt

    rows = [["generated tokens/s", f"{s['baseline_e2e_tps']:.1f}", f"{s['tokens_per_s']:.1f}", f"{s['speedup']:.2f}x"],
            ["$ per 1M tokens", f"{s['baseline_usd_per_mtok']:.4f}", f"{s['usd_per_mtok']:.4f}", f"{s['cost_ratio']:.1f}x cheaper"],
            ["memory (weights + KV)", _fmt(b.get("memory_bytes"), "mb"), _fmt(s["memory_bytes"], "mb"), ""],
            ["perplexity (final check)", f"{q['perplexity_base']:.3f}", f"{q['perplexity']:.3f}", f"{q['loss']:+.2%}"]]
    console.print(_table(f"leanlm optimize -> {r['out']}: {c['candidate']}, {c['label']} ({r['seconds']:.0f} s of {r['budget_s']:.0f} s)",
                         ["", "before: transformers bf16, one request at a time (same runs)", "after", "change"], rows))
    console.print(f"{r['why']}.\ndeploy: {r['deploy_command']}")
