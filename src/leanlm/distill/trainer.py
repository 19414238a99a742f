"""A small CPU-friendly training loop shared by distillation, pruning recovery, sparse fine-tuning and QAT.

Not a framework: one function, `train(model, loss_fn, train_ids, config)`. It draws random windows
of `seq_len` tokens from a 1-D tensor of token ids (the protocol's calibration split, never the
evaluation text), runs AdamW with warm-up and a cosine or constant schedule, gradient accumulation,
gradient clipping and optional bfloat16 autocast, shows loss and tokens/s in a tqdm bar, measures
held-out perplexity at the start, every `eval_every` steps and at the end, and stops at a token or
wall-time budget.

Checkpoints hold the model and loss-module state, the optimizer, the step, the data generator's
RNG state and the history (tensors and plain Python values only: resuming loads them with
``torch.load(weights_only=True)``, which runs no pickled code); they are written atomically (`leanlm.core.io.atomic_dir`), so an
interrupt never leaves a corrupt one. Ctrl-C / SIGTERM are deferred to the end of the current
optimizer step: the trainer then writes a checkpoint and raises `TrainingInterrupted` (a
KeyboardInterrupt) saying how to resume; a second Ctrl-C stops at once, keeping the last periodic
checkpoint. With a token budget a resumed run is bit-identical to an uninterrupted one (the
learning rate depends only on the step, the batches only on the saved generator state).

Data-parallel (started under torchrun or with ``--nproc N``; `leanlm.core.dist`): the model and
the loss module train inside DistributedDataParallel (gloo on CPU, NCCL on GPU). Every rank draws the
same global batch of `batch_size` windows from the same generator and takes every ``world``-th one,
so the gradients DDP averages, the step's loss (averaged over the ranks) and the weights equal a
one-process run's to float tolerance. Only rank 0 writes checkpoints and shows progress; a resumed
run loads rank 0's newest checkpoint on every rank (so multi-machine runs need a shared
`checkpoint_dir`). Decisions that depend on a rank's clock or signals (the wall-time budget, Ctrl-C)
are agreed over the ranks at every step boundary, so all ranks stop at the same step.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import re
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core import dist
from ..core.errors import LeanLMError
from ..core.io import atomic_dir

LossFn = Callable[[nn.Module, torch.Tensor], "tuple[torch.Tensor, dict[str, float]]"]
AfterStep = Callable[[nn.Module, int], None]
CHECKPOINT_PREFIX = "step-"


@dataclass
class TrainConfig:
    max_tokens: int | None = None      # budget in student forward tokens (batch_size * seq_len * grad_accum per step)
    max_minutes: float | None = None   # budget in wall minutes (summed over resumed runs)
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 20
    schedule: str = "cosine"           # "cosine" (to 10% of lr at the budget's end) or "constant" (after warm-up)
    batch_size: int = 4
    seq_len: int = 512
    grad_accum: int = 1
    grad_clip: float | None = 1.0
    autocast_bf16: bool | None = None  # None: on where the hardware has bfloat16 matmuls (fast_bf16); docs/pruning.md
    eval_every: int = 0                # held-out perplexity every N optimizer steps (0 = start and end only)
    eval_windows: int = 10             # windows of 512 tokens (fewer if seq_len is shorter)
    checkpoint_dir: str | None = None
    checkpoint_every: int = 50         # optimizer steps between checkpoints (and one at the end)
    resume: bool = True                # continue from the newest checkpoint in checkpoint_dir
    seed: int = 0
    progress: bool = True
    device: str = "auto"               # auto: this process's GPU when torch sees one (torchrun: GPU LOCAL_RANK), else cpu

    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len * self.grad_accum

    def check(self) -> None:
        if self.max_tokens is None and self.max_minutes is None:
            raise LeanLMError("give a training budget: max_tokens (--distill-tokens) or max_minutes (--distill-minutes)")
        if self.max_tokens is not None and self.max_tokens < self.tokens_per_step():
            raise LeanLMError(f"token budget {self.max_tokens} is below one optimizer step of {self.tokens_per_step()} tokens "
                              f"(batch {self.batch_size} x seq_len {self.seq_len} x grad_accum {self.grad_accum}); raise it")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise LeanLMError(f"max_minutes must be positive, got {self.max_minutes}")
        if min(self.batch_size, self.grad_accum) < 1 or self.seq_len < 2:
            raise LeanLMError(f"need batch_size >= 1, grad_accum >= 1, seq_len >= 2; got {self.batch_size}, {self.grad_accum}, {self.seq_len}")
        if self.schedule not in ("cosine", "constant"):
            raise LeanLMError(f"unknown schedule {self.schedule!r}; use 'cosine' or 'constant'")
        if self.lr <= 0:
            raise LeanLMError(f"lr must be positive, got {self.lr}")


def parse_budget(budget: str | int | float) -> dict:
    """The one training-budget parser (QAT/QAD, draft models): '10m' / '90s' / '1h' (wall time) or
    '2M' / '500k' / '100000' or a number (tokens) -> the TrainConfig fields ``max_tokens`` / ``max_minutes``.

    Lower-case m means minutes and upper-case M millions of tokens, as in the CLI's `--budget 10m`
    and `--budget 2M`; a bare number counts tokens.
    """
    if isinstance(budget, (int, float)) and not isinstance(budget, bool):
        tokens = int(budget)
        if tokens <= 0:
            raise LeanLMError(f"the training budget must be positive, got {budget}")
        return {"max_tokens": tokens, "max_minutes": None}
    s = str(budget).strip()
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(min|m|s|h|M|k|K|G)?", s)
    if not m:
        raise LeanLMError(f"cannot read the budget {budget!r}; give minutes/seconds/hours (10m, 90s, 1h) or tokens (2M, 500k, 100000)")
    value, unit = float(m.group(1)), m.group(2)
    if value <= 0:
        raise LeanLMError(f"the training budget must be positive, got {budget!r}")
    if unit in ("m", "min", "s", "h"):
        return {"max_tokens": None, "max_minutes": value * {"m": 1, "min": 1, "s": 1 / 60, "h": 60}[unit]}
    return {"max_tokens": int(value * {None: 1, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9}[unit]), "max_minutes": None}


@dataclass
class TrainResult:
    steps: int
    tokens: int
    seconds: float
    final_perplexity: float | None
    start_perplexity: float | None
    evals: list[dict] = field(default_factory=list)     # {"step", "tokens", "perplexity"}
    history: list[dict] = field(default_factory=list)   # per optimizer step: {"step", "lr", "loss", **metrics}
    resumed_from: int | None = None                     # step of the checkpoint this run continued from
    checkpoint: str | None = None                       # the last checkpoint written
    autocast_bf16: bool = False                         # whether the steps ran under bfloat16 autocast

    def to_dict(self) -> dict:
        return asdict(self)


class TrainingInterrupted(KeyboardInterrupt):
    """Raised after Ctrl-C / SIGTERM once the interrupted run's state is safe on disk (message says how to resume)."""


def _lr_factor(step: int, cfg: TrainConfig, progress: float) -> float:
    """Warm-up then cosine (to 0.1) or constant; `progress` in [0, 1] is the share of the budget used."""
    if step < cfg.warmup_steps:
        return (step + 1) / (cfg.warmup_steps + 1)
    if cfg.schedule == "constant":
        return 1.0
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))


def fast_bf16(device: torch.device) -> bool:
    """Whether bfloat16 autocast speeds training here: CUDA with bf16 support, or a CPU with AVX512-BF16 or AMX.
    Measured: 2.07x per distillation step on a 2-core AVX512-BF16 CPU (docs/pruning.md, training section)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def trainable_params(model: nn.Module, loss_fn) -> list[nn.Parameter]:
    """Parameters with requires_grad in the model and, when the loss is an nn.Module (projections), in the loss."""
    out, seen = [], set()
    mods = [model] + ([loss_fn] if isinstance(loss_fn, nn.Module) else [])
    for m in mods:
        for p in m.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def latest_checkpoint(checkpoint_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint folder (atomic renames mean every `step-N` folder is complete)."""
    d = Path(checkpoint_dir)
    if not d.is_dir():
        return None
    found = [p for p in d.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX) and p.name[len(CHECKPOINT_PREFIX):].isdigit()
             and (p / "state.pt").is_file()]
    return max(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]), default=None)


class _Signals:
    """Defer SIGINT/SIGTERM to the next step boundary; a second signal interrupts at once, except under
    torchrun (`second_stops=False`), whose launcher passes the terminal's Ctrl-C on as a second signal
    and kills its workers itself if they do not stop in time."""

    def __init__(self, second_stops: bool = True):
        self.pending = None
        self.second_stops = second_stops
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.pending is not None and self.second_stops:
            raise KeyboardInterrupt
        self.pending = signal.Signals(signum).name

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def keep_established(model: nn.Module) -> tuple[list[AfterStep], Callable[[], None]]:
    """What earlier steps established, kept through training: ``(after_step callables, finish)``.

    Sparsity masks (``weight_mask`` buffers): a `MaskKeeper` masks the gradients of pruned weights
    and zeroes them after every optimizer step. A leanlm-quantized model not yet prepared for QAT
    (e.g. `distill` of a model written by `leanlm quantize`) trains through its own fake
    quantization with straight-through gradients and the calibrated scales (`prepare_qat`), and
    ``finish()`` folds every weight back onto its grid (`finalize_qat`), so it leaves training
    exactly on the grid it came with. Call ``finish()`` in a ``finally``.
    """
    from ..qat.api import QATConfig, finalize_qat, prepare_qat
    from ..qat.fakequant import QATActQuantizer, QATQuantizer
    from ..quantization.modules import quantizers
    from ..sparsity.masks import MaskKeeper, masked_linears

    hooks: list[AfterStep] = []
    undo: list[Callable[[], None]] = []
    qs = [q for q in quantizers(model).values() if q.enabled]
    if qs and not any(isinstance(q, (QATQuantizer, QATActQuantizer)) for q in qs):  # quantized, not prepared for QAT
        if getattr(model, "leanlm_quant", None) is None:
            raise LeanLMError("this model carries quantizers but no leanlm quantization record, so training cannot keep it on "
                              "its grid; load it from a folder written by leanlm quantize, or train the float model and quantize after")
        prepare_qat(model, QATConfig(compile=False))
        undo.append(lambda: finalize_qat(model))
    if masked_linears(model):
        keeper = MaskKeeper(model)
        hooks.append(keeper)
        undo.append(keeper.remove)

    def finish() -> None:
        for f in undo:
            f()

    return hooks, finish


def train(
    model: nn.Module,
    loss_fn: LossFn,
    train_ids: torch.Tensor,
    config: TrainConfig,
    *,
    eval_ids: torch.Tensor | None = None,
    params: Iterable[nn.Parameter] | None = None,
    after_step: Sequence[AfterStep] = (),
) -> TrainResult:
    """Train `model` on random `seq_len` windows of `train_ids` (1-D token ids) with `loss_fn(model, batch)`.

    `loss_fn` returns `(loss, {"name": float})`; the dict is shown in the progress bar and kept in
    the history. If `loss_fn` is an nn.Module its parameters train too and its state is
    checkpointed. `params`: which parameters train (default: every requires_grad parameter); the
    others get requires_grad=False during training and are restored afterwards. `after_step`:
    callables `f(model, step)` run after every optimizer step. `eval_ids`: 1-D held-out token ids
    for perplexity (None = no evaluation). Sparsity masks and a quantized model's grid are kept
    without being asked (`keep_established`).
    """
    dist.setup()
    dev = train_device(config.device)
    home = next(model.parameters()).device
    # the student, a loss module and a distillation teacher train on `dev`, and come back where they were
    mods = [m for m in (model, loss_fn, getattr(loss_fn, "teacher", None)) if isinstance(m, nn.Module)]
    if dev != home:
        for m in mods:
            m.to(dev)
    keep, finish = keep_established(model)
    try:
        return _train(model, loss_fn, train_ids, config, eval_ids=eval_ids, params=params, after_step=[*keep, *after_step])
    finally:
        finish()
        if dev != home:
            for m in mods:
                m.to(home)


def train_device(spec: str = "auto") -> torch.device:
    """The device training runs on: ``auto`` is the GPU torch sees (under torchrun with NCCL, this process's own
    GPU, pinned by `core.dist.setup`), else the CPU; ``cpu`` / ``cuda[:N]`` choose."""
    if spec == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    try:
        d = torch.device(spec)
    except RuntimeError:
        raise LeanLMError(f"unknown training device {spec!r}; choose auto, cpu or cuda[:N]") from None
    if d.type not in ("cpu", "cuda"):
        raise LeanLMError(f"unknown training device {spec!r}; choose auto, cpu or cuda[:N]")
    if d.type == "cuda" and not torch.cuda.is_available():
        raise LeanLMError(f"training device {spec!r}: no CUDA GPU is visible to PyTorch here; use cpu (or auto)")
    return d


class _LossStep(nn.Module):
    """The model and the loss as one module, so DistributedDataParallel wraps both (a loss module's
    projections train too) while `loss_fn` still receives the bare model (its attributes, its config)."""

    def __init__(self, model: nn.Module, loss_fn):
        super().__init__()
        self.model = model
        if isinstance(loss_fn, nn.Module):
            self.loss = loss_fn
        object.__setattr__(self, "_fn", loss_fn)

    def forward(self, batch):
        return self._fn(self.model, batch)


def _data_parallel(model, loss_fn, device: torch.device):
    """`loss_fn` as a DistributedDataParallel module over this process group; parameters without
    requires_grad (a teacher, frozen layers) get no gradient and are not reduced."""
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(_LossStep(model, loss_fn), device_ids=[device.index] if device.type == "cuda" else None,
                                   forward_sync_buffers=False)


def _train(model, loss_fn, train_ids, config, *, eval_ids, params, after_step) -> TrainResult:
    cfg = config
    cfg.check()
    w = dist.setup()
    if w.parallel and cfg.batch_size % w.size:
        raise LeanLMError(f"batch_size {cfg.batch_size} does not split over {w.size} processes; use a multiple of {w.size} "
                          "(each process takes an equal share of every batch)")
    train_ids = torch.as_tensor(train_ids).reshape(-1).long()
    if train_ids.numel() < cfg.seq_len + 1:
        raise LeanLMError(f"training text has {train_ids.numel()} tokens, fewer than one window of {cfg.seq_len}; pass more text or lower seq_len")
    params = list(params) if params is not None else trainable_params(model, loss_fn)
    if not params:
        raise LeanLMError("nothing to train: no parameter has requires_grad=True (pass params=...)")
    chosen = {id(p) for p in params}
    mods = [model] + ([loss_fn] if isinstance(loss_fn, nn.Module) else [])
    frozen = [p for m in mods for p in m.parameters() if p.requires_grad and id(p) not in chosen]
    for p in frozen:
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)

    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    tps = cfg.tokens_per_step()
    total_steps = cfg.max_tokens // tps if cfg.max_tokens is not None else None
    step, tokens, seconds_before = 0, 0, 0.0
    history: list[dict] = []
    evals: list[dict] = []
    resumed_from = None
    ckpt_dir = Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else None
    last_ckpt = None

    def state_modules() -> dict:
        out = {"model": model.state_dict()}
        if isinstance(loss_fn, nn.Module):
            out["loss_fn"] = loss_fn.state_dict()
        return out

    found = latest_checkpoint(ckpt_dir) if ckpt_dir is not None and cfg.resume and w.main else None
    found = dist.broadcast_object(None if found is None else str(found))   # rank 0's choice, restored on every rank
    if found is not None:
        found = Path(found)
        if not (found / "state.pt").is_file():
            raise LeanLMError(f"rank {w.rank} cannot see checkpoint {found} written by rank 0; put the checkpoint folder on a "
                              "filesystem every machine shares")
        try:
            # weights_only: tensors and plain containers only, so a planted checkpoint cannot run code
            st = torch.load(found / "state.pt", map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - a damaged file is a user problem, say which
            raise LeanLMError(f"cannot read checkpoint {found}: {e}; delete it to restart from the one before") from None
        if st.get("tokens_per_step") != tps:
            raise LeanLMError(f"checkpoint {found} was made with {st.get('tokens_per_step')} tokens per step, this config has {tps}; "
                              "use the same batch_size/seq_len/grad_accum, or resume=False / another checkpoint_dir")
        model.load_state_dict(st["model"])
        if isinstance(loss_fn, nn.Module) and "loss_fn" in st:
            loss_fn.load_state_dict(st["loss_fn"])
        opt.load_state_dict(st["optimizer"])
        gen.set_state(st["data_rng"])
        torch.set_rng_state(st["torch_rng"])
        random.setstate(st["py_rng"])
        step, tokens, seconds_before = st["step"], st["tokens"], st["seconds"]
        history, evals = st["history"], st["evals"]
        resumed_from, last_ckpt = step, str(found)

    def save_checkpoint() -> str | None:
        if ckpt_dir is None:
            return None
        target = ckpt_dir / f"{CHECKPOINT_PREFIX}{step:07d}"
        if not w.main:   # rank 0 writes; the others wait until it is on disk
            dist.barrier()
            return str(target)
        st = {**state_modules(), "optimizer": opt.state_dict(), "data_rng": data_state, "torch_rng": torch.get_rng_state(),
              "py_rng": random.getstate(), "step": step, "tokens": tokens, "seconds": elapsed(), "history": history,
              "evals": evals, "tokens_per_step": tps, "config": asdict(cfg)}
        with atomic_dir(target, overwrite=True) as tmp:
            torch.save(st, tmp / "state.pt")
        for old in ckpt_dir.iterdir():  # keep the newest two
            if old.name.startswith(CHECKPOINT_PREFIX) and old.name < target.name and old.name != Path(last_ckpt or "").name:
                import shutil

                shutil.rmtree(old, ignore_errors=True)
        dist.barrier()
        return str(target)

    def evaluate() -> float | None:
        if eval_ids is None or cfg.eval_windows == 0:   # --eval-windows 0: no held-out evaluation
            return None
        from ..evaluation.perplexity import perplexity

        ppl = None
        if w.main:   # one rank measures, the others receive its figure
            was = model.training
            model.eval()
            win = min(512, cfg.seq_len)
            ppl = perplexity(model, ids=eval_ids, window=win, max_windows=cfg.eval_windows, progress=False).perplexity
            model.train(was)
        ppl = dist.broadcast_object(ppl)
        evals.append({"step": step, "tokens": tokens, "perplexity": ppl})
        return ppl

    t_start = time.perf_counter()

    def elapsed() -> float:
        return seconds_before + time.perf_counter() - t_start

    def budget_left() -> bool:
        if total_steps is not None and step >= total_steps:
            return False
        return cfg.max_minutes is None or elapsed() < cfg.max_minutes * 60

    def any_rank(flag: bool) -> bool:
        """True on every rank when it is true on any (time and signals differ between processes)."""
        if not w.parallel:
            return flag
        return bool(dist.all_reduce(torch.tensor([float(flag)]), "max").item())

    def progress_share() -> float:
        shares = []
        if total_steps:
            shares.append(step / total_steps)
        if cfg.max_minutes:
            shares.append(elapsed() / (cfg.max_minutes * 60))
        return max(shares)

    n_windows = train_ids.numel() - cfg.seq_len + 1
    data_state = gen.get_state()
    model.train()
    if not evals:
        evaluate()
    if total_steps is not None:
        bar = tqdm(total=total_steps * tps, initial=tokens, desc="training", unit="tok", unit_scale=True,
                   disable=not (cfg.progress and w.main))
    else:
        bar = tqdm(total=round(cfg.max_minutes * 60), initial=round(seconds_before), desc="training", unit="s",
                   disable=not (cfg.progress and w.main))
    device = params[0].device
    runner = _data_parallel(model, loss_fn, device) if w.parallel else (lambda batch: loss_fn(model, batch))
    use_bf16 = fast_bf16(device) if cfg.autocast_bf16 is None else cfg.autocast_bf16
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else None
    last_tps_t, last_tps_tok = time.perf_counter(), tokens
    updating = False
    agreed = False   # the interrupt was agreed by every rank at a step boundary (collectives are safe)
    try:
        with _Signals(second_stops=not w.parallel) as sig:
            while True:
                if any_rank(sig.pending is not None):
                    agreed = True
                    raise KeyboardInterrupt
                if any_rank(not budget_left()):
                    break
                data_state = gen.get_state()
                lr = cfg.lr * _lr_factor(step, cfg, progress_share())
                for g in opt.param_groups:
                    g["lr"] = lr
                opt.zero_grad(set_to_none=True)
                metrics: dict[str, float] = {}
                total = 0.0
                for micro in range(cfg.grad_accum):
                    starts = torch.randint(0, n_windows, (cfg.batch_size,), generator=gen)[w.rank :: w.size]
                    batch = torch.stack([train_ids[s : s + cfg.seq_len] for s in starts.tolist()]).to(device)
                    # DDP reduces the gradients once per optimizer step, after the last micro-batch
                    sync = runner.no_sync() if w.parallel and micro < cfg.grad_accum - 1 else contextlib.nullcontext()
                    with sync:
                        with autocast if autocast is not None else contextlib.nullcontext():
                            loss, m = runner(batch)
                        if not torch.isfinite(loss):
                            raise LeanLMError(f"training loss became {loss.item()} at step {step}; lower lr (now {lr:.2e}) or turn off autocast_bf16")
                        (loss / cfg.grad_accum).backward()
                    total += loss.item() / cfg.grad_accum
                    for k, v in m.items():
                        metrics[k] = metrics.get(k, 0.0) + float(v) / cfg.grad_accum
                if w.parallel:   # the step's loss and metrics: the mean over the ranks' equal shares
                    keys = sorted(metrics)
                    vals = dist.all_reduce(torch.tensor([total] + [metrics[k] for k in keys], dtype=torch.float64)) / w.size
                    total, metrics = float(vals[0]), {k: float(v) for k, v in zip(keys, vals[1:].tolist())}
                if cfg.grad_clip:
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                updating = True   # from here until the history entry the state is mid-update
                opt.step()
                step += 1
                tokens += tps
                for f in after_step:
                    f(model, step)
                data_state = gen.get_state()
                history.append({"step": step, "lr": lr, "loss": total, **metrics})
                updating = False
                now = time.perf_counter()
                rate = (tokens - last_tps_tok) / max(now - last_tps_t, 1e-9)
                last_tps_t, last_tps_tok = now, tokens
                if total_steps is not None:
                    bar.update(tps)
                else:
                    bar.n = min(round(elapsed()), bar.total)
                    bar.refresh()
                bar.set_postfix({"loss": f"{total:.4f}", **{k: f"{v:.4f}" for k, v in metrics.items()}, "tok/s": f"{rate:.0f}"})
                if cfg.eval_every and step % cfg.eval_every == 0 and not any_rank(not budget_left()):
                    evaluate()
                if ckpt_dir is not None and step % cfg.checkpoint_every == 0:
                    last_ckpt = save_checkpoint()
    except KeyboardInterrupt:
        bar.close()
        if ckpt_dir is not None and not updating and (agreed or not w.parallel):
            # Params change only inside opt.step(); a step cut off before it is redone on resume (its
            # batches are drawn again from the saved generator state). Signals wait for step boundaries.
            last_ckpt = save_checkpoint()
            where = f"; checkpoint {last_ckpt} written: run the same command again (resume=True) to continue from step {step}"
        elif ckpt_dir is not None and w.parallel:
            where = (f"; one process was stopped on its own, so no new checkpoint was written: run the same command again to "
                     f"continue from the last one ({last_ckpt or 'none yet'})")
        elif ckpt_dir is not None:
            where = (f"; stopped inside an optimizer update, so no new checkpoint was written: run the same command again to "
                     f"continue from the last one ({last_ckpt or 'none yet'})")
        else:
            where = "; no checkpoint_dir was set, so the progress is lost (set checkpoint_dir to make training resumable)"
        _restore(frozen, model)
        err = TrainingInterrupted(f"training interrupted at step {step} ({tokens} tokens){where}")
        err.steps, err.tokens = step, tokens
        raise err from None
    except BaseException:
        bar.close()
        _restore(frozen, model)
        raise
    bar.close()
    start_ppl = evals[0]["perplexity"] if evals else None
    final_ppl = None
    if eval_ids is not None:
        final_ppl = evals[-1]["perplexity"] if evals and evals[-1]["step"] == step and step > 0 else evaluate()
    if ckpt_dir is not None and (last_ckpt is None or not str(last_ckpt).endswith(f"{step:07d}")):
        last_ckpt = save_checkpoint()
    _restore(frozen, model)
    return TrainResult(steps=step, tokens=tokens, seconds=elapsed(), final_perplexity=final_ppl, start_perplexity=start_ppl,
                       evals=evals, history=history, resumed_from=resumed_from, checkpoint=last_ckpt, autocast_bf16=use_bf16)


def _restore(frozen: list[nn.Parameter], model: nn.Module) -> None:
    for p in frozen:
        p.requires_grad_(True)
    model.eval()


def lm_loss(model: nn.Module, batch: torch.Tensor):
    """Plain next-token cross-entropy (for training from scratch or fine-tuning)."""
    import torch.nn.functional as F

    logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1))
    return loss, {"ce": loss.item()}
