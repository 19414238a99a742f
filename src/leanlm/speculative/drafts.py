"""Where draft models come from: a sibling model, a quantized copy of the target, a shallow distilled copy.

`make_shallow_draft` keeps the target's embedding, first `n_layers` decoder layers, final norm and
head, then trains the kept decoder layers and norm (embedding and head frozen, so a tied head stays
tied) with the shared trainer to match the full target's next-token distribution: KL(p_target ||
q_draft) averaged over the tokens of the calibration text (logit distillation, Hinton et al. 2015; the same idea as the early-
exit drafts of LayerSkip, Elhoushi et al. 2024, without retraining the target).
"""

from __future__ import annotations

import copy

import torch

from ..core.arch import arch_of
from ..core.errors import LeanLMError


def check_vocab(target, draft, target_tokenizer=None, draft_tokenizer=None) -> None:
    """Refuse a draft whose logits or tokenizer differ from the target's."""
    from ..core.modules import check_same_vocab

    check_same_vocab(target, draft, target_tokenizer, draft_tokenizer, ref_name="target", other_name="draft",
                     fix="pick a draft of the same model family (or build one with `leanlm draft`), or use --prompt-lookup")


def quantized_draft(model, scheme: str = "w4a16-rtn", tokenizer=None, progress: bool = True):
    """A quantized copy of `model` (leanlm.quantize with an int4 preset) to draft for the float model.

    Through transformers the copy runs fake-quantized weights at float32 speed, so it costs as much
    as the target: it pays only on an engine with real low-bit kernels (leanlm.runtime).
    """
    from ..quantization import quantize

    q = copy.deepcopy(model)
    return quantize(q, scheme, tokenizer=tokenizer, progress=progress)


def truncate_layers(model, n_layers: int):
    """A copy of a Hugging Face decoder-only model keeping its first `n_layers` decoder layers (+ final norm and head)."""
    arch = arch_of(model)
    total = arch.n_layers
    if not 1 <= n_layers < total:
        raise LeanLMError(f"--layers {n_layers} is out of range: the model has {total} decoder layers, use 1..{total - 1}")
    cfg = copy.deepcopy(model.config)
    cfg.num_hidden_layers = n_layers
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = cfg.layer_types[:n_layers]
    draft = type(model)(cfg)
    pre = arch.layers_prefix()
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith(pre) or int(k[len(pre):].split(".")[0]) < n_layers}
    missing, unexpected = draft.load_state_dict(sd, strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise LeanLMError(f"cannot copy the first {n_layers} layers of {type(model).__name__}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if getattr(cfg, "tie_word_embeddings", False):
        draft.tie_weights()
    return draft.to(next(model.parameters()).dtype).eval()


def make_shallow_draft(model, n_layers: int, budget: str | float = "5m", *, tokenizer=None, max_tokens: int | None = None,
                       calib_ids: torch.Tensor | None = None, seq_len: int = 128, batch: int = 4, lr: float = 1e-3,
                       progress: bool = True, seed: int = 0):
    """The target's first `n_layers` decoder layers + final norm + head, distilled on the calibration text.

    Trains with the shared trainer (`leanlm.distill.train`, loss `DistillLoss`: KL to the target at
    temperature 1; constant learning rate) for `budget` (the one budget syntax, `parse_budget`:
    "5m" / "90s" wall time or "2M" / a number of tokens) or `max_tokens` tokens, whichever ends
    first; Ctrl-C ends training early and returns the draft as trained so far. `calib_ids`: a 1-D
    LongTensor of token ids (default: the protocol's calibration text through `tokenizer`).
    Returns the draft (a model of the target's class) with `draft.leanlm_draft` holding the training log.
    """
    from ..distill import DistillConfig, DistillLoss, TrainConfig, TrainingInterrupted, parse_budget, train

    limits = parse_budget(budget)
    if max_tokens is not None:
        limits["max_tokens"] = min(max_tokens, limits["max_tokens"] or max_tokens)
    draft = truncate_layers(model, n_layers)
    arch = arch_of(draft)
    if calib_ids is None:
        if tokenizer is None:
            raise LeanLMError("make_shallow_draft needs calibration text: pass tokenizer= (protocol calibration text) or calib_ids=")
        from ..core.data import calibration_texts, join_and_tokenize

        calib_ids = join_and_tokenize(tokenizer, calibration_texts("wiki"))
    cfg = TrainConfig(**limits, lr=lr, warmup_steps=0, schedule="constant", batch_size=batch, seq_len=seq_len, seed=seed,
                      progress=progress)
    params = [p for name, p in draft.named_parameters() if name.startswith((arch.layers_prefix(), f"{arch.body_path}.norm."))]
    target_grads = [p.requires_grad for p in model.parameters()]
    log = {"n_layers": n_layers, "steps": 0, "tokens": 0, "seconds": 0.0, "loss_first": None, "loss_last": None, "interrupted": False}
    try:
        res = train(draft, DistillLoss(model, draft, DistillConfig()), calib_ids, cfg, params=params)
        log.update(steps=res.steps, tokens=res.tokens, seconds=res.seconds)
        if res.history:
            log.update(loss_first=res.history[0]["loss"], loss_last=res.history[-1]["loss"])
    except TrainingInterrupted as e:
        log.update(interrupted=True, steps=e.steps, tokens=e.tokens)
    finally:
        for p, g in zip(model.parameters(), target_grads):  # DistillLoss froze the target
            p.requires_grad_(g)
    for p in draft.parameters():
        p.requires_grad_(False)
    draft.eval()
    draft.leanlm_draft = log
    return draft
