"""The quantization algorithms of the block-by-block calibration engine (``leanlm.core.calibrate``).

Registered steps, run in this order on each decoder layer (``calibrate`` builds the list from the
QuantConfig): ``smoothquant`` and ``awq`` (scales folded into the previous norm or Linear),
``gptq`` or ``rtn`` (the weights), ``activation_ranges`` (static activation / KV ranges, and the
quantized layer's outputs that feed the next layer).
"""

from __future__ import annotations

import contextlib
import contextvars
import time

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core import dist
from ..core.calibrate import (LayerStep, SharedInput, calibrate_blocks, find_mappings, input_hooks, linear_groups,
                              one_pass_gib, register, run_layer, solve_in_forward)
from ..core.errors import LeanLMError
from ..core.offload import trim_heap
from . import algorithms as alg
from .config import AWQ, GPTQ, AutoRound, QuantConfig, SmoothQuant
from .formats import fake_quantize
from .modules import TensorQuantizer


# True while calibrate() runs data-parallel: each rank holds a share of the calibration rows and GPTQ's
# Hessians (with their sample counts) are all-reduced before every solve.
_SHARDED: contextvars.ContextVar[bool] = contextvars.ContextVar("leanlm_gptq_sharded", default=False)


def _hessian(acc: alg.HessianAccumulator) -> torch.Tensor:
    if _SHARDED.get():
        acc.all_reduce()
    return acc.H


def _weight_quantizer(m: nn.Module) -> TensorQuantizer | None:
    q = getattr(m, "weight_quantizer", None)
    return q if q is not None and q.enabled and not q.folded else None


def _apply_scales(mp: SharedInput, s: torch.Tensor, scaled: dict) -> None:
    """Fold x -> x / s into the mapping (SmoothQuant, AWQ) and record, per consumer Linear, the factor its input was
    divided by (``scaled``: the layer's ``input_scale``, which the ranges derived from ``input_absmax`` divide by)."""
    prev = mp.prev
    bias = getattr(prev, "bias", None)
    alg.apply_smoothing(prev.weight.data, bias.data if bias is not None else None,
                        [m.weight.data for m in mp.linears], s, prev_is_norm=mp.prev_is_norm, norm_offset=mp.norm_offset)
    for m in mp.linears:
        scaled[m] = scaled[m] * s if m in scaled else s.float()


def _input_absmax(step: LayerStep, m: nn.Module) -> torch.Tensor | None:
    """Per-channel max |input| of Linear ``m`` in the float layer as the algorithms so far scaled it (float
    calibration only: ``step.input_absmax`` divided by the recorded factors), or None when unknown: sequential
    calibration, an input the float forward did not see, or one transformed inside the Linear (an online rotation)."""
    if step.input_absmax is None or m not in step.input_absmax or getattr(m, "input_transform", None) is not None:
        return None
    a = step.input_absmax[m]
    s = step.state.get("input_scale", {}).get(m)
    return a if s is None else a / s.to(a.device)


@torch.no_grad()
def _smooth(step: LayerStep, maps, a: SmoothQuant) -> None:
    layer, hidden, kw = step.layer, step.hidden, step.kw
    mods = {str(i): mp.linears[0] for i, mp in enumerate(maps)}
    known = {n: _input_absmax(step, m) for n, m in mods.items()}
    obs = {n: alg.AbsMaxObserver() for n in mods}
    if a.search:
        xs = _collect_samples(layer, hidden, kw, mods, max_rows=1024, observers=obs)
    elif any(v is None for v in known.values()):
        with input_hooks(mods, lambda n, x: obs[n].update(x)):
            run_layer(layer, hidden, kw)
    for n, mp in zip(mods, maps):
        ws = [m.weight.data for m in mp.linears]
        absmax = obs[n].channel_absmax if obs[n].channel_absmax is not None else known[n]
        if a.search:
            wq = _weight_quantizer(mp.linears[0])
            aq = getattr(mp.linears[0], "input_quantizer", None)
            s, _ = alg.smoothquant_search(xs[n], absmax, ws, wq.fmt if wq else None,
                                          aq.fmt if aq is not None and aq.enabled else None, grid=a.grid,
                                          weight_method=wq.cfg.method if wq else "max")
        else:
            s = alg.smoothquant_scales(absmax, ws, alpha=a.alpha)
        _apply_scales(mp, s, step.state.setdefault("input_scale", {}))


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

    with input_hooks(mods, keep):
        run_layer(layer, hidden, kw)
    return {n: torch.cat(v) for n, v in got.items()}


def _grid_method(m: nn.Module) -> str:
    """The range method AWQ's searches quantize with: the weight quantizer's ``full`` grid if it has one, else
    ``max`` (the searched ranges ``mse`` / ``percentile`` are not repeated inside every candidate)."""
    return "full" if _weight_quantizer(m).cfg.method == "full" else "max"


@torch.no_grad()
def _awq(layer, hidden, kw, maps, a: AWQ, clip_amax: dict, scaled: dict) -> None:
    maps = [mp for mp in maps if any(_weight_quantizer(m) for m in mp.linears)]
    mods = {str(i): mp.linears[0] for i, mp in enumerate(maps)}
    xs = _collect_samples(layer, hidden, kw, mods, max_rows=a.samples)
    for i, mp in enumerate(maps):
        trim_heap(collect=False)   # as before each GPTQ solve: without it the searches' freed temporaries fragment the heap and
        # a late block of the 1.52B model held 0.4 GB more than its start (measured; --max-memory counts the peak)
        quant = [m for m in mp.linears if _weight_quantizer(m)]   # an unquantized linear's output does not change with s
        grids = [_grid_method(m) for m in quant]
        s = alg.awq_search(xs[str(i)], [m.weight.data.float() for m in quant], [_weight_quantizer(m).fmt for m in quant],
                           grid=a.grid, n_samples_max=a.samples, scales=a.scales,
                           weight_method="full" if all(g == "full" for g in grids) else "max")
        _apply_scales(mp, s, scaled)
    if a.clip:
        lins = {n: m for n, m in layer.named_modules() if _weight_quantizer(m) is not None}
        xs = _collect_samples(layer, hidden, kw, lins, max_rows=a.clip_samples)
        grams: list[tuple[torch.Tensor, torch.Tensor]] = []  # one Gram matrix per distinct input (q/k/v share one)
        for n, m in lins.items():
            trim_heap(collect=False)
            G = next((g for x, g in grams if x.shape == xs[n].shape and torch.equal(x, xs[n])), None)
            if G is None:
                G = alg._gram(xs[n])
                grams.append((xs[n], G))
            clip_amax[id(m)] = alg.awq_clip(xs[n], m.weight.data.float(), _weight_quantizer(m).fmt, grid=a.clip_grid,
                                            n_samples_max=a.clip_samples, signed=a.clip_signed, gram=G,
                                            method=_grid_method(m))


def _fusable(fmt) -> bool:
    """GPTQ on weights stacked along the output dim equals GPTQ on each: rows are independent when
    scales are per channel or per group (not per tensor, not nvfp4's per-tensor global scale)."""
    return fmt.granularity in ("channel", "group") and fmt.kind != "nvfp4"


def _rows(t: torch.Tensor | None, rows: slice) -> torch.Tensor | None:
    return t[rows] if t is not None and t.dim() else t


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


def _forward_dtype(gptq: GPTQ | None, hidden: list[torch.Tensor]):
    """bfloat16 autocast for GPTQ's calibration forwards when asked (GPTQ.forward_dtype), else nothing."""
    if gptq is None or gptq.forward_dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(hidden[0].device.type, dtype=torch.bfloat16)


def _hessian_rows(x: torch.Tensor, gptq: GPTQ) -> torch.Tensor:
    """A Linear's inputs [rows, seq, in] without the first ``gptq.sink_tokens`` positions of each row."""
    k = gptq.sink_tokens
    return x[:, k:] if k and x.dim() == 3 and x.shape[1] > k else x


def _gptq_in_forward(layer, hidden, kw, lins, groups, gptq: GPTQ, stats: dict) -> list[torch.Tensor]:
    """One-pass GPTQ: each group is solved (``solve_in_forward``) just before its first Linear runs,
    so later groups see quantized inputs and the returned outputs are the quantized layer's (the
    next layer's inputs)."""
    first = {g[0]: g for g in groups}

    def solve(n, x):
        acc = alg.HessianAccumulator(lins[n].in_features)
        acc.add(_hessian_rows(x, gptq))
        trim_heap(collect=False)   # the previous solve's freed temporaries back to the OS first: the peak is this solve's (--max-memory)
        _solve_group(first[n], lins, _hessian(acc), gptq, stats)

    with _forward_dtype(gptq, hidden):
        out = solve_in_forward(layer, hidden, kw, {n: lins[n] for n in first}, solve)
    return [o.to(hidden[0].dtype) for o in out]


@torch.no_grad()
def _gptq_weights(layer, hidden, kw, lins: dict[str, nn.Module], groups: list[list[str]], gptq: GPTQ, stats: dict) -> None:
    """Two-pass GPTQ: one forward accumulates every group's Hessian (float weights throughout),
    then each group is solved."""
    acc = {g[0]: alg.HessianAccumulator(lins[g[0]].in_features) for g in groups}
    with input_hooks({g[0]: lins[g[0]] for g in groups}, lambda n, x: acc[n].add(_hessian_rows(x, gptq))), \
            _forward_dtype(gptq, hidden):
        run_layer(layer, hidden, kw)
    for g in groups:
        _solve_group(g, lins, _hessian(acc[g[0]]), gptq, stats)


@torch.no_grad()
def _quantize_weights(layer, hidden, kw, gptq: GPTQ | None, clip_amax: dict, stats: dict,
                      heads: int = 1, notes: set | None = None, arch=None) -> list[torch.Tensor] | None:
    """Quantize the layer's weights. Returns the quantized layer's outputs when they came for free
    (one-pass GPTQ), else None. `arch`: the model's adapter (core.arch), whose projection groups GPTQ
    shares Hessians over; without it the groups are traced."""
    lins = {n: m for n, m in layer.named_modules() if _weight_quantizer(m) is not None}
    if gptq is not None and lins:
        groups, once = linear_groups(layer, hidden, kw, lins, arch)
        if gptq.one_pass:
            gib = one_pass_gib(lins, hidden, heads)
            if _SHARDED.get():   # every rank must take the same path (they all-reduce the same Hessians in turn)
                gib = float(dist.all_reduce(torch.tensor([gib], dtype=torch.float64), "max").item())
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
        if id(m) in clip_amax:
            w = m.weight.data.float()
            qp = alg.weight_qparams(w, q.fmt, _grid_method(m), amax=clip_amax[id(m)])
            finish_weight(m, fake_quantize(w, q.fmt, qp), qp)
        else:
            kwargs = {"percentile": q.cfg.percentile} if q.cfg.method == "percentile" else {}
            finish_weight(m, *alg.round_to_nearest(m.weight.data, q.fmt, q.cfg.method, **kwargs))


def finish_weight(m: nn.Module, wq: torch.Tensor, qp) -> None:
    """Store the quantized weight values and keep their parameters on the quantizer. The parameter takes the new
    tensor's storage instead of copying into its own: a weight loaded from safetensors lives in a private file mapping,
    and writing it page by page cost 0.9 s of the 1.1 s round-to-nearest took on SmolLM2."""
    m.weight.data = wq.detach().to(m.weight.dtype).reshape(m.weight.shape).contiguous()
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


# ----------------------------------------------------------------------------- registered steps


def _maps(step: LayerStep) -> list[SharedInput]:
    """The layer's shared-input mappings, traced once per layer for SmoothQuant and AWQ."""
    if "maps" not in step.state:
        step.state["maps"] = find_mappings(step.layer, step.hidden[0], step.kw)
    return step.state["maps"]


@register("smoothquant")
def smoothquant_step(step: LayerStep, a: SmoothQuant) -> None:
    _smooth(step, _maps(step), a)


@register("awq")
def awq_step(step: LayerStep, a: AWQ) -> None:
    _awq(step.layer, step.hidden, step.kw, _maps(step), a, step.state.setdefault("clip_amax", {}),
         step.state.setdefault("input_scale", {}))


@register("rtn")
@register("gptq")
def weights_step(step: LayerStep, gptq: GPTQ | None) -> None:
    """GPTQ weights (round to nearest, within AWQ's clipping ranges if any, when ``gptq`` is None)."""
    step.state["gptq"] = gptq
    step.out = _quantize_weights(step.layer, step.hidden, step.kw, gptq, step.state.get("clip_amax", {}),
                                 step.stats.setdefault("gptq_error", {}), step.heads, step.notes, step.arch)


@register("activation_ranges")
def activation_ranges_step(step: LayerStep, _=None) -> None:
    """Static activation / KV ranges of the layer, then (sequential calibration) its quantized outputs, the next
    layer's inputs. Calibrating on float activations, a Linear input's ``max`` range is the float forward's
    per-channel maxima divided by the smoothing factors (no forward); other static ranges take a calibration pass."""
    static = _static_act_quantizers(step.layer)
    if not step.sequential:
        for m in step.layer.modules():
            q = getattr(m, "input_quantizer", None)
            if q is not None and q in static and q.cfg.method == "max" and (a := _input_absmax(step, m)) is not None:
                q.amax, q.mode = a.amax().float(), "quant"
        static = [q for q in static if q.amax is None]
    _calibrate_static(static, step.run)
    if step.sequential and (step.out is None or static):
        with _forward_dtype(None if static else step.state.get("gptq"), step.hidden):
            step.out = [x.to(step.hidden[0].dtype) for x in step.run()]


def needs_data(resolved: dict, config: QuantConfig) -> bool:
    """True when the config has algorithms or static (calibrated) activation / KV ranges."""
    static = any(not n.endswith(".weight_quantizer") and not qc.dynamic for n, qc in resolved.items())
    return bool(config.algorithms) or static


@torch.no_grad()
def calibrate(model: nn.Module, config: QuantConfig, ids: torch.Tensor | None, progress: bool = True, offload=None) -> dict:
    """Quantize every enabled weight and calibrate every static activation range, layer by layer
    (the steps registered above, on the core's block-by-block engine; ``offload``: a
    ``core.offload.BlockOffload`` for a meta-device skeleton, see ``quantization.offload``)."""
    stats: dict = {}
    t0 = time.perf_counter()
    # Weights and static activation quantizers pass through until their layer is processed.
    waiting = _static_act_quantizers(model)
    for q in model.modules():
        if isinstance(q, TensorQuantizer) and q.enabled and (q.role == "weight" or q in waiting):
            q.mode = "off"
    world = dist.world()
    sharded = (world.parallel and ids is not None and bool(config.algorithms)
               and all(isinstance(a, GPTQ) for a in config.algorithms) and not waiting)
    if sharded:
        # Data-parallel GPTQ: this rank's share of the rows, Hessians all-reduced before each solve. The
        # searches of AWQ and SmoothQuant and static ranges do not add up over shares, so with them every
        # process calibrates on every row (the same result everywhere, no speed-up).
        if ids.shape[0] < world.size:
            raise LeanLMError(f"{ids.shape[0]} calibration samples cannot be shared by {world.size} processes; "
                              f"pass at least {world.size} (--samples) or use fewer processes")
        ids = ids[world.rank :: world.size]
    _SHARDED.set(sharded)   # this run's mode (every calibrate() sets it)
    progress = progress and world.main
    if ids is not None:
        algos = {type(a): a for a in config.algorithms}
        steps = [(name, algos[t]) for t, name in ((SmoothQuant, "smoothquant"), (AWQ, "awq")) if t in algos]
        if AutoRound in algos and GPTQ in algos:
            raise LeanLMError("AutoRound and GPTQ both round the weights; use one of them (AWQ or SmoothQuant can precede either)")
        if AutoRound in algos:
            from . import autoround  # noqa: F401  (registers the "autoround" step)

            steps.append(("autoround", algos[AutoRound]))
        steps += [("gptq", algos[GPTQ]) if GPTQ in algos else ("rtn", None), ("activation_ranges", None)]
        stats = calibrate_blocks(model, ids, steps, batch=config.calib_batch, progress=progress, offload=offload,
                                 sequential=config.sequential).get("gptq_error", {})
    # Modules outside the decoder stack (e.g. a quantized lm_head): round-to-nearest weights, and static
    # activation ranges from a forward pass.
    for m in model.modules():
        q = _weight_quantizer(m)
        if q is not None:
            finish_weight(m, *alg.round_to_nearest(m.weight.data, q.fmt, q.cfg.method))
    rest = _static_act_quantizers(model)
    if rest:
        if ids is None:
            raise LeanLMError("static activation quantizers need calibration data; pass calib_data or a tokenizer")
        def forward():
            for i in range(0, min(ids.shape[0], 4 * config.calib_batch), config.calib_batch):
                model(ids[i : i + config.calib_batch], use_cache=False)

        _calibrate_static(rest, forward)
    return {"seconds": time.perf_counter() - t0, "gptq_error": stats}
