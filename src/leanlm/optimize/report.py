"""DIR/report.html: one self-contained page (matplotlib PNGs embedded as base64, no script, no network):
the Pareto fronts of quality loss against tokens/s, memory and $ per 1M tokens, the table of every
candidate, the chosen one and why, before/after figures and the machine. Every figure in the table
carries its exact value from trials.jsonl in a `data-value` attribute (the tests compare them)."""

from __future__ import annotations

import base64
import html
import io
import math
import statistics
from pathlib import Path

from ..core.io import atomic_file


def _fmt(v, kind: str) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return {"pct": f"{v:+.2%}", "frac": f"{v:.1%}", "kl": f"{v:.4f}", "tps": f"{v:.1f}", "usd": f"${v:.4f}",
            "mb": f"{v / 1e6:.0f} MB" if v >= 1e7 else f"{v / 1e6:.2f} MB", "s1": f"{v:.1f}", "b": f"{v:.3f}",
            "x": f"{v:.2f}x", "ppl": f"{v:.3f}", "s": f"{v:.0f} s"}[kind].replace("$-", "-$")


def _cell(v, kind: str, field: str) -> str:
    dv = "" if v is None else f' data-value="{html.escape(repr(v))}"'
    return f'<td data-field="{field}"{dv}>{html.escape(_fmt(v, kind))}</td>'


def pareto(points: list[tuple[float, float, int]], maximize: bool) -> list[int]:
    """Indices of the points no other point beats on both (lower loss, and higher or lower y)."""
    front = []
    for i, (x, y, k) in enumerate(points):
        dominated = any((x2 <= x and (y2 >= y if maximize else y2 <= y)) and (x2 < x or y2 != y) for x2, y2, _ in points)
        if not dominated:
            front.append(k)
    return front


def baseline_figures(records: list[dict], summary: dict) -> dict:
    deps = [r["speed"] for r in records if r.get("type") == "deploy"]
    if not deps:
        return {}
    tps = statistics.median(d["baseline_e2e_tps"] for d in deps)
    usd = statistics.median(d["baseline_usd_per_mtok"] for d in deps)
    fl = next((r["quality"]["loss"] for r in records if r.get("type") == "quality" and r.get("candidate") == "float" and r.get("rung") == 1), 0.0)
    return {"tokens_per_s": tps, "usd_per_mtok": usd, "memory_bytes": summary.get("baseline_memory_bytes"), "loss": fl}


def _plots(deploys: list[dict], chosen: dict | None, base: dict) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes_def = [("tokens_per_s", "generated tokens/s", True, 1), ("memory_bytes", "memory (MB)", False, 1e6),
                ("usd_per_mtok", "$ per 1M tokens", False, 1)]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    for ax, (key, label, maximize, div) in zip(axes, axes_def):
        pts = [(100 * r["quality"]["loss"], r["speed"][key] / div, i) for i, r in enumerate(deploys)]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], c="#4a78b5", s=28, label="candidates")
        front = sorted((pts[i] for i in pareto(pts, maximize)), key=lambda p: p[0])
        if front:
            ax.plot([p[0] for p in front], [p[1] for p in front], "-", c="#d9822b", lw=1.5, label="Pareto front")
        if chosen is not None:
            ax.scatter([100 * chosen["quality"]["loss"]], [chosen["speed"][key] / div], marker="*", s=260, c="#c0392b",
                       label="chosen", zorder=5)
        if base.get(key):   # the baseline runs the original weights in bfloat16: the float candidate's quality, where measured
            ax.scatter([100 * base.get("loss", 0.0)], [base[key] / div], marker="s", s=50, c="#555", label="transformers bf16 (naive)")
        ax.set_xlabel("quality loss: perplexity increase (%)")
        ax.set_ylabel(label)
        if key == "usd_per_mtok":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def table_rows(records: list[dict], chosen: dict | None) -> list[dict]:
    """One row per measured deployment, then one per candidate that stopped earlier (its last record)."""
    rows = []
    for r in records:
        if r.get("type") == "deploy":
            ok = chosen is not None and r["candidate"] == chosen["candidate"] and r["deployment"] == chosen["deployment"]
            rows.append({"candidate": r["candidate"], "deployment": r["label"], "status": "chosen" if ok else "measured", "rec": r})
    seen = {x["candidate"] for x in rows}
    last: dict[str, dict] = {}
    for r in records:
        if r.get("candidate") and r.get("type") in ("quality", "pruned", "skip", "failed"):
            last.setdefault(r["candidate"], {})[r["type"]] = r
    for name, d in last.items():
        if name in seen:
            continue
        if "skip" in d:
            status = "skipped: " + d["skip"]["reason"]
        elif "failed" in d:
            status = "failed: " + d["failed"]["reason"]
        elif "pruned" in d:
            status = f"stopped at rung {d['pruned']['rung']}: " + d["pruned"]["reason"]
        else:
            status = "within target; not measured (budget)"
        q = next((r for r in reversed(records) if r.get("candidate") == name and r.get("type") == "quality"), None)
        rows.append({"candidate": name, "deployment": "-", "status": status, "rec": q or {}})
    return rows


def write_report(path: Path, summary: dict) -> None:
    records = summary["trials"]
    chosen = summary.get("chosen")
    deploys = [r for r in records if r.get("type") == "deploy"]
    base = baseline_figures(records, summary)
    img = _plots(deploys, chosen, base) if deploys else None
    cfg = summary["config"]
    e = html.escape
    parts = [f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>leanlm optimize: {e(cfg['model'])}</title>
<style>body{{font:14px/1.45 system-ui,sans-serif;margin:24px;max-width:1250px;color:#222}}table{{border-collapse:collapse;margin:8px 0}}
td,th{{border:1px solid #ccc;padding:3px 7px;text-align:right}}td:first-child,th:first-child,td.l{{text-align:left}}
tr.chosen{{background:#fdecea;font-weight:600}}img{{max-width:100%}}.muted{{color:#666}}</style></head><body>
<h1>leanlm optimize: {e(cfg['model'])}</h1>
<p>Objective <b>{e(cfg['objective'])}</b>, max quality loss <b>{cfg['max_quality_loss']:.1%}</b> (perplexity increase on held-out
text: {e(cfg['quality_text'] or 'the evaluation split of the Wikipedia excerpt')}), concurrency {cfg['concurrency']}, price
${cfg['price_per_hour']}/h, budget {cfg['budget_s']:.0f} s, search took {summary['seconds']:.0f} s
({summary['resumed_trials']} trials kept from an interrupted run).</p>"""]
    if chosen is not None:
        chk = summary["check"]["quality"]
        s = chosen["speed"]
        parts.append(f"<h2>Chosen: {e(chosen['candidate'])}, {e(chosen['label'])}</h2><p id='why'>{e(summary['why'])}.</p>"
                     f"<p>Deploy: <code>{e(summary['deploy_command'])}</code>; re-run the recipe: <code>leanlm run recipe.yaml --out DIR</code></p>")
        rows = [("generated tokens/s", _fmt(s["baseline_e2e_tps"], "tps"), _fmt(s["tokens_per_s"], "tps")),
                ("$ per 1M tokens", _fmt(s["baseline_usd_per_mtok"], "usd"), _fmt(s["usd_per_mtok"], "usd")),
                ("memory (weights + KV)", _fmt(base.get("memory_bytes"), "mb"), _fmt(s["memory_bytes"], "mb")),
                ("perplexity, final-check windows", _fmt(chk["perplexity_base"], "ppl"), _fmt(chk["perplexity"], "ppl")),
                ("quality loss, final-check windows", "-", _fmt(chk["loss"], "pct")),
                ("next-token agreement / KL", "-", f"{chk['agreement']:.1%} / {chk['kl']:.4f}")]
        parts.append("<h2>Before / after</h2><table id='before-after'><tr><th></th><th>before: transformers bf16, one request at a time "
                     "(interleaved with the chosen trial)</th><th>after</th></tr>" + "".join(f"<tr><td>{e(a)}</td><td>{e(b)}</td><td>{e(c)}</td></tr>" for a, b, c in rows)
                     + f"</table><p class='muted'>Cost ratio: {s['cost_ratio']:.1f}x cheaper per token than the baseline in the "
                       f"same interleaved runs. Final-check windows: {chk['windows']} x {cfg['window']} tokens the search never saw.</p>")
    else:
        cl = summary.get("closest", {})
        parts.append(f"<h2>No candidate met the target</h2><p id='why'>{e(cl.get('message', ''))}</p>")
    if img:
        parts.append(f"<h2>Pareto fronts</h2><img alt='quality loss vs tokens/s, memory and $ per 1M tokens' src='data:image/png;base64,{img}'>")
    parts.append("<h2>Candidates</h2><table id='candidates'><tr><th>candidate</th><th>deployment</th><th>perplexity</th><th>loss</th>"
                 "<th>agreement</th><th>KL</th><th>tokens/s</th><th>decode tok/s</th><th>vs baseline</th><th>$ / 1M tok</th><th>memory</th>"
                 "<th>status</th></tr>")
    for row in table_rows(records, chosen):
        r = row["rec"]
        q, s = r.get("quality") or {}, r.get("speed") or {}
        parts.append(f"<tr class='{'chosen' if row['status'] == 'chosen' else ''}' data-candidate='{e(row['candidate'])}'>"
                     f"<td>{e(row['candidate'])}</td><td class='l'>{e(row['deployment'])}</td>"
                     + _cell(q.get("perplexity"), "ppl", "perplexity") + _cell(q.get("loss"), "pct", "loss")
                     + _cell(q.get("agreement"), "frac", "agreement") + _cell(q.get("kl"), "kl", "kl")
                     + _cell(s.get("tokens_per_s"), "tps", "tokens_per_s") + _cell(s.get("decode_tps"), "tps", "decode_tps")
                     + _cell(s.get("speedup"), "x", "speedup") + _cell(s.get("usd_per_mtok"), "usd", "usd_per_mtok")
                     + _cell(s.get("memory_bytes"), "mb", "memory_bytes") + f"<td class='l'>{e(row['status'])}</td></tr>")
    parts.append("</table>")
    fmt = next((r["costs"] for r in records if r.get("type") == "formats"), None)
    if fmt:
        shape = next(iter(fmt.values()))["shape"]
        parts.append(f"<h2>Format costs on this machine</h2><p class='muted'>One batch-1 matmul with the model's largest weight "
                     f"{shape[0]} x {shape[1]}, packed as the runtime packs it (median of 5 interleaved rounds); the mixed-precision "
                     "candidate is tried for speed objectives only when int4 is faster than int8 here.</p><table id='formats'>"
                     "<tr><th>format</th><th>us per matmul</th><th>bytes per weight</th></tr>"
                     + "".join(f"<tr><td>{e(k)}</td>" + _cell(v["us_per_call"], "s1", "us_per_call") + _cell(v["bytes_per_weight"], "b", "bytes")
                               + "</tr>" for k, v in fmt.items()) + "</table>")
    m = summary["machine"]
    parts.append(f"<h2>Machine</h2><p>{e(str(m.get('cpu')))}, {m.get('cores')} cores, {m.get('torch_threads')} torch threads, torch "
                 f"{e(str(m.get('torch')))}. Speeds are ratios against the baseline measured in the same interleaved runs; absolute "
                 "figures hold for this machine only.</p></body></html>")
    with atomic_file(path) as tmp:
        tmp.write_text("\n".join(parts))


def closest(records: list[dict], target: float, cfg) -> dict:
    """The candidates nearest the target and what it would take (a looser target, a longer budget)."""
    best: dict[str, float] = {}
    for r in records:
        if r.get("type") == "quality":
            best[r["candidate"]] = r["quality"]["loss"]   # the later (full) rung overrides the short one
    near = sorted(best.items(), key=lambda kv: kv[1])[:3]
    skipped = [r["candidate"] for r in records if r.get("type") in ("skip", "skip-deploy") and r.get("budget_related")]
    within = [n for n, v in best.items() if v <= target]
    parts = [f"no candidate met --max-quality-loss {target:.1%} within the budget"]
    if near:
        parts.append("closest: " + ", ".join(f"{n} ({v:+.2%})" for n, v in near))
        if near[0][1] > target:
            parts.append(f"a looser target of --max-quality-loss {math.ceil(near[0][1] * 1000) / 10:.1f}% would accept {near[0][0]}")
    if within:
        parts.append(f"{', '.join(within)} met the quality target but had no time left for a speed trial")
    if skipped:
        parts.append(f"a longer --budget (e.g. {max(2 * cfg.budget_s / 60, 10):.0f}m) would also try {', '.join(dict.fromkeys(skipped))}")
    return {"closest": near, "budget_skipped": list(dict.fromkeys(skipped)), "message": "; ".join(parts)}
