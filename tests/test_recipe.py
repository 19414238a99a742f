"""Recipes: validation before work, a recipe reproduces the separate commands, resume, and the 2:4 chain."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import leanlm
from conftest import make_llama
from leanlm import LeanLMError
from leanlm.cli import main
from leanlm.recipe import STEPS, QuantizeStep, Recipe, SparsifyStep

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))


@pytest.fixture
def text_path(tmp_path):
    p = tmp_path / "calib.txt"
    p.write_text("\n\n".join(f"The quick brown fox {i} jumps over the lazy dog. Paris is the capital of France." * 20
                             for i in range(8)))
    return p


def _chain(folder, text):
    """2:4 magnitude sparsity, then W4A16 GPTQ: as recipe steps and as the equivalent CLI options."""
    return [{"sparsify": {"method": "magnitude", "pattern": "2:4"}},
            {"quantize": {"scheme": "w4a16-gptq", "samples": 4, "seq_len": 32, "calib": str(text)}}]


def _nm_violations(model) -> int:
    """Groups of four along the input dimension with more than two non-zero weights, over the masked Linears."""
    bad = 0
    for m in model.modules():
        if getattr(m, "weight_mask", None) is not None:
            bad += int(((m.weight.reshape(-1, 4) != 0).sum(1) > 2).sum())
    return bad


def test_shipped_recipes_validate():
    assert {p.name for p in RECIPES} >= {"sparse24-gptq-gguf.yaml", "prune-distill-awq-qad-ct.yaml"}
    for p in RECIPES:
        r = Recipe.from_file(p)
        r.validate()
        assert all(s.name in STEPS for s in r.steps)


def test_recipe_reproduces_the_separate_commands_and_keeps_every_2_4_group(tmp_path, tiny_folder, text_path, capsys):
    # the CLI chain
    assert main(["sparsify", str(tiny_folder), "--method", "magnitude", "--pattern", "2:4", "--out", str(tmp_path / "S"), "--json"]) == 0
    assert main(["quantize", str(tmp_path / "S"), "--scheme", "w4a16-gptq", "--samples", "4", "--seq-len", "32", "--calib",
                 str(text_path), "--out", str(tmp_path / "Q"), "--json"]) == 0
    capsys.readouterr()
    # the same steps as a recipe file, through `leanlm run`
    rf = tmp_path / "r.yaml"
    import yaml

    rf.write_text(yaml.safe_dump({"model": str(tiny_folder), "steps": _chain(tiny_folder, text_path)}))
    assert main(["run", str(rf), "--out", str(tmp_path / "R"), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert [s["step"] for s in r["steps"]] == ["sparsify", "quantize"]
    q, _ = leanlm.load(tmp_path / "Q")
    rr, _ = leanlm.load(tmp_path / "R")
    sq, sr = q.state_dict(), rr.state_dict()
    assert sq.keys() == sr.keys() and all(torch.equal(sq[k], sr[k]) for k in sq)
    mq = json.loads((tmp_path / "Q" / "leanlm.json").read_text())
    mr = json.loads((tmp_path / "R" / "leanlm.json").read_text())
    assert [s["config"] for s in mq["steps"]] == [s["config"] for s in mr["steps"]]
    for a, b in zip(mq["steps"], mr["steps"]):
        assert a["figures"]["average_bits" if a["step"] == "quantize" else "overall"] == \
            b["figures"]["average_bits" if b["step"] == "quantize" else "overall"]
    # the masks came back on load, so GPTQ kept every 2:4 group, in both final folders
    for m in (q, rr):
        assert len([x for x in m.modules() if getattr(x, "weight_mask", None) is not None]) == 14
        assert _nm_violations(m) == 0
    assert not (tmp_path / ".R.steps").exists()


def test_resume_skips_finished_steps(tmp_path, tiny_folder, text_path, monkeypatch):
    recipe = Recipe.from_dict({"model": str(tiny_folder), "steps": _chain(tiny_folder, text_path)})
    real_quantize = QuantizeStep.run

    def interrupted(self, s, ctx):
        raise KeyboardInterrupt

    monkeypatch.setattr(QuantizeStep, "run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        recipe.run(tmp_path / "R", progress=False)
    assert not (tmp_path / "R").exists()
    assert (tmp_path / ".R.steps" / "01-sparsify" / "model" / "leanlm.json").is_file()
    assert not (tmp_path / ".R.steps" / "02-quantize").exists()

    def must_not_run(self, s, ctx):
        raise AssertionError("a finished step ran again")

    monkeypatch.setattr(SparsifyStep, "run", must_not_run)
    monkeypatch.setattr(QuantizeStep, "run", real_quantize)
    res = recipe.run(tmp_path / "R", progress=False)
    assert [x.step for x in res] == ["sparsify", "quantize"]
    man = json.loads((tmp_path / "R" / "leanlm.json").read_text())
    assert [s["step"] for s in man["steps"]] == ["sparsify", "quantize"] and man["sparsity"]["masks"]
    m, _ = leanlm.load(tmp_path / "R")
    assert _nm_violations(m) == 0 and not (tmp_path / ".R.steps").exists()
    # a finished step whose options changed is not silently reused
    monkeypatch.setattr(QuantizeStep, "run", interrupted)
    monkeypatch.setattr(SparsifyStep, "run", lambda self, s, ctx: {})
    with pytest.raises(KeyboardInterrupt):
        recipe.run(tmp_path / "R2", progress=False)
    changed = Recipe.from_dict({"model": str(tiny_folder), "steps": [{"sparsify": {"method": "magnitude", "pattern": "4:8"}},
                                                                      _chain(tiny_folder, text_path)[1]]})
    with pytest.raises(LeanLMError, match=r"step 1 \(sparsify\) finished earlier with other options"):
        changed.run(tmp_path / "R2", progress=False)


def _err(recipe: dict) -> str:
    with pytest.raises(LeanLMError) as e:
        Recipe.from_dict(recipe).validate()
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_bad_recipes_fail_before_any_work(tmp_path, tiny_folder, tiny_tokenizer):
    m = str(tiny_folder)
    assert "unknown key 'schem'; valid keys: scheme, config, mixed" in _err({"model": m, "steps": [{"quantize": {"schem": "x"}}]})
    assert "unknown step 'quantise'; valid steps: prune, distill" in _err({"model": m, "steps": [{"quantise": {}}]})
    assert "unknown key 'step'; valid keys: model, dtype" in _err({"model": m, "step": []})
    msg = _err({"model": m, "steps": [{"quantize": {"scheme": "nvfp4"}}, {"export": {"to": "gguf"}}]})
    assert msg.startswith("step 2 (export):") and "nvfp4" in msg
    msg = _err({"model": m, "steps": [{"quantize": {"scheme": "w4a16-rtn"}}, {"prune": {"target_params": "100k"}}]})
    assert msg.startswith("step 2 (prune): structured pruning after quantization")
    assert "step 2 (prune)" in _err({"model": m, "steps": [{"sparsify": {"method": "magnitude"}}, {"prune": {"layers": 1}}]})
    assert "step 2 (quantize): the model is already quantized" in _err(
        {"model": m, "steps": [{"quantize": {"scheme": "w8a16"}}, {"quantize": {"scheme": "w4a16-rtn"}}]})
    assert "step 1 (qat): the model is not quantized" in _err({"model": m, "steps": [{"qat": {"budget": "1m"}}]})
    assert "step 1 (quantize): pass exactly one of" in _err({"model": m, "steps": [{"quantize": {}}]})
    assert "step 1 (distill): give one training budget" in _err({"model": m, "steps": [{"distill": {}}]})
    # token lengths beyond the model's context (1024 positions), from its config.json before any load
    assert "step 2 (quantize): seq_len 4096 exceeds the model's context of 1024 tokens" in _err(
        {"model": m, "steps": [{"sparsify": {"method": "magnitude"}}, {"quantize": {"scheme": "w8a16", "seq_len": 4096}}]})
    assert "step 1 (eval): window 2048 exceeds" in _err({"model": m, "steps": [{"eval": {"window": 2048}}]})
    # a draft for a model with another vocabulary
    other = make_llama(vocab_size=len(tiny_tokenizer) + 50)
    other.save_pretrained(tmp_path / "other")
    msg = _err({"model": m, "steps": [{"draft": {"model": str(tmp_path / "other")}}]})
    assert msg.startswith("step 1 (draft): the draft") and "vocabulary" in msg
    # a step that cannot follow what a saved folder already holds (the CLI: one-step recipes)
    q = make_llama(vocab_size=len(tiny_tokenizer))
    leanlm.quantize(q, "nvfp4", torch.randint(0, 50, (2, 16)), progress=False)
    leanlm.save(q, tmp_path / "q", tokenizer=tiny_tokenizer)
    assert main(["export", str(tmp_path / "q"), "--to", "gguf", "--out", str(tmp_path / "q.gguf")]) == 2
    assert main(["prune", str(tmp_path / "q"), "--layers", "1", "--out", str(tmp_path / "p")]) == 2
    assert not (tmp_path / "q.gguf").exists() and not (tmp_path / "p").exists()


def test_cli_run_reports_bad_recipe_file(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: x\nsteps:\n  - quantize: {scheme: w4a16-rtn, colour: red}\n")
    assert main(["run", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'colour'" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "broken.json").write_text("{")
    assert main(["run", str(tmp_path / "broken.json"), "--out", str(tmp_path / "o")]) == 2
    assert "not valid JSON" in capsys.readouterr().err


def test_cli_run_table_and_eval_step(tmp_path, tiny_folder, text_path, capsys):
    rf = tmp_path / "r.json"
    rf.write_text(json.dumps({"model": str(tiny_folder), "steps": [{"eval": {"source": str(text_path), "windows": 1, "window": 16}}]}))
    assert main(["run", str(rf), "--out", str(tmp_path / "E")]) == 0
    out = capsys.readouterr().out
    assert "1. eval" in out
    man = json.loads((tmp_path / "E" / "leanlm.json").read_text())
    ppl = man["steps"][0]["figures"]["perplexity"]
    assert man["steps"][0]["step"] == "eval" and ppl["windows"] == 1 and ppl["perplexity"] > 1
    assert leanlm.load(tmp_path / "E")[0].leanlm_steps == man["steps"]


def test_cli_quantize_mixed_goes_through_the_quantization_api(tmp_path, tiny_folder, text_path, capsys):
    assert main(["quantize", str(tiny_folder), "--mixed", "6", "--menu", "int4_g64,int8", "--calib", str(text_path), "--samples", "4",
                 "--seq-len", "32", "--out", str(tmp_path / "M"), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["mixed"]["budget"] == 6 and r["mixed"]["average_bits"] <= 6 + 1e-6
    assert set(r["mixed"]["choice"].values()) <= {"int4_g64", "int8"}
    step = json.loads((tmp_path / "M" / "leanlm.json").read_text())["steps"][0]
    assert step["step"] == "quantize" and step["config"]["mixed"] == 6 and step["figures"]["mixed"] == r["mixed"]
