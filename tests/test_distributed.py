"""Data-parallel training and GPTQ on torch.distributed (gloo, 2 processes on this machine) against one process.

Each 2-process run is torchrun (`python -m torch.distributed.run --standalone`, a free local port) over
tests/dist_worker.py, or `leanlm ... --nproc 2`; the 1-process reference runs the same code here.
Tolerances: the 2-process run sums the same float32 terms in another order (two half-batch means, then
their mean over the ranks; Hessians as per-rank running means, then weighted), so losses agree to ~1e-6
relative and weights after a few AdamW steps to ~1e-5 absolute (Adam's normalised update magnifies
rounding in near-zero gradients); quantized values, which sit on a grid, come out identical.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dist_worker

WORKER = Path(__file__).parent / "dist_worker.py"
SRC = Path(__file__).parents[1] / "src"
pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without torch.distributed")


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}


def _torchrun(*args, ok: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(WORKER), *map(str, args)]
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240)
    assert (r.returncode == 0) == ok, r.stderr[-3000:]
    return r


def _losses(history):
    return torch.tensor([h["loss"] for h in history], dtype=torch.float64)


def _close_states(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if a[k].dtype.is_floating_point:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=k)
        else:
            assert torch.equal(a[k], b[k]), k


def test_two_processes_equal_one_and_resume_after_a_rank_is_killed(tmp_path):
    """Distillation (KL + LM, running-mean balance, a sparsity mask) with 4 windows x 2 micro-batches per
    step: rank 1 is SIGKILLed after step 3 (checkpoints every 2 steps), torchrun stops rank 0, the rerun
    resumes from rank 0's step-2 checkpoint on both ranks; losses and weights equal the 1-process run."""
    one = dist_worker.run_train(str(tmp_path / "c1"))
    ckpt, out = tmp_path / "c2", tmp_path / "two.pt"
    killed = _torchrun("train", out, ckpt, 3, ok=False)
    assert "SIGKILL" in killed.stderr and not out.exists()
    assert sorted(p.name for p in ckpt.iterdir()) == ["step-0000002"]
    _torchrun("train", out, ckpt)
    two = torch.load(out, weights_only=True)
    assert two["world"] == 2 and two["resumed_from"] == 2 and two["steps"] == one["steps"] == 4
    torch.testing.assert_close(_losses(two["history"]), _losses(one["history"]), rtol=1e-5, atol=0)
    assert _losses(one["history"])[-1] < _losses(one["history"])[0]   # it trained
    _close_states(two["state"], one["state"], atol=5e-5)
    down = "model.layers.0.mlp.down_proj"
    assert (two["state"][f"{down}.weight"][~two["state"][f"{down}.weight_mask"]] == 0).all()   # the mask held
    torch.testing.assert_close(two["evals"][-1]["perplexity"], one["evals"][-1]["perplexity"], rtol=1e-5, atol=0)


def test_gptq_hessians_all_reduced_equal_one_process(tmp_path):
    """Each rank calibrates on every 2nd row; the all-reduced Hessian equals the 1-process one to float32
    rounding, GPTQ's codes are identical, and QAT of a quantized model keeps its grid under DDP."""
    one = dist_worker.run_gptq()
    _torchrun("gptq", tmp_path / "g.pt")
    two = torch.load(tmp_path / "g.pt", weights_only=True)
    assert two["world"] == 2 and two["n"] == one["n"] == 96
    torch.testing.assert_close(two["H"], one["H"], rtol=1e-5, atol=1e-6)
    quantized = [k for k in one["gptq"] if k.endswith("proj.weight")]
    assert quantized and all(torch.equal(two["gptq"][k], one["gptq"][k]) for k in quantized)
    _close_states(two["gptq"], one["gptq"], atol=0)
    torch.testing.assert_close(_losses(two["qat_history"]), _losses(one["qat_history"]), rtol=1e-5, atol=0)
    assert all(torch.equal(two["qat"][k], one["qat"][k]) for k in quantized)   # on the same grid points
    _close_states(two["qat"], one["qat"], atol=1e-5)


def test_cli_nproc_prune_and_distill_equals_one_process(tmp_path, tiny_folder, text_file, capsys):
    """`leanlm prune ... --distill-tokens N --nproc 2` re-launches itself through torch.distributed.run: one
    report, one output folder (written by rank 0), the default checkpoint folder removed, the same model (float32:
    --no-bf16; bfloat16 autocast would round the two runs differently)."""
    from safetensors.torch import load_file

    from leanlm.cli import main

    args = ["prune", str(tiny_folder), "--layers", "1", "--intermediate", "64", "--samples", "2", "--seq-len", "32",
            "--batch-size", "2", "--grad-accum", "2", "--text", str(text_file), "--distill-tokens", "512", "--eval-windows", "1", "--no-bf16",
            "--json"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    one = json.loads(capsys.readouterr().out)
    r = subprocess.run([sys.executable, "-m", "leanlm", *args, "--out", str(tmp_path / "two"), "--nproc", "2"], env=_env(),
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    two = json.loads(r.stdout)   # rank 0's report only
    assert two["distill"]["steps"] == one["distill"]["steps"] == 4
    assert abs(two["distill"]["loss_last"] - one["distill"]["loss_last"]) <= 1e-5 * abs(one["distill"]["loss_last"]) + 1e-7
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("two")) == ["two"]
    a, b = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    _close_states(b, a, atol=5e-5)
