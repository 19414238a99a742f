"""Draft-tree shape for an EAGLE head, measured: per-depth, per-rank acceptance on the calibration text, the trees it
suggests, and one short side-by-side of plain decoding, a chain and trees on evaluation prompts.

1. Measure (calibration articles, so the choice is not tuned on the evaluation text): greedy tree decoding with a
   wide "comb" tree (a spine of rank-0 drafts, each spine node with `--widths` children) records, at each depth, how
   often the target took the head's rank-r draft when its parent was accepted (one phantom rejection per cell,
   as `eagle.measure_tree`, which `leanlm draft --method eagle` runs after training).
2. `tree_from_acceptance` builds the best tree of each size in `--sizes` from that table (expected accepted length =
   sum of path probabilities, reported).
3. Side by side in one run (evaluation articles, interleaved, one run each): plain decoding, the chain of `--k`, the
   default tree and the measured trees; output checked token for token against plain greedy decoding; acceptance,
   tokens per target call, draft and target seconds. Speed figures depend on the machine's load: stated in the results.

    python bench/tree_shape.py [--eagle DIR] [--prompts 2] [--new-tokens 64] [--weights fp32|int8|int4]
"""

from __future__ import annotations

import argparse
import time

import torch
from common import md_table, write_results

import leanlm
from leanlm.core.data import calibration_texts, evaluation_texts
from leanlm.core.models import cache_dir
from leanlm.evaluation.profile import machine_info
from leanlm.runtime import Engine
from leanlm.speculative import generate, speculative_generate
from leanlm.speculative.eagle import MEASURE_WIDTHS, EagleDrafter, load_head
from leanlm.speculative.tree import DEFAULT_TREE, DraftTree, RankCounts, tree_from_acceptance


def prompts(tok, texts, n, tokens):
    out = []
    for t in texts:
        ids = tok(t)["input_ids"]
        if len(ids) >= tokens:
            out.append(torch.tensor([ids[:tokens]]))
        if len(out) == n:
            break
    return out


def comb(widths: list[int]) -> DraftTree:
    paths = []
    for d, w in enumerate(widths):
        paths += [(0,) * d + (r,) for r in range(w)]
    return DraftTree.from_paths(paths)


def expected_length(tree: DraftTree, acc) -> float:
    total = 0.0
    for p in tree.paths:
        v = 1.0
        for d, r in enumerate(p):
            v *= acc[d][r] if d < len(acc) and r < len(acc[d]) else 0.0
        total += v
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--eagle", default=None, help="head folder (default: the cache's MODEL-eagle)")
    ap.add_argument("--weights", default="fp32", help="target runtime weights: fp32, int8 or int4")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prompts", type=int, default=2, help="prompts per phase (calibration and evaluation)")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--widths", default=",".join(map(str, MEASURE_WIDTHS)), help="children of the root and of each rank-0 spine node, by depth")
    ap.add_argument("--sizes", default="8,16,32")
    ap.add_argument("--k", type=int, default=4, help="chain length of the chain row")
    ap.add_argument("--name", default="tree_shape")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    model, tok = leanlm.load(a.model)
    edir = a.eagle or str(cache_dir() / "drafts" / f"{a.model}-eagle")
    head = load_head(edir, model)
    target = Engine(model, a.weights, max_seq_len=1024)

    # 1. measure on the calibration text (as eagle.measure_tree does after training)
    wide = comb([int(w) for w in a.widths.split(",")])
    t0 = time.perf_counter()
    counts = RankCounts()
    for ids in prompts(tok, calibration_texts("wiki"), a.prompts, a.prompt_tokens):
        _, st = speculative_generate(target, EagleDrafter(head), ids, a.new_tokens, tree=wide)
        counts.merge(st.ranks)
    acc, tried = counts.acceptance(prior=1), counts.tried
    measure_s = time.perf_counter() - t0
    trees = {"default": DraftTree.from_paths(DEFAULT_TREE)}
    for n in a.sizes.split(","):
        trees[f"measured-{n}"] = tree_from_acceptance(acc, int(n))

    # 3. side by side on evaluation prompts
    rows, out_rows = [], []
    labels = {"plain": "plain decoding", "chain": f"EAGLE chain, k={a.k}", **{k: f"EAGLE tree {k}" for k in trees}}
    res = {k: {"seconds": 0.0, "new": 0, "rounds": 0, "drafted": 0, "accepted": 0, "draft_s": 0.0, "target_s": 0.0, "identical": True}
           for k in labels}
    for ids in prompts(tok, evaluation_texts("wiki"), a.prompts, a.prompt_tokens):
        ref = None
        for key in labels:
            t0 = time.perf_counter()
            if key == "plain":
                out, st = generate(target, ids, a.new_tokens), None
            elif key == "chain":
                out, st = speculative_generate(target, EagleDrafter(head), ids, a.new_tokens, k=a.k)
            else:
                out, st = speculative_generate(target, EagleDrafter(head), ids, a.new_tokens, tree=trees[key])
            r = res[key]
            r["seconds"] += time.perf_counter() - t0
            r["new"] += out.shape[1] - ids.shape[1]
            ref = out if ref is None else ref
            r["identical"] &= bool(torch.equal(out, ref))
            if st is not None:
                r["rounds"] += st.rounds
                r["drafted"] += st.drafted
                r["accepted"] += st.accepted
                r["draft_s"] += st.draft_seconds
                r["target_s"] += st.target_seconds
    plain_s = res["plain"]["seconds"]
    for key, r in res.items():
        size = trees[key].size if key in trees else (a.k if key == "chain" else 0)
        tpr = (r["new"] - a.prompts) / r["rounds"] if r["rounds"] else 1.0
        exp = f"{expected_length(trees[key], acc):.2f}" if key in trees else "-"
        rows.append([labels[key], size, exp, f"{r['accepted'] / r['rounds']:.2f}" if r["rounds"] else "-", f"{tpr:.2f}",
                     f"{r['draft_s'] / r['rounds'] * 1000:.1f}" if r["rounds"] else "-",
                     f"{r['target_s'] / r['rounds'] * 1000:.1f}" if r["rounds"] else "-",
                     f"{plain_s / r['seconds']:.2f}x", "yes" if r["identical"] else "**no**"])
        out_rows.append({"row": key, "nodes": size, **r})
    acc_rows = [[d + 1] + [f"{x:.2f}" for x in row] + [str(sum(tried[d]))] for d, row in enumerate(acc)]
    wmax = max(len(r) for r in acc)
    acc_rows = [r[:-1] + [""] * (wmax + 1 - (len(r) - 1)) + r[-1:] for r in acc_rows]
    md = (f"# Draft-tree shape for an EAGLE head ({a.model}, {a.weights} runtime target)\n\n"
          f"Machine: {machine_info()}. **Machine loaded** (other jobs ran beside it): the seconds and speed ratios are "
          f"loaded figures; acceptance and tokens per target call do not depend on load.\n\n"
          f"Head: `{edir}` (training log: {head.leanlm_draft}).\n\n"
          f"## Acceptance by depth and rank (calibration articles 1..{a.prompts}, {a.prompt_tokens}-token prompts, "
          f"{a.new_tokens} new tokens, greedy, comb tree widths {a.widths}; {measure_s:.0f} s)\n\n"
          + md_table(["depth"] + [f"rank {r}" for r in range(wmax)] + ["tries of rank 0..: sum"], acc_rows)
          + "\n\nTrees built from it (`tree_from_acceptance`):\n\n"
          + "\n".join(f"- {k}: {t.size} drafts, depth {t.max_depth}: `{t.to_list()}`" for k, t in trees.items())
          + f"\n\n## Side by side (evaluation articles 1..{a.prompts}, greedy, {a.new_tokens} new tokens, one run each)\n\n"
          + md_table(["row", "drafts per round", "expected kept (from the table)", "kept per round", "tokens per target call",
                      "draft ms / round", "target ms / round", "vs plain (loaded)", "identical to plain"], rows))
    path = write_results(a.name, {"machine": machine_info(), "loaded": True, "head": edir, "acceptance": acc, "tried": tried,
                                  "hits": counts.hits, "trees": {k: t.to_list() for k, t in trees.items()}, "rows": out_rows}, md)
    print(md)
    print(f"-> {path}")


if __name__ == "__main__":
    main()
