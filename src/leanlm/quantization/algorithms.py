"""Calibration algorithms for post-training quantization, as pure tensor functions.

No module plumbing: the layer-by-layer loop (``calibrate.py``) collects statistics and calls these.

Conventions. Weights are ``[out_features, in_features]``; activations are ``[..., in_features]``.
Formats and ``QParams`` are those of :mod:`leanlm.quantization.formats`; the *statistics shape* of a
weight is tensor ``[]``, channel/token ``[out, 1]``, group/block ``[out, n_groups, 1]``. Everything
is computed in float32 on the weight's device (``gptq`` factorises the Hessian in float64, see
there). Functions return new float32 tensors and never modify their inputs, except
``apply_smoothing`` (in place, by design).

Ranges
    ``weight_qparams(w, fmt, method="max"|"percentile"|"mse"|"full", *, percentile=99.9, grid=100,
    norm=2.4, amax=None, global_amax=None) -> QParams``
    ``round_to_nearest(w, fmt, method="max") -> (w_q float32, QParams)`` (``weight_qparams`` + ``fake_quantize``)
    ``activation_amax(x | [x, ...], method="max"|"percentile", percentile=99.99) -> 0-d tensor``
    ``AbsMaxObserver()``: ``.update(x)``; ``.channel_absmax [C]``, ``.channel_absmean [C]``,
    ``.absmax`` (0-d), ``.n_rows``
GPTQ (Frantar et al. 2022)
    ``HessianAccumulator(in_features)``: ``.add(x)``; ``.H [in, in]`` (= 2/n sum x^T x); ``.n_samples``
    ``gptq(w, H, fmt, *, block_size=128, damp=0.01, act_order=False, static_groups=False,
    weight_method="max", weight_kwargs=None) -> (w_q [out, in] float32, QParams)``
    ``quant_error(w, w_q, H) -> float`` (= trace((w - w_q) H (w - w_q)^T) / out)
SmoothQuant (Xiao et al. 2023)
    ``smoothquant_scales(act_absmax [in], weights, alpha=0.5) -> s [in]``
    ``apply_smoothing(prev_weight, prev_bias, weights, s, prev_is_norm, norm_offset=0.0)`` (in place)
    ``smoothquant_search(x [n, in], act_absmax [in], weights, wfmt, afmt=None, *, grid=20,
    n_samples_max=1024, weight_method="max") -> (s [in], alpha)``
    ``smoothquant_loss(x, weights, wfmt, afmt, s, weight_method="max") -> float`` (what the search minimizes)
AWQ (Lin et al. 2024)
    ``awq_search(x [n, in], weights, fmt, *, grid=20, n_samples_max=4096, weight_method="max",
    scales="x"|"duo"|"both") -> s [in]``; apply with ``apply_smoothing``
    ``awq_loss(x, weights, fmt, s, weight_method="max") -> float`` (the objective awq_search minimizes)
    ``awq_clip(x [n, in], w, fmt, *, grid=20, max_shrink=0.5, n_samples_max=512, signed=False,
    gram=None, method="max") -> amax`` in the statistics shape; use as ``weight_qparams(w, fmt, "max", amax=amax)``
    Both objectives are read through the Gram matrix ``x^T x`` of the samples (``_gram``).
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Sequence

import torch

from .formats import QFormat, QParams, _grouped, compute_qparams, fake_quantize, fake_quantize_with, max_abs, parse_format

__all__ = [
    "METHODS",
    "full_range_scale",
    "weight_qparams",
    "round_to_nearest",
    "activation_amax",
    "AbsMaxObserver",
    "HessianAccumulator",
    "gptq",
    "quant_error",
    "smoothquant_scales",
    "apply_smoothing",
    "smoothquant_search",
    "awq_search",
    "awq_loss",
    "awq_clip",
]

METHODS = ("max", "percentile", "mse", "full")
ACT_SAMPLE_LIMIT = 1 << 20  # values per tensor kept by activation_amax(method="percentile")
_SEARCH_CHUNK = 1 << 22  # weight elements searched at once by weight_qparams(percentile / mse)


# ----------------------------------------------------------------------------- helpers


def _cells(w: torch.Tensor, fmt: QFormat) -> torch.Tensor:
    """float32 view whose last dim holds the elements sharing one scale (see ``_stat``)."""
    if fmt.granularity == "group":
        return _grouped(w, fmt)
    w = w.float()
    if fmt.granularity == "channel":
        return w.reshape(w.shape[0], -1)
    if fmt.granularity == "tensor":
        return w.reshape(-1)
    return w  # token: reduced over the last dim


def _stat(r: torch.Tensor, fmt: QFormat) -> torch.Tensor:
    """A keepdim reduction of ``_cells`` brought to the statistics shape."""
    return r.reshape(()) if fmt.granularity == "tensor" else r


def _reduce(v: torch.Tensor, fmt: QFormat, op: str) -> torch.Tensor:
    return _stat(getattr(torch, op)(v, dim=-1, keepdim=True), fmt)


def _quantile_last(v: torch.Tensor, q: float) -> torch.Tensor:
    """Quantile ``q`` in [0, 1] along the last dim (keepdim), linear interpolation like torch.quantile."""
    s = v.sort(dim=-1).values
    m = s.shape[-1]
    pos = q * (m - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, m - 1)
    frac = pos - lo
    return s[..., lo : lo + 1] * (1 - frac) + s[..., hi : hi + 1] * frac


def full_range_scale(mag: torch.Tensor, positive: torch.Tensor, fmt: QFormat) -> torch.Tensor:
    """The ``full`` range method's scale for cells of largest magnitude ``mag`` whose extreme is ``positive`` (bool):
    ``-mag / 2**(n-1)`` or ``+mag / 2**(n-1)``, so the extreme decodes from the grid's extra negative code."""
    s = torch.where(positive, -mag, mag) / (fmt.qmax + 1)
    return torch.where(s == 0, torch.ones_like(s), s)


# round_to_nearest's C++ kernel (runtime/csrc/gemv.cpp `round_to_nearest`): its kind of cell statistics and grid
_RTN_KINDS = {("int", True, "max"): 0, ("int", True, "full"): 1, ("int", False, "max"): 2, ("fp8_e4m3", True, "max"): 3}


def _rtn_kernel(w: torch.Tensor, fmt: QFormat, method: str) -> int | None:
    """The C++ kernel's kind for this weight, format and range method, or None where it does not apply."""
    kind = _RTN_KINDS.get((fmt.kind, fmt.symmetric, method))
    if kind is None or fmt.granularity not in ("group", "channel") or w.dim() != 2 or w.device.type != "cpu" \
            or w.requires_grad or fmt.bits > 8:
        return None
    from ..runtime import kernels  # the project's one C++ extension, built once at install

    return kind if kernels.load() else None


@torch.no_grad()
def round_to_nearest(w: torch.Tensor, fmt: QFormat | str, method: str = "max", **kwargs) -> tuple[torch.Tensor, QParams]:
    """Round to nearest: ``qp = weight_qparams(w, fmt, method, **kwargs)`` and ``fake_quantize(w, fmt, qp)`` (float32).

    Group and channel ints (``max``, ``full``; ``max`` for asymmetric) and fp8 e4m3 per channel run through one C++
    pass per cell while it is in cache (the same float32 operations on every value, so the same values, tested);
    the other formats and methods, and a CPU without the fused kernels, through those two functions. Round to
    nearest and FP8 were memory passes over the weights: 0.6 s on SmolLM2 against llm-compressor's 0.3 s."""
    fmt = parse_format(fmt)
    kind = None if kwargs else _rtn_kernel(w, fmt, method)
    if kind is None:
        qp = weight_qparams(w, fmt, method, **kwargs)
        return fake_quantize(w.float(), fmt, qp), qp
    N, K = w.shape
    g = fmt.group_size if fmt.granularity == "group" else K
    if K % g:
        _grouped(w, fmt)  # its error names the group size and a fix
    wq, scale, zero = torch.ops.leanlm.round_to_nearest(w.float().contiguous(), kind, g, fmt.bits)
    shape = (N, K // g, 1) if fmt.granularity == "group" else (N, 1)
    return wq, QParams(scale=scale.reshape(shape), zero=zero.reshape(shape) if kind == 2 else None)


def _is_asym(fmt: QFormat) -> bool:
    return fmt.kind == "int" and not fmt.symmetric


def _qp_from_range(w, fmt: QFormat, rng, global_amax) -> QParams:
    """QParams from a range: ``(lo, hi)`` for asymmetric ints, an amax tensor otherwise."""
    if _is_asym(fmt):
        return compute_qparams(w, fmt, xmin=rng[0], xmax=rng[1])
    kw = {"global_amax": global_amax} if fmt.kind == "nvfp4" else {}
    return compute_qparams(w, fmt, amax=rng, **kw)


def _subsample_rows(x: torch.Tensor, n_max: int) -> torch.Tensor:
    """At most n_max rows of a 2-D tensor, evenly strided (rows are tokens, so striding is unbiased)."""
    if n_max and x.shape[0] > n_max:
        idx = torch.linspace(0, x.shape[0] - 1, n_max, device=x.device).round().long()
        return x[idx]
    return x


# ----------------------------------------------------------------------------- ranges


@torch.no_grad()
def weight_qparams(
    w: torch.Tensor,
    fmt: QFormat | str,
    method: str = "max",
    *,
    percentile: float = 99.9,
    grid: int = 100,
    norm: float = 2.4,
    amax=None,
    global_amax=None,
) -> QParams:
    """QParams for a weight, with the range chosen per scale cell (group, channel or tensor).

    ``max``: min-max (the format's own default). ``percentile``: symmetric formats use the given
    percentile of |w| per cell; asymmetric ints use the (100 - p) and p percentiles of w.
    ``mse``: the "mse observer" of GPTQ / llm-compressor: shrink the max range by factors
    ``1 - 0.8 i / grid`` (i = 0..grid-1, so 1 down to just above 0.2) and keep, per cell, the factor
    with the smallest ``sum |w - Q(w)|**norm``; it never loses to ``max`` (factor 1 is a candidate).
    Works for every format: nvfp4/MX/nf4 block scales are derived by the format from the chosen
    per-block amax (MX scales are powers of two, so few candidates differ).
    ``full`` (symmetric ints only): the cell's signed extreme ``e`` (its largest-magnitude value) gives
    ``scale = -e / 2**(n-1)``, so ``e`` lands exactly on the extra negative code (-8 of int4's -8..7)
    and the step is 1/8 of the range instead of 1/7; the scale is negative when ``e`` is positive
    (llama.cpp's Q4_0 and the reference AutoRound's ``int_sym`` grid).

    ``amax`` (only with ``method="max"`` or ``"full"``) clips the range to ``[-amax, amax]``, in the statistics
    shape (e.g. from ``awq_clip``): symmetric formats use it as their amax; asymmetric ints use
    ``[max(min w, -amax), min(max w, amax)]``. ``global_amax`` (nvfp4 only) fixes the tensor-level
    amax of the FP32 global scale; default the observed max |w| (the global scale is never shrunk).
    """
    fmt = parse_format(fmt)
    if method not in METHODS:
        raise ValueError(f"unknown range method {method!r}; valid: {', '.join(METHODS)}")
    if global_amax is not None and fmt.kind != "nvfp4":
        raise ValueError(f"global_amax applies to nvfp4 only, not {fmt.name}")
    if method == "full" and not (fmt.kind == "int" and fmt.symmetric):
        raise ValueError(f"range method 'full' applies to symmetric int formats, not {fmt.name}")
    if amax is not None and method not in ("max", "full"):
        raise ValueError(f"an amax override is used as is; it cannot be combined with method {method!r}")
    w = w.detach()
    v = _cells(w, fmt)
    if fmt.kind == "nvfp4" and global_amax is None:
        global_amax = v.abs().amax()
    asym = _is_asym(fmt)
    if method == "full":
        pos, neg = _reduce(v, fmt, "amax"), -_reduce(v, fmt, "amin")  # amin: no negated copy of the weight
        mag = torch.maximum(pos, neg)
        if amax is not None:
            a = torch.as_tensor(amax, dtype=torch.float32, device=v.device).abs()
            mag = a.reshape(mag.shape) if a.numel() == mag.numel() else a.expand_as(mag)
        return QParams(scale=full_range_scale(mag, pos >= neg, fmt))
    if asym:
        lo, hi = _reduce(v, fmt, "amin"), _reduce(v, fmt, "amax")
        base = (lo, hi)
    else:
        base = _stat(max_abs(v, fmt), fmt)

    if amax is not None:
        a = torch.as_tensor(amax, dtype=torch.float32, device=v.device).abs()
        if asym:
            a = a.reshape(lo.shape) if a.numel() == lo.numel() else a
            return _qp_from_range(w, fmt, (torch.maximum(lo, -a), torch.minimum(hi, a)), global_amax)
        return _qp_from_range(w, fmt, a, global_amax)
    if method == "max":
        return _qp_from_range(w, fmt, base, global_amax)
    if method == "percentile" and not 0 < percentile <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {percentile}")
    if method == "mse" and grid < 1:
        raise ValueError(f"grid must be >= 1, got {grid}")
    # Every cell lies within one row unless per tensor: search row chunks to bound memory.
    rows = w.shape[0] if w.dim() >= 1 else 1
    step = rows if fmt.granularity == "tensor" or w.dim() < 2 else max(1, _SEARCH_CHUNK // max(1, w[0].numel()))
    parts = [_search_range(w[r : r + step] if step < rows else w, fmt, method, percentile, grid, norm, global_amax)
             for r in range(0, rows, step)]
    rng = (torch.cat([q[0] for q in parts]), torch.cat([q[1] for q in parts])) if asym else (
        parts[0] if len(parts) == 1 else torch.cat(parts))
    return _qp_from_range(w, fmt, rng, global_amax)


def _search_range(w, fmt: QFormat, method: str, percentile: float, grid: int, norm: float, global_amax):
    """Range (amax, or (lo, hi) for asymmetric ints) per cell of w by percentile or mse search."""
    asym = _is_asym(fmt)
    v = _cells(w, fmt)
    if method == "percentile":
        p = percentile / 100
        if asym:
            return _stat(_quantile_last(v, 1 - p), fmt), _stat(_quantile_last(v, p), fmt)
        return _stat(_quantile_last(v.abs(), p), fmt)
    base = (_reduce(v, fmt, "amin"), _reduce(v, fmt, "amax")) if asym else _reduce(v.abs(), fmt, "amax")
    best_err = best_f = None
    for i in range(grid):
        f = 1.0 - 0.8 * i / grid
        rng = (base[0] * f, base[1] * f) if asym else base * f
        qp = _qp_from_range(w, fmt, rng, global_amax)
        err = _reduce((_cells(fake_quantize(w.float(), fmt, qp), fmt) - v).abs().pow(norm), fmt, "sum")
        if best_err is None:
            best_err, best_f = err, torch.ones_like(err)
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_f = torch.where(better, torch.full_like(best_f, f), best_f)
    return (base[0] * best_f, base[1] * best_f) if asym else base * best_f


@torch.no_grad()
def activation_amax(
    x: torch.Tensor | Sequence[torch.Tensor],
    method: str = "max",
    percentile: float = 99.99,
    *,
    max_samples: int = ACT_SAMPLE_LIMIT,
    seed: int = 0,
) -> torch.Tensor:
    """Per-tensor activation amax (0-d float32) from collected samples, for static scales.

    ``x``: one tensor or a list of tensors (e.g. one per calibration batch). ``max``: max |x|.
    ``percentile``: the given percentile of |x|; to bound memory each tensor contributes at most
    ``max_samples // len(x)`` values drawn uniformly at random (with replacement, fixed ``seed``),
    so at most ``max_samples`` (default 2**20) values are sorted in all.
    """
    xs = [x] if isinstance(x, torch.Tensor) else list(x)
    if not xs:
        raise ValueError("activation_amax needs at least one tensor")
    dev = xs[0].device
    if method == "max":
        return torch.stack([t.detach().abs().amax().float().to(dev) for t in xs]).amax()
    if method != "percentile":
        raise ValueError(f"unknown activation range method {method!r}; use max or percentile")
    if not 0 < percentile <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {percentile}")
    per = max(1, max_samples // len(xs))
    parts = []
    for t in xs:
        flat = t.detach().reshape(-1)
        if flat.numel() > per:
            flat = flat[_sample_index(flat.numel(), per, seed, flat.device)]
        parts.append(flat.abs().float().to(dev))
    return _quantile(torch.cat(parts), percentile / 100)


@functools.lru_cache(maxsize=8)
def _sample_index(n: int, per: int, seed: int, device: torch.device) -> torch.Tensor:
    """The ``per`` indices into ``n`` values that ``activation_amax`` draws (uniform, with replacement, fixed seed),
    sorted: the same values in memory order (a quantile does not depend on order), and drawn once per tensor size
    instead of once per calibration batch and quantizer (the draw and the random-order gather were 19 of its 28 ms)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    return torch.randint(n, (per,), generator=gen, device=device).sort().values


def _quantile(v: torch.Tensor, q: float) -> torch.Tensor:
    """``torch.quantile(v, q)`` of a 1-D float32 tensor, bit for bit (its rank computed in float32 as torch computes it,
    the same linear interpolation), from the top ``n - floor(rank)`` values (``topk``) instead of a sort of all of them
    when they are a small share: the 99.99th percentile of 2**20 activations in 4 ms instead of 114 (static activation
    ranges observe every calibration batch of every quantizer: `w8a8-static` took 432 s on SmolLM2, ModelOpt 85 s)."""
    n = v.numel()
    rank = torch.tensor(q, dtype=v.dtype) * (n - 1)
    lo = int(rank.floor())
    k = n - lo
    if v.dim() != 1 or k > max(1, n // 8):
        return torch.quantile(v, q)
    top = torch.topk(v, k, sorted=True).values   # descending: top[k - 1] is the ascending value at `lo`
    return torch.lerp(top[k - 1], top[max(k - 2, 0)], rank - lo)


class AbsMaxObserver:
    """Streaming per-channel (last dim) and per-tensor statistics of |x| across calls.

    ``channel_absmax`` [C] (SmoothQuant), ``channel_absmean`` [C] (AWQ), ``absmax`` 0-d (static
    activation scales); all float32 on the device of the first input, None before any update.
    """

    def __init__(self) -> None:
        self.channel_absmax: torch.Tensor | None = None
        self.absmax: torch.Tensor | None = None
        self._abssum: torch.Tensor | None = None
        self.n_rows = 0

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        a = x.detach().reshape(-1, x.shape[-1]).abs()
        if a.shape[0] == 0:
            return
        if self.channel_absmax is not None:
            a = a.to(self.channel_absmax.device)
        cmax = a.amax(dim=0).float()
        csum = a.sum(dim=0, dtype=torch.float32)
        if self.channel_absmax is None:
            self.channel_absmax, self._abssum = cmax, csum
        else:
            if cmax.shape != self.channel_absmax.shape:
                raise ValueError(f"observer saw {self.channel_absmax.numel()} channels, now {cmax.numel()}")
            self.channel_absmax = torch.maximum(self.channel_absmax, cmax)
            self._abssum = self._abssum + csum
        self.absmax = self.channel_absmax.amax()
        self.n_rows += a.shape[0]

    @property
    def channel_absmean(self) -> torch.Tensor | None:
        return None if self._abssum is None else self._abssum / self.n_rows


# ----------------------------------------------------------------------------- GPTQ


class HessianAccumulator:
    """Running ``H = 2/n sum_rows x^T x`` over the inputs of one linear layer (GPTQ's Hessian).

    ``add(x)`` takes inputs ``[..., in_features]`` (any float dtype; every row is one sample).
    ``H`` is float32 ``[in, in]`` on the device of the first input (``device=`` overrides); zeros
    before any input. Updated as a running mean, so its magnitude does not grow with n. Only the
    upper triangle is accumulated, in blocks of ``BLOCK`` rows (about 40% fewer flops than a full
    ``x^T x``; BLAS ``syrk`` is not exposed by torch), and mirrored in place when ``H`` is read (the
    returned matrix is the accumulator's own storage: a later ``add`` changes it).
    """

    BLOCK = 192

    def __init__(self, in_features: int, *, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32):
        self.in_features = in_features
        self.n_samples = 0
        self.dtype = dtype
        self._device = device
        self._H: torch.Tensor | None = None
        self._full: torch.Tensor | None = None

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"HessianAccumulator for {self.in_features} inputs got shape {list(x.shape)}")
        x = x.detach().reshape(-1, self.in_features)
        n = x.shape[0]
        if n == 0:
            return
        if self._H is None:
            dev = self._device if self._device is not None else x.device
            self._H = torch.zeros(self.in_features, self.in_features, device=dev, dtype=self.dtype)
        x = x.to(self._H.device, self.dtype)
        total = self.n_samples + n
        self._H.mul_(self.n_samples / total)
        for i in range(0, self.in_features, self.BLOCK):
            j = min(i + self.BLOCK, self.in_features)
            self._H[i:j, i:].addmm_(x[:, i:j].T, x[:, i:], alpha=2.0 / total)
        self.n_samples = total
        self._full = None

    @torch.no_grad()
    def all_reduce(self) -> None:
        """Data-parallel calibration (`leanlm.core.dist`): replace this rank's running mean by the mean over
        every rank's rows, ``sum_r n_r H_r / sum_r n_r`` (summed in float64), on every rank."""
        from ..core.dist import all_reduce

        n = all_reduce(torch.tensor([float(self.n_samples)], dtype=torch.float64))
        if self._H is None:
            self._H = torch.zeros(self.in_features, self.in_features, device=self._device, dtype=self.dtype)
        total = all_reduce(self._H.double() * self.n_samples)
        self._H = (total / n.clamp_min(1).to(total.device)).to(self.dtype)
        self.n_samples = int(n.item())
        self._full = None

    @property
    def H(self) -> torch.Tensor:
        if self._H is None:
            return torch.zeros(self.in_features, self.in_features, dtype=self.dtype, device=self._device)
        if self._full is None:   # mirror the upper triangle into the lower one in place: no second [in, in] matrix
            H, n, b = self._H, self.in_features, self.BLOCK
            for i in range(0, n, b):
                j = min(i + b, n)
                D = H[i:j, i:j]   # add() wrote the whole diagonal block: its lower half is replaced too
                D.copy_(torch.triu(D) + torch.triu(D, 1).T)
                H[j:, i:j] = H[i:j, j:].T
            self._full = H
        return self._full


def _finite(t: torch.Tensor) -> bool:
    """No NaN/inf in ``t``, checked 256 rows at a time (isfinite of a whole [n, n] matrix makes temporaries of its size)."""
    return all(bool(torch.isfinite(c).all()) for c in t.split(256))


def prepared_hessian(H: torch.Tensor, dev: torch.device, who: str, perm: torch.Tensor | None = None) -> torch.Tensor:
    """A float64 copy of the Hessian on `dev` (float32 on MPS) with dead inputs (diagonal 0: never
    active in calibration) made independent unit columns, so the Cholesky factor exists. ``perm``:
    its rows and columns in that order, gathered a slice of rows at a time (no permuted float32
    copy). The copy is column-major (LAPACK's layout; as ``H`` is symmetric, the values are ``H``'s)."""
    hdt = torch.float32 if dev.type == "mps" else torch.float64
    n = H.shape[0]
    Hf = torch.empty((n, n), dtype=hdt, device=dev).T
    if perm is None:
        Hf.copy_(H.detach().T)
    else:
        p = perm.to(H.device)
        for i in range(0, n, 512):
            Hf[i : i + 512] = H.detach()[p[i : i + 512]][:, p]
    if not _finite(Hf.T):
        raise ValueError(f"{who}: the Hessian contains NaN/inf")
    dead = Hf.diagonal() == 0
    if dead.any():
        Hf[dead, :] = 0
        Hf[:, dead] = 0
        Hf[dead, dead] = 1
    return Hf


def inverse_cholesky(H: torch.Tensor, dev: torch.device, who: str, damp: float, perm: torch.Tensor | None = None) -> torch.Tensor:
    """float32 upper Cholesky factor of ``(H' + d*mean(diag H')*I)^-1``, with ``H'`` the prepared
    (``prepared_hessian``) float64 Hessian, its rows and columns in the order ``perm``; ``d`` starts at
    ``damp`` and is raised tenfold (with a RuntimeWarning) while a factorisation fails.

    Memory: one float64 ``[n, n]`` matrix besides ``H``. It is made in LAPACK's column-major layout
    and factorised, inverted and factorised again in place
    (``out=`` of ``cholesky_ex`` and ``cholesky_inverse``): the same LAPACK calls on the same values as
    separate matrices, so the same bits, at a third of the memory (GPTQ's peak on wide inputs). A failed
    attempt rebuilds the matrix from ``H``."""
    return _inv_chol_upper(lambda: prepared_hessian(H, dev, who, perm), damp, who).float()


def _inv_chol_upper(make, damp: float, who: str = "GPTQ") -> torch.Tensor:
    """Upper Cholesky factor of (H + d*mean(diag H)*I)^-1 for ``H = make()`` (a fresh matrix on each
    attempt, overwritten in place), raising d tenfold until it succeeds."""
    d, mean = damp, None
    for attempt in range(7):
        A = make()
        if mean is None:
            mean = A.diagonal().abs().mean()
            if not mean > 0:
                mean = torch.ones_like(mean)
        A.diagonal().add_(d * mean)
        info = torch.empty((), dtype=torch.int32, device=A.device)
        torch.linalg.cholesky_ex(A, out=(A, info))
        if info.item() == 0:
            torch.cholesky_inverse(A, out=A)
            torch.linalg.cholesky_ex(A, upper=True, out=(A, info))
            if info.item() == 0 and _finite(A.T):
                if attempt:
                    warnings.warn(f"{who}: Hessian not positive definite with damp={damp}; used damp={d:g}",
                                  RuntimeWarning, stacklevel=4)
                return A
        del A
        d = d * 10 if d > 0 else 0.01
    raise ValueError(f"{who}: Hessian is not positive definite even with damp={d / 10:g} "
                     "(too few or degenerate calibration samples?)")


@torch.no_grad()
def gptq(
    w: torch.Tensor,
    H: torch.Tensor,
    fmt: QFormat | str,
    *,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
    static_groups: bool = False,
    weight_method: str = "max",
    weight_kwargs: dict | None = None,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, QParams]:
    """GPTQ: quantize column by column, spreading each column's rounding error over the columns not
    yet quantized with the inverse Hessian (Frantar et al. 2022, "GPTQ: Accurate Post-Training
    Quantization for Generative Pre-trained Transformers", arXiv:2210.17323, Algorithm 1).

    ``w`` [out, in]; ``H`` [in, in] = 2/n sum x^T x (``HessianAccumulator``). Dead inputs (diag 0)
    get ``H_jj = 1`` and no coupling: their weights are rounded to nearest and kept (not zeroed).
    Damping adds ``damp * mean(diag H)`` to the diagonal (raised tenfold with a RuntimeWarning while
    the Cholesky factorisation fails; ValueError after 7 tries). The factorisation runs in float64
    (float32 on devices without float64, e.g. MPS); the column loop in float32 with lazy block
    updates of ``block_size`` columns.

    Scales: tensor/channel formats compute them once from ``w``. Group/block formats (int groups,
    nvfp4, MX, nf4) compute each group's scales from the already-updated weights when its first
    column is reached, unless ``static_groups``, which computes all groups from ``w`` up front.
    ``act_order`` (process columns by descending ``diag H``) implies ``static_groups``, so that
    every group keeps one set of scales in the original column order. nvfp4's global scale is
    always fixed from max |w|. Ranges use ``weight_qparams(..., weight_method, **weight_kwargs)``.
    Every format in formats.py is supported.

    ``mask`` (bool [out, in], e.g. a leanlm.sparsity ``weight_mask``): weights where it is False
    are quantized to exactly 0 (pruning is quantization to zero; their error is spread over the
    columns not yet quantized like any other, as in SparseGPT's joint prune + quantize), so a
    sparse model stays sparse; scales are computed from the kept weights only. 0 is on the grid of
    every format in formats.py (symmetric grids contain 0, asymmetric ints have an integer zero
    point inside their range, nvfp4 / MX / nf4 elements include 0).

    Returns ``(w_q, qp)``: ``w_q`` float32 [out, in] in the original column order, on ``w``'s
    device, with ``fake_quantize(w_q, fmt, qp) == w_q`` exactly.
    """
    fmt = parse_format(fmt)
    if w.dim() != 2:
        raise ValueError(f"gptq needs a 2-D weight [out, in], got shape {list(w.shape)}")
    out_f, in_f = w.shape
    if tuple(H.shape) != (in_f, in_f):
        raise ValueError(f"Hessian of shape {list(H.shape)} does not match weight {list(w.shape)}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    dev = w.device
    W0 = w.detach().float()
    _cells(W0, fmt)  # validates the group size against in_features
    keep = None
    if mask is not None:
        if tuple(mask.shape) != (out_f, in_f):
            raise ValueError(f"mask of shape {list(mask.shape)} does not match weight {list(w.shape)}")
        keep = mask.to(dev, torch.float32)
    kept0 = W0 if keep is None else W0 * keep  # ranges come from the weights that stay
    kw = dict(weight_kwargs or {})
    gkw = {"global_amax": kept0.abs().amax()} if fmt.kind == "nvfp4" else {}

    def qparams(t: torch.Tensor) -> QParams:
        return weight_qparams(t, fmt, weight_method, **kw, **gkw)

    perm = None
    if act_order:   # by the prepared Hessian's diagonal (dead inputs count as 1)
        diag = H.diagonal().to(dev, torch.float64 if dev.type != "mps" else torch.float32)
        perm = torch.argsort(torch.where(diag == 0, torch.ones_like(diag), diag), descending=True, stable=True)
        W = W0[:, perm]
        keep = keep[:, perm] if keep is not None else None
    else:
        W = W0.clone()
    U = inverse_cholesky(H, dev, "GPTQ", damp, perm)
    order = perm.tolist() if perm is not None else None

    grouped = fmt.granularity == "group"
    static = static_groups or act_order
    g = fmt.group_size if grouped else in_f
    zero = gscale = None
    if grouped and not static:
        n_groups = in_f // g
        scale = torch.ones(out_f, n_groups, 1, device=dev)
        zero = torch.zeros(out_f, n_groups, 1, device=dev) if _is_asym(fmt) else None
    else:
        qp0 = qparams(kept0)
        scale, zero, gscale = qp0.scale, qp0.zero, qp0.global_scale

    def col_params(c: int):
        if grouped:
            j = c // g
            return scale[:, j, 0], None if zero is None else zero[:, j, 0]
        if fmt.granularity == "tensor":
            return scale, zero
        return scale.reshape(-1), None if zero is None else zero.reshape(-1)

    # The column loop works on transposed blocks ([columns, out]), so that a column and each
    # rank-1 update of the columns after it are contiguous memory.
    Q = torch.empty_like(W)
    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        cnt = i2 - i1
        W1 = W[:, i1:i2].T.contiguous()
        K1 = keep[:, i1:i2].T.contiguous() if keep is not None else None
        Q1 = torch.empty_like(W1)
        E1 = torch.empty_like(W1)
        U1 = U[i1:i2, i1:i2]
        dinv = (1.0 / U1.diagonal()).tolist()
        for i in range(cnt):
            p = i1 + i
            c = order[p] if order is not None else p
            if grouped and not static and c % g == 0:
                # current values of the group's columns (p == c without act_order)
                cur = W1[i : min(cnt, i + g)].T
                if p + g > i2:  # the group runs past this block: add the pending in-block updates
                    rest = W[:, i2 : p + g] - E1[:i].T @ U[i1:p, i2 : p + g]
                    cur = torch.cat([cur, rest], dim=1)
                if keep is not None:  # pruned weights (headed for 0) do not widen the group's range
                    cur = cur * keep[:, p : p + g]
                gq = qparams(cur)
                scale[:, c // g] = gq.scale[:, 0]
                if zero is not None:
                    zero[:, c // g] = gq.zero[:, 0]
                gscale = gq.global_scale
            s, z = col_params(c)
            wc = W1[i]
            q = fake_quantize_with(wc, fmt, s, z, gscale)
            if K1 is not None:
                q = q * K1[i]
            Q1[i] = q
            err = E1[i]
            torch.sub(wc, q, out=err).mul_(dinv[i])
            W1[i:].addr_(U1[i, i:], err, alpha=-1)
        Q[:, i1:i2] = Q1.T
        if i2 < in_f:
            W[:, i2:] -= E1.T @ U[i1:i2, i2:]

    del W, U   # before the result's copies: the solve's peak is its working matrices or its result, not both
    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    qp = QParams(scale=scale, zero=zero, global_scale=gscale)
    # A no-op when fake_quantize_with matches fake_quantize bit for bit (tested); guarantees the grid invariant.
    return fake_quantize(Q, fmt, qp), qp


@torch.no_grad()
def quant_error(w: torch.Tensor, w_q: torch.Tensor, H: torch.Tensor) -> float:
    """Proxy output error ``trace((w - w_q) H (w - w_q)^T) / out``; with H = 2/n sum x^T x this is
    2 * mean over samples of ``||x (w - w_q)^T||^2`` / out."""
    d = w.detach().float() - w_q.detach().float().to(w.device)
    return float(((d @ H.detach().to(w.device, torch.float32)) * d).sum() / w.shape[0])


# ----------------------------------------------------------------------------- SmoothQuant


@torch.no_grad()
def smoothquant_scales(
    act_absmax: torch.Tensor, weights: Sequence[torch.Tensor], alpha: float = 0.5, *, min_scale: float = 1e-5
) -> torch.Tensor:
    """Per-input-channel smoothing factors (Xiao et al. 2023, "SmoothQuant: Accurate and Efficient
    Post-Training Quantization for Large Language Models", ICML, arXiv:2211.10438, eq. 4):
    ``s_j = max|X_j|**alpha / max_i max_rows |W_i[:, j]|**(1 - alpha)``, clamped below at
    ``min_scale``. Channels whose activation or weight max is 0 (or non-finite) get ``s_j = 1``.

    ``act_absmax`` [in]; ``weights``: the linears reading this input, each [out_i, in].
    Returns float32 [in] on the weights' device. Apply with ``apply_smoothing`` (x / s, W * s).
    """
    if not weights:
        raise ValueError("smoothquant_scales needs at least one weight")
    dev = weights[0].device
    a = act_absmax.detach().float().to(dev).reshape(-1)
    for w in weights:
        if w.shape[-1] != a.numel():
            raise ValueError(f"weight of shape {list(w.shape)} does not read {a.numel()} input channels")
    wmax = torch.stack([w.detach().abs().amax(dim=0).float().to(dev) for w in weights]).amax(dim=0)
    s = a.pow(alpha) / wmax.pow(1 - alpha)
    ok = (a > 0) & (wmax > 0) & torch.isfinite(s) & torch.isfinite(a) & torch.isfinite(wmax)
    return torch.where(ok, s.clamp(min=min_scale), torch.ones_like(s))


def _set(t: torch.Tensor, v: torch.Tensor) -> None:
    t.copy_(v.to(t.dtype))


@torch.no_grad()
def apply_smoothing(
    prev_weight: torch.Tensor,
    prev_bias: torch.Tensor | None,
    weights: Sequence[torch.Tensor],
    s: torch.Tensor,
    prev_is_norm: bool,
    norm_offset: float = 0.0,
) -> None:
    """Fold ``x -> x / s`` into the producer of x and ``W[:, j] *= s_j`` into its consumers, in place.

    Norm producer (RMSNorm/LayerNorm, ``prev_weight`` [in]): the effective gain ``norm_offset +
    weight`` is divided by s (``norm_offset=1`` for Gemma-style ``x * (1 + weight)``); a norm bias
    is divided by s. Linear producer whose OUTPUT is this input (``prev_weight`` [in, in_prev]):
    its rows and bias are divided by s. Arithmetic in float32, stored back in each tensor's dtype.
    The function is preserved exactly in real arithmetic (SmoothQuant / AWQ scaling).
    """
    s = s.detach().float().to(prev_weight.device).reshape(-1)
    if prev_is_norm:
        if prev_weight.dim() != 1 or prev_weight.numel() != s.numel():
            raise ValueError(f"norm weight of shape {list(prev_weight.shape)} does not match {s.numel()} scales")
        _set(prev_weight, (prev_weight.float() + norm_offset) / s - norm_offset)
    else:
        if norm_offset:
            raise ValueError("norm_offset applies to a norm producer only")
        if prev_weight.dim() != 2 or prev_weight.shape[0] != s.numel():
            raise ValueError(f"previous linear weight of shape {list(prev_weight.shape)} does not output "
                             f"{s.numel()} channels")
        _set(prev_weight, prev_weight.float() / s[:, None])
    if prev_bias is not None:
        _set(prev_bias, prev_bias.float() / s.to(prev_bias.device))
    for w in weights:
        if w.shape[-1] != s.numel():
            raise ValueError(f"weight of shape {list(w.shape)} does not read {s.numel()} input channels")
        _set(w, w.float() * s.to(w.device))


def _sq_err(x: torch.Tensor, refs: Sequence[torch.Tensor], weights: Sequence[torch.Tensor], wfmt: QFormat | None,
            afmt: QFormat | None, s: torch.Tensor, weight_method: str) -> float:
    xs = x / s
    if afmt is not None:
        xs = fake_quantize(xs, afmt)
    tot = 0.0
    for ref, w in zip(refs, weights):
        ws = w.detach().float() * s
        wq = ws if wfmt is None else fake_quantize(ws, wfmt, weight_qparams(ws, wfmt, weight_method))
        tot += float((xs @ wq.T - ref).pow(2).sum(dtype=torch.float64))
    return tot / x.shape[0]


@torch.no_grad()
def smoothquant_loss(x: torch.Tensor, weights: Sequence[torch.Tensor], wfmt: QFormat | str | None, afmt: QFormat | str | None,
                     s: torch.Tensor, weight_method: str = "max") -> float:
    """``sum_i ||x W_i^T - Qa(x / s) Qw(W_i * s)^T||^2 / n``: the layer-output error of smoothing by
    ``s`` then quantizing weights (``wfmt``) and activations (``afmt``, scales from the samples
    themselves); a format of None keeps that side in float."""
    dev = weights[0].device
    x = x.detach().reshape(-1, x.shape[-1]).to(dev).float()
    refs = [x @ w.detach().float().T for w in weights]
    return _sq_err(x, refs, weights, parse_format(wfmt) if wfmt is not None else None,
                   parse_format(afmt) if afmt is not None else None, s, weight_method)


@torch.no_grad()
def smoothquant_search(
    x: torch.Tensor,
    act_absmax: torch.Tensor,
    weights: Sequence[torch.Tensor],
    wfmt: QFormat | str | None,
    afmt: QFormat | str | None = None,
    *,
    grid: int = 20,
    n_samples_max: int = 1024,
    weight_method: str = "max",
) -> tuple[torch.Tensor, float | None]:
    """SmoothQuant with the migration strength chosen per layer instead of one global alpha (the
    auto-tuned variant of Intel Neural Compressor; SmoothQuant itself, Xiao et al. 2023, picks alpha
    by hand per model): ``alpha`` runs over ``i / grid`` (i = 0..grid-1) and the one whose
    ``smoothquant_scales`` minimize ``smoothquant_loss`` on the samples wins. ``alpha = 0`` still
    scales (by ``1 / max|W_j|``), so plain ``s = 1`` is tried first and kept on ties: the result is
    never worse than no smoothing on these samples.

    ``x``: sampled inputs [..., in] (at most ``n_samples_max`` rows are used, evenly strided);
    ``act_absmax``: max |x| per channel over all calibration rows (``AbsMaxObserver``). Returns
    ``(s [in] float32, alpha)`` with ``alpha = None`` when no smoothing won.
    """
    if not weights:
        raise ValueError("smoothquant_search needs at least one weight")
    dev = weights[0].device
    in_f = weights[0].shape[-1]
    xs = _prep_x(x, in_f, dev, n_samples_max)
    wfmt = parse_format(wfmt) if wfmt is not None else None
    afmt = parse_format(afmt) if afmt is not None else None
    refs = [xs @ w.detach().float().T for w in weights]
    best_s = torch.ones(in_f, device=dev)
    best_err, best_a = _sq_err(xs, refs, weights, wfmt, afmt, best_s, weight_method), None
    for i in range(grid):
        s = smoothquant_scales(act_absmax, weights, alpha=i / grid)
        err = _sq_err(xs, refs, weights, wfmt, afmt, s, weight_method)
        if err < best_err:
            best_err, best_s, best_a = err, s, i / grid
    return best_s, best_a


# ----------------------------------------------------------------------------- AWQ


def _prep_x(x: torch.Tensor, in_f: int, dev, n_max: int) -> torch.Tensor:
    if x.shape[-1] != in_f:
        raise ValueError(f"samples of shape {list(x.shape)} do not have {in_f} input channels")
    return _subsample_rows(x.detach().reshape(-1, in_f), n_max).to(dev).float()


def _gram(x: torch.Tensor) -> torch.Tensor:
    """``x^T x`` [in, in] (float32): ``sum ||x d^T||^2 = trace(d G d^T)``, so an output error costs
    ``out x in x in`` flops per candidate instead of ``n x out x in``."""
    return x.T @ x


def _gram_err(G: torch.Tensor, d: torch.Tensor) -> float:
    """sum ||x d^T||^2 from the Gram matrix ``G = x^T x`` (see ``_gram``)."""
    return float(((d @ G) * d).sum(dtype=torch.float64))


def _awq_scales(mean_abs: torch.Tensor, alpha: float, w_mean: torch.Tensor | None = None) -> torch.Tensor:
    s = mean_abs.pow(alpha).clamp(min=1e-4)
    if w_mean is not None:  # "duo" scaling: s = x^alpha / w^(1 - alpha)
        s = s / w_mean.pow(1 - alpha).clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


def _weight_mean(weights: Sequence[torch.Tensor], fmts: Sequence[QFormat]) -> torch.Tensor:
    """Mean over output rows of |w| / (max |w| of its scale cell), per input channel [in]."""
    parts = []
    for w, fmt in zip(weights, fmts):
        v = _cells(w.detach().float(), fmt).abs()
        v = v / (v.amax(dim=-1, keepdim=True) if fmt.granularity != "tensor" else v.amax()).clamp(min=1e-12)
        parts.append(v.reshape(w.shape[0], -1))
    return torch.cat(parts).mean(dim=0)


def _awq_err(G: torch.Tensor, weights: Sequence[torch.Tensor], fmts: Sequence[QFormat], s: torch.Tensor | None,
             weight_method: str) -> float:
    tot = 0.0
    for w, fmt in zip(weights, fmts):
        w = w.detach().float()
        ws = w if s is None else w * s
        wq = fake_quantize(ws, fmt, weight_qparams(ws, fmt, weight_method))
        if s is not None:
            wq = wq / s
        tot += _gram_err(G, w - wq)
    return tot


@torch.no_grad()
def awq_loss(x: torch.Tensor, weights: Sequence[torch.Tensor], fmt: QFormat | str, s: torch.Tensor | None,
             weight_method: str = "max", batch_out: int | None = None) -> float:
    """``sum_i ||x W_i^T - (x / s) Q(W_i * s)^T||^2 / n`` (``s=None``: no scaling, i.e. plain RTN),
    computed as ``trace(D G D^T) / n`` with the Gram matrix ``G = x^T x`` (``batch_out`` is unused)."""
    dev = weights[0].device
    x = x.detach().reshape(-1, x.shape[-1]).to(dev).float()
    return _awq_err(_gram(x), weights, _formats(fmt, weights), s, weight_method) / x.shape[0]


def _formats(fmt, weights: Sequence[torch.Tensor]) -> list[QFormat]:
    """One format per weight: `fmt` is one format for all, or a sequence of one per weight (mixed precision)."""
    if isinstance(fmt, (list, tuple)):
        if len(fmt) != len(weights):
            raise ValueError(f"{len(fmt)} formats for {len(weights)} weights")
        return [parse_format(f) for f in fmt]
    return [parse_format(fmt)] * len(weights)


AWQ_SCALES = ("x", "duo", "both")


@torch.no_grad()
def awq_search(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    fmt: QFormat | str,
    *,
    grid: int = 20,
    n_samples_max: int = 4096,
    weight_method: str = "max",
    batch_out: int | None = None,
    scales: str = "x",
) -> torch.Tensor:
    """Activation-aware scale search (Lin et al. 2024, "AWQ: Activation-aware Weight Quantization
    for LLM Compression and Acceleration", MLSys, arXiv:2306.00978, section 3.2).

    ``s = m**alpha / sqrt(max(m**alpha) * min(m**alpha))`` with ``m`` the mean |x| per input
    channel (over all rows of ``x``) and ``m**alpha`` clamped below at 1e-4; ``alpha`` runs over
    ``i / grid`` (i = 0..grid-1) and the one minimizing ``awq_loss`` (output error of the
    fake-quantized scaled weights, summed over ``weights``) wins. ``alpha = 0`` gives s = 1 and is
    kept on ties, so the result is never worse than no scaling on these samples.
    ``scales="duo"`` uses ``m**alpha / w**(1 - alpha)`` instead, with ``w`` the mean over output
    rows of |W| relative to its scale cell's max (the "duo scaling" of the AutoAWQ implementation);
    ``"both"`` searches both families (s = 1 plus 2 x (grid - 1) candidates) and keeps the best.
    ``fmt``: one format for every weight, or a sequence of one per weight (a mixed-precision group
    whose linears have different formats: each one's error is its own format's).

    ``x``: sampled inputs [..., in] (at most ``n_samples_max`` rows are used, evenly strided);
    ``weights``: the linears reading x, each [out_i, in]. Returns float32 s [in] on the weights'
    device; apply with ``apply_smoothing``. The objective goes through the Gram matrix ``x^T x``,
    computed once: each candidate costs ``out x in x in`` flops whatever the number of samples
    (``batch_out`` is unused).
    """
    if not weights:
        raise ValueError("awq_search needs at least one weight")
    fmts = _formats(fmt, weights)
    if scales not in AWQ_SCALES:
        raise ValueError(f"unknown AWQ scale family {scales!r}; valid: {', '.join(AWQ_SCALES)}")
    dev = weights[0].device
    in_f = weights[0].shape[-1]
    for w in weights:
        if w.shape[-1] != in_f:
            raise ValueError("all weights must read the same inputs")
    mean_abs = x.detach().reshape(-1, in_f).to(dev).abs().float().mean(dim=0) if x.numel() else None
    if mean_abs is None:
        raise ValueError("awq_search needs at least one sample")
    G = _gram(_prep_x(x, in_f, dev, n_samples_max))
    wm = None if scales == "x" else _weight_mean(weights, fmts)
    fams = {"x": [None], "duo": [wm], "both": [None, wm]}[scales]
    best_err, best_s = _awq_err(G, weights, fmts, None, weight_method), torch.ones(in_f, device=dev)
    for w_mean in fams:
        for i in range(1 if w_mean is None else 0, grid):  # (x family, alpha = 0: s = 1, the starting point)
            s = _awq_scales(mean_abs, i / grid, w_mean)
            err = _awq_err(G, weights, fmts, s, weight_method)
            if err < best_err:
                best_err, best_s = err, s
    return best_s


def _cell_out_err(x: torch.Tensor, d: torch.Tensor, fmt: QFormat, batch_out: int | None = None,
                  G: torch.Tensor | None = None) -> torch.Tensor:
    """Per scale cell: mean over samples of (x_cell . d_cell)^2, in the statistics shape, from the
    Gram matrix ``G = x^T x`` (computed when not given; a group reads only its diagonal block)."""
    out_f, in_f = d.shape
    n = x.shape[0]
    G = _gram(x) if G is None else G
    if fmt.granularity == "group":
        g = fmt.group_size
        k = in_f // g
        Gk = G.reshape(k, g, k, g).diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # [k, g, g] diagonal blocks
        dk = d.reshape(out_f, k, g)
        return (torch.einsum("okg,kgh->okh", dk, Gk) * dk).sum(-1).div(n).unsqueeze(-1)
    e = ((d @ G) * d).sum(-1, keepdim=True).div(n)  # [out, 1]
    return e.sum() if fmt.granularity == "tensor" else e


@torch.no_grad()
def awq_clip(
    x: torch.Tensor,
    w: torch.Tensor,
    fmt: QFormat | str,
    *,
    grid: int = 20,
    max_shrink: float = 0.5,
    n_samples_max: int = 512,
    batch_out: int | None = None,
    signed: bool = False,
    gram: torch.Tensor | None = None,
    method: str = "max",
) -> torch.Tensor:
    """AWQ's weight clipping search ("auto_clip", Lin et al. 2024, arXiv:2306.00978, section 3.3 /
    reference code): per scale cell, try ``amax = r * max|w|`` for r = 1, 1 - 1/grid, ..., 1 -
    max_shrink and keep the one with the smallest error of that cell's partial output
    ``mean_n (x_cell . (w_cell - Q(w)_cell))^2`` on the samples. r = 1 wins ties, so no cell's error
    increases versus no clipping (cross-terms between groups of one row are not modelled, as in AWQ).

    ``signed`` (symmetric ints): the candidates are ``r * a0`` with ``a0 = max(max w, qmax /
    (qmax + 1) * max(-w))`` (after ``max|w|`` itself, which still wins ties): a cell whose largest
    magnitude is negative reaches the grid's extra negative code (-8 of int4's -8..7) exactly, on
    a step 1/8 finer, as llama.cpp's Q4_0 does.

    ``x`` [..., in] samples (at most ``n_samples_max`` rows, evenly strided); ``w`` [out, in].
    Returns amax float32 in the statistics shape, to be used as
    ``weight_qparams(w, fmt, "max", amax=amax)`` (the quantizer evaluated in the search).
    ``method`` is the range method the result will be used with (``max``, or ``full`` for the full-range
    signed grid: ``weight_qparams(w, fmt, "full", amax=amax)``).
    The errors come from the samples' Gram matrix: each candidate costs ``out x in x group`` flops
    whatever the number of samples (``batch_out`` is unused); ``gram`` passes that matrix when the
    caller has it already (Linears reading the same input).
    """
    fmt = parse_format(fmt)
    if w.dim() != 2:
        raise ValueError(f"awq_clip needs a 2-D weight [out, in], got shape {list(w.shape)}")
    w = w.detach().float()
    xs = _prep_x(x, w.shape[1], w.device, n_samples_max)
    G = _gram(xs) if gram is None else gram.to(w.device, torch.float32)
    v = _cells(w, fmt)
    obs = _reduce(v.abs(), fmt, "amax")
    base = obs
    if signed and fmt.kind == "int" and fmt.symmetric:
        q = fmt.qmax
        base = torch.maximum(_reduce(v, fmt, "amax"), _reduce(-v, fmt, "amax") * (q / (q + 1)))
    gkw = {"global_amax": w.abs().amax()} if fmt.kind == "nvfp4" else {}
    best_err = torch.full_like(obs, math.inf)
    best = obs.clone()
    cands = ([obs] if base is not obs else []) + [base * (1.0 - i / grid) for i in range(int(round(max_shrink * grid)) + 1)]
    for a in cands:
        qp = weight_qparams(w, fmt, method, amax=a, **gkw)
        err = _cell_out_err(xs, w - fake_quantize(w, fmt, qp), fmt, G=G)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, a, best)
    return best
