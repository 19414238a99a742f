"""Quantization configs: ordered glob rules over quantizer names, algorithm steps, named presets.

Every quantizable tensor has a named quantizer submodule:

* ``<linear>.weight_quantizer`` and ``<linear>.input_quantizer`` for every ``nn.Linear``;
* ``<attention>.k_quantizer`` and ``<attention>.v_quantizer`` for the KV cache of every
  attention module (keys after RoPE, i.e. exactly what the cache holds).

A config is an ordered list of ``(pattern, QuantizerConfig | None)`` rules matched with
``fnmatch`` against those names; later rules win and ``None`` disables. For example::

    QuantConfig(rules=[
        ("*weight_quantizer", QuantizerConfig("int4_g64")),
        ("*down_proj.weight_quantizer", QuantizerConfig("int8")),   # 8-bit for down_proj
        ("*lm_head*", None),                                        # keep the head in float
    ], algorithms=[GPTQ()])
"""

from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass, field

from ..core.errors import LeanLMError
from .formats import parse_format


@dataclass
class QuantizerConfig:
    """How one tensor is quantized.

    format: a format name from ``formats.parse_format`` (``int4_g64``, ``int8_token``, ``fp8_e4m3``,
    ``nvfp4``, ...). method: how a static range is chosen (``max``, ``percentile``, ``mse``; ``full``
    for symmetric int weights: the signed extreme on the extra negative code, ``algorithms.weight_qparams``).
    dynamic: activations only; scales are computed from each input at run time (per token or per
    block) instead of being calibrated once.
    """

    format: str
    method: str = "max"
    percentile: float = 99.99
    dynamic: bool = False

    def __post_init__(self):
        try:
            parse_format(self.format)
        except ValueError as e:
            raise LeanLMError(str(e)) from None
        if self.method not in ("max", "percentile", "mse", "full"):
            raise LeanLMError(f"unknown range method {self.method!r}; use max, percentile, mse or full")
        fmt = parse_format(self.format)
        if self.method == "full" and not (fmt.kind == "int" and fmt.symmetric):
            raise LeanLMError(f"range method 'full' needs a symmetric int format, not {self.format!r}; use max")


@dataclass
class SmoothQuant:
    """Migrate activation outliers into the weights before quantizing (Xiao et al. 2023).

    ``search``: instead of one ``alpha`` for every layer, choose each layer's alpha from a grid of
    ``grid`` values by the quantized layer-output error on calibration samples
    (``algorithms.smoothquant_search``); ``alpha`` is then unused.
    """

    alpha: float = 0.5
    search: bool = False
    grid: int = 20


@dataclass
class AWQ:
    """Activation-aware per-channel weight scaling and clipping search (Lin et al. 2024).

    ``grid`` scale exponents per shared input; ``scales``: the scale family searched (``"x"``: the
    paper's ``mean|x|**alpha``, ``"duo"``: ``mean|x|**alpha / mean|w|**(1 - alpha)``, ``"both"``);
    ``samples``: calibration rows (tokens) per input the scale search reads, evenly strided over all;
    ``clip``: the per-group clipping search after scaling, on ``clip_samples`` rows, with
    ``clip_grid`` shrink steps of ``1 / clip_grid`` down to half the range, ``clip_signed`` adding the
    candidates that reach the symmetric int grid's extra negative code (``algorithms.awq_clip``).
    Both searches read their rows through one Gram matrix per input, so more rows cost only the
    matrix, not every candidate.
    """

    grid: int = 20
    clip: bool = True
    scales: str = "x"
    samples: int = 4096
    clip_grid: int = 20
    clip_signed: bool = False
    clip_samples: int = 512

    def __post_init__(self):
        if min(self.grid, self.clip_grid, self.samples, self.clip_samples) < 1:
            raise LeanLMError(f"AWQ needs grid, clip_grid, samples and clip_samples >= 1, got {self.grid}, {self.clip_grid}, "
                              f"{self.samples}, {self.clip_samples}")
        if self.scales not in ("x", "duo", "both"):
            raise LeanLMError(f"unknown AWQ scales {self.scales!r}; valid: x, duo, both")


@dataclass
class GPTQ:
    """Hessian-based error-compensating weight rounding (Frantar et al. 2022).

    ``act_order`` (on by default) quantizes the input columns with the largest Hessian diagonal
    first, so the rest can absorb their error. On SmolLM2 it decides whether GPTQ beats
    round-to-nearest at all: the attention-sink token's few huge input channels must come first
    (docs/quantization.md, "GPTQ and activation order").

    ``one_pass`` (on by default) runs each decoder layer once over all calibration rows in a single
    batch and solves each group of Linears when the forward reaches it: one forward per layer
    instead of two, and later Linears (o_proj, down_proj) see the already-quantized earlier ones
    (the "true sequential" variant of the GPTQ reference code). It holds the whole layer's
    activations for every row at once, so above ``one_pass_max_gib`` (estimated) the two-pass path
    runs instead and says so.

    ``forward_dtype="bfloat16"`` runs the layer forwards that feed the Hessians under bfloat16
    autocast (master weights, Hessians and solves stay float32). The forwards are most of GPTQ's
    time on a CPU, and bfloat16 matmuls are several times faster than float32 ones on CPUs with
    AVX512-BF16 or AMX. The Hessians then come from
    bfloat16-rounded activations, as they do when a model is calibrated in bfloat16 on a GPU; the
    benchmark reports the perplexity of both. Off by default: never less exact unless asked.

    ``sink_tokens`` leaves the first positions of every calibration row out of the Hessians: the
    attention-sink token's activations are orders of magnitude larger than the others' and otherwise
    dominate ``X^T X`` (docs/quantization.md, "GPTQ and the attention sink").
    """

    block_size: int = 128
    damp: float = 0.01
    act_order: bool = True
    one_pass: bool = True
    one_pass_max_gib: float = 4.0
    forward_dtype: str = "float32"
    sink_tokens: int = 0

    def __post_init__(self):
        if self.sink_tokens < 0:
            raise LeanLMError(f"GPTQ sink_tokens must be >= 0, got {self.sink_tokens}")
        if self.forward_dtype not in ("float32", "bfloat16"):
            raise LeanLMError(f"GPTQ forward_dtype must be 'float32' or 'bfloat16', got {self.forward_dtype!r}")


@dataclass
class AutoRound:
    """Learned rounding offsets and clipping by signed gradient descent, block by block (Cheng et al.
    2023, ``quantization/autoround.py``).

    ``iters`` signed-SGD steps per decoder layer, each on ``batch`` calibration rows drawn at random,
    with step size ``lr`` (default ``1 / iters``, the paper's choice) decaying linearly to 0;
    ``clip`` learns the clipping factors (in [``min_clip``, 1]) as well as the rounding.
    ``float_targets`` (on by default): each layer's targets are the float model's outputs (a float
    stream of hidden states kept beside the quantized one, as the reference implementation does), so
    a layer also corrects the error the layers before it left; off: the float layer's outputs on its
    own (quantized-stream) inputs. Measured on SmolLM2-135M (docs/quantization.md, "AutoRound").
    ``train_dtype="bfloat16"`` runs the signed-gradient steps (forward and backward) under bfloat16
    autocast, as the reference implementation does on CPUs by default; the targets, the offsets and
    clip factors, and the stored weights stay float32. Off by default: never less exact unless asked.
    ``full_range`` (symmetric ints): train and store on the full-range grid (each group's signed extreme on
    the extra negative code, ``algorithms.weight_qparams(method="full")``) whatever range method the
    quantizer has, starting from the same scale magnitude as the grid before it (AWQ's clip on ``amax / 7``
    in ``w4a16``); a quantizer with the ``full`` range method implies it. The clip factor then runs up to
    2**(n-1) / qmax (8/7 for int4, where the grid is ``amax / 7`` again).
    ``keep``: the parameters kept at the end: ``best``, those of the step with the lowest loss on its own
    ``batch`` rows (the paper's choice), or ``last``, those of the final step. With 2 rows a step the lowest
    loss mostly marks the easiest rows drawn, and on SmolLM2 ``last`` measured better on both held-out
    texts (``w4a16`` and ``nvfp4-awq-autoround`` use it; docs/quantization.md, "The full-range int grid").
    """

    iters: int = 50
    lr: float | None = None
    batch: int = 2
    clip: bool = True
    min_clip: float = 0.5
    seed: int = 0
    float_targets: bool = True
    train_dtype: str = "float32"
    full_range: bool = False
    keep: str = "best"

    def __post_init__(self):
        if self.keep not in ("best", "last"):
            raise LeanLMError(f"AutoRound keep must be 'best' or 'last', got {self.keep!r}")
        if self.train_dtype not in ("float32", "bfloat16"):
            raise LeanLMError(f"AutoRound train_dtype must be 'float32' or 'bfloat16', got {self.train_dtype!r}")
        if self.iters < 1 or self.batch < 1:
            raise LeanLMError(f"AutoRound needs iters >= 1 and batch >= 1, got iters={self.iters}, batch={self.batch}")
        if self.lr is not None and not self.lr > 0:
            raise LeanLMError(f"AutoRound lr must be > 0, got {self.lr}")
        if not 0 < self.min_clip <= 1:
            raise LeanLMError(f"AutoRound min_clip must be in (0, 1], got {self.min_clip}")


Algorithm = SmoothQuant | AWQ | GPTQ | AutoRound
ALGORITHMS = {"smoothquant": SmoothQuant, "awq": AWQ, "gptq": GPTQ, "autoround": AutoRound}


@dataclass
class QuantConfig:
    """What to quantize (rules), how (algorithms, applied in order per layer) and on how much text.

    ``rotate``: fold a rotation into the float model first (``quantization/rotate.py``, QuaRot):
    ``hadamard`` (residual stream, value heads, and an online Hadamard before down_proj) or
    ``hadamard-fold`` (no online part, so every exporter can carry it); None: no rotation.

    ``sequential``: True (the default), each decoder layer is calibrated on the outputs of the already-quantized
    layers before it (llm-compressor's sequential pipeline); False, on the float model's activations (ModelOpt's
    convention): one float forward per layer, whose per-channel input maxima give SmoothQuant's statistics and
    the static ``max`` ranges of the Linear inputs without more forwards (``w8a8-static``; docs/quantization.md).
    """

    rules: list[tuple[str, QuantizerConfig | None]]
    algorithms: list[Algorithm] = field(default_factory=list)
    calib_samples: int = 128
    calib_seq_len: int = 512
    calib_batch: int = 8
    rotate: str | None = None
    sequential: bool = True

    def __post_init__(self):
        from .rotate import METHODS

        if self.rotate is not None and self.rotate not in METHODS:
            raise LeanLMError(f"unknown rotation {self.rotate!r}; choose one of: {', '.join(METHODS)}")

    def resolve(self, names: list[str]) -> dict[str, QuantizerConfig]:
        """Map each quantizer name to its config (later rules win); unmatched or disabled names are left out.

        A rule whose pattern matches none of `names` is an error: it is almost always a typo.
        """
        chosen: dict[str, QuantizerConfig | None] = {}
        for pattern, qc in self.rules:
            hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
            if not hits:
                examples = ", ".join(names[:3])
                raise LeanLMError(f"rule pattern {pattern!r} matches no quantizer (names look like: {examples}); fix the pattern")
            for n in hits:
                chosen[n] = qc
        return {n: qc for n, qc in chosen.items() if qc is not None}

    def to_dict(self) -> dict:
        return {
            "rules": [[p, asdict(q) if q else None] for p, q in self.rules],
            "algorithms": [{"name": type(a).__name__.lower(), **asdict(a)} for a in self.algorithms],
            "calib_samples": self.calib_samples, "calib_seq_len": self.calib_seq_len, "calib_batch": self.calib_batch,
            **({"rotate": self.rotate} if self.rotate else {}),
            **({} if self.sequential else {"sequential": False}),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "QuantConfig":
        algos = []
        for a in d.get("algorithms", []):
            a = dict(a)
            algos.append(ALGORITHMS[a.pop("name")](**a))
        rules = [(p, QuantizerConfig(**q) if q else None) for p, q in d["rules"]]
        return cls(rules=rules, algorithms=algos, calib_samples=d.get("calib_samples", 128),
                   calib_seq_len=d.get("calib_seq_len", 512), calib_batch=d.get("calib_batch", 8), rotate=d.get("rotate"),
                   sequential=d.get("sequential", True))


W = "*weight_quantizer"
A = "*input_quantizer"
HEAD = ("*lm_head*", None)


def _w(fmt: str, method: str = "max") -> tuple:
    return (W, QuantizerConfig(fmt, method=method))


def _a_dyn(fmt: str) -> tuple:
    return (A, QuantizerConfig(fmt, dynamic=True))


# Named presets. Weight-only 4-bit presets use symmetric groups of 64: SmolLM2's hidden size 576 is
# not a multiple of 128 (see docs/quantization.md).
PRESETS: dict[str, callable] = {
    "w8a16": lambda: QuantConfig([_w("int8"), HEAD]),
    "w8a8": lambda: QuantConfig([_w("int8"), _a_dyn("int8_token"), HEAD]),
    # alpha 0.65: see docs/quantization.md ("SmoothQuant's alpha"); measured on wiki and news held-out text.
    "w8a8-smoothquant": lambda: QuantConfig([_w("int8"), _a_dyn("int8_token"), HEAD], [SmoothQuant(0.65)]),
    # alpha 0.8, max ranges, float calibration (one forward per layer): +4.5% on both texts where 0.5 with 99.99th-percentile
    # ranges lost +174% (the percentile clips the attention-sink outliers); docs/quantization.md.
    "w8a8-static": lambda: QuantConfig([_w("int8"), (A, QuantizerConfig("int8_tensor", method="max")), HEAD], [SmoothQuant(0.8)],
                                       sequential=False),
    # The 4-bit weight-only preset to reach for first: the best measured algorithm on SmolLM2 (docs/quantization.md,
    # "W4A16: the default algorithm"); the w4a16-* presets name one algorithm (or one chain) each.
    # The full-range grid ("full": each group's signed extreme on code -8, llama.cpp's Q4_0 convention) measured better
    # than amax / 7 on both held-out texts for round to nearest, AWQ and GPTQ (bench/results/w4_full.md); AutoRound alone
    # was not (better on wiki, worse on news), so w4a16-autoround keeps amax / 7.
    "w4a16-rtn": lambda: QuantConfig([_w("int4_g64", "full"), HEAD]),
    "w4a16-mse": lambda: QuantConfig([_w("int4_g64", "mse"), HEAD]),
    # asymmetric groups of 32 (llama.cpp Q4_1's grid), round to nearest: Gemma-3-270M keeps +6.8% perplexity where
    # symmetric g64 RTN loses +231% (bench/results/gemma_int4_quality.md)
    "w4a16-rtn-asym": lambda: QuantConfig([_w("int4_g32_asym"), HEAD]),
    "w4a16-awq": lambda: QuantConfig([_w("int4_g64", "full"), HEAD], [AWQ()]),
    "w4a16-gptq": lambda: QuantConfig([_w("int4_g64", "full"), HEAD], [GPTQ()]),
    "w4a16-autoround": lambda: QuantConfig([_w("int4_g64"), HEAD], [AutoRound()]),
    # AWQ's scales and clipping (searched on amax / 7), then AutoRound from AWQ's clip against the float model's outputs,
    # rounding onto the full-range grid (better on both texts than AWQ searching on the full-range grid too), keeping
    # the last step's parameters (better on both texts than the lowest-loss step's).
    "w4a16-awq-autoround": lambda: QuantConfig([_w("int4_g64"), HEAD], [AWQ(), AutoRound(full_range=True, keep="last")]),
    "w4a16-awq-gptq": lambda: QuantConfig([_w("int4_g64"), HEAD], [AWQ(clip=False), GPTQ()]),
    "w3a16-gptq": lambda: QuantConfig([_w("int3_g64"), HEAD], [GPTQ()]),
    # W4A8 (docs/quantization.md, "W4A8 and NVFP4 W4A4"): w4a8 is an alias of the best measured recipe.
    # w4a8-awq-autoround: the w4a16 weights recipe, AutoRound trained with the int8 activation quantizers in the
    # loop; w4a8-gptq: SmoothQuant 0.5 + GPTQ.
    "w4a8-awq-autoround": lambda: QuantConfig([_w("int4_g64"), _a_dyn("int8_token"), HEAD], [AWQ(), AutoRound()]),
    "w4a8-gptq": lambda: QuantConfig([_w("int4_g64"), _a_dyn("int8_token"), HEAD], [SmoothQuant(0.5), GPTQ()]),
    # QuaRot's recipe (rotation, then GPTQ on the rotated weights; docs/quantization.md "Rotations").
    "w4a8-quarot": lambda: QuantConfig([_w("int4_g64"), _a_dyn("int8_token"), HEAD], [GPTQ()], rotate="hadamard"),
    "nvfp4-quarot": lambda: QuantConfig([_w("nvfp4"), _a_dyn("nvfp4"), HEAD], [GPTQ()], rotate="hadamard"),
    "fp8": lambda: QuantConfig([_w("fp8_e4m3_channel"), _a_dyn("fp8_e4m3_token"), HEAD]),
    "nvfp4": lambda: QuantConfig([_w("nvfp4"), _a_dyn("nvfp4"), HEAD]),
    # NVFP4 W4A4 calibrated: AWQ's scales, then AutoRound's rounding trained with the NVFP4 activation quantizers,
    # keeping the last step (better on both texts than the lowest-loss step: bench/results/s37_nvfp4_last.md).
    "nvfp4-awq-autoround": lambda: QuantConfig([_w("nvfp4"), _a_dyn("nvfp4"), HEAD], [AWQ(), AutoRound(keep="last")]),
    "nvfp4-w4a16": lambda: QuantConfig([_w("nvfp4"), HEAD]),
    "mxfp4": lambda: QuantConfig([_w("mxfp4"), _a_dyn("mxfp4"), HEAD]),
    "mxfp8": lambda: QuantConfig([_w("mxfp8"), _a_dyn("mxfp8"), HEAD]),
    "nf4": lambda: QuantConfig([_w("nf4"), HEAD]),
}
# Short names for the best measured recipe of a format (docs/quantization.md: "W4A16: the default algorithm",
# "W4A8 and NVFP4 W4A4"); each is a preset too, building its target's config.
ALIASES = {"w4a16": "w4a16-awq-autoround", "w4a8": "w4a8-awq-autoround"}
PRESETS.update({a: (lambda t=t: PRESETS[t]()) for a, t in ALIASES.items()})
# KV-cache rules that can be added to any preset (``--kv-cache int8|fp8``): per token and head, dynamic.
KV_CACHE = {
    "int8": [("*k_quantizer", QuantizerConfig("int8_token", dynamic=True)), ("*v_quantizer", QuantizerConfig("int8_token", dynamic=True))],
    "fp8": [("*k_quantizer", QuantizerConfig("fp8_e4m3_token", dynamic=True)), ("*v_quantizer", QuantizerConfig("fp8_e4m3_token", dynamic=True))],
}


def preset(name: str, kv_cache: str | None = None) -> QuantConfig:
    """A named preset, optionally with KV-cache quantization rules appended."""
    if name not in PRESETS:
        raise LeanLMError(f"unknown scheme {name!r}; choose one of: {', '.join(PRESETS)}")
    cfg = PRESETS[name]()
    if kv_cache:
        if kv_cache not in KV_CACHE:
            raise LeanLMError(f"unknown KV-cache format {kv_cache!r}; choose int8 or fp8")
        cfg.rules += KV_CACHE[kv_cache]
    return cfg
