"""`leanlm optimize` on a tiny model: the whole loop within a short budget, every output, resume after an
interrupt (finished trials are not run again), the report's figures against trials.jsonl, the report in
a real headless browser, and a target no candidate meets."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from leanlm.core.errors import LeanLMError
from leanlm.optimize import OptimizeConfig, optimize
from leanlm.optimize import search as S

SMALL = dict(window=32, search_windows=2, check_windows=2, short_windows=1, samples=2, new_tokens=8, prompt_tokens=16, runs=1,
             concurrency=2, progress=False)


def _cfg(folder, out, **kw) -> OptimizeConfig:
    return OptimizeConfig(str(folder), str(out), **{**SMALL, "budget_s": 600.0, "exports": ["gguf"], **kw})


KEEP = ("float", "w8a16", "w8a8", "w4a16-rtn", "w4a16-gptq", "sparse-2:4+w8a16")   # a cheap slice of the space


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """One search, interrupted at its first batch-1 speed trial, then resumed to the end (of a slice of the space,
    so that the test's time does not depend on the machine's load)."""
    from conftest import make_llama, make_tokenizer

    mp = pytest.MonkeyPatch()
    real = S.candidates
    mp.setattr(S, "candidates", lambda st: [c for c in real(st) if c.name in KEEP])

    tmp = tmp_path_factory.mktemp("opt")
    tok = make_tokenizer()
    make_llama(vocab_size=len(tok)).save_pretrained(tmp / "tiny")
    tok.save_pretrained(tmp / "tiny")
    out = tmp / "out"
    real_runtime, real_serving = S.measure_runtime, S.measure_serving
    calls = []

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    S.measure_runtime = interrupt
    try:
        with pytest.raises(KeyboardInterrupt):
            optimize(_cfg(tmp / "tiny", out))
    finally:
        S.measure_runtime = real_runtime
    before = [json.loads(x) for x in (out / "trials.jsonl").read_text().splitlines()]

    def counting(*a, **k):
        calls.append(a[2])   # the deployment
        return real_serving(*a, **k)

    S.measure_serving = counting
    try:
        summary = optimize(_cfg(tmp / "tiny", out))
    finally:
        S.measure_serving = real_serving
    yield {"tmp": tmp, "out": out, "before": before, "summary": summary, "serving_calls": calls}
    mp.undo()


def test_the_loop_writes_every_output(searched):
    out, r = searched["out"], searched["summary"]
    for name in ("model/leanlm.json", "recipe.yaml", "trials.jsonl", "report.html", "model.gguf", "deploy.json"):
        assert (out / name).exists(), name
    assert r["chosen"] is not None and r["check"]["quality"]["loss"] <= 0.05
    assert r["chosen"]["quality"]["loss"] <= 0.05 and r["chosen"]["speed"]["tokens_per_s"] > 0
    kinds = {t["type"] for t in r["trials"]}
    assert {"quality", "deploy", "check"} <= kinds
    # the recipe is a valid recipe for `leanlm run`, and names the chosen candidate's steps and the export
    from leanlm.recipe import Recipe

    rec = Recipe.from_file(out / "recipe.yaml")
    rec.validate()
    assert rec.steps[-1].name == "export" and rec.steps[-1].to == "gguf"
    import leanlm

    model, tok = leanlm.load(str(out / "model"))
    assert tok is not None and model.config.vocab_size == len(tok)


def test_resume_keeps_finished_trials(searched):
    before, after = searched["before"], [json.loads(x) for x in (searched["out"] / "trials.jsonl").read_text().splitlines()]
    assert before and after[: len(before)] == before            # kept, not rewritten
    assert searched["summary"]["resumed_trials"] == len(before)
    assert any(t["type"] == "deploy" for t in before), "the interrupted run finished at least one speed trial"
    new_serving = [t for t in after[len(before):] if t["type"] == "deploy" and t["deployment"]["engine"] == "serving"]
    assert len(searched["serving_calls"]) == len(new_serving)     # a finished trial is not measured again
    for t in before:                                             # no finished quality rung is repeated
        if t["type"] == "quality":
            assert sum(1 for u in after if u["type"] == "quality" and u["candidate"] == t["candidate"] and u["rung"] == t["rung"]) == 1


def test_serving_is_swept_with_and_without_speculation(searched):
    trials = [json.loads(x) for x in (searched["out"] / "trials.jsonl").read_text().splitlines()]
    serving = [t for t in trials if t["type"] == "deploy" and t["deployment"]["engine"] == "serving"]
    spec = [t for t in serving if t["deployment"]["prompt_lookup"]]
    plain = [t for t in serving if not t["deployment"]["prompt_lookup"]]
    assert spec and {t["candidate"] for t in spec} == {t["candidate"] for t in plain}
    for t in spec:
        sp = t["speed"]
        assert 0.0 <= sp["draft_acceptance"] <= 1.0 and 0.0 <= sp["same_tokens_as_plain"] <= 1.0
        assert "outputs" not in sp and t["label"].endswith("+ prompt lookup k=4")


def test_deployments_and_their_commands():
    from leanlm.optimize.measure import Deployment
    from leanlm.optimize.space import deployments

    cfg = OptimizeConfig("m", "/tmp/opt")
    spec = Deployment("serving", max_num_seqs=16, prompt_lookup=True, k=4)
    assert S.deploy_command({"deployment": spec.to_dict()}, cfg) == \
        "leanlm serve /tmp/opt/model --max-num-seqs 16 --kv-dtype float32 --speculative prompt-lookup --num-draft 4"
    assert S.deploy_command({"deployment": Deployment("runtime", kernels=True).to_dict()}, cfg).startswith("LEANLM_KERNELS=1 leanlm generate")
    assert spec in deployments("cost", 16, "float32") and spec in deployments("throughput", 16, "float32")
    fast = deployments("latency", 16, "float32", kernels=True)
    assert [d.kernels for d in fast] == [True, True, False, False]           # the fused kernels first where they run
    assert not any(d.kernels for d in deployments("latency", 16, "float32"))


def test_report_figures_match_the_trials(searched):
    html = (searched["out"] / "report.html").read_text()
    assert "<script" not in html and "http://" not in html and "https://" not in html   # self-contained
    assert html.count("data:image/png;base64,") == 1
    trials = [json.loads(x) for x in (searched["out"] / "trials.jsonl").read_text().splitlines()]
    deploys = [t for t in trials if t["type"] == "deploy"]
    table = html[html.index("id='candidates'"):]
    rows = re.findall(r"<tr class='(\w*)' data-candidate='([^']+)'>(.*?)</tr>", table)
    measured = [r for r in rows if "data-field=\"tokens_per_s\" data-value" in r[2]]
    assert len(measured) == len(deploys)
    for (cls, name, cells), t in zip(measured, deploys):
        assert name == t["candidate"]
        vals = dict(re.findall(r'data-field="(\w+)" data-value="([^"]+)"', cells))
        for k in ("tokens_per_s", "usd_per_mtok", "memory_bytes", "speedup"):
            assert float(vals[k]) == pytest.approx(t["speed"][k], rel=1e-12), k
        for k in ("loss", "agreement", "kl", "perplexity"):
            assert float(vals[k]) == pytest.approx(t["quality"][k], rel=1e-12), k
    chosen = searched["summary"]["chosen"]
    assert [r[1] for r in measured if r[0] == "chosen"] == [chosen["candidate"]]
    assert f"${chosen['speed']['usd_per_mtok']:.4f}" in html


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(chromium() is None, reason="chromium is not installed (scripts/setup.sh installs it with apt where it can)")
def test_report_opens_in_headless_chromium(searched, tmp_path):
    png = tmp_path / "report.png"
    p = subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                        "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
                        "--enable-logging=stderr", "--v=0", "--window-size=1300,1800", f"--screenshot={png}",
                        (searched["out"] / "report.html").resolve().as_uri()], capture_output=True, text=True, timeout=60)
    console = [ln for ln in p.stderr.splitlines() if "CONSOLE" in ln or "Uncaught" in ln or "Failed to load" in ln]
    assert p.returncode == 0 and png.exists() and png.stat().st_size > 10_000, p.stderr[-2000:]
    assert not console, console
    shutil.copy(png, Path(__file__).resolve().parents[1] / "bench" / "results" / "optimize_report_test.png")


def test_a_target_no_candidate_meets(searched, tmp_path):
    """Ends with the closest candidates and what it would take; a non-zero exit, never a silent pick."""
    out = tmp_path / "strict"
    with pytest.raises(LeanLMError) as e:
        optimize(_cfg(searched["tmp"] / "tiny", out, max_quality_loss=1e-7, exports=[]))
    msg = str(e.value)
    assert "no candidate met --max-quality-loss" in msg and "closest: " in msg and "looser target" in msg
    assert (out / "report.html").exists() and not (out / "model").exists()
    assert "No candidate met the target" in (out / "report.html").read_text()
