"""The search space: candidate recipes (what to do to the model) and deployments (how to run it).

A candidate IS a recipe: a list of step configs from `leanlm.recipe`, run by the recipe runner
(`run_step`), so the chosen one is re-runnable as `leanlm run DIR/recipe.yaml`. Candidates are listed
cheapest first (estimated calibration cost), and each names what it needs: the forwards of calibration
it costs (`forwards`, in 512-token windows of the float model), the wall time of any training step
(`train_s`), a budget below which it is not tried (`min_budget_s`), and, for the expensive 4-bit PTQ
algorithms, the cheap candidate whose measured loss decides whether they can still make the target.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..recipe import PruneStep, QATStep, QuantizeStep, SparsifyStep, Step
from .measure import Deployment


@dataclass
class Candidate:
    name: str
    steps: list[Step]
    forwards: float = 0.0               # calibration cost in float-model forwards of one 512-token window
    train_s: float = 0.0                # wall time of a training step (QAD, distillation)
    min_budget_s: float = 0.0           # not tried under this search budget
    after: str | None = None            # a cheaper candidate whose full loss must be within `reach` x target to try this
    reach: float = 3.0
    kv: str = "float32"                 # the KV-cache format its quality was measured with (serving's kv_dtype)
    dtype: str | None = None            # the model's dtype (the float candidate: bfloat16, as the runtime runs it)
    fmt: str = "int8"                   # its main packed format (bf16, int8, int4): orders the speed trials by measured cost
    scale: float = 1.0                  # its weights relative to the original's (pruning)
    skip: str | None = None             # a reason it is never tried on this machine (kept in the log)
    note: str = ""

    def key(self) -> str:
        import hashlib
        import json

        return hashlib.sha1(json.dumps([[s.name, s.to_dict()] for s in self.steps], sort_keys=True, default=str).encode()).hexdigest()[:12]


@dataclass
class SpaceSettings:
    samples: int = 32            # calibration sequences for PTQ (PROTOCOL's ptq benchmark uses 32 x 512)
    seq_len: int = 512
    budget_s: float = 600.0
    objective: str = "cost"
    concurrency: int = 16
    layers: int = 30             # decoder layers (the mixed-precision probe's cost)
    linears: int = 210
    extra: list = field(default_factory=list)


def candidates(st: SpaceSettings) -> list[Candidate]:
    """Every candidate, cheapest first."""
    n, L = st.samples, st.seq_len
    win = L / 512
    q = lambda scheme, **kw: QuantizeStep(scheme=scheme, samples=n, seq_len=L, **kw)  # noqa: E731
    qad_s = max(30.0, min(600.0, 0.25 * st.budget_s))
    out = [
        Candidate("float", [], dtype="bfloat16", fmt="bf16", note="the original model in bfloat16, as the runtime runs it"),
        Candidate("w8a16", [q("w8a16")], 1, note="int8 weights, per channel (round to nearest)"),
        Candidate("w8a16+kv8", [q("w8a16", kv_cache="int8")], 1, kv="int8", note="int8 weights and int8 KV cache"),
        Candidate("w8a8", [q("w8a8")], 1, note="int8 weights and dynamic per-token int8 activations"),
        Candidate("w4a16-rtn", [q("w4a16-rtn")], 1, fmt="int4", note="int4 g64 weights (round to nearest)"),
        Candidate("w4a16-rtn+kv8", [q("w4a16-rtn", kv_cache="int8")], 1, kv="int8", after="w4a16-rtn", reach=1.2, fmt="int4"),
        Candidate("w8a8-smoothquant", [q("w8a8-smoothquant")], 3 * n * win, after="w8a8", reach=3.0,
                  note="SmoothQuant alpha 0.65 then w8a8"),
        Candidate("w4a16-gptq", [q("w4a16-gptq", gptq_bf16=True)], 12 * n * win, after="w4a16-rtn",
                  fmt="int4", note="GPTQ (bfloat16 calibration forwards)"),
        Candidate("w4a16-awq", [q("w4a16-awq")], 25 * n * win, after="w4a16-rtn", fmt="int4", note="AWQ scales and clipping search"),
        # AutoRound trains each block's rounding against the float model's outputs after AWQ: about 3x AWQ's time
        # (bench/results/ptq_w4.md), for the best measured 4-bit quality (the `w4a16` preset)
        Candidate("w4a16-awq-autoround", [q("w4a16-awq-autoround")], 75 * n * win, after="w4a16-rtn", reach=3.5, fmt="int4",
                  note="AWQ, then AutoRound's signed-gradient rounding against the float model's outputs"),
        Candidate("mixed-6bit", [QuantizeStep(mixed=6.0, menu="int4_g64,int8", mixed_algorithm="gptq", samples=n, seq_len=L)],
                  4 * min(n, 8) * win + 12 * n * win, after="w4a16-rtn", reach=6.0,   # Fisher pass: forward + backward + a matmul per format
                  fmt="int4", note="per-layer int4/int8 within 6 bits per weight (Fisher sensitivity, then GPTQ)"),
        Candidate("w4a16-rtn+qad", [QATStep(budget=f"{int(qad_s)}s", scheme="w4a16-rtn", teacher="self", samples=n, seq_len=L)],
                  1, train_s=qad_s + 30, min_budget_s=900, after="w4a16-rtn", reach=8.0,
                  fmt="int4", note="quantization-aware distillation from the float model, when PTQ misses the target"),
        Candidate("prune-0.8+distill", [PruneStep(target_params=None, intermediate=None, distill_minutes=max(1.0, 0.3 * st.budget_s / 60)),
                                        QuantizeStep(scheme="w8a16", samples=n, seq_len=L)],
                  64, train_s=0.3 * st.budget_s + 60, min_budget_s=1800, scale=0.85,
                  note="structured pruning (MLP width) + short distillation, then int8"),
        Candidate("sparse-2:4+w8a16", [SparsifyStep(method="wanda", pattern="2:4", samples=n, seq_len=L), q("w8a16")], 2 * n * win,
                  skip="the runtime's CPU kernels are dense: 2:4 or unstructured zeros save neither time nor memory here "
                       "(bench/results/sparsity_kernels.md: sparse matmuls are slower than dense)"),
    ]
    return out


def prune_target(c: Candidate, intermediate: int) -> None:
    """The pruning candidate keeps 80% of the MLP width (a multiple of 64), set once the model is known."""
    for s in c.steps:
        if isinstance(s, PruneStep):
            s.intermediate = max(64, int(intermediate * 0.8) // 64 * 64)


def deployments(objective: str, concurrency: int, kv: str, kernels: bool = False) -> list[Deployment]:
    """How each candidate is run, by objective (the first is measured first). Serving is swept with and
    without prompt-lookup speculation inside the batch (k = 4 per sequence and step); batch 1 with and
    without it (k = 8), and, where the fused batch-1 kernels run (`kernels`), with them and with PyTorch's."""
    serve = Deployment("serving", kv_dtype=kv, max_num_seqs=concurrency)
    serve_pld = Deployment("serving", kv_dtype=kv, max_num_seqs=concurrency, prompt_lookup=True, k=4)
    b1, pld = Deployment("runtime"), Deployment("runtime", prompt_lookup=True)
    fast = [Deployment("runtime", kernels=True), Deployment("runtime", prompt_lookup=True, kernels=True)] if kernels else []
    return {"cost": [serve, serve_pld, b1], "throughput": [serve, serve_pld], "latency": [*fast, b1, pld],
            "memory": [b1]}[objective]
