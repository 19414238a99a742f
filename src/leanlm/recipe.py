"""Steps and recipes: every technique as one typed step config, run by one step runner.

    recipe = Recipe.from_file("recipes/sparse24-gptq-gguf.yaml")      # or Recipe("smollm2-135m", [SparsifyStep(...), ...])
    results = recipe.run("out/")                                        # list of StepResult

Each `leanlm <command>` (quantize, sparsify, prune, distill, qat, draft, export) parses its options into
the same step config and runs it through `run_step`: a command is a one-step recipe. A recipe is
validated before any work (`Recipe.validate`): unknown keys, and a step that cannot follow the one
before it, are one-line errors. A run keeps each finished step under ``.<OUT>.steps/NN-name`` beside
OUT, so running it again after an interrupt skips the finished steps; the final model, its manifest
(every step's config and figures) and the exported files are renamed into OUT at the end.
Syntax and the step list: docs/recipes.md.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from .core.errors import LeanLMError
from .core.io import check_output
from .prune.api import PruneSizes
from .state import load, manifest_of, read_manifest, save, steps_of

# ------------------------------------------------------------------------------------------ what a step needs


@dataclass
class Facts:
    """What validation knows about the model between steps (no weight is loaded to know it)."""
    quantized: bool = False
    weight_kinds: set = field(default_factory=set)   # format kinds of the quantized weights: int, nvfp4, fp8_e4m3, ...
    act_quant: bool = False
    sparse: bool = False
    vocab: int | None = None
    context: int | None = None                       # max_position_embeddings: the longest sequence a step may use
    online_rotation: bool = False                    # runs an online Hadamard (quantize rotate="hadamard")


@dataclass
class ModelState:
    """The model a run works on, updated in place by each step (a step may replace `model`, e.g. prune)."""
    model: nn.Module
    tokenizer: Any
    source: str                      # the spec the run started from (teacher "source")
    dtype: str = "float32"
    trust_remote_code: bool = False


@dataclass
class StepResult:
    """One step's record, as the manifest keeps it."""
    step: str
    config: dict
    figures: dict
    seconds: float


@dataclass
class Context:
    out: Path | None = None          # where the step writes what it exports (export: the file; draft: the folder)
    scratch: Path | None = None      # resumable checkpoints of a training step
    progress: bool = True


def _quant_facts(f: Facts, rules) -> None:
    from .quantization.formats import parse_format

    for pattern, qc in rules:
        if qc is None:
            continue
        if "input_quantizer" in pattern:
            f.act_quant = True
        elif "weight_quantizer" in pattern:
            f.weight_kinds.add(parse_format(qc["format"] if isinstance(qc, dict) else qc.format).kind)
    f.quantized = True


def _config_of(spec: str) -> dict:
    """A folder's config.json (or the cached conversion of a built-in's), its text part; {} when unknown."""
    from .core.models import BUILTINS, _gguf_cache_folder, builtin_gguf

    try:
        path = _gguf_cache_folder(builtin_gguf(spec)) if spec in BUILTINS else Path(spec).expanduser()
        cfg = json.loads((path / "config.json").read_text())
    except (LeanLMError, OSError, ValueError):
        return {}
    return cfg.get("text_config", cfg)


def _vocab_of(spec: str) -> int | None:
    return _config_of(spec).get("vocab_size")


LENGTHS = ("seq_len", "calib_seq_len", "window")   # step options that are token lengths the model must hold


def check_lengths(step: "Step", f: Facts) -> None:
    """Every token length the step asks for fits the model's context (known before any weight is loaded)."""
    for name in LENGTHS:
        v = getattr(step, name, None)
        if f.context and isinstance(v, int) and v > f.context:
            raise LeanLMError(f"{name} {v} exceeds the model's context of {f.context} tokens (max_position_embeddings); lower it")


def source_facts(spec: str) -> Facts:
    cfg = _config_of(spec)
    f = Facts(vocab=cfg.get("vocab_size"), context=cfg.get("max_position_embeddings"))
    p = Path(spec).expanduser()
    from .state import is_leanlm_folder

    if is_leanlm_folder(p):
        man = read_manifest(p)
        q = man.get("quantization")
        if q:
            rules = [(n, e["config"]) for n, e in q["quantizers"].items()]
            _quant_facts(f, rules)
        f.sparse = bool((man.get("sparsity") or {}).get("masks"))
        f.online_rotation = bool((man.get("rotation") or {}).get("online"))
    return f


# ------------------------------------------------------------------------------------------------ the steps


class Step:
    """Base of the step configs: `check` (can it follow?), `after` (what it establishes), `run` (figures)."""
    name: ClassVar[str]
    changes_model: ClassVar[bool] = True

    def validate(self) -> None:
        """Options that contradict each other (no model needed)."""

    def check(self, f: Facts) -> None:
        """Raise LeanLMError (the reason) when this step cannot follow a model with facts `f`."""

    def after(self, f: Facts) -> None:
        """Update `f` to what this step establishes."""

    def run(self, s: ModelState, ctx: Context) -> dict:
        raise NotImplementedError

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class QuantizeStep(Step):
    """Post-training quantization: a preset (`scheme`), a QuantConfig (`config`: a dict or a JSON file) or a
    mixed-precision budget (`mixed` bits per weight, formats from `menu`, chosen under the `cost` model:
    bits, runtime bytes or measured latency, then `mixed_algorithm`: awq, gptq or rtn)."""
    name: ClassVar[str] = "quantize"
    scheme: str | None = None
    config: dict | str | None = None
    mixed: float | None = None
    menu: str | None = None          # comma-separated formats; None: quantization.mixed.MENU
    cost: str = "bits"               # mixed precision's cost model: bits | bytes | latency (quantization/mixed.py)
    mixed_algorithm: str = "awq"     # how the chosen formats are calibrated: awq | gptq | rtn
    kv_cache: str | None = None
    samples: int = 128
    seq_len: int = 512
    calib: str = "wiki"
    gptq_bf16: bool = False
    eval: bool = False
    max_memory: str | None = None    # e.g. "2GB": calibrate block by block from disk within this budget (core/offload.py)
    rotate: str | None = None        # hadamard | hadamard-fold (quantization/rotate.py); None: as the config says

    def validate(self) -> None:
        from .quantization import PRESETS
        from .quantization.rotate import METHODS

        if self.rotate is not None and self.rotate not in METHODS:
            raise LeanLMError(f"unknown rotation {self.rotate!r}; choose one of: {', '.join(METHODS)}")
        if self.rotate is not None and self.mixed is not None:
            raise LeanLMError("rotate does not combine with mixed (the precision search runs on the unrotated model); "
                              "use a scheme or a config with the rotation")

        from .quantization.mixed import ALGORITHMS, COSTS

        if self.cost not in COSTS:
            raise LeanLMError(f"unknown mixed-precision cost {self.cost!r}; choose one of: {', '.join(COSTS)}")
        if self.mixed_algorithm not in ALGORITHMS:
            raise LeanLMError(f"unknown mixed-precision algorithm {self.mixed_algorithm!r}; choose one of: {', '.join(ALGORITHMS)}")
        if self.mixed is None and (self.cost != "bits" or self.mixed_algorithm != "awq"):
            raise LeanLMError("cost and mixed_algorithm (--cost, --mixed-algorithm) apply to mixed precision; add mixed (--mixed BITS) or drop them")
        if (self.scheme is not None) + (self.config is not None) + (self.mixed is not None) != 1:
            raise LeanLMError(f"pass exactly one of scheme ({', '.join(PRESETS)}), config (a QuantConfig) or mixed (bits per weight)")
        _check_offload(self, "mixed precision measures every layer's sensitivity on the whole model: run it once without "
                       "max_memory on a machine that holds the model, or pass its per-layer formats as config" if self.mixed is not None else None)
        if self.scheme is not None or self.config is not None:
            cfg = self.quant_config()
            if self.max_memory and getattr(cfg, "rotate", None):
                raise LeanLMError("a rotation transforms the whole residual stream at once and does not run block by block; "
                                  "drop max_memory (--max-memory) or the rotation")
            if self.gptq_bf16 and not any(type(x).__name__ == "GPTQ" for x in cfg.algorithms):
                raise LeanLMError("--gptq-bf16 applies to schemes that use GPTQ (e.g. w4a16-gptq); this one does not")

    def quant_config(self):
        from .quantization import QuantConfig, preset

        if self.scheme is not None:
            cfg = preset(self.scheme, self.kv_cache)
        else:
            try:
                from .core.data import read_text_file

                d = json.loads(read_text_file(self.config, "quantization config")) if isinstance(self.config, str) else self.config
                cfg = QuantConfig.from_dict(d)
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise LeanLMError(f"cannot read the quantization config {self.config if isinstance(self.config, str) else ''}: {e}") from None
        cfg.calib_samples, cfg.calib_seq_len = self.samples, self.seq_len
        if self.rotate is not None:
            cfg.rotate = self.rotate
        if self.gptq_bf16:
            for x in cfg.algorithms:
                if type(x).__name__ == "GPTQ":
                    x.forward_dtype = "bfloat16"
        return cfg

    def check(self, f: Facts) -> None:
        if f.quantized:
            raise LeanLMError("the model is already quantized; quantize the float model once (use qat/qad to train a quantized one)")
        if f.sparse and self.mixed is None and self.quant_config().rotate:
            raise LeanLMError("a rotation mixes every weight and would destroy the sparsity masks; quantize with the rotation "
                              "before sparsifying, or without it")

    def after(self, f: Facts) -> None:
        if self.mixed is not None:
            f.quantized, f.weight_kinds = True, f.weight_kinds | {"int"}
        else:
            cfg = self.quant_config()
            _quant_facts(f, cfg.rules)
            f.online_rotation = f.online_rotation or cfg.rotate == "hadamard"

    def run(self, s: ModelState, ctx: Context) -> dict:
        from .core.data import calibration_batches
        from .quantization import average_bits, mixed_config, quantize
        from .quantization.mixed import MENU

        r: dict = {}
        if self.eval:
            from .evaluation import perplexity

            r["perplexity_float"] = perplexity(s.model, s.tokenizer, progress=ctx.progress).perplexity
        if self.mixed is not None:
            cfg, r["mixed"] = mixed_config(s.model, s.tokenizer, self.mixed, tuple(self.menu.split(",")) if self.menu else MENU, self.calib, ctx.progress,
                                           cost=self.cost, algorithm=self.mixed_algorithm, samples=min(self.samples, 8), seq_len=self.seq_len)
            cfg.calib_samples, cfg.calib_seq_len = self.samples, self.seq_len
        else:
            cfg = self.quant_config()
        calib = calibration_batches(s.tokenizer, self.samples, self.seq_len, self.calib) if self.calib != "wiki" else None
        quantize(s.model, cfg, calib, tokenizer=s.tokenizer, progress=ctx.progress)
        r.update(calib_seconds=s.model.leanlm_quant["calib_seconds"], average_bits=average_bits(s.model))
        if self.eval:
            r["perplexity_quantized"] = perplexity(s.model, s.tokenizer, progress=ctx.progress).perplexity
        return r

    def run_offloaded(self, spec: str, out: Path, ctx: Context, overwrite: bool = False, trust_remote_code: bool = False) -> dict:
        """Quantize the checkpoint `spec` into the folder `out` block by block within `max_memory` (no ModelState)."""
        from .core.data import calibration_batches
        from .core.offload import source_tokenizer
        from .quantization.offload import quantize_offloaded

        tok = source_tokenizer(spec, trust_remote_code)
        calib = calibration_batches(tok, self.samples, self.seq_len, self.calib) if self.calib != "wiki" and tok is not None else None
        return quantize_offloaded(spec, self.quant_config(), out, max_memory=self.max_memory, calib_data=calib, tokenizer=tok,
                                  progress=ctx.progress, overwrite=overwrite, trust_remote_code=trust_remote_code,
                                  step={"step": self.name, "config": self.to_dict()})


@dataclass
class SparsifyStep(Step):
    """Unstructured or n:m sparsity (`method` magnitude, wanda or sparsegpt); `rules` are [glob, value] pairs."""
    name: ClassVar[str] = "sparsify"
    method: str = "wanda"
    sparsity: float | None = None
    pattern: str = "unstructured"
    rules: list = field(default_factory=list)
    samples: int = 128
    seq_len: int = 512
    calib: str = "wiki"
    eval: bool = False
    max_memory: str | None = None    # e.g. "2GB": wanda / sparsegpt block by block from disk within this budget

    def sparsity_config(self):
        from .sparsity import SparsityConfig

        return SparsityConfig(self.method, sparsity=self.sparsity, pattern=self.pattern, rules=[tuple(r) for r in self.rules],
                              calib_samples=self.samples, calib_seq_len=self.seq_len)

    def validate(self) -> None:
        self.sparsity_config()
        _check_offload(self, f"max_memory runs the calibrated methods (wanda, sparsegpt) block by block, not {self.method}"
                       if self.method == "magnitude" else None)

    def check(self, f: Facts) -> None:
        if f.quantized:
            raise LeanLMError("sparsifying a quantized model moves weights off the quantization grid; sparsify first, then quantize")

    def after(self, f: Facts) -> None:
        f.sparse = True

    def run(self, s: ModelState, ctx: Context) -> dict:
        from .core.data import calibration_batches
        from .sparsity import sparsify_

        cfg = self.sparsity_config()
        ids = None
        if cfg.needs_data:
            if s.tokenizer is None:
                raise LeanLMError(f"{self.method} needs calibration text, and this model has no tokenizer; use method magnitude")
            ids = calibration_batches(s.tokenizer, self.samples, self.seq_len, self.calib)
        r: dict = {}
        if self.eval:
            from .evaluation import perplexity

            r["perplexity_dense"] = perplexity(s.model, s.tokenizer, progress=ctx.progress).perplexity
        rep = sparsify_(s.model, cfg, ids, progress=ctx.progress)
        r.update(pattern=str(cfg.default), seconds=rep["seconds"], overall=rep["overall"])
        if self.eval:
            r["perplexity_sparse"] = perplexity(s.model, s.tokenizer, progress=ctx.progress).perplexity
        return r

    def run_offloaded(self, spec: str, out: Path, ctx: Context, overwrite: bool = False, trust_remote_code: bool = False) -> dict:
        """Sparsify the checkpoint `spec` into the folder `out` block by block within `max_memory` (no ModelState)."""
        from .core.data import calibration_batches
        from .core.offload import source_tokenizer
        from .sparsity.offload import sparsify_offloaded

        tok = source_tokenizer(spec, trust_remote_code)
        if tok is None:
            raise LeanLMError(f"{self.method} needs calibration text, and this model has no tokenizer")
        ids = calibration_batches(tok, self.samples, self.seq_len, self.calib)
        return sparsify_offloaded(spec, self.sparsity_config(), out, max_memory=self.max_memory, calibration_ids_=ids, tokenizer=tok,
                                  progress=ctx.progress, overwrite=overwrite, trust_remote_code=trust_remote_code,
                                  step={"step": self.name, "config": self.to_dict()})


def _check_offload(step: Step, refused: str | None) -> None:
    """max_memory: a valid size, and not with options that need the whole model in memory."""
    if step.max_memory is None:
        return
    from .core.offload import parse_bytes

    parse_bytes(step.max_memory)
    if refused:
        raise LeanLMError(f"{refused}; drop max_memory (--max-memory)")
    if step.eval:
        raise LeanLMError("eval measures perplexity on the whole model in memory; drop it with max_memory (--max-memory) "
                          "and evaluate the output folder afterwards (leanlm eval OUT)")


@dataclass
class TrainOptions:
    """Training options shared by distill and prune's optional distillation."""
    lr: float = 1e-4
    batch_size: int = 4
    seq_len: int = 512
    grad_accum: int = 1
    bf16: bool | None = None
    temperature: float = 1.0
    lm_weight: float = 0.0
    hidden_pairs: int = 0
    text: str = "wiki"
    eval_windows: int = 10
    eval_every: int = 0
    checkpoint_dir: str | None = None

    def _distill(self, student, teacher, tok, minutes, tokens, ctx: Context) -> tuple[dict, dict]:
        """(the distill_config and train_config kwargs of prune_and_distill/distill, with checkpoints in ctx.scratch)."""
        from .distill import DistillConfig, TrainConfig, matched_hidden_pairs

        dc = DistillConfig(temperature=self.temperature, lm_weight=self.lm_weight,
                           hidden_layers=matched_hidden_pairs(student, teacher, self.hidden_pairs) if student is not None else [])
        tc = TrainConfig(max_tokens=tokens, max_minutes=minutes, lr=self.lr, batch_size=self.batch_size, seq_len=self.seq_len,
                         grad_accum=self.grad_accum, autocast_bf16=self.bf16, eval_windows=self.eval_windows,
                         eval_every=self.eval_every, checkpoint_dir=self.checkpoint_dir or (str(ctx.scratch) if ctx.scratch else None),
                         progress=ctx.progress)
        return dc, tc


def _train_figures(res, eval_windows: int) -> dict:
    return {"steps": res.steps, "tokens": res.tokens, "seconds": res.seconds, "resumed_from": res.resumed_from,
            "perplexity_start": res.start_perplexity, "perplexity_end": res.final_perplexity, "eval_windows": eval_windows,
            "loss_first": res.history[0]["loss"] if res.history else None, "loss_last": res.history[-1]["loss"] if res.history else None}


def _teacher(spec: str | None, s: ModelState):
    """The teacher model: 'source' (or None) is the model the run started from, else a model spec."""
    return load(s.source if spec in (None, "source") else spec, dtype=s.dtype, trust_remote_code=s.trust_remote_code)[0]


def _check_teacher_vocab(step: str, teacher: str | None, f: Facts) -> None:
    if teacher in (None, "source", "self") or f.vocab is None:
        return
    v = _vocab_of(teacher)
    if v is not None and v != f.vocab:
        raise LeanLMError(f"the teacher {teacher} has a vocabulary of {v} tokens and the model {f.vocab}; "
                          f"{step} needs a teacher with the same tokenizer")


@dataclass
class PruneStep(TrainOptions, PruneSizes, Step):
    """Structured pruning (Minitron-style) to `target_params` or given sizes (`PruneSizes`); with `distill_minutes`
    or `distill_tokens`, then distilled from the unpruned model (`prune_and_distill`)."""
    name: ClassVar[str] = "prune"
    changes_model: ClassVar[bool] = True
    target_params: str | int | None = None
    samples: int = 32
    depth_metric: str = "ppl"
    distill_minutes: float | None = None
    distill_tokens: int | None = None
    eval: bool = False

    def target(self):
        from .prune import PruneTarget

        return PruneTarget(params=self.target_params, **self.sizes())

    def check(self, f: Facts) -> None:
        if f.quantized:
            raise LeanLMError("structured pruning after quantization would re-slice quantized weights and scales; prune first, then quantize")
        if f.sparse:
            raise LeanLMError("structured pruning after sparsify would drop the sparsity masks; prune first, then sparsify")
        if self.distill_minutes is not None and self.distill_tokens is not None:
            raise LeanLMError("give one distillation budget: distill_minutes or distill_tokens")

    def run(self, s: ModelState, ctx: Context) -> dict:
        from .prune import prune, prune_and_distill

        r: dict = {}
        ppl = None
        if self.eval:
            from .evaluation import perplexity

            ppl = lambda m: perplexity(m, s.tokenizer, source=self.text, progress=ctx.progress).perplexity  # noqa: E731
            r["perplexity_original"] = ppl(s.model)
        kw = dict(samples=self.samples, seq_len=self.seq_len, depth_metric=self.depth_metric, source=self.text, progress=ctx.progress)
        if self.distill_minutes is None and self.distill_tokens is None:
            pruned = prune(s.model, self.target(), tokenizer=s.tokenizer, **kw)
        else:
            dc, tc = self._distill(None, None, s.tokenizer, self.distill_minutes, self.distill_tokens, ctx)
            pruned, res = prune_and_distill(s.model, self.target(), tokenizer=s.tokenizer, distill_config=dc, train_config=tc,
                                            train_data=self.text, prune_kwargs=kw, hidden_pairs=self.hidden_pairs)
            r["distill"] = _train_figures(res, self.eval_windows)
        p = pruned.leanlm_prune
        r.update({"from": p["from"], "to": p["to"], "params_before": p["params_before"], "params_after": p["params_after"]})
        if self.eval:
            r["perplexity_pruned" if "distill" not in r else "perplexity_distilled"] = ppl(pruned)
        s.model = pruned
        return r


@dataclass
class DistillStep(TrainOptions, Step):
    """Logit (and optionally hidden-state) distillation of the model from `teacher` ('source': the model the
    run started from, or a model spec) for `minutes` or `tokens`."""
    name: ClassVar[str] = "distill"
    changes_model: ClassVar[bool] = True
    teacher: str | None = "source"
    minutes: float | None = None
    tokens: int | None = None

    def validate(self) -> None:
        if (self.minutes is None) == (self.tokens is None):
            raise LeanLMError("give one training budget: minutes (--minutes M) or tokens (--tokens N)")

    def check(self, f: Facts) -> None:
        if f.quantized:
            raise LeanLMError("distilling a quantized model trains its weights off the quantization grid; use qad (qat with a teacher)")
        _check_teacher_vocab("distill", self.teacher, f)

    def run(self, s: ModelState, ctx: Context) -> dict:
        from .distill import distill

        teacher = _teacher(self.teacher, s)
        dc, tc = self._distill(s.model, teacher, s.tokenizer, self.minutes, self.tokens, ctx)
        res = distill(s.model, teacher, self.text, dc, tc, tokenizer=s.tokenizer)
        return _train_figures(res, self.eval_windows)


@dataclass
class QATStep(Step):
    """Quantization-aware training; with a `teacher` ('self': the float model before quantizing, 'source',
    or a model spec) quantization-aware distillation (QAD). Without `scheme`, training continues from the
    model's own quantization. `budget`: 10m, 90s, 1h or tokens (2M, 500k)."""
    name: ClassVar[str] = "qat"
    budget: str = "10m"
    scheme: str | None = None
    teacher: str | None = None
    learn_scales: bool = False
    scale_lr_mult: float = 10.0
    train: str = "all"
    compile: bool | None = None
    lm_weight: float = 0.0
    kl_weight: float = 1.0
    temperature: float = 1.0
    hidden_layers: str = ""
    lr: float = 1e-3
    batch_size: int = 2
    seq_len: int = 512
    grad_accum: int = 2
    bf16: bool | None = None
    text: str = "wiki"
    samples: int = 128
    calib_seq_len: int = 512
    eval_every: int = 0
    eval_windows: int = 10
    checkpoint_dir: str | None = None
    resume: bool = True
    seed: int = 0

    def configs(self):
        from .distill.kd import DistillConfig
        from .distill.trainer import parse_budget
        from .qat.api import QATConfig, check_trainable, default_train_config

        budget = parse_budget(self.budget)
        cfg = check_trainable(self.scheme) if self.scheme else None
        if cfg is not None:
            cfg.calib_samples, cfg.calib_seq_len = self.samples, self.calib_seq_len
        qcfg = QATConfig(learn_scales=self.learn_scales, scale_lr_mult=self.scale_lr_mult, train=self.train, compile=self.compile)
        qcfg.check()
        dcfg = None
        if self.teacher:
            try:
                pairs = [tuple(int(x) for x in p.split(":")) for p in self.hidden_layers.split(",") if p.strip()]
            except ValueError:
                raise LeanLMError(f"cannot read hidden_layers {self.hidden_layers!r}; write student:teacher pairs like 10:10,20:20") from None
            dcfg = DistillConfig(temperature=self.temperature, kl_weight=self.kl_weight, lm_weight=self.lm_weight, hidden_layers=pairs)
            dcfg.check()
        tcfg = default_train_config(lr=self.lr, batch_size=self.batch_size, seq_len=self.seq_len, grad_accum=self.grad_accum,
                                    autocast_bf16=self.bf16, eval_every=self.eval_every, eval_windows=self.eval_windows,
                                    checkpoint_dir=self.checkpoint_dir, resume=self.resume, seed=self.seed, **budget)
        tcfg.check()
        return cfg, qcfg, dcfg, tcfg

    def validate(self) -> None:
        self.configs()

    def check(self, f: Facts) -> None:
        if self.scheme and f.quantized:
            raise LeanLMError(f"the model is already quantized; drop scheme {self.scheme!r} to train its own quantization")
        if not self.scheme and not f.quantized:
            raise LeanLMError("the model is not quantized; give a scheme (e.g. w4a16-gptq) or quantize it in an earlier step")
        if self.teacher == "self" and f.quantized:
            raise LeanLMError("teacher 'self' needs the float model, but this model is already quantized; pass the float model "
                              "as the teacher (its path, or 'source' in a recipe that started from it)")
        _check_teacher_vocab(self.name, self.teacher, f)

    def after(self, f: Facts) -> None:
        if self.scheme:
            _quant_facts(f, self.configs()[0].rules)

    def run(self, s: ModelState, ctx: Context) -> dict:
        from .qat.api import qat
        from .quantization import average_bits

        cfg, qcfg, dcfg, tcfg = self.configs()
        tcfg.progress = ctx.progress
        if tcfg.checkpoint_dir is None and ctx.scratch is not None:
            tcfg.checkpoint_dir = str(ctx.scratch)
        teacher = "self" if self.teacher == "self" else _teacher(self.teacher, s) if self.teacher else None
        res = qat(s.model, cfg, tokenizer=s.tokenizer, teacher=teacher, config=qcfg, distill=dcfg, train_config=tcfg,
                  train_data=self.text, progress=ctx.progress)
        tr = res.train
        return {"mode": res.mode, "ptq_seconds": res.ptq_seconds, "steps": tr.steps, "tokens": tr.tokens, "seconds": tr.seconds,
                "start_perplexity": tr.start_perplexity, "final_perplexity": tr.final_perplexity, "evals": tr.evals,
                "eval_windows": self.eval_windows, "resumed_from": tr.resumed_from, "checkpoint": tr.checkpoint,
                "loss_first": tr.history[0]["loss"] if tr.history else None, "loss_last": tr.history[-1]["loss"] if tr.history else None,
                "average_bits": average_bits(s.model)}


@dataclass
class QADStep(QATStep):
    """QAT with a teacher (default 'source', the model the run started from)."""
    name: ClassVar[str] = "qad"
    teacher: str | None = "source"

    def validate(self) -> None:
        if not self.teacher:
            raise LeanLMError("qad needs a teacher ('self', 'source' or a model path); use qat for training without one")
        super().validate()


@dataclass
class DraftStep(Step):
    """A draft model for speculative decoding: the model's first `layers` decoder layers distilled for `budget`
    (and at most `tokens`), or an existing draft `model` checked against the model's vocabulary."""
    name: ClassVar[str] = "draft"
    changes_model: ClassVar[bool] = False
    layers: int | None = None
    model: str | None = None
    budget: str = "5m"
    tokens: int | None = None
    seq_len: int = 128
    batch: int = 4
    lr: float = 1e-3
    calib: str = "wiki"
    method: str = "shallow"          # shallow (a distilled draft model), eagle (an EAGLE-1 head, speculative/eagle.py) or medusa
    draft_vocab: int = 8192          # eagle, medusa: reduced draft vocabulary
    samples: int = 384               # eagle, medusa: self-generated training sequences
    corpus_share: float = 0.5        # eagle, medusa: share of the text time on the model's features over the calibration corpus
    heads: int = 4                   # medusa: heads (drafts per round)

    def validate(self) -> None:
        if self.method not in ("shallow", "eagle", "medusa"):
            raise LeanLMError(f"unknown draft method {self.method!r}; choose shallow, eagle or medusa")
        if self.method in ("eagle", "medusa"):
            if self.layers is not None or self.model is not None:
                raise LeanLMError(f"--method {self.method} trains a head on the model's own features: drop --layers")
            if self.calib != "wiki":
                raise LeanLMError(f"--method {self.method} writes its own training text from the protocol's calibration prompts: drop --calib")
            if self.heads < 1:
                raise LeanLMError(f"--heads must be >= 1, got {self.heads}")
            if not 0 <= self.corpus_share < 1:
                raise LeanLMError(f"--corpus-share must lie in [0, 1), got {self.corpus_share}: the share of the text time spent "
                                  "on corpus features (the rest is text the model writes)")
        elif (self.layers is None) == (self.model is None):
            raise LeanLMError("give layers (build a shallow draft: --layers N) or model (an existing draft), not both")
        from .distill.trainer import parse_budget

        parse_budget(self.budget)

    def check(self, f: Facts) -> None:
        if self.model is not None and f.vocab is not None:
            v = _vocab_of(self.model)
            if v is not None and v != f.vocab:
                raise LeanLMError(f"the draft {self.model} has a vocabulary of {v} tokens and the model {f.vocab}; "
                                  "a draft must share the model's tokenizer")

    def run(self, s: ModelState, ctx: Context) -> dict:
        if self.method in ("eagle", "medusa"):
            from .speculative.eagle import save_head, train_head

            if s.tokenizer is None:
                raise LeanLMError(f"the model has no tokenizer; a {self.method} head writes its training text with it")
            head = train_head(s.model, s.tokenizer, self.budget, method=self.method, heads=self.heads,
                              draft_vocab=self.draft_vocab, samples=self.samples,
                               corpus_share=self.corpus_share,
                               max_tokens=self.tokens, seq_len=self.seq_len, batch=self.batch, lr=self.lr,
                               checkpoint_dir=ctx.scratch, progress=ctx.progress)
            save_head(head, ctx.out, head.leanlm_draft)
            return {**head.leanlm_draft, "out": ctx.out.name}
        if self.model is not None:
            from .speculative.drafts import check_vocab

            d, dtok = load(self.model, dtype=s.dtype, trust_remote_code=s.trust_remote_code)
            check_vocab(s.model, d, s.tokenizer, dtok)
            r = {"model": self.model}
        else:
            from .core.data import calibration_texts, join_and_tokenize
            from .speculative.drafts import make_shallow_draft

            ids = join_and_tokenize(s.tokenizer, calibration_texts(self.calib))
            d = make_shallow_draft(s.model, self.layers, self.budget, max_tokens=self.tokens, calib_ids=ids, seq_len=self.seq_len,
                                   batch=self.batch, lr=self.lr, progress=ctx.progress)
            d.leanlm_source = getattr(s.model, "leanlm_source", None)
            r = dict(d.leanlm_draft)
        save(d, ctx.out, tokenizer=s.tokenizer, overwrite=True)
        return {**r, "out": ctx.out.name}


EXPORT_NAMES = {"gguf": "model.gguf", "compressed-tensors": "compressed-tensors", "hf": "hf", "onnx": "onnx"}


@dataclass
class ExportStep(Step):
    """Export to a deployment format (`to`: compressed-tensors, gguf, hf, onnx); `quant`: the GGUF type.
    In a recipe the export lands in OUT/`name` (default model.gguf, or a folder named after the format)."""
    name: ClassVar[str] = "export"
    changes_model: ClassVar[bool] = False
    to: str = "gguf"
    quant: str | None = None
    path: str | None = None

    def validate(self) -> None:
        from .export import FORMATS

        if self.to not in FORMATS:
            raise LeanLMError(f"unknown export format {self.to!r}; choose one of: {', '.join(FORMATS)}")
        if self.quant and self.to != "gguf":
            raise LeanLMError("quant (--quant) applies to gguf (F16, Q8_0, Q4_0, Q4_K_M, ...); other formats keep the model's own quantization")

    def check(self, f: Facts) -> None:
        from .export import ONLINE_ROTATION

        if f.online_rotation and self.to not in ONLINE_ROTATION:
            raise LeanLMError(f"{self.to} cannot carry the online Hadamard rotation (before down_proj) this model runs; export to "
                              f"{', '.join(ONLINE_ROTATION)}, or quantize with rotate 'hadamard-fold', which every format carries")
        odd = sorted(f.weight_kinds - {"int"})
        if self.to == "gguf" and (odd or f.act_quant):
            what = f"{', '.join(odd)} weights" if odd else "activation quantization"
            raise LeanLMError(f"GGUF holds float models and weight-only int quantization, not {what}; quantize with an int "
                              "weight-only scheme (w4a16-*, w8a16) or export to compressed-tensors")
        if self.to == "compressed-tensors":
            if not f.quantized:
                raise LeanLMError("compressed-tensors holds quantized weights and the model is not quantized; quantize it in an earlier step")
            if f.weight_kinds - {"int", "fp8_e4m3"}:
                raise LeanLMError(f"compressed-tensors export cannot represent {', '.join(sorted(f.weight_kinds - {'int', 'fp8_e4m3'}))} "
                                  "weights; use int or fp8 schemes")
        if self.to == "hf" and f.quantized:
            raise LeanLMError("export hf writes a float checkpoint and the model is quantized; export to gguf or compressed-tensors")

    def run(self, s: ModelState, ctx: Context) -> dict:
        from .evaluation.memory import checkpoint_bytes
        from .export import export

        path = export(s.model, self.to, ctx.out, overwrite=True, tokenizer=s.tokenizer, **({"quant": self.quant} if self.quant else {}))
        r = {"out": path.name, "bytes": path.stat().st_size if path.is_file() else checkpoint_bytes(path)}
        if self.to == "gguf":
            from collections import Counter

            from .export import gguf as _g

            rep = _g.last_report
            r.update(quant=rep["quant"], reused_exact=len(rep["reused_exact"]), requantized=len(rep["requantized"]),
                     kept_float=len(rep["kept_float"]), notes=_g.report_lines(rep), tensor_types=dict(Counter(rep["types"].values())))
        return r


@dataclass
class EvalStep(Step):
    """Held-out perplexity (and with `speed`, generation speed through transformers) of the model."""
    name: ClassVar[str] = "eval"
    changes_model: ClassVar[bool] = False
    ppl: bool = True
    speed: bool = False
    source: str = "wiki"
    window: int = 512
    windows: int = 40
    batch: int = 1
    prompt_tokens: int = 128
    new_tokens: int = 128
    runs: int = 5
    warmup: int = 1

    def run(self, s: ModelState, ctx: Context) -> dict:
        from .evaluation.harness import EvalSettings, evaluate

        st = EvalSettings(ppl=self.ppl, speed=self.speed, source=self.source, window=self.window, max_windows=self.windows or None,
                          batch=self.batch, prompt_tokens=self.prompt_tokens, new_tokens=self.new_tokens, runs=self.runs,
                          warmup=self.warmup, progress=ctx.progress)
        r = evaluate({"model": (s.model, s.tokenizer)}, st)["models"]["model"]
        return {k: v for k, v in r.items() if k in ("perplexity", "speed", "weights_in_memory_bytes")}


STEPS: dict[str, type[Step]] = {c.name: c for c in (PruneStep, DistillStep, SparsifyStep, QuantizeStep, QATStep, QADStep,
                                                    DraftStep, ExportStep, EvalStep)}


def make_step(name: str, options: dict | None, where: str = "step") -> Step:
    """A step config from its name and options, naming the valid ones on a mistake."""
    if name not in STEPS:
        raise LeanLMError(f"{where}: unknown step {name!r}; valid steps: {', '.join(STEPS)}")
    cls = STEPS[name]
    options = options or {}
    if not isinstance(options, dict):
        raise LeanLMError(f"{where} ({name}): options must be a mapping of key: value, got {options!r}")
    valid = [f.name for f in fields(cls)]
    bad = [k for k in options if k not in valid]
    if bad:
        raise LeanLMError(f"{where} ({name}): unknown key {bad[0]!r}; valid keys: {', '.join(valid)}")
    return cls(**options)


# ------------------------------------------------------------------------------------------------ the runner


def open_state(spec: str, dtype: str = "float32", trust_remote_code: bool = False) -> ModelState:
    model, tok = load(spec, dtype=dtype, trust_remote_code=trust_remote_code)
    return ModelState(model, tok, str(spec), dtype, trust_remote_code)


def run_step(step: Step, s: ModelState, ctx: Context | None = None) -> StepResult:
    """Run one step on `s` (in place) and append its record to the model's step history."""
    ctx = ctx or Context()
    before = s.model
    t0 = time.perf_counter()
    figures = step.run(s, ctx)
    if s.model is not before:  # a step that made a new model (prune) carries the history over
        s.model.leanlm_source = getattr(before, "leanlm_source", None)
        s.model.leanlm_steps = list(getattr(before, "leanlm_steps", None) or [])
    res = StepResult(step.name, step.to_dict(), figures, time.perf_counter() - t0)
    steps_of(s.model).append(asdict(res))
    return res


@dataclass
class Recipe:
    """A model and the steps to apply to it, in order."""
    model: str
    steps: list[Step]
    dtype: str = "float32"
    trust_remote_code: bool = False

    KEYS: ClassVar[tuple[str, ...]] = ("model", "dtype", "trust_remote_code", "steps")

    @classmethod
    def from_dict(cls, d: dict, where: str = "recipe") -> "Recipe":
        if not isinstance(d, dict):
            raise LeanLMError(f"{where}: a recipe is a mapping with keys {', '.join(cls.KEYS)}")
        bad = [k for k in d if k not in cls.KEYS]
        if bad:
            raise LeanLMError(f"{where}: unknown key {bad[0]!r}; valid keys: {', '.join(cls.KEYS)}")
        if not d.get("model"):
            raise LeanLMError(f"{where}: no model; add `model: NAME-OR-PATH`")
        raw = d.get("steps")
        if not isinstance(raw, list) or not raw:
            raise LeanLMError(f"{where}: steps must be a non-empty list like `- quantize: {{scheme: w4a16-gptq}}`")
        steps = []
        for i, entry in enumerate(raw, 1):
            if isinstance(entry, str):
                entry = {entry: None}
            if not isinstance(entry, dict) or len(entry) != 1:
                raise LeanLMError(f"{where} step {i}: write each step as `- NAME: {{options}}` (one name per step); valid steps: {', '.join(STEPS)}")
            (name, opts), = entry.items()
            try:
                steps.append(make_step(name, opts, where=f"{where} step {i}"))
            except TypeError as e:
                raise LeanLMError(f"{where} step {i} ({name}): {e}") from None
        return cls(str(d["model"]), steps, str(d.get("dtype", "float32")), bool(d.get("trust_remote_code", False)))

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "Recipe":
        path = Path(path)
        try:
            from .core.data import read_text_file

            text = read_text_file(path, "recipe")
        except OSError as e:
            raise LeanLMError(f"cannot read the recipe {path}: {e.strerror}") from None
        try:
            if path.suffix == ".json":
                d = json.loads(text)
            else:
                import yaml

                d = yaml.safe_load(text)
        except Exception as e:
            raise LeanLMError(f"{path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {str(e).splitlines()[0]}") from None
        return cls.from_dict(d, where=str(path))

    def to_dict(self) -> dict:
        return {"model": self.model, "dtype": self.dtype, "trust_remote_code": self.trust_remote_code,
                "steps": [{s.name: s.to_dict()} for s in self.steps]}

    def validate(self) -> None:
        """Every step's options, and that each step can follow the one before it; no model is loaded."""
        f = source_facts(self.model)
        for i, step in enumerate(self.steps, 1):
            try:
                if i > 1 and getattr(step, "max_memory", None):
                    raise LeanLMError("max_memory reads the float model from disk block by block, so only the first step of a "
                                      "recipe may use it; move this step first or drop max_memory")
                step.validate()
                step.check(f)
                check_lengths(step, f)
            except LeanLMError as e:
                raise LeanLMError(f"step {i} ({step.name}): {e}") from None
            step.after(f)

    def run(self, out: str | os.PathLike, overwrite: bool = False, progress: bool = True, console=None) -> list[StepResult]:
        """Run the steps and write the final model folder (and what the steps export) to `out`.

        Each finished step is kept under ``.<out>.steps/NN-name`` (beside `out`); running the same recipe
        again after an interrupt resumes after the last finished step.
        """
        self.validate()
        check_output(out, overwrite)
        out = Path(out)
        work = out.parent / f".{out.name}.steps"
        work.mkdir(parents=True, exist_ok=True)
        say = console.print if console is not None else (lambda *a, **k: None)
        done_dirs = []
        for i, step in enumerate(self.steps):
            d = work / f"{i + 1:02d}-{step.name}"
            if not d.is_dir():
                break
            rec = json.loads((d / "step.json").read_text())
            if rec["config"] != json.loads(json.dumps(step.to_dict(), default=str)):
                raise LeanLMError(f"step {i + 1} ({step.name}) finished earlier with other options; restore the recipe or "
                                  f"remove {work} to start over")
            done_dirs.append(d)
        results = [StepResult(**json.loads((d / "step.json").read_text())) for d in done_dirs]
        model_dirs = [d / "model" for d in done_dirs if (d / "model").is_dir()]
        s = None   # an offloaded first step (max_memory) reads the model from disk itself; later steps load its output
        if done_dirs or not getattr(self.steps[0], "max_memory", None):
            s = open_state(str(model_dirs[-1]) if model_dirs else self.model, self.dtype, self.trust_remote_code)
            s.source = self.model
        if done_dirs:  # the history up to the last finished step (which may not have changed the model)
            man = json.loads((done_dirs[-1] / "leanlm.json").read_text())
            s.model.leanlm_steps, s.model.leanlm_source = man["steps"], man["source"]
            say(f"resuming after step {len(done_dirs)} ({self.steps[len(done_dirs) - 1].name}); finished steps are kept in {work}")
        n = len(self.steps)
        for i in range(len(done_dirs), n):
            step = self.steps[i]
            d = work / f"{i + 1:02d}-{step.name}"
            tmp = work / f".{d.name}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            say(f"[bold]step {i + 1}/{n}: {step.name}[/bold] {_brief(step)}")
            artifact = tmp / "artifacts" / ((step.path or EXPORT_NAMES[step.to]) if isinstance(step, ExportStep) else "draft")
            artifact.parent.mkdir()
            ctx = Context(out=artifact, scratch=work / f"{d.name}.checkpoints", progress=progress)
            if s is None:
                t0 = time.perf_counter()
                figures = step.run_offloaded(self.model, tmp / "model", ctx, trust_remote_code=self.trust_remote_code)
                res = StepResult(step.name, step.to_dict(), figures, time.perf_counter() - t0)
                shutil.copy2(tmp / "model" / "leanlm.json", tmp / "leanlm.json")
            else:
                res = run_step(step, s, ctx)
                if step.changes_model:
                    save(s.model, tmp / "model", tokenizer=s.tokenizer)
                (tmp / "leanlm.json").write_text(json.dumps(manifest_of(s.model), indent=1, default=str))
            (tmp / "step.json").write_text(json.dumps(asdict(res), indent=1, default=str))
            os.replace(tmp, d)
            shutil.rmtree(ctx.scratch, ignore_errors=True)
            results.append(res)
            if s is None and i + 1 < n:
                s = open_state(str(d / "model"), self.dtype, self.trust_remote_code)
                s.source = self.model
            say(f"  done in {res.seconds:.1f} s: {brief_figures(res.figures)}")
        from .core.io import atomic_dir

        with atomic_dir(out, overwrite=overwrite) as tmp:
            if s is None:   # the offloaded step was the only one: its folder is the result
                shutil.copytree(work / f"01-{self.steps[0].name}" / "model", tmp / "model")
            else:
                save(s.model, tmp / "model", tokenizer=s.tokenizer)
            for p in (tmp / "model").iterdir():
                os.replace(p, tmp / p.name)
            (tmp / "model").rmdir()
            for i, step in enumerate(self.steps):
                arts = work / f"{i + 1:02d}-{step.name}" / "artifacts"
                for p in arts.iterdir() if arts.is_dir() else ():
                    if (tmp / p.name).exists():
                        raise LeanLMError(f"step {i + 1} ({step.name}) writes {p.name}, which another step wrote too; give it another path")
                    shutil.copytree(p, tmp / p.name) if p.is_dir() else shutil.copy2(p, tmp / p.name)
            (tmp / "recipe.json").write_text(json.dumps(self.to_dict(), indent=1, default=str))
        shutil.rmtree(work, ignore_errors=True)
        return results


def _brief(step: Step) -> str:
    keys = {f.name: f.default for f in fields(step)}
    return ", ".join(f"{k}={v}" for k, v in step.to_dict().items() if v != keys.get(k) and v not in (None, [], ""))


def brief_figures(fig: dict) -> str:
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in fig.items()
                     if isinstance(v, (int, float, str)) and not isinstance(v, bool))[:300]
