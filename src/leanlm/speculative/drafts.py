"""Where draft models come from: a sibling model, a quantized copy of the target, a shallow distilled copy.

`make_shallow_draft` keeps the target's embedding, first `n_layers` decoder layers, final norm and
head, then trains the kept decoder layers and norm (embedding and head frozen, so a tied head stays
tied) to match the full target's next-token distribution: KL(p_target || q_draft) averaged over the
tokens of the calibration text (logit distillation, Hinton et al. 2015; the same idea as the early-
exit drafts of LayerSkip, Elhoushi et al. 2024, without retraining the target).
"""

from __future__ import annotations

import copy
import re
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

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


def parse_budget(budget: str | float | int) -> float:
    """Seconds from 300, "300", "300s", "5m", "1.5h"."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([smh]?)\s*", str(budget))
    if not m or float(m.group(1)) <= 0:
        raise LeanLMError(f"bad time budget {budget!r}; use seconds or a number with s, m or h, e.g. 5m")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]


def truncate_layers(model, n_layers: int):
    """A copy of a Hugging Face decoder-only model keeping its first `n_layers` decoder layers (+ final norm and head)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise LeanLMError(f"{type(model).__name__} has no model.layers list; shallow drafts support Llama-style decoder models")
    total = len(layers)
    if not 1 <= n_layers < total:
        raise LeanLMError(f"--layers {n_layers} is out of range: the model has {total} decoder layers, use 1..{total - 1}")
    cfg = copy.deepcopy(model.config)
    cfg.num_hidden_layers = n_layers
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = cfg.layer_types[:n_layers]
    draft = type(model)(cfg)
    sd = {k: v for k, v in model.state_dict().items() if not re.match(r"model\.layers\.(\d+)\.", k) or int(k.split(".")[2]) < n_layers}
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

    Trains for `budget` wall-clock time (seconds or "5m") or `max_tokens` tokens, whichever ends
    first; Ctrl-C ends training early and returns the draft as trained so far. `calib_ids`: a 1-D
    LongTensor of token ids (default: the protocol's calibration text through `tokenizer`).
    Returns the draft (a model of the target's class) with `draft.leanlm_draft` holding the training log.
    """
    seconds = parse_budget(budget)
    if max_tokens is not None and max_tokens < seq_len:
        raise LeanLMError(f"token budget {max_tokens} is below one sequence of {seq_len} tokens; raise it or lower seq_len")
    draft = truncate_layers(model, n_layers)
    if calib_ids is None:
        if tokenizer is None:
            raise LeanLMError("make_shallow_draft needs calibration text: pass tokenizer= (protocol calibration text) or calib_ids=")
        from ..core.data import calibration_texts, join_and_tokenize

        calib_ids = join_and_tokenize(tokenizer, calibration_texts("wiki"))
    n_seq = calib_ids.numel() // seq_len
    if n_seq < batch:
        raise LeanLMError(f"the calibration text has {calib_ids.numel()} tokens, fewer than one batch of {batch} x {seq_len}")
    seqs = calib_ids[: n_seq * seq_len].view(n_seq, seq_len)
    for name, p in draft.named_parameters():
        p.requires_grad_(name.startswith("model.layers.") or name.startswith("model.norm."))
    params = [p for p in draft.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    model.eval()
    draft.train()
    log = {"n_layers": n_layers, "steps": 0, "tokens": 0, "seconds": 0.0, "loss_first": None, "loss_last": None, "interrupted": False}
    t0 = time.perf_counter()
    bar = tqdm(total=round(seconds), desc=f"distilling {n_layers}-layer draft", unit="s", disable=not progress)
    order = torch.randperm(n_seq, generator=g)
    pos = 0
    try:
        while True:
            elapsed = time.perf_counter() - t0
            if elapsed >= seconds or (max_tokens is not None and log["tokens"] + batch * seq_len > max_tokens):
                break
            if pos + batch > n_seq:
                order, pos = torch.randperm(n_seq, generator=g), 0
            x = seqs[order[pos : pos + batch]]
            pos += batch
            with torch.no_grad():
                p_log = F.log_softmax(model(input_ids=x).logits.float(), -1)
            q_log = F.log_softmax(draft(input_ids=x).logits.float(), -1)
            loss = F.kl_div(q_log.flatten(0, 1), p_log.flatten(0, 1), log_target=True, reduction="batchmean")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            log["steps"] += 1
            log["tokens"] += x.numel()
            log["loss_last"] = loss.item()
            if log["loss_first"] is None:
                log["loss_first"] = loss.item()
            bar.n = min(round(time.perf_counter() - t0), round(seconds))
            bar.set_postfix(kl=f"{log['loss_last']:.3f}", tokens=log["tokens"])
            bar.refresh()
    except KeyboardInterrupt:
        log["interrupted"] = True
    finally:
        bar.close()
    log["seconds"] = time.perf_counter() - t0
    for p in draft.parameters():
        p.requires_grad_(False)
    draft.eval()
    draft.leanlm_draft = log
    return draft
