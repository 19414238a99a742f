"""The speculative options of `leanlm generate` and the options and report of `leanlm draft` (leanlm/cli.py parses
them into a `leanlm.recipe.DraftStep`)."""

from __future__ import annotations

import time

import torch

from ..cli_args import COUNT, POSITIVE, SEQ_LEN, SHARE
from ..core.errors import LeanLMError


def speculation_args(sp) -> None:
    """Add the speculation options to the `generate` parser (which has the prompt and sampling options)."""
    sp.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template as a user turn")
    g = sp.add_mutually_exclusive_group()
    g.add_argument("--draft", help="draft model (same tokenizer): built-in name, folder, quant:PRESET for a quantized copy of MODEL, "
                   "or a draft head folder (leanlm draft MODEL --method eagle|medusa)")
    g.add_argument("--prompt-lookup", action="store_true", help="draft-free speculation: copy n-grams from the prompt and the output")
    k = sp.add_mutually_exclusive_group()
    k.add_argument("--num-draft", type=COUNT, default=None, help="tokens drafted per round (default 4 with --draft, 8 with --prompt-lookup)")
    k.add_argument("--adaptive", action="store_true", help="choose the number drafted each round from acceptance and cost")
    sp.add_argument("--tree", nargs="?", const="auto", default=None, metavar="TREE",
                    help="with --draft (a draft head or a draft model): draft a static token tree verified in one target call; "
                         "alone (auto): the tree measured when the head was trained, else the default shape; or default, chain:K, a JSON list of "
                         "child-rank paths such as [[0],[1],[0,0]], or a .json file holding one")
    sp.add_argument("--max-draft", type=COUNT, default=None, help="largest k --adaptive may choose (default 8, 16 with --prompt-lookup)")
    sp.add_argument("--draft-dtype", default=None, help="dtype of the draft model (default: --dtype)")


def run_generate(a, load, make_target=None) -> dict:
    """`leanlm generate`: plain decoding, or speculative decoding with --draft / --prompt-lookup."""
    from ..runtime.sampling import Sampling
    from .adaptive import AdaptiveK
    from .decode import generate, speculative_generate
    from .drafters import PromptLookupDrafter
    from .drafts import check_vocab, quantized_draft
    from .eagle import drafter_for, is_head_folder, load_head
    from .step import HFStepModel
    from .tree import parse_tree

    speculative = a.draft is not None or a.prompt_lookup
    if not speculative and (a.num_draft is not None or a.adaptive):
        raise LeanLMError("--num-draft and --adaptive need --draft DRAFT or --prompt-lookup")
    tree = None
    if a.tree is not None:
        tree = parse_tree(a.tree) if a.tree != "auto" else "auto"
        if a.draft is None:
            raise LeanLMError("--tree drafts with a draft head or a draft model: give --draft HEAD_DIR or --draft MODEL; "
                              "prompt lookup drafts chains")
        if a.num_draft is not None or a.adaptive:
            raise LeanLMError("--tree has a fixed shape; drop --num-draft / --adaptive (or drop --tree for a chain)")
    if a.max_new_tokens < 1:
        raise LeanLMError(f"--max-new-tokens must be >= 1, got {a.max_new_tokens}")
    sampling = Sampling(a.temperature, a.top_k, a.top_p)
    model, tok = load(a.model, a.dtype, a.trust_remote_code)
    if tok is None:
        raise LeanLMError(f"{a.model} has no tokenizer; generate needs one to read --prompt")
    text = a.prompt
    if a.chat:
        if not getattr(tok, "chat_template", None):
            raise LeanLMError(f"{a.model}'s tokenizer has no chat template; drop --chat")
        text = tok.apply_chat_template([{"role": "user", "content": a.prompt}], tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tok(text, add_special_tokens=not a.chat)["input_ids"]], dtype=torch.long)
    if ids.shape[1] == 0:
        raise LeanLMError("the prompt is empty after tokenization; pass some text with --prompt")
    eos = None if a.no_eos_stop else tok.eos_token_id
    gen = torch.Generator().manual_seed(a.seed)
    target = make_target(model) if make_target is not None else HFStepModel(model)
    mode, stats = "plain", None
    t0 = time.perf_counter()
    if not speculative:
        out = generate(target, ids, a.max_new_tokens, sampling, generator=gen, eos_token_id=eos)
    else:
        if a.prompt_lookup:
            drafter, mode = PromptLookupDrafter(), "prompt lookup"
        elif is_head_folder(a.draft):
            drafter = drafter_for(load_head(a.draft, model))
            mode = f"{drafter.head.leanlm_draft.get('method', 'eagle')} head {a.draft}"
            src = ""
            if tree == "auto":   # the tree measured at training (train_head), else the default shape (cut to a Medusa head's depth)
                measured = drafter.head.leanlm_draft.get("tree")
                tree, src = parse_tree(measured or "default"), " measured at training" if measured else " default"
                if not measured and getattr(drafter.head, "max_tree_depth", None):
                    tree = tree.truncate(drafter.head.max_tree_depth)
            if tree is not None:
                mode += f", tree of {tree.size} drafts (depth {tree.max_depth}{',' + src if src else ''})"
        elif a.draft.startswith("quant:"):
            drafter, mode = quantized_draft(model, a.draft[len("quant:"):], tokenizer=tok, progress=not a.json), f"draft {a.draft}"
        else:
            drafter, dtok = load(a.draft, a.draft_dtype or a.dtype, a.trust_remote_code)
            check_vocab(model, drafter, tok, dtok)
            mode = f"draft {a.draft}"
        if tree == "auto":   # a draft model: the default shape
            tree = parse_tree("default")
        if tree is not None and not is_head_folder(a.draft):
            mode += f", tree of {tree.size} drafts (depth {tree.max_depth})"
        if a.adaptive:
            k = AdaptiveK(k_max=a.max_draft or (16 if a.prompt_lookup else 8))
        else:
            k = a.num_draft if a.num_draft is not None else (8 if a.prompt_lookup else 4)
        t0 = time.perf_counter()
        out, st = speculative_generate(target, drafter, ids, a.max_new_tokens, k, sampling, generator=gen, eos_token_id=eos,
                                       tree=tree)
        stats = st.to_dict()
        stats.pop("ks")
        stats["mean_k"] = st.drafted / st.rounds if st.rounds else 0.0
    seconds = time.perf_counter() - t0
    new = out[0, ids.shape[1]:]
    return {"model": a.model, "mode": mode, "prompt_tokens": ids.shape[1], "new_tokens": len(new), "seconds": seconds,
            "tokens_per_second": len(new) / seconds, "text": tok.decode(new, skip_special_tokens=True), "stats": stats}


def show_generate(r: dict, console) -> None:
    console.print(r["text"], markup=False, highlight=False)
    line = f"[{r['mode']}: {r['new_tokens']} tokens in {r['seconds']:.2f} s, {r['tokens_per_second']:.1f} tok/s"
    s = r["stats"]
    if s:
        line += (f"; acceptance {s['acceptance_rate']:.0%}, {s['mean_accepted']:.2f} drafts kept per round, "
                 f"{s['tokens_per_round']:.2f} tokens per target forward, mean k {s['mean_k']:.1f}")
    console.print(line + "]", markup=False, highlight=False)


def draft_args(sp) -> None:
    sp.add_argument("--method", choices=("shallow", "eagle", "medusa"), default="shallow",
                    help="shallow: the first --layers layers, distilled (a draft model); eagle: an EAGLE-1 head on the model's "
                         "own features; medusa: Medusa heads on its last feature (eagle and medusa: a head folder for generate --draft)")
    sp.add_argument("--heads", type=COUNT, default=4, help="medusa: heads, one per token drafted each round (default 4)")
    sp.add_argument("--layers", type=COUNT, default=None, help="decoder layers the shallow draft keeps (the first N; --method shallow)")
    sp.add_argument("--budget", default=None, help="training budget: time (30s, 5m, 1h) or tokens (500k, 2M, 100000); "
                    "default 5m (shallow), 30m (eagle, medusa: the text generation included)")
    sp.add_argument("--draft-vocab", type=COUNT, default=8192, help="eagle, medusa: tokens of the reduced draft vocabulary (the most "
                    "frequent in the self-generated text; default 8192)")
    sp.add_argument("--samples", type=COUNT, default=384, help="eagle, medusa: sequences the model writes for its own training text (default 384)")
    sp.add_argument("--corpus-share", type=SHARE, default=0.5, help="eagle, medusa: share of the text time spent on the model's features "
                    "over the calibration corpus instead of text it writes (0 to 1, 1 excluded; default 0.5)")
    sp.add_argument("--tokens", type=COUNT, default=None, help="token budget (training stops at whichever budget ends first)")
    sp.add_argument("--seq-len", type=SEQ_LEN, default=128, help="tokens per training sequence")
    sp.add_argument("--batch", type=COUNT, default=None, help="sequences per batch (default 4 shallow, 8 eagle and medusa)")
    sp.add_argument("--lr", type=POSITIVE, default=1e-3, help="learning rate")
    sp.add_argument("--calib", default="wiki", help="training text: wiki (calibration split, default), news or a .txt/.jsonl file")
    sp.add_argument("--out", required=True, help="output folder (a Hugging Face checkpoint, written atomically)")
    sp.add_argument("--overwrite", action="store_true")


def show_draft(r: dict, console) -> None:
    if r.get("method") in ("eagle", "medusa"):
        fit = f"loss {r['loss_first']:.3f} -> {r['loss_last']:.3f}, top-1 agreement {r['top1_last']:.0%}" if r["steps"] else "no training step ran"
        kind = "EAGLE head" if r["method"] == "eagle" else f"{r['heads']} Medusa heads"
        console.print(f"{kind} -> {r['out']}: {r['sequences']} sequences of self-generated text and calibration-corpus "
                      f"windows ({r['text_tokens']} tokens, {r['generation_seconds']:.0f} s), {r['steps']} steps, {r['tokens']} tokens, {r['seconds']:.0f} s, {fit}; "
                      f"draft vocabulary {r['draft_vocab']} ({r['vocab_coverage']:.1%} of the text)"
                      + (f"; draft tree of {len(r['tree'])} measured (generate --tree)" if r.get("tree") else ""),
                      markup=False, highlight=False)
        return
    stop = " (interrupted: saved as trained so far)" if r["interrupted"] else ""
    kl = f"KL to the target {r['loss_first']:.3f} -> {r['loss_last']:.3f}" if r["steps"] else "no training step ran"
    console.print(f"draft with {r['layers']} layers -> {r['out']}: {r['steps']} steps, {r['tokens']} tokens, {r['seconds']:.0f} s, "
                  f"{kl}{stop}", markup=False, highlight=False)
