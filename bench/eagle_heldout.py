"""Drafts an EAGLE head keeps per round (greedy chain of 4, float32 runtime target, 64 new tokens) on held-out
evaluation prompts and on calibration prompts, at several prompt lengths: how well a head generalises past its
training text. Acceptance does not depend on load.

    python bench/eagle_heldout.py HEAD [HEAD ...] [--name eagle_heldout]
"""

from __future__ import annotations

import argparse

import torch
from common import md_table, setup_threads, write_results

import leanlm
from leanlm.core.data import calibration_texts, evaluation_texts
from leanlm.runtime import Engine
from leanlm.speculative.decode import speculative_generate
from leanlm.speculative.eagle import EagleDrafter, load_head


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("heads", nargs="+")
    ap.add_argument("--lengths", default="32,64,128,256")
    ap.add_argument("--name", default="eagle_heldout")
    a = ap.parse_args()
    setup_threads()
    model, tok = leanlm.load("smollm2-135m")
    eng = Engine(model, "fp32", max_seq_len=1024)
    sets = {"evaluation articles 1-6": [tok(t, add_special_tokens=False)["input_ids"] for t in evaluation_texts("wiki")[:6]],
            "calibration articles 11-16": [tok(t, add_special_tokens=False)["input_ids"] for t in calibration_texts("wiki")[10:16]]}
    Ls = [int(x) for x in a.lengths.split(",")]
    res, rows = {}, []
    for h in a.heads:
        head = load_head(h, model)
        for name, arts in sets.items():
            kept = []
            for L in Ls:
                acc = rounds = 0
                for ids in arts:
                    if len(ids) >= L:
                        _, st = speculative_generate(eng, EagleDrafter(head), torch.tensor([ids[:L]]), 64, k=4)
                        acc, rounds = acc + st.accepted, rounds + st.rounds
                kept.append(acc / rounds)
            res[f"{h}|{name}"] = kept
            rows.append([h, f"corpus_share {head.leanlm_draft.get('corpus_share', 0)}", name] + [f"{k:.2f}" for k in kept]
                        + [f"{sum(kept) / len(kept):.2f}"])
    md = ("# EAGLE heads: drafts kept per round (chain of 4) by prompt length\n\n"
          + md_table(["head", "text", "prompts"] + [f"{L} tokens" for L in Ls] + ["mean"], rows) + "\n")
    print(write_results(a.name, {"kept_per_round": res, "lengths": Ls}, md).read_text())


if __name__ == "__main__":
    main()
