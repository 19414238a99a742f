"""Speculative decoding benchmark on SmolLM2-135M, per PROTOCOL.md.

Tasks, batch 1, greedy, 128 new tokens with no early stop:
  (a) continuation: the first 128 tokens of evaluation articles (the protocol prompt);
  (b) quote: a chat-template user turn asking to summarise, or to quote the opening sentences
      of, a passage (the first `--passage-tokens` tokens of an evaluation article, cut back to the end
      of its last full sentence); the two instructions alternate over the articles (--instruction);
  (c) chat: the same chat turn with the summarise instruction only; (d) quote-only: the quote instruction only.
Rows (all in one process, timed interleaved A B A B ..., median of --runs after a warm-up):
  plain decoding of the float32 target through leanlm.runtime's Engine (`--engine leanlm`, default) or
  the Hugging Face step adapter (`--engine hf`): the speed baseline, same engine as the speculative rows;
  transformers' own generate; leanlm prompt lookup and draft-model speculation (shallow distilled
  draft, int4 copy of the target); and transformers' assisted generation with
  the same shallow draft (assistant_model=) and with prompt lookup (prompt_lookup_num_tokens=); an EAGLE-1 head
(`--eagle DIR`, built by `leanlm draft MODEL --method eagle`): chains of k drafts (`eagle`, `eagle-adaptive`) and its
static tree (`eagle-tree`: the tree measured when the head was trained, else the default shape); Medusa heads (`--medusa
DIR`, `leanlm draft MODEL --method medusa`): one draft per head each round (`medusa`) and their tree (`medusa-tree`).
`--target-weights int4` makes the target the packed int4 runtime model (plain = int4 decoding; the EAGLE head
trained on the float model drafts for it).
Every row's output is checked token for token against plain greedy decoding, in every run. Each task also reports how
much of the (plain greedy) continuation repeats its own 4-grams, so that repetition is not mistaken for drafting skill.

    python bench/speculative.py [--runs 5] [--prompts 2] [--draft DIR] [--eagle DIR] [--medusa DIR] [--target-weights fp32|int4]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from pathlib import Path

import torch
from common import md_table, setup_threads, write_results

import leanlm
from leanlm.core.data import evaluation_texts
from leanlm.core.models import cache_dir
from leanlm.evaluation.profile import machine_info
from leanlm.speculative import (
    AdaptiveK, HFStepModel, PromptLookupDrafter, generate, make_shallow_draft, parse_tree, quantized_draft, speculative_generate,
)

INSTRUCTIONS = [
    "Summarise the following passage in a few sentences.",
    "Quote the first three sentences of the following passage exactly, word for word.",
]


def continuation_prompts(tok, n, tokens=128):
    out = []
    for text in evaluation_texts("wiki"):
        ids = tok(text)["input_ids"]
        if len(ids) >= tokens:
            out.append(torch.tensor([ids[:tokens]]))
        if len(out) == n:
            return out, "first 128 tokens of evaluation articles 1.." + str(n)


def passage_prompts(tok, n, passage_tokens, which="alternate"):
    out = []
    for i, text in enumerate(evaluation_texts("wiki")[:n]):
        ids = tok(text)["input_ids"][:passage_tokens]
        passage = tok.decode(ids)
        cut = max(passage.rfind(". "), passage.rfind(".\n"))
        passage = passage[: cut + 1] if cut > 0 else passage
        inst = INSTRUCTIONS[i % 2] if which == "alternate" else INSTRUCTIONS[which == "quote"]
        msg = f"{inst}\n\n{passage.strip()}"
        chat = tok.apply_chat_template([{"role": "user", "content": msg}], tokenize=False, add_generation_prompt=True)
        out.append(torch.tensor([tok(chat, add_special_tokens=False)["input_ids"]]))
    return out, (f"chat template, user turn = instruction + blank line + the first {passage_tokens} tokens of evaluation "
                 f"article i (cut to its last full sentence); instruction: {which} of {INSTRUCTIONS}")


def repetition(ids: torch.Tensor, start: int, n: int = 4) -> float:
    """Share of the tokens from `start` on whose n-gram (the n tokens ending at it) occurred earlier in the sequence."""
    seq = ids[0].tolist()
    seen, hits, total = set(), 0, 0
    for i in range(n - 1, len(seq)):
        g = tuple(seq[i - n + 1: i + 1])
        if i >= start:
            total += 1
            hits += g in seen
        seen.add(g)
    return hits / max(total, 1)


def hf_generate(model, **extra):
    def run(ids, n):
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, pad_token_id=model.config.eos_token_id, **extra)
        return out, None
    return run


def write(a, model, nl, draft_info, draft_log, tasks, head_infos=()):
    mach = machine_info()
    eng = (f"leanlm.runtime Engine ({a.target_weights} target; the int4 copy packed int4)" if a.engine == "leanlm"
           else "the Hugging Face step adapter")
    tw = "float32" if a.target_weights == "fp32" else a.target_weights
    md = [f"# Speculative decoding, {a.model} ({tw} target), batch 1, greedy, {a.new_tokens} new tokens\n\n"
          f"Target and drafts run through {eng}; 'plain' is greedy decoding of the same target through the same engine.\n\n"
          f"Machine: {mach['cpu']}, {mach['cores']} cores, {mach['torch_threads']} torch threads, torch {mach['torch']} "
          f"(each task states the machine's load average during its runs; this benchmark alone loads it to about 2). Median of {a.runs} interleaved runs after a warm-up; "
          f"each run generates for {a.prompts} prompts per task. Speedups are end-to-end (prefill included) time ratios. "
          f"'identical' = every output of every run equals plain greedy decoding token for token.\n"]
    if draft_log is not None or "built" in draft_info or "loaded" in draft_info:
        md.append(f"Shallow draft: first {nl} of {model.config.num_hidden_layers} layers + norm + head, distilled "
                  f"({draft_info}; log {draft_log}).\n")
    for e in head_infos:
        md.append(f"{e['kind']} head: {e['path']}: {e['head_bytes'] / 1e6:.1f} MB on disk = {e['head_bytes'] / e['target_bytes']:.1%} of the "
                  f"float32 target's {e['target_bytes'] / 1e6:.0f} MB (the draft vocabulary's head rows and the embedding are the "
                  f"target's, not stored); trained in {e['log'].get('total_seconds', 0) / 60:.1f} min wall "
                  f"(text generation {e['log'].get('generation_seconds', 0) / 60:.1f} min, {e['log'].get('steps')} steps); "
                  f"draft vocabulary {e['log'].get('draft_vocab')}. Draft cost per round: the head's seconds per round over the "
                  "target's seconds per verification round.\n")
    for task, t in tasks.items():
        rows = []
        for name, r in t["rows"].items():
            hf = r.get("speedup_vs_transformers_generate")
            rows.append([name, f"{r['e2e_tok_s']:.2f}", f"{r['speedup_vs_plain']:.2f}x", f"{hf:.2f}x" if hf else "-",
                         f"{r['acceptance_rate']:.0%}" if "acceptance_rate" in r else "-",
                         f"{r['mean_accepted']:.2f}" if "mean_accepted" in r else "-",
                         f"{r['tokens_per_target_forward']:.2f}" if "tokens_per_target_forward" in r else "-",
                         f"{r['draft_cost_per_round']:.2f}" if "draft_cost_per_round" in r else "-",
                         f"{r['mean_k']:.1f}" if "mean_k" in r else "-",
                         "yes" if r["identical_to_plain_greedy"] else "NO"])
        md.append(f"## {task} (prompt lengths {t['prompt_lengths']})\n\nPrompts: {t['prompts']}. 1-minute load average of the "
                  f"machine during the runs: {min(t['load_average_1min']):.1f} to {max(t['load_average_1min']):.1f} on {mach['cores']} cores. "
                  f"4-gram self-repetition of the continuations: {', '.join(f'{x:.0%}' for x in t['repetition_4gram'])}.\n\n" + md_table(
            ["method", "tok/s", "vs plain (leanlm)", "vs transformers generate", "acceptance", "drafts kept / round",
             "tokens / target call", "draft cost / round", "mean k", "identical"], rows))
    path = write_results(a.name, {"machine": mach, "args": vars(a), "draft_log": draft_log, "tasks": tasks}, "\n\n".join(md))
    return path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--prompts", type=int, default=2, help="prompts per task (each run generates for all of them)")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--passage-tokens", type=int, default=320)
    ap.add_argument("--draft", default=None, help="shallow draft folder (default: built into the leanlm cache if missing)")
    ap.add_argument("--draft-layers", type=int, default=4)
    ap.add_argument("--draft-budget", default="8m")
    ap.add_argument("--quant-scheme", default="w4a16-rtn", help="int4 preset for the quantized-copy draft ('' to skip)")
    ap.add_argument("--eagle", default=None, help="EAGLE head folder (default: the leanlm cache's drafts/MODEL-eagle, if there)")
    ap.add_argument("--eagle-k", type=int, default=4, help="chain length of the EAGLE rows")
    ap.add_argument("--medusa", default=None, help="Medusa head folder (default: the leanlm cache's drafts/MODEL-medusa, if there)")
    ap.add_argument("--target-weights", choices=["fp32", "int4"], default="fp32", help="the target: float32 or packed int4 runtime")
    rows = ("plain,generate,pld,pld-adaptive,draft,draft-adaptive,int4,int4-adaptive,hf-pld,hf-draft,eagle,eagle-adaptive,eagle-tree,"
            "medusa,medusa-tree")
    ap.add_argument("--quote-rows", default=rows, help=f"rows timed on the summarise/quote task (of {rows})")
    ap.add_argument("--continuation-rows", default=rows, help="rows timed on the continuation task")
    ap.add_argument("--k", type=int, default=4, help="fixed k of the draft-model rows")
    ap.add_argument("--pld-k", type=int, default=8, help="fixed k of the prompt-lookup rows")
    ap.add_argument("--tasks", default="quote,continuation", help="of continuation, quote (alternate/--instruction), chat, quote-only")
    ap.add_argument("--instruction", choices=["alternate", "summarise", "quote"], default="alternate",
                    help="summarise/quote task: which instruction the prompts use (alternate: summarise, quote, ...)")
    ap.add_argument("--name", default="speculative", help="results file name under bench/results/")
    ap.add_argument("--engine", choices=["leanlm", "hf"], default="leanlm",
                    help="target and draft models run through leanlm.runtime's Engine (float32 target; the int4 copy packed "
                         "in int4) or through the Hugging Face step adapter")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores, per PROTOCOL.md; 1 on a "
                    "heavily shared machine, where two threads stall on each other)")
    a = ap.parse_args()
    setup_threads()
    if a.threads:
        torch.set_num_threads(a.threads)

    model, tok = leanlm.load(a.model)
    run_tasks = a.tasks.split(",")
    wanted_rows = set((a.continuation_rows if "continuation" in run_tasks else "").split(",")) | set(
        a.quote_rows.split(",") if set(run_tasks) - {"continuation"} else [])   # the rows of the tasks this run times
    heads, head_infos = {}, []   # "eagle" / "medusa" -> the trained head, when a row of it is wanted
    for kind, hdir in (("eagle", a.eagle), ("medusa", a.medusa)):
        if any(r.startswith(kind) for r in wanted_rows):
            from leanlm.speculative.eagle import HEAD_FILE, load_head

            hdir = hdir or str(cache_dir() / "drafts" / f"{a.model}-{kind}")
            heads[kind] = load_head(hdir, model)
            head_infos.append({"kind": {"eagle": "EAGLE", "medusa": "Medusa"}[kind], "path": hdir,
                               "head_bytes": (Path(hdir) / HEAD_FILE).stat().st_size,
                               "target_bytes": sum(p.numel() * 4 for p in model.parameters()), "log": heads[kind].leanlm_draft})
    draft_dir = a.draft or str(cache_dir() / "drafts" / f"{a.model}-{a.draft_layers}l")
    need_draft = bool(wanted_rows & {"draft", "draft-adaptive", "hf-draft"})
    if not need_draft:   # no shallow-draft row: the target stands in (never timed)
        draft, draft_info = model, "not used in this run"
    else:
        try:
            draft, _ = leanlm.load(draft_dir)
            draft_info = f"loaded from {draft_dir}"
        except leanlm.LeanLMError:
            draft = make_shallow_draft(model, a.draft_layers, a.draft_budget, tokenizer=tok)
            leanlm.save(draft, draft_dir, tokenizer=tok)
            draft_info = f"built now: {draft.leanlm_draft}"

    log_file = Path(draft_dir) / "leanlm_draft.json"
    draft_log = json.loads(log_file.read_text()) if log_file.is_file() else None
    need_int4 = any(r.startswith("int4") for r in wanted_rows)
    qdraft = quantized_draft(model, a.quant_scheme, tokenizer=tok) if a.quant_scheme and need_int4 else None

    if a.engine == "leanlm":   # the low-bit runtime's lean decoder (issue 4) for target and drafts; float32 target
        from leanlm.runtime import Engine

        target = Engine(model, a.target_weights, max_seq_len=1024)
        draft_step = Engine(draft, "fp32", max_seq_len=1024) if need_draft else None
        qdraft_step = Engine(qdraft, "auto", max_seq_len=1024) if qdraft is not None else None
    else:
        target, draft_step, qdraft_step = HFStepModel(model), draft, qdraft

    def spec(drafter, k, tree=None):
        def run(ids, n):
            if tree is not None:
                return speculative_generate(target, drafter, ids, n, tree=tree)
            kk = AdaptiveK(k_max=int(k)) if isinstance(k, str) else k
            return speculative_generate(target, drafter, ids, n, k=kk)
        return run

    nl = draft.config.num_hidden_layers
    methods = {  # key: (label, generate function)
        "plain": ("plain (leanlm loop)", lambda ids, n: (generate(target, ids, n), None)),
        "generate": ("transformers generate", hf_generate(model)),
        "pld": (f"prompt lookup, k={a.pld_k}", spec(PromptLookupDrafter(), a.pld_k)),
        "pld-adaptive": ("prompt lookup, adaptive k<=16", spec(PromptLookupDrafter(), "16")),
        "draft": (f"shallow {nl}-layer draft, k={a.k}", spec(draft_step, a.k)),
        "draft-adaptive": (f"shallow {nl}-layer draft, adaptive k<=8", spec(draft_step, "8")),
        "int4": (f"int4 copy ({a.quant_scheme}), k={a.k}", spec(qdraft_step, a.k) if qdraft is not None else None),
        "int4-adaptive": (f"int4 copy ({a.quant_scheme}), adaptive k<=8", spec(qdraft_step, "8") if qdraft is not None else None),
        "hf-pld": ("transformers assisted, prompt_lookup_num_tokens=10", hf_generate(model, prompt_lookup_num_tokens=10)),
        "hf-draft": (f"transformers assisted, assistant_model=shallow {nl}-layer draft", hf_generate(model, assistant_model=draft)),
    }
    from leanlm.speculative.eagle import drafter_for

    for kind, head in heads.items():
        paths = head.leanlm_draft.get("tree")   # the tree measured at training (train_head), else the default shape
        shape = f"measured tree, {len(paths)} drafts" if paths else "default tree"
        if kind == "eagle":
            methods["eagle"] = (f"EAGLE-1 head, k={a.eagle_k}", spec(drafter_for(head), a.eagle_k))
            methods["eagle-adaptive"] = ("EAGLE-1 head, adaptive k<=8", spec(drafter_for(head), "8"))
            methods["eagle-tree"] = (f"EAGLE-1 head, {shape}", spec(drafter_for(head), None, paths or "default"))
        else:
            K = head.cfg.heads
            tree = paths or parse_tree("default").truncate(K).to_list()
            methods["medusa"] = (f"Medusa, {K} heads, k={K}", spec(drafter_for(head), K))
            methods["medusa-tree"] = (f"Medusa, {K} heads, {shape}", spec(drafter_for(head), None, tree))
    wanted = {"quote": a.quote_rows.split(","), "continuation": a.continuation_rows.split(",")}
    wanted["chat"] = wanted["quote-only"] = wanted["quote"]
    for task, keys in wanted.items():
        if task not in run_tasks:
            continue
        for key in keys:
            if key not in methods or methods[key][1] is None:
                raise SystemExit(f"unknown or unavailable row {key!r}; rows: {', '.join(methods)}")

    tasks = {}
    for task in a.tasks.split(","):
        which = {"quote": a.instruction, "chat": "summarise", "quote-only": "quote"}.get(task)
        prompts, how = (passage_prompts(tok, a.prompts, a.passage_tokens, which) if which else continuation_prompts(tok, a.prompts))
        refs = [generate(target, p, a.new_tokens) for p in prompts]
        first = ["plain"] + (["generate"] if "generate" in wanted[task] else [])
        meths = dict(methods[k] for k in first + [k for k in wanted[task] if k not in ("plain", "generate")])
        for name, fn in meths.items():  # warm-up
            fn(prompts[0], 8)
        times = {m: [] for m in meths}
        stats = {m: [] for m in meths}
        same = {m: True for m in meths}
        load = [os.getloadavg()[0]]
        for r in range(a.runs):
            for name, fn in meths.items():
                t0 = time.perf_counter()
                outs = [fn(p, a.new_tokens) for p in prompts]
                times[name].append(time.perf_counter() - t0)
                for (out, st), ref in zip(outs, refs):
                    same[name] &= torch.equal(out, ref)
                    if r == 0 and st is not None:
                        stats[name].append(st)
                acc = f", acceptance {stats[name][0].acceptance_rate:.2f}, kept/round {stats[name][0].mean_accepted:.2f}" if stats[name] else ""
                print(f"[{task}] run {r + 1}/{a.runs} {name}: {times[name][-1]:.1f} s, identical={same[name]}{acc}", flush=True)
            load.append(os.getloadavg()[0])
        base = statistics.median(times["plain (leanlm loop)"])
        hf = statistics.median(times["transformers generate"]) if "transformers generate" in times else None
        rows = {}
        for name in meths:
            med = statistics.median(times[name])
            st = stats[name]
            row = {"median_s": med, "times_s": times[name], "e2e_tok_s": a.new_tokens * len(prompts) / med,
                   "speedup_vs_plain": base / med, "speedup_vs_transformers_generate": hf / med if hf else None,
                   "identical_to_plain_greedy": same[name]}
            if st:
                drafted, acc, rounds = sum(s.drafted for s in st), sum(s.accepted for s in st), sum(s.rounds for s in st)
                row.update(acceptance_rate=acc / max(drafted, 1), mean_accepted=acc / rounds, mean_k=drafted / rounds,
                           tokens_per_target_forward=sum(s.new_tokens - 1 for s in st) / rounds,
                           draft_seconds_per_round=sum(s.draft_seconds for s in st) / rounds,
                           target_seconds_per_round=sum(s.target_seconds for s in st) / rounds,
                           draft_cost_per_round=sum(s.draft_seconds for s in st) / max(sum(s.target_seconds for s in st), 1e-9))
            rows[name] = row
        tasks[task] = {"prompts": how, "load_average_1min": load, "prompt_lengths": [p.shape[1] for p in prompts], "rows": rows,
                       "repetition_4gram": [repetition(r, p.shape[1]) for r, p in zip(refs, prompts)],
                       "sample_output": tok.decode(refs[0][0, prompts[0].shape[1]:])}
        path = write(a, model, nl, draft_info, draft_log, tasks, head_infos)  # after every task, so a cut-short run keeps what it has
    print(path.read_text())


if __name__ == "__main__":
    main()
