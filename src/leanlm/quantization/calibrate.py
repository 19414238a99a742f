"""Block-by-block calibration: one decoder layer's inputs captured, processed, released.

For each decoder layer, in order: capture what it needs (input statistics, Hessians, samples) by
running the layer alone on the outputs of the already-quantized layers before it; apply the
configured algorithms (SmoothQuant, AWQ, then GPTQ or round-to-nearest weights); calibrate static
activation ranges; compute the layer's quantized outputs, which become the next layer's inputs.
Peak memory stays near one layer plus the calibration activations.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core.arch import arch_or_none
from ..core.errors import LeanLMError
from ..core.modules import decoder_layers
from . import algorithms as alg
from .config import AWQ, GPTQ, QuantConfig, SmoothQuant
from .formats import fake_quantize
from .modules import TensorQuantizer


class _Stop(Exception):
    pass


@dataclass
class _Mapping:
    """Linears that read the same input, and the module whose output that input is."""

    prev: nn.Module
    prev_is_norm: bool
    norm_offset: float
    linears: list[nn.Module]


def _first(o):
    return o[0] if isinstance(o, (tuple, list)) else o


def _check_finite(t: torch.Tensor, where: str) -> None:
    if not torch.isfinite(t).all():
        raise LeanLMError(f"NaN/inf in the activations {where}; the model or its calibration text is broken (check the dtype and weights)")


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, layers: nn.ModuleList, ids: torch.Tensor, batch: int):
    """Hidden states entering layer 0 for each mini-batch, and each layer's keyword arguments.

    Keyword arguments (masks, rotary embeddings) are recorded once per layer from a full forward of
    one calibration row: every row has the same length and no padding, so they are shared by all
    mini-batches (a batch dimension of 1 broadcasts).
    """
    kwargs: list[dict | None] = [None] * len(layers)
    hooks = []
    for i, layer in enumerate(layers):
        def rec(mod, args, kw, i=i):
            if kwargs[i] is None:
                kwargs[i] = {k: v for k, v in kw.items() if k != "hidden_states"}
        hooks.append(layer.register_forward_pre_hook(rec, with_kwargs=True))
    device = next(model.parameters()).device
    try:
        model(ids[:1].to(device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()

    hidden: list[torch.Tensor] = []

    def stop(mod, args, kw):
        hidden.append(args[0] if args else kw["hidden_states"])
        raise _Stop

    h = layers[0].register_forward_pre_hook(stop, with_kwargs=True)
    try:
        for i in range(0, ids.shape[0], batch):
            with contextlib.suppress(_Stop):
                model(ids[i : i + batch].to(device), use_cache=False)
    finally:
        h.remove()
    for x in hidden:
        _check_finite(x, "entering the first layer")
    return hidden, kwargs


def _run(layer: nn.Module, hidden: list[torch.Tensor], kw: dict) -> list[torch.Tensor]:
    return [_first(layer(x, **kw)) for x in hidden]


@torch.no_grad()
def solve_in_forward(layer, hidden, kw, firsts: dict[str, nn.Module], solve) -> list[torch.Tensor]:
    """One forward of the layer over all calibration rows as one batch; ``solve(name, x)`` runs in a
    pre-hook on each module of ``firsts`` with its whole input ``x``, before that module runs. A
    solve that changes weights (GPTQ's one-pass mode, ``_gptq_in_forward``; SparseGPT and Wanda in
    leanlm.sparsity) is therefore seen by every later module, and the
    returned outputs are the changed layer's (the next layer's inputs)."""
    def hook(n):
        def pre(mod, args):
            solve(n, args[0])
        return pre

    hooks = [m.register_forward_pre_hook(hook(n)) for n, m in firsts.items()]
    try:
        out = _first(layer(torch.cat(hidden), **kw))
    finally:
        for h in hooks:
            h.remove()
    return list(out.split([h.shape[0] for h in hidden]))


@contextlib.contextmanager
def _input_hooks(modules: dict[str, nn.Module], fn):
    """Call fn(name, input_tensor) for each module's input during the block."""
    def hook(n):
        def pre(mod, args):
            fn(n, args[0])  # returns None: the input is left as it is
        return pre

    hs = [m.register_forward_pre_hook(hook(n)) for n, m in modules.items()]
    try:
        yield
    finally:
        for h in hs:
            h.remove()


def _norm_offset(norm: nn.Module) -> float:
    """0 for x * w norms, 1 for Gemma-style x * (1 + w) norms, found by zeroing the weight."""
    w = norm.weight.data.clone()
    norm.weight.data.zero_()
    try:
        y = norm(torch.randn(2, w.numel(), dtype=w.dtype, device=w.device))
    finally:
        norm.weight.data.copy_(w)
    return 0.0 if y.abs().max() == 0 else 1.0


@torch.no_grad()
def _trace_inputs(layer: nn.Module, x: torch.Tensor, kw: dict, outputs_of: list[nn.Module] = ()):
    """One forward of a single row: which Linears read the same input tensor (by identity), and
    which of ``outputs_of`` produced it. Returns ``(feeds, made_by)``: input id -> [Linear names],
    input id -> producing module."""
    linears = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
    made_by: dict[int, nn.Module] = {}
    feeds: dict[int, list[str]] = {}
    alive: list[torch.Tensor] = []  # holding every seen tensor keeps ids from being reused mid-forward
    hooks = []

    def _record_output(mod, args, out):
        alive.append(out)
        made_by[id(out)] = mod

    def _record_input(n):
        def pre(mod, args):
            alive.append(args[0])
            feeds.setdefault(id(args[0]), []).append(n)
        return pre

    for m in outputs_of:
        hooks.append(m.register_forward_hook(_record_output))
    for n, m in linears.items():
        hooks.append(m.register_forward_pre_hook(_record_input(n)))
    try:
        layer(x[:1], **_slice_kw(kw, 1))
    finally:
        for h in hooks:
            h.remove()
    return feeds, made_by


@torch.no_grad()
def find_mappings(layer: nn.Module, x: torch.Tensor, kw: dict) -> list[_Mapping]:
    """Which norm feeds which linears (found by tensor identity in one forward), plus up_proj -> down_proj."""
    linears = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
    norms = [m for m in layer.modules() if m is not layer and not isinstance(m, nn.Linear)
             and isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() == 1]
    feeds, made_by = _trace_inputs(layer, x, kw, norms)
    maps = []
    for tid, names in feeds.items():
        if tid in made_by:
            norm = made_by[tid]
            maps.append(_Mapping(norm, True, _norm_offset(norm), [linears[n] for n in names]))
    for n, m in linears.items():
        if n.endswith("up_proj"):
            down = linears.get(n[: -len("up_proj")] + "down_proj")
            if down is not None and down.in_features == m.out_features:
                maps.append(_Mapping(m, False, 0.0, [down]))
    return maps


def _slice_kw(kw: dict, n: int) -> dict:
    """Keyword arguments cut to the first n rows of the batch where they carry a batch dimension."""
    out = {}
    for k, v in kw.items():
        if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] > 1:
            v = v[:n]
        elif isinstance(v, tuple) and all(isinstance(t, torch.Tensor) for t in v):
            v = tuple(t[:n] if t.dim() >= 1 and t.shape[0] > 1 else t for t in v)
        out[k] = v
    return out


def _weight_quantizer(m: nn.Module) -> TensorQuantizer | None:
    q = getattr(m, "weight_quantizer", None)
    return q if q is not None and q.enabled and not q.folded else None


def _apply_scales(mp: _Mapping, s: torch.Tensor) -> None:
    prev = mp.prev
    bias = getattr(prev, "bias", None)
    alg.apply_smoothing(prev.weight.data, bias.data if bias is not None else None,
                        [m.weight.data for m in mp.linears], s, prev_is_norm=mp.prev_is_norm, norm_offset=mp.norm_offset)


@torch.no_grad()
def _smooth(layer, hidden, kw, maps, a: SmoothQuant) -> None:
    mods = {str(i): mp.linears[0] for i, mp in enumerate(maps)}
    obs = {n: alg.AbsMaxObserver() for n in mods}
    if a.search:
        xs = _collect_samples(layer, hidden, kw, mods, max_rows=1024, observers=obs)
    else:
        with _input_hooks(mods, lambda n, x: obs[n].update(x)):
            _run(layer, hidden, kw)
    for n, mp in zip(mods, maps):
        ws = [m.weight.data for m in mp.linears]
        if a.search:
            wq = _weight_quantizer(mp.linears[0])
            aq = getattr(mp.linears[0], "input_quantizer", None)
            s, _ = alg.smoothquant_search(xs[n], obs[n].channel_absmax, ws, wq.fmt if wq else None,
                                          aq.fmt if aq is not None and aq.enabled else None, grid=a.grid,
                                          weight_method=wq.cfg.method if wq else "max")
        else:
            s = alg.smoothquant_scales(obs[n].channel_absmax, ws, alpha=a.alpha)
        _apply_scales(mp, s)


@torch.no_grad()
def _collect_samples(layer, hidden, kw, mods: dict[str, nn.Module], max_rows: int = 4096,
                     observers: dict[str, alg.AbsMaxObserver] | None = None) -> dict[str, torch.Tensor]:
    """Up to max_rows input rows per module, evenly strided over the calibration tokens (and, with
    ``observers``, every row's range recorded in the same pass)."""
    got: dict[str, list[torch.Tensor]] = {n: [] for n in mods}
    per_batch = max(1, max_rows // max(1, len(hidden)))

    def keep(n, x):
        if observers is not None:
            observers[n].update(x)
        x = x.reshape(-1, x.shape[-1])
        step = max(1, x.shape[0] // per_batch)
        got[n].append(x[::step][:per_batch].float())

    with _input_hooks(mods, keep):
        _run(layer, hidden, kw)
    return {n: torch.cat(v) for n, v in got.items()}


@torch.no_grad()
def _awq(layer, hidden, kw, maps, a: AWQ, clip_amax: dict) -> None:
    maps = [mp for mp in maps if any(_weight_quantizer(m) for m in mp.linears)]
    mods = {str(i): mp.linears[0] for i, mp in enumerate(maps)}
    xs = _collect_samples(layer, hidden, kw, mods)
    for i, mp in enumerate(maps):
        fmt = next(_weight_quantizer(m).fmt for m in mp.linears if _weight_quantizer(m))
        s = alg.awq_search(xs[str(i)], [m.weight.data.float() for m in mp.linears], fmt, grid=a.grid)
        _apply_scales(mp, s)
    if a.clip:
        lins = {n: m for n, m in layer.named_modules() if _weight_quantizer(m) is not None}
        xs = _collect_samples(layer, hidden, kw, lins)
        for n, m in lins.items():
            clip_amax[id(m)] = alg.awq_clip(xs[n], m.weight.data.float(), _weight_quantizer(m).fmt)


def _fusable(fmt) -> bool:
    """GPTQ on weights stacked along the output dim equals GPTQ on each: rows are independent when
    scales are per channel or per group (not per tensor, not nvfp4's per-tensor global scale)."""
    return fmt.granularity in ("channel", "group") and fmt.kind != "nvfp4"


def _rows(t: torch.Tensor | None, rows: slice) -> torch.Tensor | None:
    return t[rows] if t is not None and t.dim() else t


def linear_groups(layer, hidden, kw, lins: dict[str, nn.Module]) -> tuple[list[list[str]], bool]:
    """The Linears ``lins`` grouped by the input tensor they read (q/k/v, gate/up), in call order, and
    whether every one of them is called exactly once per forward (used by GPTQ and by leanlm.sparsity)."""
    feeds, _ = _trace_inputs(layer, hidden[0], kw)
    calls = Counter(n for names in feeds.values() for n in names)
    # A Linear called more than once (or not at all in the traced row, e.g. an unrouted expert)
    # keeps a Hessian of its own over every call.
    groups = [[n for n in names if n in lins and calls[n] == 1] for names in feeds.values()]
    groups = [g for g in groups if g] + [[n] for n in lins if calls[n] != 1]
    return groups, all(calls[n] == 1 for n in lins)


def _solve_group(g: list[str], lins: dict[str, nn.Module], H: torch.Tensor, gptq: GPTQ, stats: dict) -> None:
    """GPTQ for Linears sharing one Hessian: one stacked solve when their formats match and rows are
    independent, else one solve each."""
    qs = {n: _weight_quantizer(lins[n]) for n in g}
    same = len({(q.fmt, q.cfg.method, q.cfg.percentile) for q in qs.values()}) == 1
    solves = [g] if same and _fusable(qs[g[0]].fmt) else [[n] for n in g]
    for part in solves:
        q = qs[part[0]]
        w = torch.cat([lins[n].weight.data.float() for n in part])
        wkw = {"percentile": q.cfg.percentile} if q.cfg.method == "percentile" else None
        # A sparsified Linear (leanlm.sparsity) carries a weight_mask: GPTQ keeps its zeros at zero.
        masks = [getattr(lins[n], "weight_mask", None) for n in part]
        mask = None if all(mk is None for mk in masks) else torch.cat(
            [torch.ones_like(lins[n].weight, dtype=torch.bool) if mk is None else mk for n, mk in zip(part, masks)])
        wq, qp = alg.gptq(w, H, q.fmt, block_size=gptq.block_size, damp=gptq.damp, act_order=gptq.act_order,
                          weight_method=q.cfg.method, weight_kwargs=wkw, mask=mask)
        row = 0
        for n in part:
            m = lins[n]
            rows = slice(row, row + m.out_features)
            row += m.out_features
            qpm = alg.QParams(_rows(qp.scale, rows), _rows(qp.zero, rows), qp.global_scale)
            stats[id(m)] = alg.quant_error(w[rows], wq[rows], H)
            finish_weight(m, wq[rows], qpm)


def _one_pass_gib(lins: dict[str, nn.Module], hidden: list[torch.Tensor], heads: int) -> float:
    """Rough peak activation memory of one layer's forward over all rows at once: every Linear's
    output plus a few hidden-sized tensors and one attention score matrix."""
    rows = sum(h.shape[0] for h in hidden)
    seq, width = hidden[0].shape[1], hidden[0].shape[-1]
    per_token = sum(m.out_features for m in lins.values()) + 4 * width
    return 4 * (rows * seq * per_token + rows * heads * seq * seq) / 2**30


def _forward_dtype(gptq: GPTQ | None, hidden: list[torch.Tensor]):
    """bfloat16 autocast for GPTQ's calibration forwards when asked (GPTQ.forward_dtype), else nothing."""
    if gptq is None or gptq.forward_dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(hidden[0].device.type, dtype=torch.bfloat16)


def _gptq_in_forward(layer, hidden, kw, lins, groups, gptq: GPTQ, stats: dict) -> list[torch.Tensor]:
    """One-pass GPTQ: each group is solved (``solve_in_forward``) just before its first Linear runs,
    so later groups see quantized inputs and the returned outputs are the quantized layer's (the
    next layer's inputs)."""
    first = {g[0]: g for g in groups}

    def solve(n, x):
        acc = alg.HessianAccumulator(lins[n].in_features)
        acc.add(x)
        _solve_group(first[n], lins, acc.H, gptq, stats)

    with _forward_dtype(gptq, hidden):
        out = solve_in_forward(layer, hidden, kw, {n: lins[n] for n in first}, solve)
    return [o.to(hidden[0].dtype) for o in out]


@torch.no_grad()
def _gptq_weights(layer, hidden, kw, lins: dict[str, nn.Module], groups: list[list[str]], gptq: GPTQ, stats: dict) -> None:
    """Two-pass GPTQ: one forward accumulates every group's Hessian (float weights throughout),
    then each group is solved."""
    acc = {g[0]: alg.HessianAccumulator(lins[g[0]].in_features) for g in groups}
    with _input_hooks({g[0]: lins[g[0]] for g in groups}, lambda n, x: acc[n].add(x)), _forward_dtype(gptq, hidden):
        _run(layer, hidden, kw)
    for g in groups:
        _solve_group(g, lins, acc[g[0]].H, gptq, stats)


@torch.no_grad()
def _quantize_weights(layer, hidden, kw, gptq: GPTQ | None, clip_amax: dict, stats: dict,
                      heads: int = 1, notes: set | None = None, arch_groups: tuple | None = None) -> list[torch.Tensor] | None:
    """Quantize the layer's weights. Returns the quantized layer's outputs when they came for free
    (one-pass GPTQ), else None. `arch_groups`: the adapter's projection groups (core.arch), each Linear
    called once per forward; without them (a family the adapter does not know) the groups are traced."""
    lins = {n: m for n, m in layer.named_modules() if _weight_quantizer(m) is not None}
    if gptq is not None and lins:
        if arch_groups is not None:
            named = {n for g in arch_groups for n in g}
            groups = [[n for n in g if n in lins] for g in arch_groups] + [[n] for n in lins if n not in named]
            groups, once = [g for g in groups if g], True
        else:
            groups, once = linear_groups(layer, hidden, kw, lins)
        if gptq.one_pass:
            gib = _one_pass_gib(lins, hidden, heads)
            if once and gib <= gptq.one_pass_max_gib:
                return _gptq_in_forward(layer, hidden, kw, lins, groups, gptq, stats)
            why = (f"its activations over all calibration rows need ~{gib:.1f} GiB > one_pass_max_gib={gptq.one_pass_max_gib}"
                   if once else "a Linear is called other than once per forward")
            if notes is not None and why not in notes:
                notes.add(why)
                tqdm.write(f"leanlm: GPTQ runs two passes per layer (slower, float-weight Hessians) because {why}")
        return _gptq_weights(layer, hidden, kw, lins, groups, gptq, stats)
    for n, m in lins.items():
        q = _weight_quantizer(m)
        w = m.weight.data.float()
        kwargs = {"percentile": q.cfg.percentile} if q.cfg.method == "percentile" else {}
        if id(m) in clip_amax:
            qp = alg.weight_qparams(w, q.fmt, "max", amax=clip_amax[id(m)])
        else:
            qp = alg.weight_qparams(w, q.fmt, q.cfg.method, **kwargs)
        finish_weight(m, fake_quantize(w, q.fmt, qp), qp)


def finish_weight(m: nn.Module, wq: torch.Tensor, qp) -> None:
    """Store the quantized weight values in place and keep their parameters on the quantizer."""
    m.weight.data.copy_(wq.to(m.weight.dtype))
    m.weight_quantizer.qparams = qp
    m.weight_quantizer.folded = True
    m.weight_quantizer.mode = "quant"


def _static_act_quantizers(module: nn.Module) -> list[TensorQuantizer]:
    return [q for q in module.modules() if isinstance(q, TensorQuantizer) and q.enabled and q.role != "weight"
            and not q.cfg.dynamic and q.amax is None]


def _calibrate_static(qs: list[TensorQuantizer], run) -> None:
    """Record the ranges of `qs` over `run()`, then switch them to quantizing with those ranges."""
    if not qs:
        return
    for q in qs:
        q.mode = "calib"
    try:
        run()
    finally:
        for q in qs:
            q.mode = "quant"


def needs_data(resolved: dict, config: QuantConfig) -> bool:
    """True when the config has algorithms or static (calibrated) activation / KV ranges."""
    static = any(not n.endswith(".weight_quantizer") and not qc.dynamic for n, qc in resolved.items())
    return bool(config.algorithms) or static


@torch.no_grad()
def calibrate(model: nn.Module, config: QuantConfig, ids: torch.Tensor | None, progress: bool = True) -> dict:
    """Quantize every enabled weight and calibrate every static activation range, layer by layer."""
    stats: dict = {}
    t0 = time.perf_counter()
    # Weights and static activation quantizers pass through until their layer is processed.
    waiting = _static_act_quantizers(model)
    for q in model.modules():
        if isinstance(q, TensorQuantizer) and q.enabled and (q.role == "weight" or q in waiting):
            q.mode = "off"
    layers = decoder_layers(model)
    algos = {type(a): a for a in config.algorithms}
    if ids is not None:
        batch = max(d for d in range(1, min(config.calib_batch, ids.shape[0]) + 1) if ids.shape[0] % d == 0)
        hidden, kws = capture_layer_inputs(model, layers, ids, batch)
        bar = tqdm(list(enumerate(layers)), desc="calibrating layers", unit="layer", disable=not progress)
        heads = getattr(getattr(model, "config", None), "num_attention_heads", 1) or 1
        arch = arch_or_none(model)
        arch_groups = arch.groups if arch is not None else None
        notes: set = set()
        for i, layer in bar:
            kw = kws[i]
            clip_amax: dict = {}
            if SmoothQuant in algos or AWQ in algos:
                maps = find_mappings(layer, hidden[0], kw)
                if SmoothQuant in algos:
                    _smooth(layer, hidden, kw, maps, algos[SmoothQuant])
                if AWQ in algos:
                    _awq(layer, hidden, kw, maps, algos[AWQ], clip_amax)
            out = _quantize_weights(layer, hidden, kw, algos.get(GPTQ), clip_amax, stats, heads, notes, arch_groups)
            static = _static_act_quantizers(layer)
            _calibrate_static(static, lambda: _run(layer, hidden, kw))
            if out is None or static:
                with _forward_dtype(None if static else algos.get(GPTQ), hidden):
                    out = [x.to(hidden[0].dtype) for x in _run(layer, hidden, kw)]
            hidden = out  # quantized outputs feed the next layer
            for x in hidden:
                _check_finite(x, f"after layer {i}")
        del hidden
    # Modules outside the decoder stack (e.g. a quantized lm_head): round-to-nearest weights, and static
    # activation ranges from a forward pass.
    for m in model.modules():
        q = _weight_quantizer(m)
        if q is not None:
            w = m.weight.data.float()
            qp = alg.weight_qparams(w, q.fmt, q.cfg.method)
            finish_weight(m, fake_quantize(w, q.fmt, qp), qp)
    rest = _static_act_quantizers(model)
    if rest:
        if ids is None:
            raise LeanLMError("static activation quantizers need calibration data; pass calib_data or a tokenizer")
        def forward():
            for i in range(0, min(ids.shape[0], 4 * config.calib_batch), config.calib_batch):
                model(ids[i : i + config.calib_batch], use_cache=False)

        _calibrate_static(rest, forward)
    return {"seconds": time.perf_counter() - t0, "gptq_error": stats}
