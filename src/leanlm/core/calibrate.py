"""The block-by-block calibration engine, and the registry of algorithms that run on it.

``calibrate_blocks(model, ids, steps)`` captures the hidden states entering the first decoder layer
for the calibration rows, then for each decoder layer in order hands a ``LayerStep`` (the layer,
its inputs, its keyword arguments) to each named algorithm of ``steps`` in turn, and feeds the
layer's outputs (computed after the algorithms changed it) to the next layer. Peak memory stays near
one layer plus the calibration activations. With ``sequential=False`` every layer is instead calibrated
on the float model's activations: one forward of the unchanged layer records each Linear's per-channel
input maxima (``LayerStep.input_absmax``) and its outputs, which feed the next layer.

Algorithms register themselves by name with ``@register("name")``: a function
``fn(step: LayerStep, config) -> None`` that reads the layer's inputs with the helpers here (input
hooks, ``solve_in_forward``, ``linear_groups``, ``find_mappings``) and changes the layer in place.
GPTQ, RTN, AWQ, SmoothQuant and static activation ranges register in ``leanlm.quantization.calibrate``,
SparseGPT and Wanda in ``leanlm.sparsity.api``; the core imports none of them.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .arch import Arch, arch_or_none
from .errors import LeanLMError
from .modules import decoder_layers


class _Stop(Exception):
    pass


@dataclass
class SharedInput:
    """Linears that read the same input, and the module whose output that input is."""

    prev: nn.Module
    prev_is_norm: bool
    norm_offset: float
    linears: list[nn.Module]


def _first(o):
    return o[0] if isinstance(o, (tuple, list)) else o


def check_finite(t: torch.Tensor, where: str) -> None:
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
        check_finite(x, "entering the first layer")
    return hidden, kwargs


def run_layer(layer: nn.Module, hidden: list[torch.Tensor], kw: dict) -> list[torch.Tensor]:
    return [_first(layer(x, **kw)) for x in hidden]


@torch.no_grad()
def solve_in_forward(layer, hidden, kw, firsts: dict[str, nn.Module], solve) -> list[torch.Tensor]:
    """One forward of the layer over all calibration rows as one batch; ``solve(name, x)`` runs in a
    pre-hook on each module of ``firsts`` with its whole input ``x``, before that module runs. A
    solve that changes weights (GPTQ's one-pass mode; SparseGPT and Wanda) is therefore seen by
    every later module, and the returned outputs are the changed layer's (the next layer's inputs)."""
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


@torch.no_grad()
def observe_inputs(layer: nn.Module, hidden: list[torch.Tensor], kw: dict) -> tuple[list[torch.Tensor], dict[nn.Module, torch.Tensor]]:
    """One forward of the layer as it is: its outputs, and each Linear's per-channel maximum |x| over every
    calibration row (float32 [in_features]); an input read by several Linears (q/k/v) is reduced once."""
    absmax: dict[nn.Module, torch.Tensor] = {}
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}   # id -> (input, its maxima); holding the input keeps its id unique

    def pre(mod, args):
        x = args[0]
        hit = seen.get(id(x))
        if hit is None:
            hit = seen[id(x)] = (x, x.detach().reshape(-1, x.shape[-1]).abs().amax(0).float())
        prev = absmax.get(mod)
        absmax[mod] = hit[1] if prev is None else torch.maximum(prev, hit[1])

    hooks = [m.register_forward_pre_hook(pre) for m in layer.modules() if isinstance(m, nn.Linear)]
    out = []
    try:
        for x in hidden:
            out.append(_first(layer(x, **kw)))
            seen.clear()
    finally:
        for h in hooks:
            h.remove()
    return out, absmax


@contextlib.contextmanager
def input_hooks(modules: dict[str, nn.Module], fn):
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
def find_mappings(layer: nn.Module, x: torch.Tensor, kw: dict) -> list[SharedInput]:
    """Which norm feeds which linears (found by tensor identity in one forward), plus up_proj -> down_proj."""
    linears = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
    norms = [m for m in layer.modules() if m is not layer and not isinstance(m, nn.Linear)
             and isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() == 1]
    feeds, made_by = _trace_inputs(layer, x, kw, norms)
    maps = []
    for tid, names in feeds.items():
        if tid in made_by:
            norm = made_by[tid]
            maps.append(SharedInput(norm, True, _norm_offset(norm), [linears[n] for n in names]))
    for n, m in linears.items():
        if n.endswith("up_proj"):
            down = linears.get(n[: -len("up_proj")] + "down_proj")
            # a down_proj whose input is transformed at run time (an online rotation) has no channel-wise link to up_proj
            if down is not None and down.in_features == m.out_features and getattr(down, "input_transform", None) is None:
                maps.append(SharedInput(m, False, 0.0, [down]))
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


def linear_groups(layer, hidden, kw, lins: dict[str, nn.Module], arch: Arch | None = None) -> tuple[list[list[str]], bool]:
    """The Linears ``lins`` grouped by the input tensor they read (q/k/v, gate/up), in call order, and
    whether every one of them is called exactly once per forward (GPTQ, SparseGPT and Wanda share a
    group's input statistics). A known family's groups come from its adapter (`arch`); others are traced."""
    if arch is not None:
        named = {n for g in arch.groups for n in g}
        groups = [[n for n in g if n in lins] for g in arch.groups] + [[n] for n in lins if n not in named]
        return [g for g in groups if g], True
    feeds, _ = _trace_inputs(layer, hidden[0], kw)
    calls = Counter(n for names in feeds.values() for n in names)
    # A Linear called more than once (or not at all in the traced row, e.g. an unrouted expert)
    # keeps a Hessian of its own over every call.
    groups = [[n for n in names if n in lins and calls[n] == 1] for names in feeds.values()]
    groups = [g for g in groups if g] + [[n] for n in lins if calls[n] != 1]
    return groups, all(calls[n] == 1 for n in lins)


def one_pass_gib(lins: dict[str, nn.Module], hidden: list[torch.Tensor], heads: int) -> float:
    """Rough peak activation memory of one layer's forward over all rows at once: every Linear's
    output plus a few hidden-sized tensors and one attention score matrix."""
    rows = sum(h.shape[0] for h in hidden)
    seq, width = hidden[0].shape[1], hidden[0].shape[-1]
    per_token = sum(m.out_features for m in lins.values()) + 4 * width
    return 4 * (rows * seq * per_token + rows * heads * seq * seq) / 2**30


# ----------------------------------------------------------------------------- engine and registry


@dataclass
class LayerStep:
    """One decoder layer during calibration, handed to each algorithm of the run in turn.

    hidden: the layer's inputs (the outputs of the already-processed layers before it), one tensor
    per mini-batch; kw: the layer's keyword arguments (masks, rotary embeddings). An algorithm that
    computes the changed layer's outputs anyway (a one-pass solve) stores them in ``out``; otherwise
    the engine runs the layer once more after the last algorithm. ``state`` is shared by the
    algorithms of this layer (e.g. AWQ's clipping ranges for the weight solver), ``stats`` and
    ``notes`` by the whole run (figures to report; messages already printed). ``sequential`` False: the
    engine calibrates on float activations; ``input_absmax`` then holds each Linear's per-channel input
    maxima in the unchanged layer (``observe_inputs``), and the layer's float outputs feed the next layer
    whatever ``out`` holds.
    """

    index: int
    layer: nn.Module
    hidden: list[torch.Tensor]
    kw: dict
    model: nn.Module
    stats: dict
    notes: set
    state: dict = field(default_factory=dict)
    out: list[torch.Tensor] | None = None
    sequential: bool = True
    input_absmax: dict[nn.Module, torch.Tensor] | None = None

    def run(self) -> list[torch.Tensor]:
        """The layer's outputs for every mini-batch, as the layer is now."""
        return run_layer(self.layer, self.hidden, self.kw)

    @property
    def arch(self) -> Arch | None:
        """The model's architecture adapter, None for a family it does not know."""
        return arch_or_none(self.model)

    @property
    def heads(self) -> int:
        return getattr(getattr(self.model, "config", None), "num_attention_heads", 1) or 1

    def note(self, message: str) -> None:
        """Print a message once per run."""
        if message not in self.notes:
            self.notes.add(message)
            tqdm.write(f"leanlm: {message}")


CALIBRATION_ALGORITHMS: dict[str, Callable[[LayerStep, Any], None]] = {}


def register(name: str):
    """Decorator registering ``fn(step: LayerStep, config)`` as the calibration algorithm ``name``."""
    def deco(fn):
        CALIBRATION_ALGORITHMS[name] = fn
        return fn
    return deco


def calib_batch(n_rows: int, batch: int) -> int:
    """The largest mini-batch size <= ``batch`` that divides the number of calibration rows."""
    return max(d for d in range(1, min(batch, n_rows) + 1) if n_rows % d == 0)


@torch.no_grad()
def calibrate_blocks(model: nn.Module, ids: torch.Tensor, steps: Sequence[tuple[str, Any]], *, batch: int = 1,
                     progress: bool = True, desc: str = "calibrating layers", offload=None, sequential: bool = True) -> dict:
    """Run the registered algorithms ``steps`` (``(name, config)`` pairs, in order) on every decoder
    layer of ``model``, block by block over the calibration token ids ``ids`` [N, L] in mini-batches
    of at most ``batch`` rows. Returns the run's ``stats`` dict the algorithms filled.

    ``sequential``: True, each layer sees the outputs of the layers before it as the algorithms left them
    (llm-compressor's sequential pipeline); False, it sees the float model's (ModelOpt's convention): one
    forward of each unchanged layer gives ``LayerStep.input_absmax`` and the next layer's inputs.

    ``offload`` (a ``core.offload.BlockOffload``): ``model`` is a skeleton on the meta device; each block
    is loaded before its algorithms run and written out and freed after (finished blocks of an
    interrupted run are skipped), then the parameters outside the layers are loaded."""
    unknown = [n for n, _ in steps if n not in CALIBRATION_ALGORITHMS]
    if unknown:
        raise LeanLMError(f"unknown calibration algorithm {unknown[0]!r}; registered: {', '.join(sorted(CALIBRATION_ALGORITHMS))}")
    layers = decoder_layers(model)
    if offload is None:
        hidden, kws = capture_layer_inputs(model, layers, ids, calib_batch(ids.shape[0], batch))
        start = 0
    else:
        hidden, kws, start = offload.capture(layers, ids, calib_batch(ids.shape[0], batch))
    stats: dict = {}
    notes: set = set()
    for i, layer in tqdm(list(enumerate(layers))[start:], desc=desc, unit="layer", disable=not progress):
        if offload is not None:
            offload.load(i, layer)
        step = LayerStep(i, layer, hidden, kws[i], model, stats, notes, sequential=sequential)
        if not sequential:
            float_out, step.input_absmax = observe_inputs(layer, hidden, kws[i])
        for name, cfg in steps:
            CALIBRATION_ALGORITHMS[name](step, cfg)
        if not sequential:
            hidden = float_out
        else:   # the changed layer's outputs feed the next layer
            hidden = step.out if step.out is not None else step.run()
        for x in hidden:
            check_finite(x, f"after layer {i}")
        if offload is not None:
            del step
            offload.finish_block(i, layer, hidden)
    if offload is not None:
        offload.load_rest()
    return stats
