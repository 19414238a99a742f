"""AutoRound (quantization/autoround.py): learned rounding lowers the layer output error below
round-to-nearest, the stored weights lie on their grid, bad settings are clear errors."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import make_llama
from leanlm import LeanLMError
from leanlm.quantization import GPTQ, AutoRound, QuantConfig, QuantizerConfig, quantize
from leanlm.quantization.formats import fake_quantize
from leanlm.quantization.modules import quantizers


def _cfg(fmt: str, *algos) -> QuantConfig:
    return QuantConfig([("*weight_quantizer", QuantizerConfig(fmt)), ("*lm_head*", None)], list(algos), calib_batch=4)


def _layer0_outputs(model, ids) -> torch.Tensor:
    got = []
    h = model.model.layers[0].register_forward_hook(lambda m, a, o: got.append(o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        model(ids, use_cache=False)
    h.remove()
    return got[0]


@pytest.mark.parametrize("fmt,train_dtype", [("int4_g32", "float32"), ("int3_g32_asym", "float32"), ("int4_g32", "bfloat16")])
def test_autoround_lowers_layer_output_error_below_rtn(fmt, train_dtype):
    model = make_llama(vocab_size=300, hidden=64, layers=2, intermediate=128)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 300, (16, 32), generator=g)
    held = torch.randint(0, 300, (8, 32), generator=g)
    rtn, ar = copy.deepcopy(model), copy.deepcopy(model)
    quantize(rtn, _cfg(fmt), ids, progress=False)
    quantize(ar, _cfg(fmt, AutoRound(iters=60, batch=4, train_dtype=train_dtype)), ids, progress=False)
    for x in (ids, held):
        ref = _layer0_outputs(model, x)
        e_rtn = (_layer0_outputs(rtn, x) - ref).pow(2).mean().item()
        e_ar = (_layer0_outputs(ar, x) - ref).pow(2).mean().item()
        assert e_ar < 0.9 * e_rtn, (fmt, e_ar, e_rtn)
    for name, q in quantizers(ar).items():  # every weight on its grid, with the stored scales
        if q.enabled and q.role == "weight":
            w = dict(ar.named_modules())[name.rsplit(".", 1)[0]].weight.detach()
            assert torch.equal(fake_quantize(w, q.fmt, q.qparams), w.float()), name


def test_autoround_config_round_trip_and_bad_settings():
    cfg = _cfg("int4_g32", AutoRound(iters=7, batch=3))
    back = QuantConfig.from_dict(cfg.to_dict())
    assert back.algorithms == [AutoRound(iters=7, batch=3)]
    assert QuantConfig.from_dict(_cfg("int4_g32", AutoRound(train_dtype="bfloat16")).to_dict()).algorithms[0].train_dtype == "bfloat16"
    for bad in ({"iters": 0}, {"batch": 0}, {"lr": -1.0}, {"min_clip": 0.0}, {"train_dtype": "float16"}, {"keep": "first"}):
        with pytest.raises(LeanLMError, match="AutoRound"):
            AutoRound(**bad)
    model = make_llama(vocab_size=300)
    with pytest.raises(LeanLMError, match="use one of them"):
        quantize(model, _cfg("int4_g32", AutoRound(iters=2), GPTQ()), torch.randint(0, 300, (4, 16)), progress=False)


def test_gptq_sink_tokens_leave_the_first_positions_out_of_the_hessian(monkeypatch):
    """GPTQ(sink_tokens=1): the Hessians see every position but the first of each row, and on inputs whose
    first position is a synthetic attention sink (a few channels 100x larger) the quantized layer's error on
    the other positions is lower than with the sink in the Hessian."""
    from leanlm.quantization import algorithms as alg

    seen = []
    orig = alg.HessianAccumulator.add
    monkeypatch.setattr(alg.HessianAccumulator, "add", lambda self, x: (seen.append(x.shape[-2]), orig(self, x))[1])
    model = make_llama(vocab_size=300)
    ids = torch.randint(0, 300, (4, 16), generator=torch.Generator().manual_seed(0))
    quantize(model, _cfg("int4_g32", GPTQ(sink_tokens=1)), ids, progress=False)
    assert seen and set(seen) == {15}

    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 64, 128, generator=g)
    x[:, 0, :4] *= 100.0  # the sink: huge values on a few channels at position 0 of every row
    w = torch.randn(96, 128, generator=g) * 0.05
    rest = x[:, 1:].reshape(-1, 128)

    def err_on_rest(rows):
        acc = alg.HessianAccumulator(128)
        acc.add(rows)
        wq = alg.gptq(w, acc.H, "int4_g32", act_order=True)[0]
        return (rest @ (w - wq).T).pow(2).mean().item()

    assert err_on_rest(x[:, 1:]) < err_on_rest(x)


@pytest.mark.parametrize("acts", [None, "int4_token"])
def test_autoround_float_targets_are_the_float_models_layer_outputs(monkeypatch, acts):
    """float_targets: every layer trains against the float model's own outputs of that layer (a float
    stream kept beside the quantized one), not the float layer on its quantized inputs; with activation
    quantizers, the targets are still the float model's (activations unquantized)."""
    from leanlm.quantization import autoround

    model = make_llama(vocab_size=300, hidden=64, layers=3, intermediate=128)
    ids = torch.randint(0, 300, (8, 16), generator=torch.Generator().manual_seed(0))
    ref = []
    hooks = [layer.register_forward_hook(lambda m, a, o: ref.append(o[0] if isinstance(o, tuple) else o))
             for layer in model.model.layers]
    with torch.no_grad():
        model(ids, use_cache=False)
    for h in hooks:
        h.remove()
    got, orig = [], autoround._float_targets

    def record(step):
        y = orig(step)
        got.append(torch.cat(y))
        return y

    monkeypatch.setattr(autoround, "_float_targets", record)
    q = copy.deepcopy(model)
    cfg = _cfg("int4_g32", AutoRound(iters=3, batch=2, float_targets=True))
    if acts:
        cfg.rules.insert(1, ("*input_quantizer", QuantizerConfig(acts, dynamic=True)))
    quantize(q, cfg, ids, progress=False)
    assert len(got) == 3
    for i, (y, r) in enumerate(zip(got, ref)):
        assert torch.allclose(y, r, atol=1e-4), i
    # the quantized stream leaves the float one after layer 0, so later targets differ from the old ones
    assert not torch.allclose(_layer0_outputs(q, ids), ref[0], atol=1e-4)


def test_w4a16_default_awq_then_autoround_beats_awq_alone_on_held_out_logits():
    """The w4a16 preset (AWQ, then AutoRound against the float model's outputs) against AWQ alone and
    against AutoRound trained on its quantized-stream targets, on a tiny model's held-out logits."""
    from leanlm.quantization import AWQ, preset

    model = make_llama(vocab_size=300, hidden=64, layers=2, intermediate=128)
    g = torch.Generator().manual_seed(0)
    ids, held = torch.randint(0, 300, (8, 32), generator=g), torch.randint(0, 300, (8, 32), generator=g)
    with torch.no_grad():
        ref = model(held, use_cache=False).logits
    stale = preset("w4a16")
    stale.algorithms = [AWQ(), AutoRound(float_targets=False)]
    err = {}
    for name, cfg in (("w4a16", preset("w4a16")), ("awq", preset("w4a16-awq")), ("stale targets", stale)):
        q = copy.deepcopy(model)
        quantize(q, cfg, ids, progress=False)
        with torch.no_grad():
            err[name] = (q(held, use_cache=False).logits - ref).pow(2).mean().item()
    assert err["w4a16"] < 0.95 * err["awq"] and err["w4a16"] < err["stale targets"], err


def test_autoround_trains_through_the_activation_quantizers():
    """W4A8 / W4A4: training runs with the dynamic activation quantizers in the loop (straight-through),
    so the Linears before a quantized input (q/k/v before o_proj, gate/up before down_proj) still get
    gradients and leave round-to-nearest; the quantizers are back to plain quantizing afterwards."""
    from leanlm.quantization.algorithms import weight_qparams

    model = make_llama(vocab_size=300, hidden=64, layers=1, intermediate=128)
    ids = torch.randint(0, 300, (8, 32), generator=torch.Generator().manual_seed(0))
    float_w = {n: m.weight.detach().clone() for n, m in model.named_modules() if n.endswith(("q_proj", "gate_proj"))}
    cfg = _cfg("int4_g32", AutoRound(iters=20, batch=4, clip=False))
    cfg.rules.insert(1, ("*input_quantizer", QuantizerConfig("int8_token", dynamic=True)))
    quantize(model, cfg, ids, progress=False)
    mods = dict(model.named_modules())
    fmt = mods["model.layers.0.self_attn.q_proj"].weight_quantizer.fmt
    for n, w in float_w.items():
        rtn = fake_quantize(w.float(), fmt, weight_qparams(w.float(), fmt, "max"))
        assert not torch.equal(mods[n].weight.detach().float(), rtn), f"{n} got no gradient through the activation quantizers"
    for q in quantizers(model).values():
        if q.enabled and q.role == "input":
            assert q.mode == "quant" and not q.ste


def test_w4a8_and_nvfp4_calibrated_presets_beat_round_to_nearest_on_held_out_logits():
    """Presets w4a8-awq-autoround (AWQ, then AutoRound with int8 activations) and nvfp4-awq-autoround against the same
    formats rounded to nearest, on a tiny model's held-out logits."""
    from leanlm.quantization import preset

    model = make_llama(vocab_size=300, hidden=64, layers=2, intermediate=128)
    g = torch.Generator().manual_seed(0)
    ids, held = torch.randint(0, 300, (8, 32), generator=g), torch.randint(0, 300, (8, 32), generator=g)
    with torch.no_grad():
        ref = model(held, use_cache=False).logits
    # NVFP4's fine blocks leave little for calibration to win on a random tiny model (no outlier channels)
    for calibrated, plain, ratio in (("w4a8-awq-autoround", "w4a8-gptq", 0.9), ("nvfp4-awq-autoround", "nvfp4", 1.0)):
        err = {}
        for name in (calibrated, plain):
            cfg = preset(name)
            if name == plain:
                cfg.algorithms = []  # round to nearest, same formats
            q = copy.deepcopy(model)
            quantize(q, cfg, ids, progress=False)
            with torch.no_grad():
                err[name] = (q(held, use_cache=False).logits - ref).pow(2).mean().item()
        assert err[calibrated] < ratio * err[plain], err


def test_autoround_full_range_grid_runs_and_exports_exactly(tmp_path, tiny_tokenizer):
    """The "full" range method under AWQ + AutoRound: each group's scale is its signed extreme / -8 (llama.cpp's Q4_0 convention), so
    scales may be negative and code -8 is used; the weights lie on that grid, the packed int4 runtime decodes them,
    and compressed-tensors and GGUF Q4_0 carry them without requantizing."""
    pytest.importorskip("compressed_tensors", reason="compressed-tensors not installed: pip install -e '.[export]'")
    from leanlm.export import export
    from leanlm.export import gguf as G
    from leanlm.export.consumers import load_compressed_tensors
    from leanlm.quantization import AWQ
    from leanlm.quantization.formats import quantize as qcodes
    from leanlm.runtime import Engine

    model = make_llama(vocab_size=len(tiny_tokenizer), hidden=64, layers=2, intermediate=128)
    g = torch.Generator().manual_seed(0)
    ids, held = torch.randint(0, 300, (16, 32), generator=g), torch.randint(0, 300, (2, 24), generator=g)
    cfg = QuantConfig([("*weight_quantizer", QuantizerConfig("int4_g32", method="full")), ("*lm_head*", None)],
                      [AWQ(grid=4), AutoRound(iters=20, batch=4)], calib_batch=4)
    assert QuantConfig.from_dict(cfg.to_dict()).rules[0][1].method == "full"
    quantize(model, cfg, ids, progress=False)
    negative = minus8 = 0
    for name, q in quantizers(model).items():
        if q.enabled and q.role == "weight":
            w = dict(model.named_modules())[name.rsplit(".", 1)[0]].weight.detach()
            assert torch.equal(fake_quantize(w, q.fmt, q.qparams), w.float()), name
            negative += int((q.qparams.scale < 0).sum())
            minus8 += int((qcodes(w.float(), q.fmt, q.qparams) == -8).sum())
    assert negative > 0 and minus8 > 0
    with torch.no_grad():
        want = model(held).logits
    eng = Engine(model, max_batch=2, max_seq_len=64)
    lin, layout = model.model.layers[1].mlp.down_proj, eng.model.layers[1].down
    fq = lin.weight.detach().float()
    assert (layout.dequantize() - fq).abs().max() <= 1e-2 * fq.abs().max()
    got = eng.forward(held)
    assert (got - want).abs().max() <= 0.15 * want.abs().max() and torch.equal(got.argmax(-1), want.argmax(-1))
    out = export(model, "compressed-tensors", tmp_path / "ct", tokenizer=tiny_tokenizer)
    with torch.no_grad():
        assert torch.equal(load_compressed_tensors(out)(held).logits, want)
    export(model, "gguf", tmp_path / "m.gguf", tokenizer=tiny_tokenizer)
    assert G.last_report["quant"] == "Q4_0" and len(G.last_report["reused_exact"]) == 14 and not G.last_report["requantized"]
