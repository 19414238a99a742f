"""Mixed precision: choose a format per linear layer under a budget, in one calibration pass and one solve.

Sensitivity is a second-order estimate of the calibration loss increase when only layer l is quantized
to format f: with y = x W^T the layer's output and g = dL/dy its gradient (next-token loss on the
calibration text), s(l, f) = sum over tokens and output channels of g^2 * (x dW_f^T)^2, where
dW_f = Q_f(W) - W is the error the calibration algorithm will leave: round to nearest for rtn and gptq, and
for awq the layer's own AWQ scale and clipping search (on its first probe rows, a coarser grid) before
rounding. AWQ shrinks int4's error most where activations have outliers, so scoring it by round to nearest
spends the budget's int8 layers where AWQ would have fixed int4 anyway (bench/results/mixed_awq*.md).
This is the diagonal Fisher of the loss in the layer's output space
(the empirical Fisher approximates the loss Hessian; HAWQ, Dong et al. 2019, uses the Hessian the same
way, and SqueezeLLM, Kim et al. 2023, the Fisher diagonal). One forward and one backward of the model
give every g; each format costs one extra matmul per layer, so the whole search costs a few forwards
where measuring each (layer, format) pair's KL would cost one full forward each.

The choice minimises the summed sensitivity (effects assumed additive) subject to a budget, an exact
0/1 integer program solved with `scipy.optimize.milp` (HiGHS branch and bound). The cost of a layer in
a format (`layer_costs`, also used by `leanlm optimize`) is its bits per weight, the bytes the leanlm
runtime stores for it, or its measured batch-1 matmul time on this machine as the runtime packs it.
"""

from __future__ import annotations

import fnmatch
import statistics
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..core.errors import LeanLMError
from . import algorithms as alg
from .config import AWQ, GPTQ, QuantConfig, QuantizerConfig
from .formats import fake_quantize, parse_format

COSTS = ("bits", "bytes", "latency")
ALGORITHMS = {"awq": AWQ, "gptq": GPTQ, "rtn": None}
MENU = ("int3_g64", "int4_g64", "int4_g32", "int8")
SENSITIVITY_AWQ = AWQ(grid=10, clip_grid=10, samples=512, clip_samples=512)  # the estimate's AWQ: half the grid, one probe row
DENSE = {"bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass
class MixedPrecisionResult:
    choice: dict[str, str]                    # linear name -> format
    average_bits: float                       # over the chosen layers, scale overhead included
    budget: float
    cost: str = "bits"
    spent: float = 0.0                        # the chosen formats' total cost, in the budget's unit
    limit: float = 0.0                        # the budget in that unit (bits or bytes per weight x weights, or microseconds)
    sensitivity: dict[str, dict[str, float]] = field(default_factory=dict)  # name -> format -> loss-increase estimate
    seconds: dict[str, float] = field(default_factory=dict)                   # wall time of: costs, sensitivity, solve
    cpu_seconds: dict[str, float] = field(default_factory=dict)               # the process's CPU time of each (all threads)

    def config(self, algorithms=None, extra_rules=None) -> QuantConfig:
        """A QuantConfig with one exact rule per layer (ready for `quantize`, e.g. with AWQ())."""
        rules = [(f"{n}.weight_quantizer", QuantizerConfig(f)) for n, f in self.choice.items()]
        return QuantConfig(rules + list(extra_rules or []), list(algorithms or []))


# ----------------------------------------------------------------------------- cost model


def _packed(shape: tuple[int, int], fmt: str, dtype: torch.dtype):
    """A random [out, in] weight packed in `fmt` exactly as the leanlm runtime packs a layer in that format
    (a format without a fast kernel falls back to dense `dtype`, as `--allow-fallback` runs it)."""
    from ..runtime.layouts import pack_linear, pack_weight
    from .modules import TensorQuantizer

    w = torch.randn(shape) * 0.02
    if fmt in DENSE:
        return pack_weight(w, fmt, dtype)
    lin = nn.Linear(shape[1], shape[0], bias=False)
    lin.weight.data.copy_(w)
    lin.weight_quantizer = TensorQuantizer(QuantizerConfig(fmt), role="weight")
    return pack_linear(lin, None, dtype, allow_fallback=True)


def format_costs(shape: tuple[int, int], formats: tuple[str, ...], calls: int = 50, rounds: int = 5,
                 dtype: torch.dtype = torch.bfloat16) -> dict[str, dict]:
    """Measured cost on this machine of one [out, in] weight in each format (a quantization format name, or
    bf16 / fp32 for dense), packed as the leanlm runtime packs it: microseconds per batch-1 matmul (median
    of `rounds` rounds of `calls`, formats interleaved), bytes per weight (scales included) and whether the
    runtime had to fall back to dense weights (`rounds=0`: bytes only, nothing timed). The one cost model of
    mixed precision and `leanlm optimize`."""
    packed = {f: _packed(tuple(shape), f, dtype) for f in formats}
    x = torch.randn(1, shape[1], dtype=dtype)
    times: dict[str, list[float]] = {f: [] for f in formats}
    with torch.inference_mode():
        for f in formats if rounds else ():
            packed[f](x)
        for _ in range(rounds):
            for f in formats:
                t = time.perf_counter()
                for _ in range(calls):
                    packed[f](x)
                times[f].append((time.perf_counter() - t) / calls * 1e6)
    out = {}
    for f in formats:
        nbytes = sum(b.numel() * b.element_size() for b in list(packed[f].buffers()) + list(packed[f].parameters()))
        out[f] = {"us_per_call": statistics.median(times[f]) if rounds else None, "bytes_per_weight": nbytes / (shape[0] * shape[1]),
                  "shape": list(shape), "fallback": bool(getattr(packed[f], "fallback", None))}
    return out


def layer_costs(shapes: dict[str, tuple[int, int]], menu: tuple[str, ...], cost: str = "bits", progress: bool = False,
                calls: int = 50) -> dict[str, dict[str, float]]:
    """Cost of each layer (name -> [out, in]) in each menu format: total bits (`bits`: the format's bits per
    weight, scales included), total runtime bytes (`bytes`) or measured microseconds per batch-1 matmul
    (`latency`, once per distinct shape)."""
    if cost not in COSTS:
        raise LeanLMError(f"unknown cost {cost!r}; choose one of: {', '.join(COSTS)}")
    if cost == "bits":
        return {n: {f: parse_format(f).bits_per_weight(s[1]) * s[0] * s[1] for f in menu} for n, s in shapes.items()}
    uniq = sorted(set(map(tuple, shapes.values())))
    per = {s: format_costs(s, menu, calls=calls, rounds=5 if cost == "latency" else 0)
           for s in tqdm(uniq, desc=f"{cost} per format", unit="shape", disable=not progress)}
    if cost == "bytes":
        return {n: {f: per[tuple(s)][f]["bytes_per_weight"] * s[0] * s[1] for f in menu} for n, s in shapes.items()}
    return {n: {f: per[tuple(s)][f]["us_per_call"] for f in menu} for n, s in shapes.items()}


def _budget_limit(shapes, bits, costs, budget: float, cost: str) -> float:
    """The budget in cost units. bits: `budget` bits per weight; bytes: `budget` / 8 bytes per weight as the
    runtime stores them; latency: per layer, the time of a `budget`-bit layer if time grew linearly with bits
    between the two menu formats around `budget` (e.g. int4_g64 plus 1/16 of the int8 - int4 difference at 4.5)."""
    n_weights = sum(s[0] * s[1] for s in shapes.values())
    if cost == "bits":
        return budget * n_weights
    if cost == "bytes":
        return budget / 8 * n_weights
    total = 0.0
    for n in shapes:
        pts = sorted((bits[n][f] / (shapes[n][0] * shapes[n][1]), costs[n][f]) for f in costs[n])
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        total += float(np.interp(budget, xs, ys))
    return total


# ----------------------------------------------------------------------------- sensitivity


def _linears(model: nn.Module, include: str, exclude: tuple[str, ...]) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and fnmatch.fnmatchcase(n, include)
            and not any(fnmatch.fnmatchcase(n, e) for e in exclude)}


@torch.no_grad()
def format_error(w: torch.Tensor, x: torch.Tensor, fmt, algorithm: str = "rtn") -> torch.Tensor:
    """Q(W) - W for `w` [out, in] in `fmt`: round to nearest (`rtn`, and `gptq`, whose error feedback the
    estimate does not model), or after AWQ's scale and clip search on inputs `x` [n, in] (`awq`, with
    `SENSITIVITY_AWQ`'s grids; the scale is searched per layer, where AWQ shares it between the layers
    reading one input)."""
    fmt = parse_format(fmt)
    w = w.detach().float()
    if algorithm != "awq":
        return fake_quantize(w, fmt) - w
    a = SENSITIVITY_AWQ
    s = alg.awq_search(x, [w], fmt, grid=a.grid, n_samples_max=a.samples)
    ws = w * s
    amax = alg.awq_clip(x, ws, fmt, grid=a.clip_grid, n_samples_max=a.clip_samples)
    return fake_quantize(ws, fmt, alg.weight_qparams(ws, fmt, "max", amax=amax)) / s - w


def fisher_sensitivity(model: nn.Module, calib_ids: torch.Tensor, lins: dict[str, nn.Linear], menu: tuple[str, ...],
                       batch: int = 1, progress: bool = True, dtype: str = "bfloat16",
                       algorithm: str = "rtn") -> dict[str, dict[str, float]]:
    """s[layer][format] = sum over calibration tokens of (dL/dy)^2 * (x dW^T)^2: the diagonal-Fisher estimate
    of the next-token loss increase when only that layer is rounded to that format. One forward and one
    backward per mini-batch of `batch` rows of `calib_ids` [N, L]; the parameters get no gradients.
    `dtype` bfloat16 (default) runs the forward, backward and the dW products under bfloat16 autocast (about
    3x faster on CPUs with bfloat16 matmuls; a sensitivity ranking needs no more precision), float32 exactly.
    `algorithm` (rtn, awq, gptq) sets dW: see `format_error`; awq's search reads each layer's first mini-batch."""
    if algorithm not in ALGORITHMS:
        raise LeanLMError(f"unknown mixed-precision algorithm {algorithm!r}; choose one of: {', '.join(ALGORITHMS)}")
    if dtype not in ("bfloat16", "float32"):
        raise LeanLMError(f"unknown sensitivity dtype {dtype!r}; choose bfloat16 or float32")
    dt = getattr(torch, dtype)
    fmts = [parse_format(f) for f in menu]
    sens = {n: {f: 0.0 for f in menu} for n in lins}
    stash: dict[str, torch.Tensor] = {}
    delta: dict[str, list[torch.Tensor]] = {}

    def fwd(n):
        def hook(mod, args, out):
            stash[n] = args[0].detach()
            if n not in delta:   # dW per format, computed once (from the first mini-batch) for all of them
                x = stash[n].float().reshape(-1, lins[n].in_features)
                with torch.autocast(x.device.type, enabled=False):
                    delta[n] = [format_error(lins[n].weight, x, f, algorithm).to(dt) for f in fmts]
            if out.requires_grad:
                out.register_hook(lambda g, n=n: _score(n, g))
        return hook

    def _score(n, g):
        x = stash.pop(n).to(dt).reshape(-1, lins[n].in_features)
        g2 = g.detach().float().reshape(-1, lins[n].out_features).square()
        for f, dw in zip(menu, delta[n]):
            sens[n][f] += float((g2 * (x @ dw.t()).float().square()).sum())

    emb = model.get_input_embeddings()
    grad_in = emb.register_forward_hook(lambda mod, args, out: out.requires_grad_())
    hooks = [grad_in] + [m.register_forward_hook(fwd(n)) for n, m in lins.items()]
    was = {p: p.requires_grad for p in model.parameters()}
    dev = next(model.parameters()).device
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        rows = range(0, calib_ids.shape[0], batch)
        for i in tqdm(rows, desc="layer sensitivity", unit="batch", disable=not progress):
            ids = calib_ids[i : i + batch].to(dev)
            with torch.enable_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
                logits = model(ids, use_cache=False).logits
                loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="sum")
                loss.backward()
            stash.clear()
    finally:
        for h in hooks:
            h.remove()
        for p, r in was.items():
            p.requires_grad_(r)
    missing = [n for n in lins if n not in delta]
    if missing:
        raise LeanLMError(f"{missing[0]} was never reached by the calibration forward; exclude it from the search")
    return sens


# ----------------------------------------------------------------------------- solve


def solve_choice(sens: dict[str, dict[str, float]], costs: dict[str, dict[str, float]], limit: float) -> dict[str, str]:
    """The format per layer minimising the summed sensitivity with the summed cost <= `limit`: an exact 0/1
    integer program (one binary per layer and format, one format per layer), solved by HiGHS."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    names = list(sens)
    pairs = [(n, f) for n in names for f in sens[n]]
    cheapest = sum(min(costs[n].values()) for n in names)
    if cheapest > limit * (1 + 1e-9):
        raise LeanLMError(f"the budget is below the cheapest choice of the menu ({cheapest / limit:.3f}x the budget); raise it or add a cheaper format")
    scale_c = max(abs(limit), 1e-30)
    scale_s = max(max(abs(v) for n in names for v in sens[n].values()), 1e-30)
    c = np.array([sens[n][f] / scale_s for n, f in pairs])
    a_cost = np.array([[costs[n][f] / scale_c for n, f in pairs]])
    a_one = np.zeros((len(names), len(pairs)))
    for j, (n, _) in enumerate(pairs):
        a_one[names.index(n), j] = 1
    res = milp(c, integrality=np.ones(len(pairs)), bounds=Bounds(0, 1),
               constraints=[LinearConstraint(a_cost, -np.inf, 1.0), LinearConstraint(a_one, 1, 1)],
               options={"mip_rel_gap": 0.0, "presolve": True})
    if res.x is None:
        raise LeanLMError(f"the mixed-precision solve found no choice within the budget ({res.message})")
    choice = {n: f for (n, f), v in zip(pairs, res.x) if v > 0.5}
    spent = sum(costs[n][choice[n]] for n in names)
    if spent > limit * (1 + 1e-9):
        raise LeanLMError(f"the mixed-precision solve exceeded the budget ({spent / limit:.6f}x)")
    return choice


def _check_menu(lins, menu):
    for n, m in lins.items():
        for f in menu:
            fmt = parse_format(f)
            if fmt.group_size and m.in_features % fmt.group_size:
                raise LeanLMError(f"{n}: menu format {fmt.name} needs the input dimension {m.in_features} to be a multiple of {fmt.group_size}; change the menu")


def mixed_precision(
    model: nn.Module,
    calib_ids: torch.Tensor,
    budget: float,
    menu: tuple[str, ...] = MENU,
    include: str = "*",
    exclude: tuple[str, ...] = ("*lm_head*",),
    cost: str = "bits",
    progress: bool = True,
    batch: int = 1,
    dtype: str = "bfloat16",
    sensitivity: dict[str, dict[str, float]] | None = None,
    algorithm: str = "rtn",
) -> MixedPrecisionResult:
    """Score every layer in every menu format on `calib_ids` ([N, L] tokens) and choose formats within `budget`:
    bits per weight (`cost` bits or bytes) or a bits-equivalent time budget (`cost` latency; see `_budget_limit`).
    `sensitivity` (a previous result's) skips the measurement: re-solve under another budget or cost model.
    `algorithm`: the calibration algorithm that will quantize the choice (sets the error scored, `format_error`)."""
    if cost not in COSTS:
        raise LeanLMError(f"unknown cost {cost!r}; choose one of: {', '.join(COSTS)}")
    menu = tuple(parse_format(f).name for f in menu)
    if len(set(menu)) != len(menu):
        raise LeanLMError(f"the menu {','.join(menu)} names a format twice; list each once")
    lins = _linears(model, include, exclude)
    if not lins:
        raise LeanLMError(f"no linear layer matches include={include!r} minus exclude={exclude}")
    _check_menu(lins, menu)
    shapes = {n: (m.out_features, m.in_features) for n, m in lins.items()}
    bits = layer_costs(shapes, menu, "bits")
    t0, c0 = time.perf_counter(), time.process_time()
    costs = bits if cost == "bits" else layer_costs(shapes, menu, cost, progress)
    t1, c1 = time.perf_counter(), time.process_time()
    limit = _budget_limit(shapes, bits, costs, budget, cost)
    cheapest = sum(min(v.values()) for v in costs.values())
    if cheapest > limit * (1 + 1e-9):
        low = min(parse_format(f).bits_per_weight(min(s[1] for s in shapes.values())) for f in menu)
        raise LeanLMError(f"budget {budget} bits/weight is below the cheapest menu choice (about {low:.3f} by {cost}); raise it or add a smaller format")
    if sensitivity is not None and any(set(sensitivity.get(n, {})) != set(menu) for n in lins):
        raise LeanLMError("the given sensitivity does not cover every layer and menu format of this search; measure it again")
    sens = sensitivity if sensitivity is not None else fisher_sensitivity(model, calib_ids, lins, menu, batch, progress, dtype, algorithm)
    t2, c2 = time.perf_counter(), time.process_time()
    choice = solve_choice(sens, costs, limit)
    t3, c3 = time.perf_counter(), time.process_time()
    total = sum(s[0] * s[1] for s in shapes.values())
    avg = sum(bits[n][f] for n, f in choice.items()) / total
    spent = sum(costs[n][f] for n, f in choice.items())
    return MixedPrecisionResult(choice, avg, budget, cost, spent, limit, sens,
                                {"costs": t1 - t0, "sensitivity": t2 - t1, "solve": t3 - t2},
                                {"costs": c1 - c0, "sensitivity": c2 - c1, "solve": c3 - c2})


def mixed_config(model: nn.Module, tokenizer, budget: float, menu: tuple[str, ...] = MENU,
                 calib: str = "wiki", progress: bool = True, cost: str = "bits", algorithm: str = "awq",
                 samples: int = 8, seq_len: int = 512) -> tuple[QuantConfig, dict]:
    """The mixed-precision QuantConfig (per-layer formats within `budget`, then `algorithm`: awq, gptq or rtn;
    the head stays float) and what was chosen; sensitivity is measured on `samples` x `seq_len` tokens of `calib`."""
    from ..core.data import calibration_batches

    if algorithm not in ALGORITHMS:
        raise LeanLMError(f"unknown mixed-precision algorithm {algorithm!r}; choose one of: {', '.join(ALGORITHMS)}")
    probe = calibration_batches(tokenizer, samples, seq_len, calib)
    res = mixed_precision(model, probe, budget, tuple(menu), cost=cost, progress=progress, algorithm=algorithm)
    info = {"budget": budget, "cost": cost, "algorithm": algorithm, "average_bits": res.average_bits, "spent": res.spent,
            "limit": res.limit, "choice": res.choice, "search_seconds": res.seconds, "sensitivity": res.sensitivity}
    alg = ALGORITHMS[algorithm]
    return res.config([alg()] if alg else [], [("*lm_head*", None)]), info
