"""One process of the data-parallel tests (tests/test_distributed.py), started by torchrun or run alone.

    python dist_worker.py train OUT.pt CKPT_DIR [KILL_AT]   distillation (KL + LM, a sparsity mask) on a tiny Llama
    python dist_worker.py gptq OUT.pt                       GPTQ W4A16, a Hessian all-reduce, and QAT of an RTN model

Under torchrun every rank runs this; `leanlm` joins the process group from the environment by itself
(`leanlm.core.dist.setup`). Rank 0 saves what the test compares; with KILL_AT, rank 1 kills itself
(SIGKILL) right after that optimizer step, as a crashed machine would.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import make_llama  # noqa: E402

from leanlm.core import dist  # noqa: E402

VOCAB = 300


def train_ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (4000,), generator=torch.Generator().manual_seed(0))


def train_config(ckpt: str | None, **kw):
    from leanlm.distill import TrainConfig

    base = dict(max_tokens=4 * 4 * 16 * 2, lr=3e-3, warmup_steps=2, batch_size=4, seq_len=16, grad_accum=2, checkpoint_dir=ckpt,
                checkpoint_every=2, progress=False, autocast_bf16=False, eval_windows=2)
    return TrainConfig(**{**base, **kw})


def run_train(ckpt: str | None, kill_at: int | None = None) -> dict:
    from leanlm.distill import DistillConfig, DistillLoss, train
    from leanlm.sparsity.masks import attach_mask

    student, teacher = make_llama(vocab_size=VOCAB, seed=0).float(), make_llama(vocab_size=VOCAB, seed=1).float()
    down = student.model.layers[0].mlp.down_proj
    attach_mask(down, torch.rand(down.weight.shape, generator=torch.Generator().manual_seed(2)) > 0.5)
    loss = DistillLoss(teacher, student, DistillConfig(lm_weight=0.5))
    after = []
    if kill_at is not None and dist.env_world().rank == 1:
        after = [lambda m, step: os.kill(os.getpid(), signal.SIGKILL) if step == kill_at else None]
    ids = train_ids()
    res = train(student, loss, ids, train_config(ckpt), eval_ids=ids[:256], after_step=after)
    return {"history": res.history, "evals": res.evals, "resumed_from": res.resumed_from, "steps": res.steps,
            "state": {k: v.clone() for k, v in student.state_dict().items()}, "world": dist.world().size}


def run_gptq() -> dict:
    from leanlm.distill import lm_loss, train
    from leanlm.quantization import quantize
    from leanlm.quantization.algorithms import HessianAccumulator

    w = dist.setup()
    # the Hessian all-reduce alone: each rank adds its share of the rows, in two chunks
    x = torch.randn(96, 40, generator=torch.Generator().manual_seed(3))
    acc = HessianAccumulator(40)
    mine = x[w.rank :: w.size]
    acc.add(mine[:5])
    acc.add(mine[5:])
    if w.parallel:
        acc.all_reduce()
    # GPTQ W4A16 on 8 calibration rows (each rank takes every world-th row)
    model = make_llama(vocab_size=VOCAB, seed=0).float()
    calib = torch.randint(1, VOCAB, (8, 32), generator=torch.Generator().manual_seed(4))
    quantize(model, "w4a16-gptq", calib, progress=False)
    # QAT of an RTN-quantized model: the trainer keeps it on its grid (keep_established) under DDP too
    qat = make_llama(vocab_size=VOCAB, seed=5).float()
    quantize(qat, "w4a16-rtn", progress=False)
    res = train(qat, lm_loss, train_ids(), train_config(None, max_tokens=2 * 4 * 16 * 2, lr=1e-3))
    return {"H": acc.H.clone(), "n": acc.n_samples, "gptq": {k: v.clone() for k, v in model.state_dict().items()},
            "qat": {k: v.clone() for k, v in qat.state_dict().items()}, "qat_history": res.history, "world": w.size}


def main(argv: list[str]) -> dict:
    if argv[0] == "train":
        return run_train(argv[2] if len(argv) > 2 else None, int(argv[3]) if len(argv) > 3 else None)
    return run_gptq()


if __name__ == "__main__":
    torch.set_num_threads(1)
    result = main(sys.argv[1:])
    if dist.world().main:
        torch.save(result, sys.argv[2])
    dist.teardown()
