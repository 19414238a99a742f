"""Quantization mechanics on tiny models: config rules, module swaps, every preset, save/reload, KV cache."""

import copy
import json

import pytest
import torch
from torch import nn

import leanlm
from leanlm import LeanLMError
from leanlm.cli import main
from leanlm.quantization import (
    GPTQ, PRESETS, QuantConfig, QuantizerConfig, SmoothQuant, quantize, summary,
)
from leanlm.quantization.modules import TensorQuantizer, quantizer_names

from conftest import make_llama


def calib(n=4, L=32, vocab=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (n, L), generator=g)


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_rules_later_win_and_none_disables(tiny_model):
    names = quantizer_names(tiny_model)
    cfg = QuantConfig([("*weight_quantizer", QuantizerConfig("int4_g64")),
                       ("*down_proj.weight_quantizer", QuantizerConfig("int8")),
                       ("*lm_head*", None)])
    r = cfg.resolve(names)
    assert r["model.layers.0.mlp.down_proj.weight_quantizer"].format == "int8"
    assert r["model.layers.0.self_attn.q_proj.weight_quantizer"].format == "int4_g64"
    assert "lm_head.weight_quantizer" not in r and not any(k.endswith("input_quantizer") for k in r)


def test_pattern_matching_nothing_is_an_error(tiny_model):
    cfg = QuantConfig([("*mpl*weight_quantizer", QuantizerConfig("int8"))])
    with pytest.raises(LeanLMError, match="matches no quantizer"):
        quantize(tiny_model, cfg)


def test_unknown_scheme_and_format():
    with pytest.raises(LeanLMError, match="unknown scheme 'w5a5'"):
        leanlm.quantization.preset("w5a5")
    with pytest.raises(LeanLMError, match="unknown format"):
        QuantizerConfig("int4_q64")


def test_class_swap_keeps_isinstance_and_state_dict(tiny_model):
    keys = set(tiny_model.state_dict())
    quantize(tiny_model, "w4a16-rtn", progress=False)
    q = tiny_model.model.layers[0].self_attn.q_proj
    assert isinstance(q, nn.Linear) and type(q).__name__ == "QuantLinear"
    assert isinstance(q.weight_quantizer, TensorQuantizer) and q.weight_quantizer.folded
    assert set(tiny_model.state_dict()) == keys  # weight-only RTN adds no tensors to the state_dict
    assert all(r["on_grid"] for r in summary(tiny_model) if r["role"] == "weight")


@pytest.mark.parametrize("scheme", sorted(PRESETS))
def test_every_preset_on_a_tiny_model(scheme, tmp_path, tiny_tokenizer):
    model = make_llama(vocab_size=len(tiny_tokenizer))
    ids = calib()
    ref = logits(model, ids)
    quantize(model, scheme, calib(seed=1), progress=False)
    out = logits(model, ids)
    assert torch.isfinite(out).all()
    rel = ((out - ref).norm() / ref.norm()).item()
    assert 0 < rel < 0.6, f"{scheme}: relative logit change {rel}"
    rows = summary(model)
    assert rows and all(r["on_grid"] for r in rows if r["role"] == "weight")
    path = leanlm.save(model, tmp_path / scheme, tokenizer=tiny_tokenizer)
    back = leanlm.load(path)[0]
    assert torch.equal(logits(back, ids), out)  # reload reproduces the quantized model exactly
    m2, tok2 = leanlm.load(path)  # and leanlm.load recognizes the folder
    assert torch.equal(logits(m2, ids), out) and tok2 is not None


def test_int4_checkpoint_is_smaller(tmp_path, tiny_tokenizer):
    model = make_llama(vocab_size=len(tiny_tokenizer), hidden=128, intermediate=256, tie=False)
    model.save_pretrained(tmp_path / "float")
    quantize(model, QuantConfig([("*weight_quantizer", QuantizerConfig("int4_g64"))]), progress=False)
    leanlm.save(model, tmp_path / "q")
    lin = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    f = (tmp_path / "float" / "model.safetensors").stat().st_size
    q = (tmp_path / "q" / "model.safetensors").stat().st_size
    # every linear (incl. the untied head) went from 4 bytes to ~0.53 bytes per weight
    assert f - q > 0.8 * lin * (4 - 0.6)


def test_group_size_not_dividing_is_explicit(tiny_tokenizer):
    model = make_llama(vocab_size=len(tiny_tokenizer), hidden=96, heads=4, kv_heads=2, intermediate=192)
    with pytest.raises(LeanLMError, match="input dimension 96 to be a multiple of 64"):
        quantize(model, "w4a16-rtn")
    # a rule keeping the offending layers in int8 makes it work
    cfg = QuantConfig([("*weight_quantizer", QuantizerConfig("int4_g32"))])
    quantize(model, cfg, progress=False)


def test_quantized_head_is_untied(tiny_model):
    emb = tiny_model.model.embed_tokens.weight.detach().clone()
    quantize(tiny_model, QuantConfig([("*weight_quantizer", QuantizerConfig("int4_g64"))]), progress=False)
    assert torch.equal(tiny_model.model.embed_tokens.weight, emb)  # embedding untouched
    assert not torch.equal(tiny_model.lm_head.weight, emb)         # head quantized on its own copy


def test_kv_cache_quantization_changes_attention_and_generates(tiny_model):
    ids = calib()
    ref = logits(tiny_model, ids)
    quantize(tiny_model, "w8a16", kv_cache="int8", progress=False)
    attn = tiny_model.model.layers[0].self_attn
    assert attn.k_quantizer.enabled and attn.v_quantizer.fmt.name == "int8_token"
    calls = []
    attn.k_quantizer.register_forward_hook(lambda m, i, o: calls.append(i[0].shape))
    out = logits(tiny_model, ids)
    assert calls and calls[0][-1] == tiny_model.config.hidden_size // tiny_model.config.num_attention_heads
    assert 0 < (out - ref).abs().max() < 0.5
    gen = tiny_model.generate(ids[:1, :8], attention_mask=torch.ones(1, 8, dtype=torch.long), max_new_tokens=4, do_sample=False)
    assert gen.shape == (1, 12)


def test_static_activation_ranges_are_calibrated_and_saved(tiny_model, tmp_path):
    quantize(tiny_model, "w8a8-static", calib(), progress=False)
    q = tiny_model.model.layers[1].mlp.down_proj.input_quantizer
    assert q.amax is not None and q.amax > 0
    leanlm.save(tiny_model, tmp_path / "s")
    back = leanlm.load(tmp_path / "s")[0]
    assert torch.equal(back.model.layers[1].mlp.down_proj.input_quantizer.amax, q.amax)


def _input_max(model, ids) -> dict[str, float]:
    """max |x| over the input of every decoder-layer Linear in one forward of ``model``."""
    seen: dict[str, float] = {}

    def rec(n):
        return lambda m, a: seen.__setitem__(n, max(seen.get(n, 0.0), a[0].abs().max().item()))

    hooks = [m.register_forward_pre_hook(rec(n)) for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n]
    logits(model, ids)
    for h in hooks:
        h.remove()
    return seen


def _layer_calls(model, rows: int) -> list[int]:
    """Counts the decoder-layer forwards over ``rows`` calibration rows (the 1-row traces are not counted)."""
    calls = [0]
    for layer in model.model.layers:
        layer.register_forward_pre_hook(lambda m, a: calls.__setitem__(0, calls[0] + (a[0].shape[0] == rows)))
    return calls


def test_float_calibration_ranges_are_the_smoothed_float_models_maxima_in_one_forward_per_layer(tiny_model):
    ids = calib(n=4)
    static = ("*input_quantizer", QuantizerConfig("int8_tensor", method="max"))
    model = copy.deepcopy(tiny_model)
    calls = _layer_calls(model, 2)
    quantize(model, QuantConfig([static, ("*lm_head*", None)], [SmoothQuant(0.8)], calib_batch=2, sequential=False), ids, progress=False)
    # 2 capture calls stopped at layer 0, then 2 layers x 2 mini-batches: SmoothQuant's statistics and every range from one float forward
    assert calls[0] == 2 + 2 * 2
    qs = {n: m.input_quantizer for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n}
    for q in qs.values():   # no weight quantizer: the model is the smoothed float model; read its Linears' inputs
        q.mode = "off"
    want = _input_max(model, ids)
    assert set(want) == set(qs)
    for n, q in qs.items():
        assert q.amax.item() == pytest.approx(want[n], rel=1e-4), n
    seq = copy.deepcopy(tiny_model)   # sequential: SmoothQuant's statistics, the ranges, the quantized outputs
    calls = _layer_calls(seq, 2)
    quantize(seq, QuantConfig([static, ("*lm_head*", None)], [SmoothQuant(0.8)], calib_batch=2), ids, progress=False)
    assert calls[0] == 2 + 3 * 2 * 2


def test_float_calibration_ranges_do_not_see_earlier_layers_weight_rounding(tiny_model):
    ids = calib(n=4)
    static = ("*input_quantizer", QuantizerConfig("int8_tensor", method="max"))
    w4 = ("*weight_quantizer", QuantizerConfig("int4_g64"))
    amax = {}
    for name, rules, seq in (("float", [static], False), ("w4 float", [w4, static], False), ("w4 sequential", [w4, static], True)):
        model = copy.deepcopy(tiny_model)
        quantize(model, QuantConfig(rules + [("*lm_head*", None)], sequential=seq), ids, progress=False)
        amax[name] = model.model.layers[1].mlp.down_proj.input_quantizer.amax
    assert torch.equal(amax["w4 float"], amax["float"])
    assert not torch.equal(amax["w4 sequential"], amax["float"])
    cfg = QuantConfig([w4, static], sequential=False)
    assert QuantConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))).sequential is False
    assert "sequential" not in QuantConfig([w4]).to_dict()


def test_bad_inputs(tiny_model, tmp_path):
    with pytest.raises(LeanLMError, match="needs calibration data"):
        quantize(tiny_model, "w4a16-gptq")
    broken = make_llama()
    with torch.no_grad():
        broken.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(LeanLMError, match="NaN/inf"):
        quantize(broken, "w4a16-rtn")
    with torch.no_grad():  # +inf and -inf in one tensor (their sum is NaN)
        broken.model.layers[0].mlp.up_proj.weight[0, :2] = torch.tensor([float("inf"), float("-inf")])
    with pytest.raises(LeanLMError, match="layers.0.mlp.up_proj.weight holds NaN/inf"):
        quantize(broken, "w4a16-rtn")
    with torch.no_grad():  # a lone -inf in another layer, the first one finite again
        broken.model.layers[0].mlp.up_proj.weight[0, :2] = 0.0
        broken.model.layers[1].mlp.up_proj.weight[0, 0] = float("-inf")
    with pytest.raises(LeanLMError, match="layers.1.mlp.up_proj.weight holds NaN/inf"):
        quantize(broken, "w4a16-rtn")
    quantize(tiny_model, "w4a16-rtn", progress=False)
    with pytest.raises(LeanLMError, match="already quantized"):
        quantize(tiny_model, "w4a16-rtn")
    leanlm.save(tiny_model, tmp_path / "o")
    with pytest.raises(LeanLMError, match="already exists"):
        leanlm.save(tiny_model, tmp_path / "o")
    for fmt in ("int4_g64_asym", "nvfp4", "fp8_e4m3"):   # the full-range grid is a symmetric int grid
        with pytest.raises(LeanLMError, match="range method 'full' needs a symmetric int format"):
            QuantizerConfig(fmt, method="full")


def test_config_json_round_trip():
    cfg = QuantConfig([("*weight_quantizer", QuantizerConfig("int4_g64", method="mse")), ("*lm_head*", None)], [GPTQ(act_order=True)])
    back = QuantConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg


def test_cli_quantize(capsys, tiny_folder, tmp_path, text_file):
    out = tmp_path / "q"
    code = main(["quantize", str(tiny_folder), "--scheme", "w4a16-gptq", "--out", str(out), "--samples", "4",
                 "--seq-len", "32", "--calib", str(text_file), "--json"])
    r = json.loads(capsys.readouterr().out)
    assert code == 0 and json.loads((out / "leanlm.json").read_text())["quantization"] is not None
    assert r["scheme"] == "w4a16-gptq" and r["checkpoint_bytes"] > 0
    assert {row["format"] for row in r["layers"]} == {"int4_g64"}
    code = main(["quantize", str(tiny_folder), "--scheme", "w4a16-gptq", "--out", str(out)])
    assert code == 2 and "already exists" in capsys.readouterr().err
    out2 = tmp_path / "q_bf16"
    code = main(["quantize", str(tiny_folder), "--scheme", "w4a16-gptq", "--gptq-bf16", "--out", str(out2), "--samples", "4",
                 "--seq-len", "32", "--calib", str(text_file), "--json"])
    assert code == 0 and '"forward_dtype": "bfloat16"' in (out2 / "leanlm.json").read_text()
    capsys.readouterr()
    code = main(["quantize", str(tiny_folder), "--scheme", "w4a16-rtn", "--gptq-bf16", "--out", str(tmp_path / "r")])
    assert code == 2 and "--gptq-bf16 applies to schemes that use GPTQ" in capsys.readouterr().err


def test_smoothquant_search_in_calibration_beats_fixed_alpha(tiny_tokenizer):
    """The per-layer alpha search lowers (never raises, up to noise) the logit error of W8A8 on a tiny model."""
    from leanlm.quantization import QuantConfig, QuantizerConfig, SmoothQuant

    ids, calib_ids = calib(), calib(seed=1)
    rules = [("*weight_quantizer", QuantizerConfig("int8")), ("*input_quantizer", QuantizerConfig("int8_tensor", dynamic=True)),
             ("*lm_head*", None)]
    errs = {}
    for name, algo in (("fixed", SmoothQuant(0.5)), ("search", SmoothQuant(search=True, grid=10))):
        model = make_llama(vocab_size=len(tiny_tokenizer))
        ref = logits(model, ids)
        quantize(model, QuantConfig(rules, [algo]), calib_ids, progress=False)
        errs[name] = ((logits(model, ids) - ref).norm() / ref.norm()).item()
    assert 0 < errs["search"] <= errs["fixed"] * 1.05, errs


def test_gptq_bfloat16_forwards_close_to_float32(tiny_model):
    """GPTQ(forward_dtype="bfloat16") feeds its Hessians from bfloat16-autocast forwards; the solved
    weights stay on the float32 grid and end up close to the float32-forward result."""
    ids = calib(8, 32)
    g64 = [("*weight_quantizer", QuantizerConfig("int4_g64")), ("*lm_head*", None)]
    a, b = copy.deepcopy(tiny_model), copy.deepcopy(tiny_model)
    quantize(a, QuantConfig(g64, [GPTQ()]), ids, progress=False)
    quantize(b, QuantConfig(g64, [GPTQ(forward_dtype="bfloat16")]), ids, progress=False)
    wa, wb = a.model.layers[1].mlp.down_proj.weight, b.model.layers[1].mlp.down_proj.weight
    assert wb.dtype == torch.float32 and not torch.equal(wa, wb)           # the Hessians did change a little
    assert (wa != wb).float().mean() < 0.2                                 # ... most codes stay the same
    with torch.no_grad():
        la, lb, ref = a(ids).logits, b(ids).logits, tiny_model(ids).logits
    assert (lb - ref).norm() < 1.2 * (la - ref).norm()                     # no worse than float32 forwards (to noise)
    with pytest.raises(LeanLMError, match="forward_dtype"):
        GPTQ(forward_dtype="float16")


def test_aliases_build_their_targets_config():
    """`w4a16` and `w4a8` name the best measured recipe of their format: the same config as the preset they point to."""
    from leanlm.quantization import ALIASES, PRESETS, preset

    assert set(ALIASES) <= set(PRESETS) and set(ALIASES.values()) <= set(PRESETS)
    for alias, target in ALIASES.items():
        assert preset(alias).to_dict() == preset(target).to_dict(), alias
