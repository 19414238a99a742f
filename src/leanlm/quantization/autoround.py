"""AutoRound: learned rounding and clipping by signed gradient descent, block by block.

Cheng et al. 2023, "Optimize Weight Rounding via Signed Gradient Descent for the Quantization of
LLMs" (arXiv:2309.05516). For every quantized Linear of a decoder layer, a rounding offset ``V`` in
[-0.5, 0.5] per weight (in units of its group's scale) and clipping factors per scale cell
(``alpha`` on the maximum, ``beta`` on the minimum of asymmetric grids, in [``min_clip``, 1]) are
trained together so that the quantized layer's output matches the float layer's output on the
calibration rows; each step moves every parameter by ``lr`` times the sign of its gradient (signed
SGD, lr decaying linearly to 0) and the parameters of the step with the lowest loss are kept (``keep="best"``,
the paper's choice) or those of the last step (``keep="last"``). The
weights are then fixed on the grid: ``Q(w + V * s)`` with the scales of the learned clip, so the
stored model is an ordinary quantized model (no extra parameters at inference).

Rounding goes through ``formats.fake_quantize_with(ste=True)`` (straight-through rounding), so any
weight format works; clipping is learned for the formats whose scale is ``amax / qmax`` (int, fp8,
nf4), while nvfp4 / MX scales (rounded to E4M3 / powers of two) keep their max-based ranges and only
``V`` is trained. After AWQ (``[AWQ(), AutoRound()]``) the scaled weights are trained and the
clip factors start from AWQ's clipping search instead of 1. ``AutoRound(full_range=True)`` (or a quantizer
with the ``full`` range method) trains symmetric int scales on the full-range grid, the group's signed extreme
on code -2**(n-1), as the reference implementation does (``algorithms.weight_qparams``). A sparsified Linear's ``weight_mask``
zeros stay exactly 0 and its ranges come from the kept weights only.

With activation quantization (W4A8, NVFP4 W4A4), training sees the layer's dynamic activation
quantizers, with straight-through gradients, while the targets are computed with them off: the
rounding learns to make up for the activation error as well as its own. Static activation ranges
are calibrated after the weights and pass through while AutoRound trains.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.func import functional_call

from ..core.calibrate import LayerStep, register, run_layer
from .calibrate import _grid_method, _weight_quantizer, finish_weight
from .config import AutoRound
from .algorithms import full_range_scale
from .formats import QParams, _grouped, compute_qparams, fake_quantize_with
from .modules import TensorQuantizer

__all__ = ["autoround_step", "RoundingParams"]


class RoundingParams(nn.Module):
    """The trainable rounding offset and clip factors of one Linear's weight, and its quantized value."""

    def __init__(self, w: torch.Tensor, fmt, mask: torch.Tensor | None, learn_clip: bool,
                 init_amax: torch.Tensor | None = None, full_range: bool = False, init_full: bool = False):
        super().__init__()
        self.fmt = fmt
        self.shape = w.shape
        wk = w.float() if mask is None else w.float() * mask
        self.register_buffer("wg", _grouped(w.float(), fmt))
        self.register_buffer("keep", None if mask is None else _grouped(mask.float(), fmt))
        g = _grouped(wk, fmt)
        red = (lambda t, op: getattr(torch, op)(t, dim=-1, keepdim=True)) if fmt.granularity != "tensor" else (
            lambda t, op: getattr(torch, op)(t))
        self.asym = fmt.kind == "int" and not fmt.symmetric
        if self.asym:
            self.register_buffer("lo", red(g, "amin").clamp(max=0))
            self.register_buffer("hi", red(g, "amax").clamp(min=0))
        else:
            self.register_buffer("amax", red(g.abs(), "amax"))
        self.learn_clip = learn_clip and fmt.spec.scale in ("f16", "f32")
        # full_range (symmetric ints): scale = -(signed extreme) * alpha / 2**(n-1), so the extreme sits on the extra
        # negative code at alpha = 1; alpha may reach 2**(n-1) / qmax, the amax / qmax grid. init_full: init_amax was
        # searched on the full-range grid (the quantizer's "full" range method), else on amax / qmax.
        self.full = full_range and self.learn_clip and fmt.kind == "int" and not self.asym
        self.top = (fmt.qmax + 1) / fmt.qmax if self.full else 1.0
        if self.full:
            self.register_buffer("positive", red(g, "amax") >= red(-g, "amax"))
        stat = (self.lo if self.asym else self.amax).shape
        self.V = nn.Parameter(torch.zeros_like(self.wg))
        self.alpha = nn.Parameter(torch.ones(stat, device=w.device), requires_grad=self.learn_clip)
        self.beta = nn.Parameter(torch.ones(stat, device=w.device), requires_grad=self.learn_clip and self.asym)
        if not self.learn_clip:  # nvfp4 / MX: the format's own max-based scales, fixed
            self.fixed = compute_qparams(wk, fmt)
        elif init_amax is not None:  # start from a clipping search's ranges (AWQ's clip: AWQ + AutoRound)
            a = init_amax.detach().float().to(w.device).abs().reshape(stat)
            with torch.no_grad():
                if self.asym:
                    self.alpha.copy_(torch.where(self.hi > 0, torch.minimum(self.hi, a) / self.hi.clamp(min=1e-12), 1.0))
                    self.beta.copy_(torch.where(self.lo < 0, torch.maximum(self.lo, -a) / self.lo.clamp(max=-1e-12), 1.0))
                else:  # the same scale magnitude as the search's grid: a / qmax, or a / 2**(n-1) (init_full)
                    r = a / self.amax.clamp(min=1e-12) * (1.0 if init_full or not self.full else self.top)
                    self.alpha.copy_(torch.where(self.amax > 0, r, 1.0).clamp(max=self.top))

    def qparams(self) -> QParams:
        """The current scales (differentiable in alpha / beta for amax / qmax formats)."""
        if not self.learn_clip:
            return self.fixed
        q = self.fmt.qmax
        if self.asym:
            lo, hi = self.lo * self.beta, self.hi * self.alpha
            qmax = 2**self.fmt.bits - 1
            scale = hi - lo
            scale = torch.where(scale == 0, torch.ones_like(scale), scale / qmax)
            zero = torch.round(-lo.detach() / scale.detach()).clamp(0, qmax)
            return QParams(scale=scale, zero=zero)
        a = self.amax * self.alpha
        if self.full:
            return QParams(scale=full_range_scale(a, self.positive, self.fmt))
        return QParams(scale=torch.where(a == 0, torch.ones_like(a), a / q))

    def forward(self) -> torch.Tensor:
        qp = self.qparams()
        s = qp.scale * qp.global_scale if self.fmt.kind == "nvfp4" else qp.scale
        x = self.wg + self.V * s.detach()
        wq = fake_quantize_with(x, self.fmt, qp.scale, qp.zero, qp.global_scale, ste=True)
        if self.keep is not None:
            wq = wq * self.keep
        return wq.reshape(self.shape)

    @torch.no_grad()
    def clamp_(self, min_clip: float) -> None:
        self.V.clamp_(-0.5, 0.5)
        self.alpha.clamp_(min_clip, self.top)
        self.beta.clamp_(min_clip, 1.0)


def _layer_output(layer, weights: dict, x: torch.Tensor, kw: dict) -> torch.Tensor:
    out = functional_call(layer, weights, (x,), kw, strict=False)
    return out[0] if isinstance(out, (tuple, list)) else out


_FLOAT_STREAM = "autoround_float_stream"


def _act_quantizers(layer: nn.Module) -> list[TensorQuantizer]:
    """The layer's enabled activation / KV quantizers that quantize during calibration (dynamic ones:
    static ranges are calibrated after the weights, so they pass through while AutoRound runs)."""
    return [q for q in layer.modules() if isinstance(q, TensorQuantizer) and q.enabled and q.role != "weight"
            and q.mode == "quant" and not q.folded]


@contextlib.contextmanager
def _acts(layer: nn.Module, *, off: bool = False, ste: bool = False):
    """Activation quantizers of ``layer`` switched off (the float model's targets), or quantizing with
    straight-through gradients (training sees what will run, and gradients still reach the Linears
    before them: o_proj's input quantizer would otherwise stop every gradient to q/k/v)."""
    qs = _act_quantizers(layer)
    saved = [(q.mode, q.ste) for q in qs]
    for q in qs:
        if off:
            q.mode = "off"
        if ste:
            q.ste = True
    try:
        yield qs
    finally:
        for q, (mode, st) in zip(qs, saved):
            q.mode, q.ste = mode, st


def _float_targets(step: LayerStep) -> list[torch.Tensor]:
    """The float model's outputs of this layer (its still-float weights on the float model's inputs),
    kept in the run's ``stats`` from layer to layer as a second, float stream of hidden states beside
    the quantized one (the reference AutoRound's "quantized inputs, float targets": each layer also
    learns to undo the error the layers before it left). The first layer, or a layer whose predecessor
    left no float stream (a resumed run), starts it from its own inputs."""
    prev = step.stats.get(_FLOAT_STREAM)
    x = prev[1] if prev is not None and prev[0] == step.index - 1 else step.hidden
    with _acts(step.layer, off=True):
        y = run_layer(step.layer, x, step.kw)
    step.stats[_FLOAT_STREAM] = (step.index, y)
    return y


@register("autoround")
def autoround_step(step: LayerStep, cfg: AutoRound) -> None:
    """Train V / alpha / beta of every quantized Linear of ``step.layer`` against its float outputs,
    then store the rounded weights (``finish_weight``)."""
    layer = step.layer
    lins = {n: m for n, m in layer.named_modules() if _weight_quantizer(m) is not None}
    with torch.no_grad():
        y_float = _float_targets(step) if cfg.float_targets else None
    if not lins:
        return
    dev = step.hidden[0].device
    x_all = torch.cat(step.hidden)
    with torch.no_grad():
        # The targets: the float model's outputs (float_targets), else the float layer's outputs on
        # this layer's (quantized-stream) inputs; activations unquantized in both.
        if y_float is None:
            with _acts(layer, off=True):
                y_float = step.run()
        y_all = torch.cat(y_float).float()
    clip_amax = step.state.get("clip_amax", {})  # AWQ's clipping ranges, when AWQ ran first: the starting clip
    full = {n: _grid_method(m) == "full" for n, m in lins.items()}   # the grid AWQ's clip search used
    params = {n: RoundingParams(m.weight.data, _weight_quantizer(m).fmt, getattr(m, "weight_mask", None), cfg.clip,
                                clip_amax.get(id(m)), cfg.full_range or full[n], full[n])
              for n, m in lins.items()}
    trainable = [p for rp in params.values() for p in rp.parameters() if p.requires_grad]
    frozen = [p for p in layer.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed + step.index)
    n_rows = x_all.shape[0]
    bs = min(cfg.batch, n_rows)
    lr0 = cfg.lr if cfg.lr is not None else 1.0 / cfg.iters
    best_loss, best, first_loss = float("inf"), None, None
    try:
        with torch.enable_grad(), _acts(layer, ste=True), torch.autocast(dev.type, dtype=torch.bfloat16,
                                                                           enabled=cfg.train_dtype == "bfloat16"):
            for it in range(cfg.iters):
                idx = torch.randperm(n_rows, generator=gen)[:bs].to(dev)
                weights = {f"{n}.weight": rp() for n, rp in params.items()}
                out = _layer_output(layer, weights, x_all[idx], step.kw)
                loss = (out.float() - y_all[idx]).pow(2).mean()
                lv = loss.item()
                if first_loss is None:
                    first_loss = lv
                if lv < best_loss:
                    best_loss = lv
                    if cfg.keep == "best":
                        best = [p.detach().clone() for p in trainable]
                grads = torch.autograd.grad(loss, trainable, allow_unused=True)
                lr = lr0 * (1 - it / cfg.iters)
                with torch.no_grad():
                    for p, g in zip(trainable, grads):
                        if g is not None:
                            p.sub_(lr * g.sign())
                    for rp in params.values():
                        rp.clamp_(cfg.min_clip)
    finally:
        for p in frozen:
            p.requires_grad_(True)
    with torch.no_grad():
        if best is not None:
            for p, b in zip(trainable, best):
                p.copy_(b)
        for n, m in lins.items():
            rp = params[n]
            qp = rp.qparams()
            qp = QParams(qp.scale.detach(), None if qp.zero is None else qp.zero.detach(),
                         None if qp.global_scale is None else qp.global_scale.detach())
            finish_weight(m, rp().detach(), qp)
    step.stats.setdefault("autoround", {})[step.index] = {"first_loss": first_loss, "best_loss": best_loss}

