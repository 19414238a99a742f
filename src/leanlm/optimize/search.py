"""`optimize`: from a model and a quality bound to its cheapest deployment on this machine.

The loop (docs/optimize.md):
1. Load the model once; compute the original model's reference figures on held-out windows.
2. For each candidate recipe, cheapest first, while the budget lasts (keeping room for one speed trial):
   build it with the recipe runner (`run_step` on a copy of the model), then successive halving under the
   quality constraint: rung 0 scores it on the first `short_windows` windows; only a candidate within
   `slack` x the target goes on to rung 1, the full search windows; those within the target go on to
   rung 2, after every candidate's quality is known: their deployments' speed and cost (interleaved with
   the naive transformers bf16 baseline), the predicted cheapest first (the measured cost of each
   packed format on this machine), breadth first over the objective's deployments (`space.deployments`:
   serving with and without in-batch speculation, batch 1 with the fused or PyTorch's kernels, ...). Expensive
   candidates wait for a cheaper relative's measured loss (`Candidate.after`) and are skipped when it
   shows they cannot reach the target, or when their estimated time exceeds what is left.
3. Rank the measured deployments by the objective; the best one's model is checked on windows the
   search never saw; the first that also passes there is chosen.
4. Write DIR/model, DIR/recipe.yaml, the exports, DIR/report.html; DIR/trials.jsonl got one line per
   finished trial as it finished and is the resume log: a rerun with the same --out skips them.
"""

from __future__ import annotations

import copy
import gc
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..core.errors import LeanLMError
from ..recipe import EXPORT_NAMES, Context, EvalStep, ExportStep, ModelState, Recipe, open_state, run_step
from .measure import Deployment, baseline_generator, format_costs, measure_runtime, measure_serving, serving_prompts
from .quality import QualityProbe
from .space import Candidate, SpaceSettings, candidates, deployments, prune_target

OBJECTIVES = ("cost", "latency", "throughput", "memory")
TRIALS = "trials.jsonl"


@dataclass
class OptimizeConfig:
    """Options of `leanlm optimize` (see docs/optimize.md)."""
    model: str
    out: str
    max_quality_loss: float = 0.05         # bound on the relative perplexity increase on held-out text
    objective: str = "cost"
    quality_text: str | None = None        # default: the protocol's evaluation split of the Wikipedia excerpt
    concurrency: int = 16
    price_per_hour: float = 0.10           # $ per hour of this machine (a 2-core cloud VM)
    budget_s: float = 1800.0
    exports: list[str] = field(default_factory=list)
    dtype: str = "float32"
    trust_remote_code: bool = False
    window: int = 512
    search_windows: int = 8
    check_windows: int = 8
    short_windows: int = 2
    slack: float = 1.5                     # rung 0 keeps candidates within slack x the target
    samples: int = 32                      # PTQ calibration sequences
    new_tokens: int = 128
    prompt_tokens: int = 128
    runs: int = 3
    overwrite: bool = False
    progress: bool = True

    def check(self) -> None:
        if self.objective not in OBJECTIVES:
            raise LeanLMError(f"unknown objective {self.objective!r}; choose one of: {', '.join(OBJECTIVES)}")
        if not 0 < self.max_quality_loss < 10:
            raise LeanLMError(f"--max-quality-loss must be a positive percentage such as 5%, got {self.max_quality_loss:.4g}")
        if self.budget_s < 30:
            raise LeanLMError(f"a budget of {self.budget_s:.0f} s is too small for one trial (load, reference, one build, "
                              "one evaluation, one speed run); give at least --budget 1m")
        bad = [e for e in self.exports if e not in ("gguf", "compressed-tensors", "hf", "onnx")]
        if bad:
            raise LeanLMError(f"unknown export format {bad[0]!r}; choose from gguf, compressed-tensors, hf, onnx (comma-separated)")


def parse_loss(text: str) -> float:
    """'5%' or '5' (percent) -> 0.05."""
    t = str(text).strip()
    try:
        v = float(t[:-1] if t.endswith("%") else t) / 100
    except ValueError:
        raise LeanLMError(f"cannot read the quality loss {text!r}; write a percentage such as 5%") from None
    if not 0 < v < 10:
        raise LeanLMError(f"the quality loss must be a positive percentage such as 5%, got {text!r}")
    return v


def parse_search_budget(text: str) -> float:
    """'10m' / '90s' / '1h' -> seconds (the project's one budget parser; a search budget is a time)."""
    from ..distill.trainer import parse_budget

    b = parse_budget(text)
    if b["max_minutes"] is None:
        raise LeanLMError(f"a search budget is a time such as 10m, 90s or 1h, not {text!r}")
    return b["max_minutes"] * 60


class TrialLog:
    """DIR/trials.jsonl: one JSON line per finished trial, appended (and flushed) as each finishes."""

    def __init__(self, path: Path):
        self.path = path
        self.records: list[dict] = []
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    self.records.append(json.loads(line))
                except ValueError:
                    break   # a line cut by the interrupt: everything after it is redone
        self.resumed = len(self.records)

    def find(self, **kw) -> dict | None:
        return next((r for r in self.records if all(r.get(k) == v for k, v in kw.items())), None)

    def add(self, rec: dict) -> dict:
        rec = {"t": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **rec}
        self.records.append(rec)
        with open(self.path, "a") as f:
            f.write(json.dumps(rec, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())
        return rec


class Clock:
    def __init__(self, budget_s: float):
        self.t0, self.budget = time.perf_counter(), budget_s

    def spent(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.budget - self.spent()


def _say(cfg: OptimizeConfig, console, msg: str) -> None:
    if console is not None and cfg.progress:
        console.print(msg)


def prepare_out(cfg: OptimizeConfig) -> bool:
    """Check --out before any model is loaded. True when it is an interrupted search to resume."""
    import shutil

    from ..core.io import check_output

    out = Path(cfg.out).expanduser()
    if out.exists() and not cfg.overwrite and out.is_dir() and (out / TRIALS).exists() and not (out / "report.html").exists():
        return True
    check_output(out, cfg.overwrite)
    if out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    return False


def optimize(cfg: OptimizeConfig, console=None) -> dict:
    """Run the search; returns the summary (also in DIR/report.html). Raises LeanLMError when no candidate meets the target."""
    from ..core.data import read_user_texts
    from ..evaluation.memory import tensor_bytes
    from ..evaluation.profile import machine_info

    cfg.check()
    if cfg.quality_text:
        read_user_texts(cfg.quality_text)     # an empty or unreadable file fails here, before the model loads
    resume = prepare_out(cfg)
    out = Path(cfg.out).expanduser()
    clock = Clock(cfg.budget_s)

    base = open_state(cfg.model, cfg.dtype, cfg.trust_remote_code)
    probe = QualityProbe(base.model, base.tokenizer, cfg.quality_text, cfg.window, cfg.search_windows, cfg.check_windows)
    t = time.perf_counter()
    probe._reference("search", 0)
    fwd_s = time.perf_counter() - t             # one float forward of a window (plus its reference bookkeeping)
    texts = read_user_texts(cfg.quality_text) if cfg.quality_text else None
    from ..core.data import evaluation_texts
    from ..evaluation.speed import protocol_prompts

    texts = texts or evaluation_texts("wiki")
    prompt_len = min(cfg.prompt_tokens, cfg.window // 2)
    prompts = protocol_prompts(base.tokenizer, 1, prompt_len, cfg.quality_text or "wiki")
    serve_prompts = serving_prompts(base.tokenizer, texts, 2 * cfg.concurrency, (prompt_len // 2, prompt_len, prompt_len * 3 // 2))
    base_gen = baseline_generator(base.model, base.tokenizer)
    base_gen(prompts, 2, lambda: None)          # warm-up
    t = time.perf_counter()
    base_gen(prompts, 2, lambda: None)
    t2 = time.perf_counter() - t
    t = time.perf_counter()
    base_gen(prompts, 8, lambda: None)
    per_tok = max((time.perf_counter() - t - t2) / 6, 1e-4)   # the baseline's time per decoded token, and its prefill
    base_run = max(t2 - per_tok, 0) + cfg.new_tokens * per_tok
    tok_s = cfg.new_tokens / base_run
    serve_runs = max(1, cfg.runs - 1)          # a serving round generates 2 x concurrency x new_tokens tokens
    # a trial = the baseline's runs + the candidate's (assumed no slower than the baseline at batch 1, and serving at
    # least concurrency / 2 times its throughput, as continuous batching gives on CPU), plus warm-ups
    speed_s = {"runtime": cfg.runs * 2 * base_run + 2 * t2 + 2,
               "serving": serve_runs * (base_run + 2 * cfg.concurrency * cfg.new_tokens * per_tok / max(2, cfg.concurrency / 2))
               + 2 * t2 + 2}
    reserve = 2.5 * cfg.check_windows * fwd_s + 2 * fwd_s + 5   # final check (its reference too), save, exports, report
    first = 2 * fwd_s + (cfg.short_windows + cfg.search_windows) * 1.5 * fwd_s + min(speed_s.values())
    _say(cfg, console, f"reference ready in {clock.spent():.0f} s: one window forward {fwd_s:.2f} s, baseline {tok_s:.1f} tokens/s")
    if first + reserve > clock.left():
        raise LeanLMError(f"a budget of {cfg.budget_s:.0f} s is too small for one trial on this model and machine (about "
                          f"{first + reserve + clock.spent():.0f} s); raise --budget")

    out.mkdir(parents=True, exist_ok=True)    # only now: a bad model or budget leaves nothing behind
    log = TrialLog(out / TRIALS)
    if resume:
        _say(cfg, console, f"resuming the search in {out}: {log.resumed} finished trials are kept")
    body = base.model.model if hasattr(base.model, "model") else base.model
    n_lin = sum(isinstance(m, torch.nn.Linear) for m in body.modules())
    fmt = log.find(type="formats")
    if fmt is None:   # the measured cost of each packed format, on the model's largest linear weight
        big = max((m for m in body.modules() if isinstance(m, torch.nn.Linear)), key=lambda m: m.weight.numel())
        fmt = log.add({"type": "formats", "costs": format_costs(big.weight)})
    costs = fmt["costs"]
    _say(cfg, console, "format costs on this machine: " + ", ".join(f"{k} {v['us_per_call']:.0f} us / {v['bytes_per_weight']:.2f} B per weight"
                                                                  for k, v in costs.items()))
    st = SpaceSettings(samples=cfg.samples, seq_len=min(512, cfg.window), budget_s=cfg.budget_s, objective=cfg.objective,
                       concurrency=cfg.concurrency, linears=n_lin)
    space = candidates(st)
    inter = getattr(base.model.config, "intermediate_size", None)
    for c in space:
        if inter:
            prune_target(c, inter)
    by_name = {c.name: c for c in space}
    full_loss: dict[str, float] = {}
    for r in log.records:
        if r.get("type") == "quality" and r.get("rung") == 1:
            full_loss[r["candidate"]] = r["quality"]["loss"]
    target = cfg.max_quality_loss
    models: dict[str, torch.nn.Module] = {}

    def recipe_of(c: Candidate, exports=()) -> Recipe:
        steps = list(c.steps) + [ExportStep(to=e) for e in exports]
        return Recipe(cfg.model, steps or [EvalStep(windows=cfg.search_windows)], c.dtype or cfg.dtype, cfg.trust_remote_code)

    def build(c: Candidate) -> tuple[torch.nn.Module, float]:
        if c.name in models:
            return models[c.name], 0.0
        models.clear()
        gc.collect()
        t = time.perf_counter()
        m = copy.deepcopy(base.model)
        if c.dtype:
            m = m.to(getattr(torch, c.dtype))
        s = ModelState(m, base.tokenizer, cfg.model, c.dtype or cfg.dtype, cfg.trust_remote_code)
        for step in c.steps:
            run_step(step, s, Context(progress=cfg.progress))
        s.model.eval()
        models[c.name] = s.model
        return s.model, time.perf_counter() - t

    from tqdm.auto import tqdm

    bar = tqdm(space, desc="optimize", unit="candidate", disable=not cfg.progress)
    for c in bar:
        bar.set_postfix_str(f"{c.name}, {clock.left():.0f} s left")
        if any(r.get("candidate") == c.name and (r.get("type") == "failed" or (r.get("type") == "pruned" and r.get("target") == target)
               or (r.get("type") == "skip" and not r.get("budget_related"))) for r in log.records):
            continue   # finished earlier (a budget skip is tried again on resume; a stop under another target is redone)
        why = None
        if c.skip:
            why = c.skip
        elif cfg.exports:
            try:
                recipe_of(c, cfg.exports).validate()
            except LeanLMError as e:
                why = f"cannot be exported as asked: {e}"
        if why is None and c.name.startswith("mixed") and cfg.objective != "memory" and \
                costs["int4"]["us_per_call"] >= costs["int8"]["us_per_call"]:
            why = (f"int4 is not faster than int8 on this machine ({costs['int4']['us_per_call']:.0f} vs "
                   f"{costs['int8']['us_per_call']:.0f} us per matmul): mixing int4 layers in saves bytes, not time")
        if why is None and c.min_budget_s > cfg.budget_s:
            why = f"tried only with --budget >= {c.min_budget_s / 60:.0f}m"
        if why is None and c.after is not None:
            ref = full_loss.get(c.after)
            if ref is None:   # stopped at rung 0: its short loss tells as much
                ref = next((r["quality"]["loss"] for r in log.records if r.get("type") == "quality" and r["candidate"] == c.after), None)
            if ref is None:
                why = f"budget: its cheaper relative {c.after} was not evaluated"
            elif ref <= target:
                why = f"{c.after} already meets the target ({ref:.2%}); this costs more to build for the same format"
            elif ref > c.reach * target:
                why = (f"{c.after} loses {ref:.1%}, over {c.reach:g}x the target of {target:.1%}; {c.name} is not expected to "
                       "close that gap")
        est = c.forwards * fwd_s * 1.2 + c.train_s + (cfg.short_windows + cfg.search_windows) * 1.5 * fwd_s
        keep = reserve + speed_s[deployments(cfg.objective, cfg.concurrency, c.kv)[0].engine]   # room for one speed trial
        if why is None and est + keep > clock.left():
            why = f"budget: needs about {est:.0f} s, {max(clock.left() - keep, 0):.0f} s left"
        if why is not None:
            log.add({"type": "skip", "candidate": c.name, "reason": why, "estimate_s": est, "budget_related": why.startswith("budget")
                     or "--budget" in why})
            _say(cfg, console, f"[dim]skip {c.name}: {why}[/dim]")
            continue
        # rung 0 and 1: quality
        for rung, windows in ((0, cfg.short_windows), (1, None)):
            if log.find(type="quality", candidate=c.name, rung=rung):
                continue
            try:
                model, build_s = build(c)
                t = time.perf_counter()
                q = probe.measure(model, windows)
            except LeanLMError as e:
                log.add({"type": "failed", "candidate": c.name, "reason": str(e)})
                _say(cfg, console, f"[red]{c.name} failed: {e}[/red]")
                break
            log.add({"type": "quality", "candidate": c.name, "rung": rung, "recipe": recipe_of(c).to_dict()["steps"],
                           "quality": q.to_dict(), "build_s": build_s, "seconds": time.perf_counter() - t + build_s, "note": c.note})
            _say(cfg, console, f"{c.name}: rung {rung} ({q.windows} windows) perplexity {q.perplexity:.3f} "
                               f"({q.loss:+.2%}), agreement {q.agreement:.1%}, KL {q.kl:.4f}")
            limit = target * cfg.slack if rung == 0 else target
            if rung == 1:
                full_loss[c.name] = q.loss
            if q.loss > limit:
                log.add({"type": "pruned", "candidate": c.name, "rung": rung, "loss": q.loss, "target": target,
                         "reason": f"loss {q.loss:.2%} > {limit:.2%} on {q.windows} windows"})
                break
    bar.close()

    # rung 2: the survivors' deployments, the predicted cheapest first (the measured cost of their weight format)
    def predicted(c: Candidate) -> float:
        f = costs.get(c.fmt) or costs["bf16"]
        return c.scale * (f["bytes_per_weight"] if cfg.objective == "memory" else f["us_per_call"])

    survivors = sorted((c for c in space if (log.find(type="quality", candidate=c.name, rung=1) or {}).get("quality", {})
                        .get("loss", 1e9) <= target), key=predicted)
    from ..runtime import kernels as _kernels

    fused = cfg.objective == "latency" and _kernels.available()   # the fused batch-1 kernels run here (LEANLM_KERNELS=1, built)
    plain_outputs: dict[str, list] = {}   # each candidate's plain serving outputs, to compare a speculative round's with
    # breadth first: every survivor's first deployment (the objective's main one) before anyone's second
    width = max((len(deployments(cfg.objective, cfg.concurrency, c.kv, fused)) for c in survivors), default=0)
    for j in range(width):
        for c in survivors:
            deps = deployments(cfg.objective, cfg.concurrency, c.kv, fused)
            if j >= len(deps) or log.find(type="deploy", candidate=c.name, deployment=deps[j].to_dict()):
                continue
            dep = deps[j]
            qual = log.find(type="quality", candidate=c.name, rung=1)
            if speed_s[dep.engine] + reserve > clock.left():
                log.add({"type": "skip-deploy", "candidate": c.name, "deployment": dep.to_dict(), "budget_related": True,
                         "reason": f"budget: a {dep.engine} speed trial needs about {speed_s[dep.engine]:.0f} s"})
                continue
            try:
                model, _ = build(c)
                t = time.perf_counter()
                if dep.engine == "runtime":
                    fig = measure_runtime(model, dep, prompts, base_gen, cfg.new_tokens, cfg.runs, cfg.price_per_hour)
                else:
                    fig = measure_serving(model, base.tokenizer, dep, serve_prompts, base_gen, prompts, cfg.new_tokens, serve_runs,
                                          cfg.price_per_hour)
            except LeanLMError as e:
                log.add({"type": "failed-deploy", "candidate": c.name, "deployment": dep.to_dict(), "reason": str(e)})
                continue
            outs = fig.pop("outputs", None)
            if outs is not None and not dep.prompt_lookup:
                plain_outputs[c.name] = outs
            elif outs is not None and c.name in plain_outputs:   # speculation inside the batch: the same greedy outputs?
                ref = plain_outputs[c.name]
                fig["same_outputs_as_plain"] = sum(a == b for a, b in zip(outs, ref)) / len(ref)
                fig["same_tokens_as_plain"] = (sum(x == y for a, b in zip(outs, ref) for x, y in zip(a, b))
                                               / max(1, sum(len(b) for b in ref)))
            if fig.get("identical_to_greedy") is False:   # speculative decoding must be lossless under greedy decoding
                log.add({"type": "failed-deploy", "candidate": c.name, "deployment": dep.to_dict(),
                         "reason": "prompt-lookup output differs from plain greedy decoding"})
                continue
            log.add({"type": "deploy", "candidate": c.name, "deployment": dep.to_dict(), "label": dep.label(),
                     "quality": qual["quality"], "speed": fig, "seconds": time.perf_counter() - t})
            extra = f", {fig['draft_acceptance']:.0%} of drafts accepted" if "draft_acceptance" in fig else ""
            _say(cfg, console, f"{c.name} / {dep.label()}: {fig['tokens_per_s']:.1f} tok/s ({fig['speedup']:.2f}x the baseline), "
                               f"${fig['usd_per_mtok']:.3f} per 1M tokens, {fig['memory_bytes'] / 1e6:.0f} MB{extra}")

    # ---------------------------------------------------------------------------------- choose and check
    ranked = rank([r for r in log.records if r.get("type") == "deploy"], cfg.objective)
    chosen, check = None, None
    tried = set()
    for r in ranked:
        name = r["candidate"]
        if name in tried:
            continue
        tried.add(name)
        prev = log.find(type="check", candidate=name)
        if prev is None:
            model, _ = build(by_name[name])
            q = probe.measure(model, None, split="check")
            prev = log.add({"type": "check", "candidate": name, "quality": q.to_dict()})
        if prev["quality"]["loss"] <= target:
            chosen, check = r, prev
            break
        _say(cfg, console, f"[yellow]{name} passed the search windows but loses {prev['quality']['loss']:.2%} on the "
                           "final-check windows; trying the next[/yellow]")
        if len(tried) >= 3:
            break
    summary = {"config": {k: v for k, v in asdict(cfg).items()}, "machine": machine_info(), "seconds": clock.spent(),
               "budget_s": cfg.budget_s, "resumed_trials": log.resumed, "trials": log.records, "objective": cfg.objective,
               "target": target, "reference_perplexity_search": None,
               "baseline_memory_bytes": tensor_bytes(base.model) * 2 // next(base.model.parameters()).element_size()}
    q0 = next((r["quality"] for r in log.records if r.get("type") == "quality" and r.get("rung") == 1), None)
    if q0:
        summary["reference_perplexity_search"] = q0["perplexity_base"]
    from .report import closest, write_report

    if chosen is None:
        summary["chosen"] = None
        summary["closest"] = closest(log.records, target, cfg)
        write_report(out / "report.html", summary)
        raise LeanLMError(summary["closest"]["message"])
    c = by_name[chosen["candidate"]]
    model, _ = build(c)
    from ..state import save

    s = ModelState(model, base.tokenizer, cfg.model, cfg.dtype, cfg.trust_remote_code)
    save(model, out / "model", tokenizer=base.tokenizer, overwrite=True)
    exported = {}
    for e in cfg.exports:
        dest = out / EXPORT_NAMES[e]
        r = run_step(ExportStep(to=e), s, Context(out=dest, progress=cfg.progress))
        exported[e] = {"path": dest.name, **{k: v for k, v in r.figures.items() if k in ("bytes", "quant")}}
    _write_recipe(out / "recipe.yaml", recipe_of(c, cfg.exports), chosen, cfg)
    summary.update(chosen=chosen, check=check, exports=exported, why=why_chosen(chosen, ranked, cfg),
                   deploy_command=deploy_command(chosen, cfg))
    (out / "deploy.json").write_text(json.dumps({"candidate": chosen["candidate"], "deployment": chosen["deployment"],
                                                 "command": summary["deploy_command"]}, indent=1))
    summary["seconds"] = clock.spent()
    write_report(out / "report.html", summary)
    return summary


def score(r: dict, objective: str) -> float:
    """Lower is better."""
    s = r["speed"]
    return {"cost": s["usd_per_mtok"], "latency": -s.get("decode_tps", s["tokens_per_s"]), "throughput": -s["tokens_per_s"],
            "memory": s["memory_bytes"]}[objective]


def rank(deploys: list[dict], objective: str) -> list[dict]:
    return sorted(deploys, key=lambda r: (score(r, objective), r["quality"]["loss"]))


def why_chosen(chosen: dict, ranked: list[dict], cfg: OptimizeConfig) -> str:
    what = {"cost": f"the lowest $ per 1M generated tokens (${chosen['speed']['usd_per_mtok']:.3f} at ${cfg.price_per_hour}/h)",
            "latency": f"the fastest batch-1 decode ({chosen['speed'].get('decode_tps', 0):.1f} tokens/s)",
            "throughput": f"the most generated tokens/s ({chosen['speed']['tokens_per_s']:.1f})",
            "memory": f"the least memory ({chosen['speed']['memory_bytes'] / 1e6:.0f} MB)"}[cfg.objective]
    return (f"{chosen['candidate']} ({chosen['label']}) has {what} among the {len(ranked)} measured deployments whose "
            f"perplexity increase on the search windows is within {cfg.max_quality_loss:.1%} "
            f"({chosen['quality']['loss']:+.2%}), and it stays within the target on the final-check windows")


def deploy_command(chosen: dict, cfg: OptimizeConfig) -> str:
    d = Deployment(**chosen["deployment"])
    m = str(Path(cfg.out) / "model")
    if d.engine == "serving":
        return (f"leanlm serve {m} --max-num-seqs {d.max_num_seqs} --kv-dtype {d.kv_dtype}"
                + (f" --speculative prompt-lookup --num-draft {d.k}" if d.prompt_lookup else ""))
    env = "LEANLM_KERNELS=1 " if d.kernels else ""
    return f"{env}leanlm generate {m} --prompt '...'" + (f" --prompt-lookup --num-draft {d.k}" if d.prompt_lookup else "")


def _write_recipe(path: Path, recipe: Recipe, chosen: dict, cfg: OptimizeConfig) -> None:
    import yaml

    head = (f"# written by leanlm optimize (objective {cfg.objective}, max quality loss {cfg.max_quality_loss:.1%}):\n"
            f"# candidate {chosen['candidate']}, deployed as: {chosen['label']}\n"
            f"# re-run: leanlm run {path.name} --out DIR;  deploy: {deploy_command(chosen, cfg)}\n")
    path.write_text(head + yaml.safe_dump(json.loads(json.dumps(recipe.to_dict(), default=str)), sort_keys=False))
