"""Mixed precision (quantization/mixed.py): the Fisher sensitivity pass, the exact budgeted solve, the cost models."""

from __future__ import annotations

import itertools
import json
import random

import pytest
import torch
import torch.nn.functional as F

from conftest import make_llama
from leanlm.cli import main
from leanlm.core.errors import LeanLMError
from leanlm.quantization import mixed_precision, quantize, summary
from leanlm.quantization.formats import fake_quantize, parse_format
from leanlm.quantization.mixed import _budget_limit, fisher_sensitivity, format_costs, format_error, layer_costs, solve_choice

MENU = ("int4_g64", "int8")


def _ids(n=2, length=32, seed=0):
    return torch.randint(0, 300, (n, length), generator=torch.Generator().manual_seed(seed))


def test_solve_equals_brute_force_and_respects_the_budget():
    """On random small cases the 0/1 program's choice has the brute-force optimum's objective and never
    exceeds the budget, at budgets from the cheapest to the dearest choice."""
    rng = random.Random(0)
    for case in range(6):
        names, fmts = [f"l{i}" for i in range(5)], ["a", "b", "c"]
        sens = {n: {f: rng.random() for f in fmts} for n in names}
        costs = {n: {f: rng.randint(1, 20) for f in fmts} for n in names}
        lo, hi = sum(min(c.values()) for c in costs.values()), sum(max(c.values()) for c in costs.values())
        for limit in (lo, (lo + hi) / 2, lo + 3, hi):
            choice = solve_choice(sens, costs, limit)
            assert sum(costs[n][choice[n]] for n in names) <= limit
            best = min(sum(sens[n][f] for n, f in zip(names, combo)) for combo in itertools.product(fmts, repeat=len(names))
                       if sum(costs[n][f] for n, f in zip(names, combo)) <= limit)
            assert sum(sens[n][choice[n]] for n in names) == pytest.approx(best, rel=1e-9, abs=1e-12), (case, limit)
    with pytest.raises(LeanLMError, match="below the cheapest"):
        solve_choice(sens, costs, lo - 1)


def test_fisher_score_is_the_gradient_weighted_output_error(tiny_model):
    """s(l, f) = sum (dL/dy)^2 (x dW^T)^2, checked against autograd on one layer."""
    ids = _ids()
    name = "model.layers.1.mlp.down_proj"
    lin = dict(tiny_model.named_modules())[name]
    sens = fisher_sensitivity(tiny_model, ids, {name: lin}, MENU, batch=2, progress=False, dtype="float32")
    got = {}
    h = lin.register_forward_hook(lambda m, a, y: got.update(x=a[0].detach(), y=y) or y.retain_grad())
    logits = tiny_model(ids, use_cache=False).logits
    F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum").backward()
    h.remove()
    for f in MENU:
        dw = fake_quantize(lin.weight.detach(), parse_format(f)) - lin.weight.detach()
        want = float((got["y"].grad.square() * (got["x"] @ dw.t()).square()).sum())
        assert sens[name][f] == pytest.approx(want, rel=1e-4)
    fast = fisher_sensitivity(tiny_model, ids, {name: lin}, MENU, batch=1, progress=False)   # bfloat16 autocast
    assert all(fast[name][f] == pytest.approx(sens[name][f], rel=0.1) for f in MENU)
    assert 0 < sens[name]["int8"] < sens[name]["int4_g64"] / 10
    assert all(p.grad is None or p.requires_grad for p in tiny_model.parameters())


def test_awq_sensitivity_scores_the_error_awq_leaves():
    """With algorithm="awq" the scored dW is the one AWQ's scale and clip search leaves on the layer's inputs:
    on inputs with outlier channels its output error is below round to nearest's, never above it, and
    the sensitivity pass scores exactly that dW (checked against autograd on one layer)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 128, generator=g)
    x[:, :4] *= 30                                   # a few outlier input channels, as LLM activations have
    w = torch.randn(48, 128, generator=g) * 0.05
    err = lambda d: float((x @ d.t()).square().sum())  # noqa: E731
    rtn, awq = format_error(w, x, "int4_g64", "rtn"), format_error(w, x, "int4_g64", "awq")
    assert torch.equal(rtn, fake_quantize(w, parse_format("int4_g64")) - w)
    assert err(awq) < 0.8 * err(rtn)

    model = make_llama()
    ids = _ids()
    name = "model.layers.1.mlp.down_proj"
    lin = dict(model.named_modules())[name]
    sens = fisher_sensitivity(model, ids, {name: lin}, MENU, batch=2, progress=False, dtype="float32", algorithm="awq")
    got = {}
    h = lin.register_forward_hook(lambda m, a, y: got.update(x=a[0].detach(), y=y) or y.retain_grad())
    logits = model(ids, use_cache=False).logits
    F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum").backward()
    h.remove()
    xs = got["x"].reshape(-1, lin.in_features)
    for f in MENU:
        dw = format_error(lin.weight, xs, f, "awq")
        want = float((got["y"].grad.square() * (got["x"] @ dw.t()).square()).sum())
        assert sens[name][f] == pytest.approx(want, rel=1e-4)
    with pytest.raises(LeanLMError, match="unknown mixed-precision algorithm"):
        fisher_sensitivity(model, ids, {name: lin}, MENU, progress=False, algorithm="awq2")


def test_insensitive_layers_get_the_cheaper_format():
    """Layer 0's attention output is zeroed: q/k/v/o of layer 0 cannot change the loss (zero gradient or zero
    error), so with budget for every other layer in int8 the search keeps exactly those four in int4."""
    model = make_llama()
    att = model.model.layers[0].self_attn
    att.o_proj.weight.data.zero_()
    quiet = {f"model.layers.0.self_attn.{p}_proj" for p in "qkvo"}
    ids = _ids()
    lins = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n}
    want = {n: ("int4_g64" if n in quiet else "int8") for n in lins}
    bits = sum(parse_format(f).bits_per_weight(lins[n].in_features) * lins[n].weight.numel() for n, f in want.items())
    budget = bits / sum(m.weight.numel() for m in lins.values())
    res = mixed_precision(model, ids, budget, MENU, progress=False)
    assert all(res.sensitivity[n][f] == 0 for n in quiet for f in MENU)
    assert res.choice == want
    assert res.average_bits <= budget + 1e-12 and res.spent <= res.limit


def test_budget_is_met_exactly_and_the_choice_is_applied(tiny_model):
    ids = _ids()
    res = mixed_precision(tiny_model, ids, budget=6.0, menu=MENU, progress=False)
    assert res.average_bits <= 6.0 and set(res.choice.values()) == set(MENU) and "lm_head" not in res.choice
    assert res.seconds.keys() == {"costs", "sensitivity", "solve"}
    # a budget equal to uniform int4_g64 (4.25 bits at these widths) leaves no room for any int8 layer;
    # re-solving with the measured sensitivity skips the pass
    low = mixed_precision(tiny_model, ids, 4.25, MENU, progress=False, sensitivity=res.sensitivity)
    assert set(low.choice.values()) == {"int4_g64"} and low.sensitivity is res.sensitivity
    assert mixed_precision(tiny_model, ids, 6.0, MENU, progress=False, sensitivity=res.sensitivity).choice == res.choice
    quantize(tiny_model, res.config(), progress=False)
    fm = {r["name"]: r["format"] for r in summary(tiny_model)}
    assert all(fm[f"{n}.weight_quantizer"] == f for n, f in res.choice.items())
    with pytest.raises(LeanLMError, match="below the cheapest"):
        mixed_precision(make_llama(), ids, budget=3.0, menu=MENU, progress=False)
    with pytest.raises(LeanLMError, match="unknown cost"):
        mixed_precision(make_llama(), ids, budget=6.0, menu=MENU, cost="watts", progress=False)


@pytest.fixture
def reference_layouts(monkeypatch):
    """PyTorch's int4/int8 layouts only. With the fused batch-1 kernels (the default) an int4 layer also keeps the
    kernel's tiled copy of its codes, 1.06 bytes per weight against int8's 1.02 (docs/runtime.md, a known cost to
    remove), so the bytes model's int4 < int8 ordering holds on the reference layouts only."""
    from leanlm.runtime import kernels

    monkeypatch.setattr(kernels, "available", lambda: False)


def test_measured_cost_models(reference_layouts):
    """bytes: what the runtime stores (int3 has no kernel and is stored dense); latency: measured per shape;
    a latency budget in bits interpolates each layer's time between the menu formats around it."""
    c = format_costs((64, 128), ("int3_g64", "int4_g64", "int8", "bf16"), calls=2, rounds=1)
    assert c["int3_g64"]["fallback"] and not c["int4_g64"]["fallback"] and not c["int8"]["fallback"]
    assert c["int4_g64"]["bytes_per_weight"] < c["int8"]["bytes_per_weight"] < c["bf16"]["bytes_per_weight"]
    assert all(v["us_per_call"] > 0 and v["shape"] == [64, 128] for v in c.values())
    shapes = {"a": (64, 128), "b": (64, 128), "c": (128, 64)}
    lat = layer_costs(shapes, MENU, "latency", calls=2)
    assert lat["a"] == lat["b"]   # one measurement per distinct shape
    bits = layer_costs(shapes, MENU, "bits")
    budget = 6.0
    want = 0.0
    for n, (o, i) in shapes.items():
        b4, b8 = bits[n]["int4_g64"] / (o * i), bits[n]["int8"] / (o * i)
        want += lat[n]["int4_g64"] + (budget - b4) / (b8 - b4) * (lat[n]["int8"] - lat[n]["int4_g64"])
    assert _budget_limit(shapes, bits, lat, budget, "latency") == pytest.approx(want)
    assert _budget_limit(shapes, bits, bits, 5.0, "bits") == 5.0 * sum(o * i for o, i in shapes.values())


def test_cli_mixed_with_bytes_cost(tmp_path, tiny_folder, text_file, capsys, reference_layouts):
    out = tmp_path / "q"
    code = main(["quantize", str(tiny_folder), "--mixed", "6", "--menu", "int4_g64,int8", "--cost", "bytes", "--mixed-algorithm", "rtn",
                 "--samples", "2", "--seq-len", "32", "--calib", str(text_file), "--out", str(out), "--json"])
    assert code == 0
    r = json.loads(capsys.readouterr().out)
    m = r["mixed"]
    assert m["cost"] == "bytes" and m["algorithm"] == "rtn" and m["spent"] <= m["limit"]
    assert set(m["choice"].values()) <= set(MENU) and (out / "leanlm.json").exists()
    code = main(["quantize", str(tiny_folder), "--scheme", "w8a16", "--cost", "latency", "--out", str(tmp_path / "r")])
    assert code == 2 and "apply to mixed precision" in capsys.readouterr().err
