"""Prune SmolLM2-135M to <= 90M parameters (width, depth, both), distill from the original, compare (PROTOCOL.md).

For each pruning variant: held-out perplexity (wiki evaluation split, 40 x 512 tokens) right after
pruning and after distillation from the unpruned model for a token budget, against the same
architecture randomly initialised and trained with the same loss, data and token budget; then
decode speed of the pruned models against the original, interleaved in one run (transformers
`generate`, batch 1, 128 prompt + 128 new tokens, median of --runs after a warm-up).

Budget: the issue allows 20 minutes of 2-core training. It is given in tokens so that the result
does not depend on the machine's load: FULL_BUDGET_TOKENS is what 20 minutes give at the measured
training throughput in float32 (see docs/pruning.md for the conversion); every run also records
its own wall and CPU seconds. On a quiet machine `--minutes 20` gives the best variant exactly 20
wall minutes and its random-init baseline the tokens those reached.

    python bench/prune_distill.py                                   # every variant at the full budget
    python bench/prune_distill.py --budget-tokens 32768 --others-budget-tokens 0   # first variant only, smaller budget
    python bench/prune_distill.py --minutes 20 --others-budget-tokens 81920   # quiet machine: 20 wall minutes
    python bench/prune_distill.py --quick                           # smoke run: tiny budgets, 4 windows
"""

from __future__ import annotations

import argparse
import os
import resource
import time

from common import md_table, setup_threads, write_results

import torch

import leanlm
from leanlm.core.data import calibration_texts, evaluation_texts, join_and_tokenize
from leanlm.distill import DistillConfig, TrainConfig, distill, matched_hidden_pairs
from leanlm.distill.trainer import fast_bf16
from leanlm.evaluation import perplexity
from leanlm.evaluation.speed import compare_speed, hf_generator, protocol_prompts
from leanlm.prune import PruneTarget, dims_of, prune

# 20 minutes x 120 tokens/s: the distillation step (135M teacher forward + ~90M student forward and backward,
# batch 2 x 512) measured at 2048 tokens per 34 CPU-seconds, i.e. 120 tokens/s on 2 fully used cores.
TOKENS_PER_2CORE_SECOND = 120
FULL_BUDGET_TOKENS = 20 * 60 * TOKENS_PER_2CORE_SECOND


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def ppl(model, eval_ids, windows) -> float:
    return perplexity(model, ids=eval_ids, max_windows=windows, progress=False).perplexity


def train_cfg(a, budget, lr, minutes=None):
    steps = budget // (a.batch_size * a.seq_len) if budget else 200
    return TrainConfig(max_tokens=budget, max_minutes=minutes, lr=lr, batch_size=a.batch_size, seq_len=a.seq_len, warmup_steps=max(1, min(20, steps // 10)),
                       autocast_bf16=a.bf16, eval_windows=2, progress=True, seed=0)


def timed_distill(student, teacher, train_ids, a, budget, lr, minutes=None, pairs=()) -> dict:
    w0, c0 = time.perf_counter(), cpu_seconds()
    res = distill(student, teacher, train_ids, DistillConfig(hidden_layers=list(pairs)), train_cfg(a, budget, lr, minutes), eval_ids=None)
    wall, cpu = time.perf_counter() - w0, cpu_seconds() - c0
    return {"steps": res.steps, "tokens": res.tokens, "wall_s": wall, "cpu_s": cpu, "lr": lr, "hidden_pairs": list(pairs),
            "tokens_per_2core_second": res.tokens / (cpu / 2), "kl_first": res.history[0]["kl"], "kl_last": res.history[-1]["kl"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--target", default="90M")
    ap.add_argument("--variants", default="width,depth,both")
    ap.add_argument("--budget-tokens", type=int, default=FULL_BUDGET_TOKENS,
                    help="distillation budget of the variant with the lowest perplexity after pruning")
    ap.add_argument("--minutes", type=float, default=None,
                    help="instead of --budget-tokens: the best variant distills for this many wall minutes; its random-init "
                         "baseline then gets the tokens it reached")
    ap.add_argument("--others-budget-tokens", type=int, default=None, help="budget of the other variants (default: the same)")
    ap.add_argument("--lr", type=float, default=5e-4, help="distillation learning rate (pruned student)")
    ap.add_argument("--random-lr", type=float, default=1e-3, help="learning rate of the randomly initialised baseline")
    ap.add_argument("--hidden-pairs", type=int, default=0,
                    help="also match N evenly spaced hidden states to the layers they were cut from (default 0: logit KL only)")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                    help="bfloat16 autocast in training (default: the trainer's choice, on with AVX512-BF16/AMX)")
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--samples", type=int, default=32, help="calibration sequences of 512 tokens for the importance")
    ap.add_argument("--depth-samples", type=int, default=4, help="of those, how many rank the layers")
    ap.add_argument("--depth-metric", choices=["ppl", "cosine"], default="ppl")
    ap.add_argument("--no-random", action="store_true", help="skip the randomly initialised baseline")
    ap.add_argument("--random-all", action="store_true", help="random-init baseline for every distilled variant (default: the best one)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 2048-token budgets, 4 windows, 2 speed runs of 16 tokens")
    ap.add_argument("--name", default="prune_distill")
    a = ap.parse_args()
    if a.quick:
        a.budget_tokens, a.others_budget_tokens, a.windows, a.runs, a.new_tokens, a.samples = 2048, 2048, 4, 2, 16, 4
    setup_threads()
    teacher, tok = leanlm.load(a.model)
    eval_ids = join_and_tokenize(tok, evaluation_texts("wiki"))
    train_ids = join_and_tokenize(tok, calibration_texts("wiki"))
    base_ppl = ppl(teacher, eval_ids, a.windows)
    base_params = sum(p.numel() for p in teacher.parameters())
    print(f"{a.model}: {base_params:,} parameters, perplexity {base_ppl:.3f}", flush=True)
    out = {"baseline": {"params": base_params, "perplexity": base_ppl, "dims": dims_of(teacher).to_dict()}, "variants": {}}
    students = {}
    budgets = {}
    for i, axes in enumerate(a.variants.split(",")):   # phase 1: prune every variant (cheap), perplexity right after
        budgets[axes] = a.budget_tokens if i == 0 else (a.others_budget_tokens if a.others_budget_tokens is not None else a.budget_tokens)
        t0 = time.perf_counter()
        student = prune(teacher, PruneTarget(params=a.target, axes=axes), tokenizer=tok, samples=a.samples,
                        depth_samples=a.depth_samples, depth_metric=a.depth_metric)
        r = {"axes": axes, "dims": dims_of(student).to_dict(), "params": student.leanlm_prune["params_after"],
             "prune_seconds": time.perf_counter() - t0, "kept_layers": student.leanlm_prune["kept_layers"],
             "budget_tokens": budgets[axes]}
        r["ppl_pruned"] = ppl(student, eval_ids, a.windows)
        print(f"[{axes}] {r['dims']} {r['params']:,} params: pruned perplexity {r['ppl_pruned']:.3f}", flush=True)
        students[axes] = student
        out["variants"][axes] = r
        write_results(a.name, {**out, "settings": vars(a)}, report(out, a, partial=True))  # keep what finished
    # the variant with the lowest pruned perplexity gets --budget-tokens, the others --others-budget-tokens
    order = sorted(students, key=lambda k: out["variants"][k]["ppl_pruned"])
    other = a.others_budget_tokens if a.others_budget_tokens is not None else a.budget_tokens
    for k in order:
        budgets[k] = out["variants"][k]["budget_tokens"] = a.budget_tokens if k == order[0] else other
    for axes in order:   # phase 2: distill, and the random-init baseline at the same budget
        student = students[axes]
        r, budget = out["variants"][axes], budgets[axes]
        if not budget:
            continue
        timed = a.minutes is not None and axes == order[0]
        pairs = matched_hidden_pairs(student, teacher, a.hidden_pairs)
        r["distill"] = timed_distill(student, teacher, train_ids, a, None if timed else budget, a.lr, a.minutes if timed else None, pairs)
        budget = r["budget_tokens"] = budgets[axes] = r["distill"]["tokens"]
        r["ppl_distilled"] = ppl(student, eval_ids, a.windows)
        print(f"[{axes}] distilled {budget} tokens: perplexity {r['ppl_distilled']:.3f}", flush=True)
        write_results(a.name, {**out, "settings": vars(a)}, report(out, a, partial=True))
        if not a.no_random and (axes == order[0] or a.random_all):
            torch.manual_seed(0)
            rnd = type(teacher)(student.config).eval()
            r["random"] = timed_distill(rnd, teacher, train_ids, a, budget, a.random_lr, pairs=pairs)
            r["ppl_random_trained"] = ppl(rnd, eval_ids, a.windows)
            print(f"[{axes}] random init trained {budget} tokens: perplexity {r['ppl_random_trained']:.3f}", flush=True)
            del rnd
            write_results(a.name, {**out, "settings": vars(a)}, report(out, a, partial=True))
    if a.runs:
        gens = {f"{a.model} (original)": hf_generator(teacher, tok)}
        gens.update({f"pruned {k}": hf_generator(m, tok) for k, m in students.items()})
        prompts = protocol_prompts(tok, 1, 128)
        sp = compare_speed(gens, prompts, a.new_tokens, a.runs)
        base = sp[f"{a.model} (original)"].decode_tps
        out["speed"] = {k: {**v.to_dict(), "decode_ratio": v.decode_tps / base} for k, v in sp.items()}
    path = write_results(a.name, {**out, "settings": vars(a)}, report(out, a))
    print(path.read_text())


def hidden_note(out: dict) -> str:
    pairs = {k: r["distill"]["hidden_pairs"] for k, r in out["variants"].items() if r.get("distill", {}).get("hidden_pairs")}
    if not pairs:
        return ""
    return (" plus normalised MSE of hidden states, balanced by running means (student:teacher hidden_states indices: "
            + "; ".join(f"{k} " + ",".join(f"{s}:{t}" for s, t in p) for k, p in pairs.items()) + ")")


def report(out: dict, a, partial: bool = False) -> str:
    """The markdown table and notes for whatever has been measured so far."""
    base_ppl, base_params = out["baseline"]["perplexity"], out["baseline"]["params"]
    rows = []
    for axes, r in out["variants"].items():
        d = r["dims"]
        fmt = lambda x: f"{x:.3f}" if isinstance(x, float) else "-"  # noqa: E731
        ratio = r.get("ppl_distilled", r["ppl_pruned"]) / base_ppl
        spd = out.get("speed", {}).get(f"pruned {axes}", {}).get("decode_ratio")
        rows.append([axes, f"{d['layers']} x {d['hidden']} / {d['intermediate']} / {d['heads']}h {d['kv_heads']}kv",
                     f"{r['params'] / 1e6:.1f}M", fmt(r["ppl_pruned"]), f"{r['budget_tokens']:,}", fmt(r.get("ppl_distilled")),
                     f"{ratio:.2f}x", fmt(r.get("ppl_random_trained")), f"{spd:.2f}x" if spd else "-"])
    mach = f"{os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
    md = [f"# Structured pruning + distillation of {a.model} to <= {a.target} parameters\n",
          f"Baseline: {base_params / 1e6:.1f}M parameters, held-out perplexity {base_ppl:.3f} (wiki evaluation split, "
          f"{a.windows} x 512 tokens). Training text: the wiki calibration split (40 articles). Distillation: logit KL at T=1 "
          f"from the unpruned model{hidden_note(out)}, AdamW lr {a.lr} (random-init baseline: same loss and tokens, lr {a.random_lr}), "
          f"batch {a.batch_size} x {a.seq_len}, cosine schedule, {'bf16 autocast' if (fast_bf16(torch.device('cpu')) if a.bf16 is None else a.bf16) else 'float32'}. Importance from "
          f"{a.samples} x 512 calibration tokens, layers ranked by {a.depth_metric} on {a.depth_samples} of them. "
          + (f"Budget: the best variant distills for {a.minutes:g} wall minutes, its random-init baseline for the tokens that "
             f"reached, the other variants for {a.others_budget_tokens or 0:,} tokens. " if a.minutes is not None else
             f"Full budget = {FULL_BUDGET_TOKENS:,} tokens (20 min x {TOKENS_PER_2CORE_SECOND} tok/s on 2 cores, float32 estimate). ")
          + f"Machine: {mach}.\n",
          md_table(["variant", "layers x hidden / intermediate / heads", "params", "ppl pruned", "budget tokens", "ppl distilled",
                    "vs 135M", "random init, same budget", "decode speed vs 135M"], rows)]
    for axes, r in out["variants"].items():
        for k in ("distill", "random"):
            if k in r:
                t = r[k]
                md.append(f"- {axes} {k}: {t['steps']} steps, {t['tokens']:,} tokens, {t['wall_s'] / 60:.1f} wall min, "
                          f"{t['cpu_s'] / 60:.1f} CPU min ({t['tokens_per_2core_second']:.0f} tokens per 2-core second), "
                          f"KL {t['kl_first']:.3f} -> {t['kl_last']:.3f}")
    if "speed" in out:
        s0 = next(iter(out["speed"].values()))
        md.append(f"\nDecode speed: transformers generate, float32, batch 1, {s0['prompt_tokens']} + {s0['new_tokens']} tokens, "
                  f"median of {s0['runs']} interleaved runs: " + ", ".join(f"{k} {v['decode_tps']:.1f} tok/s ({v['decode_ratio']:.2f}x)"
                                                                          for k, v in out["speed"].items()))
    md.append(f"\nLoad average at the end: {os.getloadavg()[0]:.1f} (the token budget makes the perplexities independent of it).")
    if partial:
        md.insert(1, "**Partial: the run has not finished (rows without a figure are pending).**\n")
    return "\n".join(md)


if __name__ == "__main__":
    main()
