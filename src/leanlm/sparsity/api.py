"""``sparsify_(model, config)``: prune a model's decoder Linears in place, layer by layer.

Magnitude needs no data. Wanda and SparseGPT read calibration activations, captured block by block
by the core's calibration engine (``leanlm.core.calibrate``, where both register): the hidden states
entering layer 0 are captured once, then
each decoder layer runs on the outputs of the already-sparsified layer before it (sequential).
Inside a layer, the Linears that read the same input (q/k/v, gate/up) are pruned together in a
pre-hook when the forward reaches them (``solve_in_forward``), so o_proj and down_proj see the
already-pruned q/k/v and gate/up; a layer too large for one pass (``one_pass_max_gib``) or with a
Linear called more than once is calibrated in two passes instead (statistics of the dense layer,
then prune, then a forward for the next layer's inputs), and says so.
"""

from __future__ import annotations

import time

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core.calibrate import (LayerStep, calibrate_blocks, input_hooks, linear_groups, one_pass_gib, register,
                              run_layer, solve_in_forward)
from ..core.data import calibration_batches
from ..core.errors import LeanLMError
from ..core.modules import decoder_layers
from ..quantization import algorithms as qalg
from . import algorithms as alg
from .config import SparsityConfig, Target
from .masks import MASK, attach_mask, overall_sparsity, sparsity_report


def candidates(model: nn.Module) -> dict[str, nn.Linear]:
    """The Linears sparsify_ may prune: those inside the decoder layers (not the head, not embeddings)."""
    layers = decoder_layers(model)
    ids = {id(m) for layer in layers for m in layer.modules() if isinstance(m, nn.Linear)}
    return {n: m for n, m in model.named_modules() if id(m) in ids}


def _check(model: nn.Module, targets: dict[str, Target], mods: dict[str, nn.Linear]) -> None:
    for n, t in targets.items():
        m = mods[n]
        if getattr(m, MASK, None) is not None:
            raise LeanLMError(f"{n} is already sparsified (it has a weight_mask); start from the dense model")
        if t.structured and m.in_features % t.m:
            raise LeanLMError(f"{n}: pattern {t} needs the input dimension {m.in_features} to be a multiple of {t.m}; "
                              f"use another pattern or add a rule that leaves this layer dense or unstructured")
        if not m.weight.is_meta and not torch.isfinite(m.weight).all():   # meta: an offloaded skeleton, checked as each block loads
            raise LeanLMError(f"{n}.weight holds NaN/inf; the checkpoint is corrupt, so pruning it would be meaningless")


class _Pruner:
    """Prunes one group of Linears that share an input, from that input's statistics."""

    def __init__(self, cfg: SparsityConfig, targets: dict[str, Target], names: dict[int, str], stats: dict):
        self.cfg, self.targets, self.names, self.stats = cfg, targets, names, stats

    def new_stat(self, in_features: int):
        if self.cfg.method == "sparsegpt":
            return qalg.HessianAccumulator(in_features)
        return _NormAccumulator()

    @torch.no_grad()
    def prune(self, group: list[nn.Linear], stat) -> None:
        for m in group:
            name = self.names[id(m)]
            t = self.targets[name]
            w = m.weight.data.float()
            if self.cfg.method == "wanda":
                keep = alg.wanda_mask(w, stat.norms(), t)
                w_new = w * keep
            else:
                H = stat.H
                w_new, keep = alg.sparsegpt(w, H, t, block_size=self.cfg.block_size, damp=self.cfg.damp)
                self.stats[name] = {"reconstruction_error": qalg.quant_error(w, w_new, H),
                                    "magnitude_error": qalg.quant_error(w, w * alg.magnitude_mask(w, t), H)}
            m.weight.data.copy_(w_new.to(m.weight.dtype))
            attach_mask(m, keep)


class _NormAccumulator:
    """Sum of squares per input channel over every token seen (Wanda's ||X_j||_2^2)."""

    def __init__(self):
        self.sq = None

    def add(self, x: torch.Tensor) -> None:
        s = x.detach().reshape(-1, x.shape[-1]).float().pow(2).sum(0)
        self.sq = s if self.sq is None else self.sq + s

    def norms(self) -> torch.Tensor:
        return self.sq.sqrt()


@register("sparsegpt")
@register("wanda")
@torch.no_grad()
def prune_step(step: LayerStep, pruner: _Pruner) -> None:
    """Prune the layer's target Linears (SparseGPT or Wanda, as ``pruner.cfg.method`` says)."""
    layer, hidden, kw = step.layer, step.hidden, step.kw
    lins = {ln: m for ln, m in layer.named_modules() if id(m) in pruner.names and pruner.names[id(m)] in pruner.targets}
    if not lins:
        return
    groups, once = linear_groups(layer, hidden, kw, lins)
    gib = one_pass_gib(lins, hidden, step.heads)
    if once and gib <= pruner.cfg.one_pass_max_gib:
        first = {g[0]: g for g in groups}

        def solve(n, x):
            st = pruner.new_stat(lins[n].in_features)
            st.add(x)
            pruner.prune([lins[k] for k in first[n]], st)

        step.out = solve_in_forward(layer, hidden, kw, {n: lins[n] for n in first}, solve)
        return
    why = (f"its activations over all calibration rows need ~{gib:.1f} GiB > one_pass_max_gib={pruner.cfg.one_pass_max_gib}"
           if once else "a Linear is called other than once per forward")
    step.note(f"sparsify runs two passes per layer (statistics of the dense layer) because {why}")
    st = {g[0]: pruner.new_stat(lins[g[0]].in_features) for g in groups}
    with input_hooks({g[0]: lins[g[0]] for g in groups}, lambda n, x: st[n].add(x)):
        run_layer(layer, hidden, kw)
    for g in groups:
        pruner.prune([lins[k] for k in g], st[g[0]])


@torch.no_grad()
def sparsify_(model: nn.Module, config: SparsityConfig | None = None, calibration_ids: torch.Tensor | None = None,
              progress: bool = True, *, tokenizer=None) -> dict:
    """Sparsify ``model`` in place; returns a report (``sparsity_report`` rows, totals, seconds).

    Every pruned Linear gets a ``weight_mask`` buffer and exact zeros in its weight. Wanda and
    SparseGPT need calibration token ids ``calibration_ids`` [N, L] (LongTensor); without them,
    ``config.calib_samples`` x ``config.calib_seq_len`` tokens are cut from the protocol's
    calibration text with ``tokenizer``.
    """
    config = config or SparsityConfig()
    mods = candidates(model)
    if not mods:
        raise LeanLMError(f"{type(model).__name__} has no nn.Linear layers inside its decoder layers to sparsify")
    targets = config.resolve(list(mods))
    if not targets:
        raise LeanLMError("the config's rules leave every Linear dense; nothing to sparsify")
    _check(model, targets, mods)
    ids = None
    if config.needs_data:
        if calibration_ids is None:
            if tokenizer is None:
                raise LeanLMError(f"{config.method} needs calibration data: pass calibration_ids= (token ids [N, L]) "
                                  "or tokenizer= (then the protocol's calibration text is used), or use method='magnitude'")
            calibration_ids = calibration_batches(tokenizer, config.calib_samples, config.calib_seq_len)
        ids = calibration_ids
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype != torch.long or ids.numel() == 0:
            raise LeanLMError(f"calibration_ids must be a non-empty 2-D LongTensor of token ids [N, L], got "
                              f"{tuple(getattr(ids, 'shape', ()))} {getattr(ids, 'dtype', type(ids).__name__)}")
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    stats: dict = {}
    try:
        if ids is None:
            for n in tqdm(list(targets), desc="magnitude pruning", unit="linear", disable=not progress):
                m = mods[n]
                attach_mask(m, alg.magnitude_mask(m.weight, targets[n]))
        else:
            names = {id(m): n for n, m in mods.items()}
            pruner = _Pruner(config, targets, names, stats)
            calibrate_blocks(model, ids, [(config.method, pruner)], batch=config.calib_batch, progress=progress,
                             desc=f"{config.method} pruning")
    finally:
        model.train(was_training)
    secs = time.perf_counter() - t0
    model.leanlm_sparsity = {"config": config.to_dict(), "calib_seconds": secs,
                             "targets": {n: str(t) for n, t in targets.items()}}
    return {"method": config.method, "seconds": secs, "targets": {n: str(t) for n, t in targets.items()},
            "layers": sparsity_report(model), "overall": overall_sparsity(model), "errors": stats}


def sparsify_and_distill(model: nn.Module, config: SparsityConfig | None = None, *, tokenizer=None,
                         calibration_ids: torch.Tensor | None = None, distill_config=None, train_config=None,
                         train_data=None, eval_ids=None, progress: bool = True):
    """Sparsify `model` in place, then distill it from a frozen copy of the dense original (the
    shared trainer keeps the pruned weights at zero: the issue's "sparsify then distill" pipeline).

    Returns `(sparsify report, TrainResult)`."""
    import copy

    from ..distill import DistillConfig, TrainConfig, distill

    teacher = copy.deepcopy(model).eval()
    report = sparsify_(model, config, calibration_ids, progress=progress, tokenizer=tokenizer)
    res = distill(model, teacher, train_data, distill_config or DistillConfig(), train_config or TrainConfig(max_minutes=10),
                  tokenizer=tokenizer, eval_ids=eval_ids)
    model.eval()
    return report, res
