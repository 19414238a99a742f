"""Speculative decoding: a cheap drafter proposes tokens, the target verifies them in one forward pass.

    from leanlm.speculative import speculative_generate, PromptLookupDrafter, make_shallow_draft
    out, stats = speculative_generate(model, draft_model, ids, 128, k="adaptive")      # greedy: exactly model's greedy output
    out, stats = speculative_generate(model, PromptLookupDrafter(), ids, 128, k=8)
    out, stats = speculative_generate(Engine(model), EagleDrafter(head), ids, 128, tree="default")  # a static draft tree
    draft = make_shallow_draft(model, 6, budget="5m", tokenizer=tok)

Files: step.py (StepModel interface, Hugging Face adapter), drafters.py (draft model, prompt lookup),
decode.py (the one decode loop: speculative, and plain as its special case), adaptive.py (choice of
k), drafts.py (vocabulary check, quantized and shallow distilled drafts), eagle.py (EAGLE-1 draft heads), tree.py (static
draft trees: tree attention mask, tree verification), cli.py (the `generate` /
`draft` options). Sampling settings: `leanlm.runtime.sampling`; budgets: `leanlm.distill.parse_budget`.
See docs/speculative.md.
"""

from ..distill.trainer import parse_budget
from ..runtime.sampling import Sampling
from .adaptive import AdaptiveK
from .decode import K_MAX, SpecStats, generate, speculative_generate
from .drafters import ModelDrafter, PromptLookupDrafter
from .drafts import check_vocab, make_shallow_draft, quantized_draft, truncate_layers
from .step import HFStepModel, StepModel, as_step_model
from .tree import DEFAULT_TREE, DraftTree, parse_tree, tree_from_acceptance, verify_tree

__all__ = [
    "AdaptiveK", "K_MAX", "SpecStats", "generate", "speculative_generate", "ModelDrafter", "PromptLookupDrafter", "Sampling",
    "check_vocab", "make_shallow_draft", "parse_budget", "quantized_draft", "truncate_layers",
    "HFStepModel", "StepModel", "as_step_model", "DEFAULT_TREE", "DraftTree", "parse_tree", "tree_from_acceptance", "verify_tree",
]
