"""leanlm.core.calibrate: the block-by-block engine and its registry of calibration algorithms."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from conftest import make_llama
from leanlm.core.calibrate import CALIBRATION_ALGORITHMS, LayerStep, calibrate_blocks, register
from leanlm.core.errors import LeanLMError


def test_engine_hands_each_layer_its_inputs_and_feeds_the_changed_outputs_on():
    model = make_llama(vocab_size=120, layers=3, seed=0)
    ids = torch.randint(0, 120, (6, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids, output_hidden_states=True).hidden_states
    seen: dict[int, torch.Tensor] = {}

    @register("test_probe")
    def probe(step: LayerStep, scale: float) -> None:
        seen[step.index] = torch.cat(step.hidden)
        step.state["probe"] = True
        step.stats.setdefault("layers", []).append(step.index)

    stats = calibrate_blocks(model, ids, [("test_probe", 1.0)], batch=4, progress=False)  # batch 4 -> mini-batches of 3
    assert stats["layers"] == [0, 1, 2]
    for i in range(3):  # the inputs of layer i are the model's own hidden states i
        torch.testing.assert_close(seen[i], ref[i], rtol=1e-5, atol=1e-5)

    @register("test_zero_mlp")
    def zero_mlp(step: LayerStep, _) -> None:  # changes the layer: the next layer must see the changed outputs
        step.layer.mlp.down_proj.weight.data.zero_()

    calibrate_blocks(model, ids, [("test_zero_mlp", None), ("test_probe", None)], progress=False)
    with torch.no_grad():
        changed = model(ids, output_hidden_states=True).hidden_states
    for i in range(3):
        torch.testing.assert_close(seen[i], changed[i], rtol=1e-5, atol=1e-5)
    del CALIBRATION_ALGORITHMS["test_probe"], CALIBRATION_ALGORITHMS["test_zero_mlp"]


def test_float_calibration_feeds_each_layer_the_float_models_activations():
    model = make_llama(vocab_size=120, layers=3, seed=0)
    ids = torch.randint(0, 120, (6, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids, output_hidden_states=True).hidden_states
    norm_out = []
    h = model.model.layers[1].input_layernorm.register_forward_hook(lambda m, a, o: norm_out.append(o))
    with torch.no_grad():
        model(ids)
    h.remove()
    seen, absmax = {}, {}

    @register("test_float_probe")
    def probe(step: LayerStep, _) -> None:
        seen[step.index] = torch.cat(step.hidden)
        absmax[step.index] = step.input_absmax[step.layer.self_attn.q_proj]
        step.layer.mlp.down_proj.weight.data.zero_()   # a change the next layer must not see

    calibrate_blocks(model, ids, [("test_float_probe", None)], batch=4, progress=False, sequential=False)
    for i in range(3):   # the original model's hidden states, although every layer was changed
        torch.testing.assert_close(seen[i], ref[i], rtol=1e-5, atol=1e-5)
    want = norm_out[0].reshape(-1, norm_out[0].shape[-1]).abs().amax(0)   # q_proj reads the norm's output
    torch.testing.assert_close(absmax[1], want, rtol=1e-5, atol=1e-6)
    del CALIBRATION_ALGORITHMS["test_float_probe"]


def test_unknown_algorithm_names_the_registered_ones():
    import leanlm.quantization.api  # noqa: F401  (registers gptq, awq, ...)
    import leanlm.sparsity.api  # noqa: F401  (registers sparsegpt, wanda)

    model = make_llama(vocab_size=50, layers=1)
    with pytest.raises(LeanLMError, match=r"unknown calibration algorithm 'nope'; registered: .*awq.*gptq.*sparsegpt.*wanda"):
        calibrate_blocks(model, torch.zeros(2, 4, dtype=torch.long), [("nope", None)], progress=False)


def test_core_imports_no_technique_package():
    code = ("import sys, leanlm.core.calibrate, leanlm.core.modules, leanlm.core.io, leanlm.core.data; "
            "bad = [m for m in sys.modules if m.split('.')[:2] in [['leanlm', p] for p in "
            "('quantization', 'sparsity', 'prune', 'distill', 'qat', 'speculative', 'export', 'runtime')]]; "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
