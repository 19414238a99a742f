"""Structured pruning: targets, the choice of what survives, and prune -> distill.

    pruned = prune(model, PruneTarget(params="90M"), tokenizer=tok)          # width (default axes)
    pruned = prune(model, PruneTarget(layers=20, intermediate=1024), tokenizer=tok)
    leanlm.save(pruned, "smollm2-90m", tokenizer=tok)   # plain transformers folder + leanlm.json (layer map)
    student, result = prune_and_distill(model, "90M", tokenizer=tok, train_config=TrainConfig(max_tokens=200_000))
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch import nn

from ..core.arch import arch_of
from ..core.errors import LeanLMError
from .importance import activation_importance, layer_importance
from .structure import Dims, Keep, check_supported, count_params, dims_of, slice_model

AXES = ("width", "depth", "both")


@dataclass
class PruneSizes:
    """Sizes to prune to (None: keep, or let `PruneTarget.params` choose). The recipe's prune step shares them.

    axes: "width" shrinks hidden and intermediate by one common factor (intermediate a multiple of
    `multiple_of`, hidden a multiple of lcm(multiple_of, heads) since transformers needs hidden % heads == 0;
    a width that cannot shrink to such a multiple stays as it is), "depth"
    removes whole layers, "both" takes half of the needed reduction from depth, the rest from width.
    Attention heads change only when `heads`/`kv_heads` are given. `multiple_of` (default 64) makes the chosen
    sizes ones that quantization groups (32, 64) and packed kernels accept; sizes given explicitly are kept.
    """
    hidden: int | None = None
    intermediate: int | None = None
    heads: int | None = None
    kv_heads: int | None = None
    layers: int | None = None
    axes: str = "width"
    multiple_of: int = 64

    def sizes(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(PruneSizes)}


@dataclass
class PruneTarget(PruneSizes):
    """What the pruned model should be: the sizes given are fixed; `params` (a count, "90M") shrinks the others
    along `axes`."""
    params: int | str | None = None


def parse_count(x: int | str) -> int:
    """90_000_000, "90M", "0.09B", "90000k" -> int."""
    if isinstance(x, int) and not isinstance(x, bool):
        return x
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMbBgG]?)\s*", str(x))
    if not m:
        raise LeanLMError(f"bad parameter count {x!r}; use a number with an optional k, M or B suffix, e.g. 90M")
    return int(float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9}[m.group(2).lower()])


def _check_dims(orig: Dims, d: Dims) -> None:
    """Every size within the model's, grouped-query attention kept even, and a config transformers accepts."""
    for name in ("hidden", "intermediate", "heads", "kv_heads", "layers"):
        v, o = getattr(d, name), getattr(orig, name)
        if v < 1:
            raise LeanLMError(f"--{name.replace('_', '-')} {v} must be at least 1")
        if v > o:
            raise LeanLMError(f"--{name.replace('_', '-')} {v} is larger than the model's {o}; pruning only shrinks a model")
    group = orig.heads // orig.kv_heads
    if d.heads % d.kv_heads:
        raise LeanLMError(f"{d.heads} query heads cannot be shared evenly by {d.kv_heads} KV heads (grouped-query attention); "
                          f"use a multiple of {d.kv_heads}")
    if d.heads // d.kv_heads > group:
        raise LeanLMError(f"{d.heads} heads over {d.kv_heads} KV heads gives {d.heads // d.kv_heads} per group, but the model has "
                          f"{group} per group and pruning cannot add heads to a group; keep at most {d.kv_heads * group} heads "
                          f"or more KV heads")
    if d.hidden % d.heads:
        raise LeanLMError(f"hidden size {d.hidden} is not a multiple of {d.heads} attention heads, which transformers' config "
                          f"requires (head_dim stays {orig.hidden // orig.heads if orig.hidden % orig.heads == 0 else 'as is'}); "
                          f"use a multiple of {d.heads} or change --heads")


def solve_dims(model: nn.Module, target: PruneTarget) -> Dims:
    """The dimensions to prune to: fixed ones as given, the rest chosen to meet `target.params`."""
    if target.axes not in AXES:
        raise LeanLMError(f"unknown axes {target.axes!r}; use one of {', '.join(AXES)}")
    if target.multiple_of < 1:
        raise LeanLMError(f"multiple_of must be >= 1, got {target.multiple_of} (--multiple-of)")
    orig = dims_of(model)
    heads = target.heads if target.heads is not None else orig.heads
    kv = target.kv_heads
    if kv is None:
        # heads given alone: keep every KV group and shrink the query heads per group (if it divides)
        kv = orig.kv_heads if heads % orig.kv_heads == 0 else None
        if kv is None:
            raise LeanLMError(f"--heads {heads} is not a multiple of the model's {orig.kv_heads} KV heads (grouped-query attention); "
                              f"give --kv-heads too, or a multiple of {orig.kv_heads}")
    def given(name):
        v = getattr(target, name)
        return getattr(orig, name) if v is None else int(v)

    d = Dims(given("hidden"), given("intermediate"), heads, kv, given("layers"))
    _check_dims(orig, d)
    if target.params is None:
        if all(getattr(target, k) is None for k in ("hidden", "intermediate", "heads", "kv_heads", "layers")):
            raise LeanLMError("no pruning target: give a parameter count (--target-params 90M) or sizes (--layers, --hidden, ...)")
        return d
    want = parse_count(target.params)
    have = count_params(model, orig)
    if want >= have:
        raise LeanLMError(f"target {want:,} parameters is not smaller than the model's {have:,}; give a smaller --target-params")
    if count_params(model, d) <= want:
        return d
    free_w = [n for n in ("hidden", "intermediate") if getattr(target, n) is None]
    depth_free = target.layers is None
    if target.axes == "depth" or (target.axes == "both" and not free_w):
        if not depth_free:
            raise LeanLMError("target --target-params needs fewer layers but --layers is fixed; drop --layers or use --axes width")
        return _fit_depth(model, d, want, want)
    if target.axes == "both" and depth_free:
        half = count_params(model, d) - (count_params(model, d) - want) // 2
        d = _fit_depth(model, d, half, want)
    if not free_w:
        raise LeanLMError("target --target-params needs a narrower model but --hidden and --intermediate are both fixed; "
                          "drop one of them, or use --axes depth")
    return _fit_width(model, d, free_w, want, target.multiple_of)


def _fit_depth(model, d: Dims, goal: int, want: int) -> Dims:
    for layers in range(d.layers, 0, -1):
        c = Dims(d.hidden, d.intermediate, d.heads, d.kv_heads, layers)
        if count_params(model, c) <= goal:
            return c
    raise LeanLMError(f"even one layer has more than {want:,} parameters at these widths; give a larger --target-params "
                      "or narrower sizes")


def _fit_width(model, d: Dims, free: list[str], want: int, multiple: int) -> Dims:
    """Largest common scale of the free widths (rounded down to their multiples) that fits `want`."""
    free = [n for n in free if _step(d, n, multiple) < getattr(d, n)]   # the others cannot shrink to a multiple
    lo, hi = 0.0, 1.0
    best = None
    for _ in range(30):
        s = (lo + hi) / 2
        c = _scaled(d, free, s, multiple) if free else None
        if c is not None and count_params(model, c) <= want:
            best, lo = c, s
        else:
            hi = s
    if best is None:
        raise LeanLMError(f"no width fits {want:,} parameters with sizes that are multiples of {multiple} (the embedding alone "
                          "may be too large); give a larger --target-params, remove layers too (--axes both, --layers), or a smaller --multiple-of")
    # the binary search stops near the boundary; step each free width up while it still fits
    for n in free:
        while True:
            v = getattr(best, n) + _step(best, n, multiple)
            if v > getattr(d, n):
                break
            c = Dims(**{**best.to_dict(), n: v})
            if count_params(model, c) > want:
                break
            best = c
    return best


def _step(d: Dims, name: str, multiple: int) -> int:
    return math.lcm(multiple, d.heads) if name == "hidden" else multiple


def _scaled(d: Dims, free: list[str], s: float, multiple: int) -> Dims | None:
    vals = d.to_dict()
    for n in free:
        a = _step(d, n, multiple)
        v = int(vals[n] * s) // a * a
        if v < a:
            return None
        vals[n] = min(v, vals[n])
    return Dims(**vals)


def choose(imp, orig: Dims, d: Dims) -> Keep:
    """Which indices survive: the most important ones, in their original order."""
    def top(scores: torch.Tensor, k: int) -> torch.Tensor:
        return torch.sort(torch.topk(scores, k).indices).values

    if d.layers < orig.layers:
        layers = sorted(top(imp.layers, d.layers).tolist())
    else:
        layers = list(range(orig.layers))
    group = orig.heads // orig.kv_heads
    per = d.heads // d.kv_heads
    heads, kvs, chans = {}, {}, {}
    for i in layers:
        h = imp.heads[i].view(orig.kv_heads, group)
        kv = top(h.sum(1), d.kv_heads)
        kept = [int(g) * group + int(j) for g in kv for j in top(h[g], per)]
        kvs[i], heads[i] = kv, torch.tensor(kept, dtype=torch.long)
        chans[i] = top(imp.channels[i], d.intermediate)
    return Keep(layers, top(imp.hidden, d.hidden), heads, kvs, chans)


def prune(model: nn.Module, target: PruneTarget | int | str, *, tokenizer=None, calib: torch.Tensor | None = None,
          samples: int = 32, seq_len: int = 512, depth_samples: int = 8, depth_metric: str = "ppl",
          source: str | Path = "wiki", progress: bool = True) -> nn.Module:
    """A new, smaller model of the same class (the input model is left unchanged).

    Importance is measured on `calib` ([N, T] token ids; default: `samples` x `seq_len` tokens of
    the calibration split of `source`, default the protocol's wiki, through `tokenizer`); depth ranking uses the first
    `depth_samples` rows. The result carries `model.leanlm_prune` (dimensions, parameter counts,
    kept layers, the layer scores).
    """
    if not isinstance(target, PruneTarget):
        target = PruneTarget(params=target)
    if depth_metric not in ("ppl", "cosine"):
        raise LeanLMError(f"unknown depth metric {depth_metric!r}; use 'ppl' or 'cosine'")
    check_supported(model)
    d = solve_dims(model, target)
    orig = dims_of(model)
    t0 = time.perf_counter()
    if calib is None:
        from ..core.data import calibration_batches

        if tokenizer is None:
            raise LeanLMError("pruning needs calibration text: pass tokenizer= (protocol calibration text) or calib= token ids")
        calib = calibration_batches(tokenizer, samples, seq_len, source)
    calib = torch.as_tensor(calib).long()
    if calib.dim() != 2:
        raise LeanLMError(f"calib must be [samples, seq_len] token ids, got shape {tuple(calib.shape)}")
    was = model.training
    model.eval()
    imp = activation_importance(model, calib, progress=progress)
    if d.layers < orig.layers:
        imp.layers = layer_importance(model, calib[:depth_samples], depth_metric, progress=progress)
        imp.layer_metric = depth_metric
    model.train(was)
    keep = choose(imp, orig, d)
    pruned = slice_model(model, keep)
    before, after = sum(p.numel() for p in model.parameters()), sum(p.numel() for p in pruned.parameters())
    pruned.leanlm_prune = {
        "from": orig.to_dict(), "to": d.to_dict(), "params_before": before, "params_after": after,
        "target": asdict(target), "calibration_tokens": int(calib.numel()), "depth_metric": imp.layer_metric,
        "kept_layers": keep.layers, "layer_scores": imp.layers.tolist() if imp.layers is not None else None,
        "head_dim": arch_of(model).head_dim, "seconds": time.perf_counter() - t0,
    }
    return pruned


def prune_and_distill(model: nn.Module, target: PruneTarget | int | str, *, tokenizer=None, distill_config=None,
                      train_config=None, train_data=None, eval_ids=None, prune_kwargs: dict | None = None, after_step=(),
                      hidden_pairs: int = 0):
    """Prune `model`, then distill the pruned student from the unpruned `model` (Minitron's recipe).

    `hidden_pairs`: also match that many evenly spaced hidden states (the layers the student kept).
    Returns `(student, TrainResult)`; the teacher (`model`) is not modified.
    """
    from ..distill import DistillConfig, TrainConfig, distill, matched_hidden_pairs

    student = prune(model, target, tokenizer=tokenizer, **(prune_kwargs or {}))
    if hidden_pairs:
        distill_config = distill_config or DistillConfig()
        distill_config.hidden_layers = matched_hidden_pairs(student, model, hidden_pairs)
    res = distill(student, model, train_data, distill_config or DistillConfig(), train_config or TrainConfig(max_minutes=10),
                  tokenizer=tokenizer, eval_ids=eval_ids, after_step=after_step)
    return student, res
