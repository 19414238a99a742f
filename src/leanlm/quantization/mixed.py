"""Mixed precision: choose a format per linear layer under an average bits-per-weight budget.

Sensitivity is measured, not guessed: for every layer and every format on the menu, only that
layer's weight is quantized (round-to-nearest) and the KL divergence of the model's next-token
distribution from the float model's is measured on calibration text. The choice then minimises
the summed KL subject to the budget (a greedy knapsack: repeatedly take the upgrade with the most
KL saved per extra bit), assuming per-layer effects add up, as HAWQ-style searches do
(Dong et al. 2019, "HAWQ: Hessian AWare Quantization of Neural Networks with Mixed-Precision").
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..core.errors import LeanLMError
from .config import QuantConfig, QuantizerConfig
from .formats import fake_quantize, parse_format


@dataclass
class MixedPrecisionResult:
    choice: dict[str, str]                    # linear name -> format
    average_bits: float                       # over the chosen layers, scale overhead included
    budget: float
    sensitivity: dict[str, dict[str, float]] = field(default_factory=dict)  # name -> format -> KL

    def config(self, algorithms=None, extra_rules=None) -> QuantConfig:
        """A QuantConfig with one exact rule per layer (ready for `quantize`, e.g. with GPTQ())."""
        rules = [(f"{n}.weight_quantizer", QuantizerConfig(f)) for n, f in self.choice.items()]
        return QuantConfig(rules + list(extra_rules or []), list(algorithms or []))


def _kl(ref_logp: torch.Tensor, logits: torch.Tensor) -> float:
    kl = F.kl_div(F.log_softmax(logits.float(), -1), ref_logp, log_target=True, reduction="batchmean").item()
    return max(kl, 0.0)  # float rounding can make a near-zero KL slightly negative


@torch.no_grad()
def mixed_precision(
    model: nn.Module,
    calib_ids: torch.Tensor,
    budget: float,
    menu: tuple[str, ...] = ("int3_g64", "int4_g64", "int8"),
    include: str = "*",
    exclude: tuple[str, ...] = ("*lm_head*",),
    progress: bool = True,
) -> MixedPrecisionResult:
    """Measure per-layer sensitivity on `calib_ids` ([N, L] tokens) and pick formats within `budget` bits."""
    fmts = [parse_format(f) for f in menu]
    lins = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and fnmatch.fnmatchcase(n, include)
            and not any(fnmatch.fnmatchcase(n, e) for e in exclude)}
    if not lins:
        raise LeanLMError(f"no linear layer matches include={include!r} minus exclude={exclude}")
    for n, m in lins.items():
        for f in fmts:
            if f.group_size and m.in_features % f.group_size:
                raise LeanLMError(f"{n}: menu format {f.name} needs the input dimension {m.in_features} to be a multiple of {f.group_size}; change the menu")
    bits = {(n, f.name): f.bits_per_weight(m.in_features) for n, m in lins.items() for f in fmts}
    cheapest = sum(min(bits[(n, f.name)] for f in fmts) * m.weight.numel() for n, m in lins.items())
    total = sum(m.weight.numel() for m in lins.values())
    if budget * total < cheapest:
        raise LeanLMError(f"budget {budget} bits/weight is below the cheapest menu choice ({cheapest / total:.3f}); raise it or add a smaller format")

    ref = F.log_softmax(model(calib_ids, use_cache=False).logits.float(), -1)
    sens: dict[str, dict[str, float]] = {}
    bar = tqdm(total=len(lins) * len(fmts), desc="layer sensitivity", unit="probe", disable=not progress)
    for n, m in lins.items():
        w = m.weight.data.clone()
        sens[n] = {}
        for f in fmts:
            m.weight.data.copy_(fake_quantize(w.float(), f).to(w.dtype))
            sens[n][f.name] = _kl(ref, model(calib_ids, use_cache=False).logits)
            bar.update()
        m.weight.data.copy_(w)
    bar.close()

    # Greedy knapsack: start every layer at its cheapest format, then take upgrades by KL saved per bit.
    order = sorted(fmts, key=lambda f: f.bits_per_weight(64))
    choice = {n: min(fmts, key=lambda f: bits[(n, f.name)]).name for n in lins}
    spent = cheapest
    while True:
        best, best_gain = None, 0.0
        for n, m in lins.items():
            cur = choice[n]
            for f in order:
                extra = (bits[(n, f.name)] - bits[(n, cur)]) * m.weight.numel()
                if extra <= 0 or spent + extra > budget * total:
                    continue
                gain = (sens[n][cur] - sens[n][f.name]) / extra
                if gain > best_gain:
                    best, best_gain = (n, f.name, extra), gain
        if best is None:
            break
        n, f, extra = best
        choice[n] = f
        spent += extra
    return MixedPrecisionResult(choice, spent / total, budget, sens)


def mixed_config(model: nn.Module, tokenizer, budget: float, menu: tuple[str, ...] = ("int3_g64", "int4_g64", "int8"),
                 calib: str = "wiki", progress: bool = True) -> tuple[QuantConfig, dict]:
    """The mixed-precision QuantConfig (per-layer formats within `budget` bits, then GPTQ; the head stays
    float) and what was chosen; sensitivity is measured on 4 x 256 tokens of `calib`."""
    from ..core.data import calibration_batches
    from .config import GPTQ

    probe = calibration_batches(tokenizer, 4, 256, calib)
    res = mixed_precision(model, probe, budget, tuple(menu), progress=progress)
    info = {"budget": budget, "average_bits": res.average_bits, "choice": res.choice, "sensitivity_kl": res.sensitivity}
    return res.config([GPTQ()], [("*lm_head*", None)]), info
