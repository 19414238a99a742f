"""Knowledge distillation: a student learns the frozen teacher's next-token distribution.

Losses (Hinton, Vinyals & Dean 2015, "Distilling the knowledge in a neural network"; the
logit-only recipe Minitron found best after pruning, Muralidharan et al. 2024, "Compact language
models via pruning and knowledge distillation"):

- `kl`: KL(p_teacher || q_student) over the vocabulary at temperature T, times T^2 so gradients
  keep their size across temperatures;
- `lm`: cross-entropy on the text's own next tokens;
- `hidden`: for each (student_layer, teacher_layer) pair, the mean squared error between the
  student's hidden state (through a learned linear projection when the widths differ) and the
  teacher's, divided by the teacher state's mean square (so it is scale-free). Layer indices are
  indices into transformers' `hidden_states` tuple: 0 = embeddings, i = output of decoder layer i.

Balancer ("running_mean", used when more than one loss is on): each loss is divided by a running
mean of its own (detached) value before weighting, so the weights are relative shares and a loss
with a large scale (KL in nats over 49k tokens vs a normalised MSE) cannot drown the others.
"none" adds the weighted raw losses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..core.dist import all_reduce, world
from ..core.errors import LeanLMError
from .trainer import TrainConfig, TrainResult, train


@dataclass
class DistillConfig:
    temperature: float = 1.0
    kl_weight: float = 1.0
    lm_weight: float = 0.0
    hidden_layers: list[tuple[int, int]] = field(default_factory=list)   # (student_layer, teacher_layer) into hidden_states
    hidden_weight: float = 1.0
    balance: str = "running_mean"     # or "none"
    balance_momentum: float = 0.99

    def check(self) -> None:
        if self.temperature <= 0:
            raise LeanLMError(f"temperature must be positive, got {self.temperature}")
        if min(self.kl_weight, self.lm_weight, self.hidden_weight) < 0:
            raise LeanLMError("loss weights must be >= 0")
        if self.kl_weight == 0 and self.lm_weight == 0 and not (self.hidden_layers and self.hidden_weight > 0):
            raise LeanLMError("every loss weight is 0: set kl_weight, lm_weight or hidden_layers with hidden_weight > 0")
        if self.balance not in ("running_mean", "none"):
            raise LeanLMError(f"unknown balance {self.balance!r}; use 'running_mean' or 'none'")


def kl_at_temperature(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """T^2 * KL(softmax(t/T) || softmax(s/T)), mean over tokens (all leading dims)."""
    t = temperature
    s = F.log_softmax(student_logits.float() / t, -1).flatten(0, -2)
    p = F.log_softmax(teacher_logits.float() / t, -1).flatten(0, -2)
    return F.kl_div(s, p, log_target=True, reduction="batchmean") * (t * t)


def _width(model) -> int:
    return int(model.config.hidden_size)


class DistillLoss(nn.Module):
    """`loss_fn(student, batch)` for `train`: holds the projections and the balancer's running means.

    The teacher is kept outside the module's state (frozen, eval, no_grad), so checkpoints hold
    only what trains.
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, config: DistillConfig):
        super().__init__()
        config.check()
        self.cfg = config
        object.__setattr__(self, "teacher", teacher.eval())
        for p in teacher.parameters():
            p.requires_grad_(False)
        n_s = student.config.num_hidden_layers
        n_t = teacher.config.num_hidden_layers
        ds, dt = _width(student), _width(teacher)
        self.proj = nn.ModuleList()
        for s_l, t_l in config.hidden_layers:
            if not (0 <= s_l <= n_s and 0 <= t_l <= n_t):
                raise LeanLMError(f"hidden-state pair ({s_l}, {t_l}) is out of range: the student has hidden states 0..{n_s}, "
                                  f"the teacher 0..{n_t}")
            self.proj.append(nn.Identity() if ds == dt else nn.Linear(ds, dt, bias=False))
        names = [n for n, on in (("kl", config.kl_weight > 0), ("lm", config.lm_weight > 0),
                                 ("hidden", bool(config.hidden_layers) and config.hidden_weight > 0)) if on]
        self.names = names
        self.register_buffer("running", torch.zeros(len(names)))
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))

    def forward(self, student: nn.Module, batch: torch.Tensor):
        cfg = self.cfg
        need_h = "hidden" in self.names
        with torch.no_grad():
            t_out = self.teacher(input_ids=batch, use_cache=False, output_hidden_states=need_h)
        s_out = student(input_ids=batch, use_cache=False, output_hidden_states=need_h)
        if s_out.logits.shape[-1] != t_out.logits.shape[-1]:
            raise LeanLMError(f"student vocabulary {s_out.logits.shape[-1]} differs from the teacher's {t_out.logits.shape[-1]}; "
                              "distillation needs the same tokenizer")
        losses = {}
        if "kl" in self.names:
            losses["kl"] = kl_at_temperature(s_out.logits, t_out.logits, cfg.temperature)
        if "lm" in self.names:
            lg = s_out.logits[:, :-1].float()
            losses["lm"] = F.cross_entropy(lg.reshape(-1, lg.size(-1)), batch[:, 1:].reshape(-1))
        if "hidden" in self.names:
            terms = []
            for (s_l, t_l), proj in zip(cfg.hidden_layers, self.proj):
                hs = proj(s_out.hidden_states[s_l].float())
                ht = t_out.hidden_states[t_l].float()
                terms.append(F.mse_loss(hs, ht) / ht.pow(2).mean().clamp_min(1e-8))
            losses["hidden"] = torch.stack(terms).mean()
        weights = {"kl": cfg.kl_weight, "lm": cfg.lm_weight, "hidden": cfg.hidden_weight}
        vals = torch.stack([losses[n].detach() for n in self.names])
        if world().parallel:   # data-parallel: every rank keeps the running means of the global batch
            vals = all_reduce(vals) / world().size
        with torch.no_grad():
            m = cfg.balance_momentum
            self.running.copy_(torch.where(self.seen > 0, m * self.running + (1 - m) * vals, vals))
            self.seen += 1
        balance = cfg.balance == "running_mean" and len(self.names) > 1
        total = sum(weights[n] * (losses[n] / self.running[i].clamp_min(1e-8) if balance else losses[n])
                    for i, n in enumerate(self.names))
        return total, {n: v.item() for n, v in losses.items()}


def matched_hidden_pairs(student: nn.Module, teacher: nn.Module, n: int) -> list[tuple[int, int]]:
    """`n` evenly spaced (student, teacher) `hidden_states` pairs for `DistillConfig.hidden_layers`.

    A student from `leanlm.prune` with dropped layers pairs each chosen student layer with the
    teacher layer it was cut from (`leanlm_prune["kept_layers"]`); otherwise layers are matched by
    relative depth. The final hidden state is left out: transformers applies the final norm to it,
    and the logit loss already covers the end of the network.
    """
    n_s, n_t = student.config.num_hidden_layers, teacher.config.num_hidden_layers
    if n < 0:
        raise LeanLMError(f"the number of hidden-state pairs must be >= 0, got {n}")
    if n > n_s - 1:
        raise LeanLMError(f"the student has {n_s} layers, so at most {n_s - 1} hidden-state pairs (the last one is "
                          f"left to the logit loss); asked for {n}")
    kept = (getattr(student, "leanlm_prune", None) or {}).get("kept_layers")
    if kept is not None and (len(kept) != n_s or max(kept) >= n_t):
        kept = None  # not pruned from this teacher: match by relative depth
    pairs = []
    for k in range(1, n + 1):
        s = round(k * n_s / (n + 1))          # output of student layer s-1 (hidden_states index s)
        t = kept[s - 1] + 1 if kept is not None else round(s * n_t / n_s)
        pairs.append((s, t))
    return pairs


def _train_ids(data, tokenizer) -> torch.Tensor:
    if isinstance(data, torch.Tensor):
        return data.reshape(-1).long()
    from ..core.data import calibration_texts, join_and_tokenize

    if tokenizer is None:
        raise LeanLMError("distill needs token ids or a tokenizer to cut the training text; pass tokenizer=")
    if data is None:
        data = calibration_texts("wiki")
    elif isinstance(data, (str, Path)):
        data = calibration_texts(data)
    return join_and_tokenize(tokenizer, list(data))


def distill(student: nn.Module, teacher: nn.Module, train_data=None, config: DistillConfig | None = None,
            train_config: TrainConfig | None = None, *, tokenizer=None, eval_ids: torch.Tensor | None = None,
            params=None, after_step=()) -> TrainResult:
    """Train `student` to match the frozen `teacher` on `train_data`; returns the `TrainResult`.

    `train_data`: a 1-D tensor of token ids, a list of documents, a source name ("wiki", "news",
    a .txt/.jsonl path: its calibration split) or None (the protocol's wiki calibration text);
    documents need `tokenizer`. `eval_ids`: held-out ids for perplexity during training (None:
    the evaluation split of the named source, else of wiki, when a tokenizer is given; else none).
    """
    from ..core.modules import check_same_vocab

    config = config or DistillConfig()
    train_config = train_config or TrainConfig(max_minutes=5)
    check_same_vocab(student, teacher, ref_name="student", other_name="teacher",
                     fix="distillation matches next-token distributions: use a teacher of the same model family")
    ids = _train_ids(train_data, tokenizer)
    if eval_ids is None and tokenizer is not None:
        from ..core.data import evaluation_texts, join_and_tokenize

        source = train_data if isinstance(train_data, (str, Path)) else "wiki"
        eval_ids = join_and_tokenize(tokenizer, evaluation_texts(source))
    loss = DistillLoss(teacher, student, config)
    res = train(student, loss, ids, train_config, eval_ids=eval_ids, params=params, after_step=after_step)
    student.leanlm_distill = {"distill": {k: v for k, v in config.__dict__.items()}, "train": res.to_dict()}
    return res
