"""Quantization-aware training (QAT) and distillation (QAD) on top of leanlm's PTQ and shared trainer.

    res = leanlm.qat.qat(model, "w3a16-gptq", tokenizer=tok, budget="10m")                  # QAT
    res = leanlm.qat.qat(model, "w3a16-gptq", tokenizer=tok, teacher="self", budget="2M")   # QAD
    leanlm.save(model, "out/", tokenizer=tok)

Steps: (1) post-training quantization with the scheme's own calibration algorithm (GPTQ, AWQ,
SmoothQuant: `leanlm.quantize`), which folds every weight onto its grid; (2) `prepare_qat`: every
weight quantizer becomes a `QATQuantizer` that fake-quantizes the (now latent, float) weight with
the calibrated scales and a straight-through estimator, optionally learning the scales (LSQ);
activation and KV-cache quantizers keep their format and pass gradients straight through;
(3) `leanlm.distill.train` with the LM loss (QAT) or `DistillLoss` against a float teacher (QAD);
(4) `finalize_qat`: weights are folded onto the grid with the final scales, so the model is again
an ordinary leanlm-quantized model that `leanlm.save`, the runtime and the exporters take as is.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..core.errors import LeanLMError
from ..distill.kd import DistillConfig, DistillLoss, _train_ids
from ..distill.trainer import TrainConfig, TrainResult, lm_loss, parse_budget, train
from ..quantization.config import PRESETS, QuantConfig, preset
from ..quantization.formats import fake_quantize
from ..quantization.modules import TensorQuantizer, quantizers
from .fakequant import QATActQuantizer, QATQuantizer, compile_works

TRAIN_WHAT = ("all", "quantized", "scales")
ONNX_SCHEMES = ("int8-dynamic", "int8-static", "int4-weight")


@dataclass
class QATConfig:
    """What QAT trains.

    train: "all" (quantized weights, their learned scales if any, norms and embeddings),
    "quantized" (only the latent weights of quantized layers and their scales) or "scales" (only the
    learned scales, codes nearly fixed: EfficientQAT's end-to-end stage, Chen et al. 2024; needs
    learn_scales). learn_scales: LSQ step sizes (Esser et al. 2020); scale_lr_mult: their
    learning rate relative to the weights' (see `QATQuantizer`). compile: run the fake
    quantization through torch.compile's fused kernels (same values; 1.5x faster NVFP4 steps and
    1.25x faster W4A8 steps on SmolLM2, bench/qat_speed.py); None: on when torch.compile works on
    this machine (a warning says when it does not and training runs eagerly).
    """

    learn_scales: bool = False
    scale_lr_mult: float = 10.0
    train: str = "all"
    compile: bool | None = None

    def check(self) -> None:
        if self.train not in TRAIN_WHAT:
            raise LeanLMError(f"unknown train={self.train!r}; choose one of: {', '.join(TRAIN_WHAT)}")
        if self.train == "scales" and not self.learn_scales:
            raise LeanLMError("train='scales' trains only learned scales: also set learn_scales=True (CLI: --learn-scales)")
        if self.scale_lr_mult <= 0:
            raise LeanLMError(f"scale_lr_mult must be positive, got {self.scale_lr_mult}")

    def use_compile(self, device_type: str = "cpu") -> bool:
        """`compile`, with None resolved: whether torch.compile works for `device_type` here."""
        return compile_works(device_type) if self.compile is None else self.compile


@dataclass
class QATResult:
    mode: str                               # "qat" or "qad"
    scheme: dict                            # the QuantConfig as a dict
    ptq_seconds: float
    train: TrainResult
    qat: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["train"] = self.train.to_dict()
        return d


# ------------------------------------------------------------------------------- budget


# ------------------------------------------------------------------------------- prepare / finalize


def check_trainable(scheme) -> QuantConfig:
    """The QuantConfig for `scheme` (preset name or QuantConfig), or a clear error when QAT cannot train it."""
    if isinstance(scheme, QuantConfig):
        return scheme
    if scheme in ONNX_SCHEMES:
        raise LeanLMError(f"scheme {scheme!r} quantizes an ONNX graph with onnxruntime and has no fake-quant path to train; "
                          f"QAT takes a leanlm.quantization preset: {', '.join(PRESETS)}")
    if not isinstance(scheme, str):
        raise LeanLMError(f"scheme must be a preset name or a QuantConfig, got {type(scheme).__name__}")
    return preset(scheme)


def prepare_qat(model: nn.Module, config: QATConfig | None = None) -> list[nn.Parameter]:
    """Make a PTQ-calibrated model trainable in place; returns the parameters QAT should train.

    Every calibrated weight quantizer becomes a `QATQuantizer` (class swap; its calibrated scales
    move into buffers); activation and KV-cache quantizers switch to straight-through gradients.
    """
    config = config or QATConfig()
    config.check()
    qs = quantizers(model)
    if not qs or getattr(model, "leanlm_quant", None) is None:
        raise LeanLMError("QAT needs a model quantized by leanlm.quantize (fake quantization); quantize it first")
    p = next(model.parameters(), None)
    use_compile = config.use_compile(p.device.type if p is not None else "cpu")
    weight_qs = []
    for name, q in qs.items():
        if not q.enabled:
            continue
        if q.role == "weight":
            if isinstance(q, QATQuantizer):
                raise LeanLMError("this model is already prepared for QAT; call finalize_qat first")
            if not q.folded or q.qparams is None:
                raise LeanLMError(f"{name} was never calibrated; run leanlm.quantize to the end before QAT")
            q.__class__ = QATQuantizer
            q.start_qat(config.learn_scales, config.scale_lr_mult, compiled=use_compile)
            weight_qs.append(q)
        else:
            q.__class__ = QATActQuantizer
            q.ste, q.compiled = True, use_compile
    if config.learn_scales and not weight_qs:
        raise LeanLMError("learn_scales needs quantized weights, but this scheme quantizes none")
    scales = [q.log_scale for q in weight_qs if q.log_scale is not None]
    if config.train == "scales":
        return scales
    owners = [m for m in model.modules() if isinstance(getattr(m, "weight_quantizer", None), QATQuantizer)
              and m.weight_quantizer.enabled]
    weights = [m.weight for m in owners]
    if config.train == "quantized":
        return weights + scales
    seen = {id(p) for p in weights + scales}
    rest = [p for p in model.parameters() if id(p) not in seen]
    return weights + scales + rest


@torch.no_grad()
def finalize_qat(model: nn.Module) -> nn.Module:
    """Fold every latent weight onto its grid with the final scales and undo the class swaps.

    The result is an ordinary leanlm-quantized model (`leanlm.save`, the runtime and the
    exporters take it unchanged); its forward equals the QAT forward exactly.
    """
    mods = dict(model.named_modules())
    for name, q in quantizers(model).items():
        if isinstance(q, QATQuantizer):
            owner = mods[name[: -len(".weight_quantizer")]]
            qp = q.current_qparams()
            qp = type(qp)(*(None if t is None else t.detach().float().clone() for t in (qp.scale, qp.zero, qp.global_scale)))
            w = owner.weight
            w.data.copy_(fake_quantize(w.detach().float(), q.fmt, qp).to(w.dtype))
            for b in ("qat_scale", "qat_zero", "qat_global_scale"):
                delattr(q, b)
            del q.log_scale
            q.__dict__.pop("compiled", None)
            q.__class__ = TensorQuantizer
            q.qparams, q.folded, q.ste, q.mode = qp, True, False, "quant"
        elif isinstance(q, TensorQuantizer):
            if isinstance(q, QATActQuantizer):
                q.__class__ = TensorQuantizer
                q.__dict__.pop("compiled", None)
            q.ste = False
    return model


def check_teacher(student: nn.Module, teacher: nn.Module, student_tokenizer=None, teacher_tokenizer=None) -> None:
    from ..core.modules import check_same_vocab

    check_same_vocab(student, teacher, student_tokenizer, teacher_tokenizer, ref_name="student", other_name="teacher",
                     fix="QAD matches next-token distributions: use a teacher of the same model family, or --teacher self "
                         "(the float model itself, the default)")


# ------------------------------------------------------------------------------- one call


def default_train_config(**overrides) -> TrainConfig:
    """QAT's defaults for the shared trainer: lr 1e-3 (what bench/qat.py measured, docs/qat.md) with a 5-step warm-up
    then cosine, 2048 tokens per step as 2 accumulated batches of 2 x 512 (QAD at 4 x 512 in one batch peaked near
    8 GB on SmolLM2-135M, docs/qat.md)."""
    base = dict(lr=1e-3, warmup_steps=5, batch_size=2, grad_accum=2, seq_len=512, eval_windows=10, checkpoint_every=25)
    base.update(overrides)
    return TrainConfig(**base)


def qat(
    model: nn.Module,
    scheme: str | QuantConfig | None,
    *,
    tokenizer=None,
    teacher: nn.Module | str | None = None,
    budget: str | int | None = None,
    config: QATConfig | None = None,
    distill: DistillConfig | None = None,
    train_config: TrainConfig | None = None,
    train_data=None,
    calib_data: torch.Tensor | None = None,
    eval_ids: torch.Tensor | None = None,
    teacher_tokenizer=None,
    evaluate: bool = True,
    progress: bool = True,
) -> QATResult:
    """Quantize `model` in place with `scheme`, then train it with fake quantization; returns a `QATResult`.

    scheme: a preset name or QuantConfig (PTQ with its calibration algorithm first), or None when
    `model` is already leanlm-quantized (training continues from it). teacher: None (QAT, LM loss),
    "self" (QAD from a float copy of `model` taken before quantizing) or a model with the same
    vocabulary (QAD). distill: the QAD loss (default: logit KL only; `lm_weight` mixes in the LM
    loss). budget: "10m" / "2M" tokens etc. (overrides train_config's budget). train_data: token
    ids, documents, a source name or file (default: the protocol's wiki calibration split).
    eval_ids: held-out ids for the trainer's perplexity at the start and end (default: the wiki
    evaluation split; evaluate=False: none).
    """
    config = config or QATConfig()
    config.check()
    already = any(isinstance(m, TensorQuantizer) for m in model.modules())
    qcfg = None
    if scheme is None:
        if not already:
            raise LeanLMError("give a scheme (e.g. w3a16-gptq) or a model already quantized by leanlm quantize")
    else:
        qcfg = check_trainable(scheme)
        if already:
            raise LeanLMError("this model is already quantized; pass scheme=None to continue training it, or load the float model")
    if isinstance(teacher, str):
        if teacher != "self":
            raise LeanLMError(f"teacher must be a model, 'self' or None, got {teacher!r}")
        if already:
            raise LeanLMError("teacher 'self' needs the float model, but this model is already quantized; pass the float teacher model")
        teacher = copy.deepcopy(model).eval()
    if teacher is not None:
        check_teacher(model, teacher, tokenizer, teacher_tokenizer)
    if train_config is None:
        train_config = default_train_config()
    if budget is not None:
        for k, v in parse_budget(budget).items():
            setattr(train_config, k, v)
    train_config.check()
    ids = _train_ids(train_data, tokenizer)
    if not evaluate or train_config.eval_windows == 0:
        eval_ids = None
    elif eval_ids is None and tokenizer is not None:
        from ..core.data import evaluation_texts, join_and_tokenize

        eval_ids = join_and_tokenize(tokenizer, evaluation_texts("wiki"))

    ptq_seconds = 0.0
    if qcfg is not None:
        from ..quantization.api import quantize

        quantize(model, qcfg, calib_data, tokenizer=tokenizer, progress=progress)
        ptq_seconds = model.leanlm_quant["calib_seconds"]
    params = prepare_qat(model, config)
    if not params:
        raise LeanLMError("nothing to train in this model with these settings")
    if teacher is None:
        loss_fn, mode = lm_loss, "qat"
    else:
        loss_fn, mode = DistillLoss(teacher, model, distill or DistillConfig()), "qad"
    train_config.progress = train_config.progress and progress
    try:
        res = train(model, loss_fn, ids, train_config, eval_ids=eval_ids, params=params)  # keeps sparsity masks
    finally:
        finalize_qat(model)  # always leave an ordinary quantized model behind (also after Ctrl-C)
    info = {"mode": mode, "qat": asdict(config), "train": {k: v for k, v in asdict(train_config).items()},
            "steps": res.steps, "tokens": res.tokens, "seconds": res.seconds,
            "start_perplexity": res.start_perplexity, "final_perplexity": res.final_perplexity}
    if mode == "qad":
        info["distill"] = asdict(distill or DistillConfig())
    model.leanlm_quant["qat"] = info
    return QATResult(mode=mode, scheme=model.leanlm_quant["config"], ptq_seconds=ptq_seconds, train=res, qat=asdict(config))
