"""Bad input and interruption, as a careless or hostile user would give them (docs/reliability.md).

Every CLI command is run with out-of-range numbers, missing / empty / binary / non-UTF-8 files, existing,
misplaced and unwritable outputs, and lengths beyond the model's context. Each must end with exit code 2,
one line on stderr naming the problem, and nothing left behind; bad numbers and outputs fail before any
model is loaded. Plus one test per defect of issue 23 that is not a CLI message (chunked prefill, pruning
sizes, the GGUF summary, SIGTERM, resume without pickle).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import make_llama
from leanlm.cli import build_parser, main
from leanlm.cli_args import Number
from leanlm.core.errors import LeanLMError

# The smallest valid command line of every command (model "m" does not exist: a check that passes would
# fail at the model load, a different message).
BASE = {
    "info": ["info", "m"],
    "eval": ["eval", "m"],
    "profile": ["profile", "m"],
    "quantize": ["quantize", "m", "--scheme", "w8a16", "--out", "OUT"],
    "export": ["export", "m", "--to", "hf", "--out", "OUT"],
    "generate": ["generate", "m", "--prompt", "hello"],
    "draft": ["draft", "m", "--layers", "1", "--out", "OUT"],
    "prune": ["prune", "m", "--layers", "1", "--out", "OUT"],
    "distill": ["distill", "m", "--teacher", "m", "--tokens", "100", "--out", "OUT"],
    "sparsify": ["sparsify", "m", "--method", "magnitude", "--out", "OUT"],
    "qat": ["qat", "m", "--scheme", "w4a16-rtn", "--budget", "10000", "--out", "OUT"],
    "serve": ["serve", "m", "--port", "8000"],
    "optimize": ["optimize", "m", "--max-quality-loss", "5%", "--budget", "10m", "--out", "OUT"],
}
WRITERS = [c for c, argv in BASE.items() if "--out" in argv]
ARGV = {**BASE, "run": ["run", "recipe.yaml", "--out", "OUT"]}   # every command, for argument checks


def test_every_command_is_covered():
    """A new subcommand must get a BASE line (or, like `run`, whose model is in a file, tests of its own below)."""
    assert set(_subparsers()) == set(ARGV)


def test_run_bad_recipe_files_and_outputs(capsys, tmp_path):
    """`leanlm run`: missing, binary and empty recipe files, an unknown key, an existing output; nothing left behind."""
    (tmp_path / "bin.yaml").write_bytes(bytes(range(256)))
    (tmp_path / "empty.yaml").write_text("")
    (tmp_path / "typo.yaml").write_text("model: smollm2-135m\nsteps:\n  - quantize: {schem: w8a16}\n")
    (tmp_path / "ok.yaml").write_text("model: smollm2-135m\nsteps:\n  - quantize: {scheme: w8a16}\n")
    (tmp_path / "exists").mkdir()
    before = _left(tmp_path)
    for recipe, out, msg in [("nope.yaml", "o", "does not exist"), ("bin.yaml", "o", "binary file"), ("empty.yaml", "o", "recipe"),
                             ("typo.yaml", "o", "scheme"), ("ok.yaml", "exists", "already exists")]:
        code, err = _run(capsys, ["run", str(tmp_path / recipe), "--out", str(tmp_path / out)])
        assert code == 2 and msg in _one_line_error(err), err
    assert _left(tmp_path) == before


@pytest.mark.parametrize("argv,msg", [
    (["quantize", "MODEL", "--scheme", "w4a16-gptq", "--max-memory", "1MB"], "--max-memory 1 MB is too small"),
    (["quantize", "MODEL", "--mixed", "4", "--max-memory", "2GB"], "mixed precision measures"),
    (["quantize", "MODEL", "--scheme", "w8a16", "--eval", "--max-memory", "2GB"], "evaluate the output folder afterwards"),
    (["quantize", "MODEL", "--scheme", "w8a16", "--dtype", "bfloat16", "--max-memory", "2GB"], "drop --dtype"),
    (["sparsify", "MODEL", "--method", "magnitude", "--max-memory", "2GB"], "(wanda, sparsegpt) block by block"),
    (["quantize", "BROKEN", "--scheme", "w8a16", "--max-memory", "2GB"], "is truncated"),
])
def test_max_memory_refusals(capsys, tmp_path, tiny_folder, argv, msg):
    """--max-memory (offloaded calibration): a budget below one block plus activations names the minimum;
    options that need the whole model are refused; a truncated shard is named; nothing is left behind."""
    broken = tmp_path / "broken"
    make_llama(vocab_size=300, layers=3).save_pretrained(broken, max_shard_size="60KB")
    shard = sorted(broken.glob("model-*.safetensors"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    argv = [str(tiny_folder) if a == "MODEL" else str(broken) if a == "BROKEN" else a for a in argv]
    code, err = _run(capsys, argv + ["--samples", "2", "--seq-len", "8", "--out", str(tmp_path / "out")])
    line = _one_line_error(err)
    assert code == 2 and msg in line, line
    if "truncated" in msg:
        assert str(shard) in line
    if "too small" in msg:
        assert "raise --max-memory to at least" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "tiny"]


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    p = build_parser()
    return next(a for a in p._actions if isinstance(a, argparse._SubParsersAction)).choices


def _numeric_options():
    for cmd, sp in _subparsers().items():
        for act in sp._actions:
            if act.option_strings and hasattr(act.type, "range"):
                yield cmd, act.option_strings[-1], act.type


def _bad_values(t) -> list[str]:
    if not isinstance(t, Number):   # a size such as 90M
        return ["lots", "0"]
    out = ["abc"]
    if t.lo is not None:
        out.append(str(t.lo if t.lo_open else (t.lo - 1)))
    if t.hi is not None:
        out.append(str(t.hi if t.hi_open else t.hi + 1))
    if t.kind is float:
        out += ["nan", "inf"]
    return out


def _run(capsys, argv: list[str]) -> tuple[int, str]:
    """main() in-process; argparse's exits become their code. Returns (code, stderr)."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    return code, err


def _one_line_error(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error:" in ln]
    assert len(errors) == 1, err
    assert "Traceback" not in err
    return errors[0]


def _left(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ------------------------------------------------------------------------------ numbers (defects 1, 2)


def test_every_numeric_option_is_checked():
    """No option takes a bare int/float: each number is a checked type (or a fixed list of choices)."""
    unchecked = [(cmd, act.option_strings) for cmd, sp in _subparsers().items() for act in sp._actions
                 if act.type in (int, float) and not act.choices]
    assert not unchecked
    assert {cmd for cmd, _, _ in _numeric_options()} >= set(BASE) - {"info"}


@pytest.mark.parametrize("cmd,opt,typ", list(_numeric_options()), ids=lambda x: x if isinstance(x, str) else "")
def test_out_of_range_numbers_are_usage_errors(capsys, tmp_path, cmd, opt, typ):
    for bad in _bad_values(typ):
        argv = [tmp_path / "OUT" if a == "OUT" else a for a in ARGV[cmd]]
        code, err = _run(capsys, [str(a) for a in argv] + [f"{opt}={bad}"])
        assert code == 2, (opt, bad)
        line = _one_line_error(err)
        assert f"argument {opt}" in line and "must be" in line, line
    assert _left(tmp_path) == []


def test_ranges_are_stated_in_help():
    for cmd, sp in _subparsers().items():
        text = " ".join(sp.format_help().split())
        for act in sp._actions:
            if hasattr(act.type, "range"):
                assert " ".join(act.type.range.split()) in text, (cmd, act.option_strings)


def test_issue_examples(capsys):
    code, err = _run(capsys, ["eval", "m", "--ppl", "--windows", "-2"])
    assert code == 2 and "argument --windows: must be >= 0, got -2" in err
    code, err = _run(capsys, ["generate", "m", "--prompt", "Hello", "--max-new-tokens", "-1"])
    assert code == 2 and "argument --max-new-tokens: must be >= 1, got -1" in err


@pytest.mark.parametrize("cmd", ["eval", "generate"])
def test_head_format_is_a_choice(capsys, cmd):
    """--head (the runtime's output head format) takes a fixed list: a typo is a one-line usage error."""
    code, err = _run(capsys, ARGV[cmd] + ["--head", "int3"])
    assert code == 2 and "argument --head: invalid choice: 'int3'" in _one_line_error(err)


@pytest.mark.parametrize("cmd", ["generate", "serve"])
def test_device_is_checked(capsys, cmd):
    """--device takes cpu, cuda or cuda:N; a typo is a one-line usage error before any model loads."""
    code, err = _run(capsys, ARGV[cmd] + ["--device", "gpu0"])
    assert code == 2 and "argument --device: must be cpu, cuda or cuda:N, got 'gpu0'" in _one_line_error(err)


# ------------------------------------------------------------------------------ outputs (defect 4)


@pytest.mark.parametrize("cmd", WRITERS)
def test_output_checked_before_the_model_loads(capsys, tmp_path, cmd):
    """Existing output, a parent that is a file, an unwritable folder: refused before loading model 'm'."""
    def argv(out):
        return [str(out) if a == "OUT" else a for a in BASE[cmd]]

    (tmp_path / "exists").mkdir()
    (tmp_path / "afile").write_text("x")
    before = _left(tmp_path)
    for out, msg in [(tmp_path / "exists", "already exists"), (tmp_path / "afile" / "sub" / "out", "is a file, not a folder")]:
        code, err = _run(capsys, argv(out))
        assert code == 2
        line = _one_line_error(err)
        assert msg in line and "unknown model" not in line, line
    assert _left(tmp_path) == before


def test_unwritable_output_folder(capsys, tmp_path, monkeypatch):
    """As root chmod does not stop writes, so the check writes a probe file; a failing probe is reported."""
    import leanlm.core.io as io

    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(io.tempfile, "mkstemp", refuse)
    code, err = _run(capsys, ["quantize", "m", "--scheme", "w8a16", "--out", str(tmp_path / "q")])
    assert code == 2 and "is not writable (Permission denied)" in _one_line_error(err)
    assert _left(tmp_path) == []


def test_atomic_writers_check_the_location_too(tmp_path):
    from leanlm.core.io import atomic_dir, atomic_file

    (tmp_path / "f").write_text("x")
    with pytest.raises(LeanLMError, match="is a file, not a folder"):
        with atomic_dir(tmp_path / "f" / "out"):
            pass
    with pytest.raises(LeanLMError, match="is a file, not a folder"):
        with atomic_file(tmp_path / "f" / "out.gguf"):
            pass
    assert _left(tmp_path) == ["f"]


# ------------------------------------------------------------------------------ user files (defect 5)


@pytest.fixture
def bad_files(tmp_path):
    d = tmp_path / "files"
    d.mkdir()
    (d / "empty.txt").write_text("")
    (d / "binary.txt").write_bytes(bytes(range(256)) * 4)
    (d / "latin1.txt").write_bytes("caf\xe9 cr\xe8me br\xfbl\xe9e".encode("latin-1"))
    (d / "binary.jsonl").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    return {"missing": (d / "missing.txt", "does not exist"), "empty": (d / "empty.txt", "holds no text"),
            "binary": (d / "binary.txt", "binary file"), "latin1": (d / "latin1.txt", "not UTF-8"),
            "binary.jsonl": (d / "binary.jsonl", "binary file")}


FILE_OPTIONS = {   # every option that names a user text file, with what the command needs besides
    "eval": ["eval", "MODEL", "--ppl", "--windows", "1", "--window", "16", "--source"],
    "quantize": ["quantize", "MODEL", "--scheme", "w8a16", "--out", "OUT", "--samples", "1", "--seq-len", "8", "--calib"],
    "sparsify": ["sparsify", "MODEL", "--method", "wanda", "--out", "OUT", "--samples", "1", "--seq-len", "8", "--calib"],
    "prune": ["prune", "MODEL", "--layers", "1", "--out", "OUT", "--samples", "1", "--seq-len", "8", "--text"],
    "distill": ["distill", "MODEL", "--teacher", "MODEL", "--tokens", "64", "--batch-size", "1", "--seq-len", "8",
                "--out", "OUT", "--text"],
    "draft": ["draft", "MODEL", "--layers", "1", "--out", "OUT", "--calib"],
    "qat": ["qat", "MODEL", "--scheme", "w8a16", "--budget", "64", "--samples", "1", "--calib-seq-len", "8",
            "--batch-size", "1", "--grad-accum", "1", "--seq-len", "8", "--out", "OUT", "--text"],
    "optimize": ["optimize", "MODEL", "--max-quality-loss", "5%", "--out", "OUT", "--quality-text"],
    "generate": ["generate", "MODEL", "--prompt", "hi", "--draft", "MODEL", "--tree"],
}


@pytest.mark.parametrize("cmd", list(FILE_OPTIONS))
def test_bad_text_files(capsys, tmp_path, tiny_folder, bad_files, cmd):
    kinds = ["missing", "binary", "latin1"] if cmd != "quantize" else list(bad_files)
    for kind in kinds:
        path, msg = bad_files[kind]
        argv = [str(tiny_folder) if a == "MODEL" else str(tmp_path / "out") if a == "OUT" else a for a in FILE_OPTIONS[cmd]]
        code, err = _run(capsys, argv + [str(path)])
        assert code == 2, (kind, err)
        line = _one_line_error(err)
        assert msg in line and str(path) in line, line
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("extra,msg", [
    (["--objective", "speed"], "unknown objective 'speed'; choose one of: cost, latency, throughput, memory"),
    (["--budget", "10s"], "too small for one trial"),
    (["--budget", "2M"], "a search budget is a time"),
    (["--budget", "soon"], "cannot read the budget"),
    (["--export", "zip"], "unknown export format 'zip'"),
    (["--max-quality-loss", "five"], "argument --max-quality-loss: must be a positive percentage"),
])
def test_optimize_bad_options(capsys, tmp_path, extra, msg):
    """Refused before model 'm' is loaded; nothing written."""
    code, err = _run(capsys, ["optimize", "m", "--max-quality-loss", "5%", "--out", str(tmp_path / "o")] + extra)
    line = _one_line_error(err)
    assert code == 2 and msg in line and "unknown model" not in line, line
    assert _left(tmp_path) == []


@pytest.mark.parametrize("extra,msg", [
    (["--method", "eagle", "--budget", "0"], "the training budget must be positive"),
    (["--method", "eagle", "--budget", "0m"], "the training budget must be positive"),
    (["--method", "eagle", "--layers", "2"], "drop --layers"),
    (["--method", "eagle", "--calib", "news"], "drop --calib"),
    (["--method", "eagle", "--corpus-share", "1"], "argument --corpus-share: must be in [0, 1), got 1"),
    (["--method", "medusa", "--budget", "0"], "the training budget must be positive"),
    (["--method", "medusa", "--layers", "2"], "--method medusa trains a head on the model's own features: drop --layers"),
    (["--method", "medusa", "--heads", "0"], "argument --heads"),
    (["--method", "hydra"], "argument --method: invalid choice: 'hydra'"),
    ([], "give layers (build a shallow draft: --layers N)"),
])
def test_draft_bad_options(capsys, tmp_path, extra, msg):
    """leanlm draft --method eagle|shallow: contradictory options and a zero budget, refused before model 'm' is loaded."""
    code, err = _run(capsys, ["draft", "m", "--out", str(tmp_path / "o")] + extra)
    line = _one_line_error(err)
    assert code == 2 and msg in line and "unknown model" not in line, line
    assert _left(tmp_path) == []


def test_generate_refuses_a_head_for_another_model(capsys, tmp_path, tiny_folder):
    """generate --draft HEAD: an EAGLE head trained for another checkpoint (same shapes) is refused in one line."""
    from leanlm.speculative.eagle import make_head, save_head

    other = make_llama(vocab_size=300, seed=5)
    save_head(make_head(other, torch.arange(10)), tmp_path / "head")
    code, err = _run(capsys, ["generate", str(tiny_folder), "--prompt", "hello", "--draft", str(tmp_path / "head")])
    line = _one_line_error(err)
    assert code == 2 and "trained for another checkpoint" in line, line


@pytest.mark.parametrize("extra,msg", [
    (["--tree"], "--num-draft, --adaptive, --tree and --chat go with --draft DRAFT or --prompt-lookup"),
    (["--prompt-lookup", "--tree"], "--tree drafts with a draft head or a draft model"),
    (["--draft", "HEAD", "--tree", "--num-draft", "3"], "--tree has a fixed shape"),
    (["--draft", "HEAD", "--tree", "--adaptive"], "--tree has a fixed shape"),
    (["--draft", "HEAD", "--tree", "[[0, 0]]"], "has path [0, 0] but not its parent [0]"),
    (["--draft", "HEAD", "--tree", "[[0], [0]]"], "repeats a path"),
    (["--draft", "HEAD", "--tree", "[[0], [-2]]"], "integers >= 0"),
    (["--draft", "HEAD", "--tree", "[[0],"], "cannot read"),
    (["--draft", "HEAD", "--tree", "chain:0"], "the chain length must be an integer in 1..64"),
    (["--draft", "HEAD", "--tree", "[" + ",".join(f"[{i}]" for i in range(65)) + "]"], "use at most 64"),
])
def test_generate_bad_tree(capsys, tmp_path, extra, msg):
    """generate --tree: without an EAGLE head, with --num-draft / --adaptive, and malformed trees; refused in one line
    before model 'm' is loaded."""
    from leanlm.speculative.eagle import make_head, save_head

    save_head(make_head(make_llama(vocab_size=300), torch.arange(10)), tmp_path / "head")
    argv = ["generate", "m", "--prompt", "hello"] + [str(tmp_path / "head") if a == "HEAD" else a for a in extra]
    code, err = _run(capsys, argv)
    line = _one_line_error(err)
    assert code == 2 and msg in line and "unknown model" not in line, line


def test_bad_quantize_config_file(capsys, tmp_path, tiny_folder, bad_files):
    path, msg = bad_files["binary"]
    code, err = _run(capsys, ["quantize", str(tiny_folder), "--config", str(path), "--out", str(tmp_path / "q")])
    assert code == 2 and msg in _one_line_error(err)


@pytest.mark.parametrize("cmd", list(BASE))
def test_missing_model(capsys, tmp_path, cmd):
    argv = [str(tmp_path / "OUT") if a == "OUT" else str(tmp_path / "nope") if a == "m" else a for a in BASE[cmd]]
    code, err = _run(capsys, argv)
    assert code == 2 and "unknown model" in _one_line_error(err)
    assert _left(tmp_path) == []


@pytest.mark.parametrize("cmd", list(BASE))
def test_binary_file_empty_file_and_empty_folder_as_model(capsys, tmp_path, cmd):
    (tmp_path / "model.bin").write_bytes(bytes(range(256)))
    (tmp_path / "empty.gguf").write_bytes(b"")
    (tmp_path / "folder").mkdir()
    before = _left(tmp_path)
    for model, msg in [("model.bin", "is not a model"), ("empty.gguf", "not a GGUF file"), ("folder", "has no config.json")]:
        argv = [str(tmp_path / "OUT") if a == "OUT" else str(tmp_path / model) if a == "m" else a for a in BASE[cmd]]
        code, err = _run(capsys, argv)
        assert code == 2 and msg in _one_line_error(err), err
    assert _left(tmp_path) == before


# ------------------------------------------------------------------------------ library errors (defect 6)


def test_library_error_keeps_its_reason(capsys, tiny_folder):
    cfg = json.loads((tiny_folder / "config.json").read_text())
    cfg.update(hidden_size=640, num_attention_heads=9)
    (tiny_folder / "config.json").write_text(json.dumps(cfg))
    code, err = _run(capsys, ["info", str(tiny_folder)])
    line = _one_line_error(err)
    assert code == 2 and "640" in line and "9" in line and "multiple" in line, line


def test_error_text_keeps_meaningful_lines():
    from leanlm.core.models import _error_text

    e = ValueError("1 validation error for Config\n\n  hidden_size\n    must divide heads\nFor further information visit https://x")
    assert _error_text(e) == "1 validation error for Config hidden_size must divide heads"
    assert "\n" not in _error_text(ValueError("a\n" * 50)) and len(_error_text(ValueError("x" * 5000))) <= 600


# ------------------------------------------------------------------------------ data-parallel processes (--nproc)

# Each data-parallel command with a --nproc that cannot work, refused before any process starts.
NPROC = {
    "distill": (BASE["distill"] + ["--nproc", "3"], "--batch-size 4 does not split over --nproc 3"),
    "prune": (BASE["prune"] + ["--batch-size", "2", "--nproc", "4"], "--batch-size 2 does not split over --nproc 4"),
    "qat": (BASE["qat"] + ["--nproc", "3"], "--batch-size 2 does not split over --nproc 3"),
    "quantize": (BASE["quantize"] + ["--samples", "1", "--nproc", "2"], "--samples 1 cannot be shared by --nproc 2"),
}


def test_nproc_covers_the_training_commands():
    assert {cmd for cmd, sp in _subparsers().items() for act in sp._actions if "--nproc" in act.option_strings} == set(NPROC)


@pytest.mark.parametrize("cmd", list(NPROC))
def test_nproc_that_does_not_divide(capsys, tmp_path, cmd):
    argv, msg = NPROC[cmd]
    code, err = _run(capsys, [str(tmp_path / "OUT") if a == "OUT" else a for a in argv])
    assert code == 2 and msg in _one_line_error(err), err
    assert _left(tmp_path) == []


def test_nproc_with_max_memory(capsys, tmp_path):
    """The block-by-block path runs in one process: --nproc with --max-memory is refused before any work."""
    argv = [str(tmp_path / "OUT") if a == "OUT" else a for a in BASE["quantize"] + ["--nproc", "2", "--max-memory", "2GB"]]
    code, err = _run(capsys, argv)
    assert code == 2 and "drop --nproc" in _one_line_error(err) and "--max-memory" in _one_line_error(err), err
    assert _left(tmp_path) == []


def test_nproc_inside_torchrun_and_commands_that_do_not_run_parallel(capsys, tmp_path, monkeypatch):
    """Under torchrun (its RANK/WORLD_SIZE in the environment) --nproc is refused, and so is a command that has no
    data-parallel path, before any process group is joined."""
    for k, v in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(k, v)
    out = str(tmp_path / "OUT")
    for argv, msg in [([*BASE["distill"], "--nproc", "2"], "drop --nproc"), (BASE["eval"], "eval does not run data-parallel"),
                      (BASE["export"], "export does not run data-parallel")]:
        code, err = _run(capsys, [out if a == "OUT" else a for a in argv])
        assert code == 2 and msg in _one_line_error(err), err
    assert _left(tmp_path) == []


# ------------------------------------------------------------------------------ context length (defect 3)


@pytest.mark.parametrize("argv,option", [
    (["eval", "MODEL", "--ppl", "--window", "2048"], "--window 2048"),
    (["eval", "MODEL", "--speed", "--prompt-tokens", "1000", "--new-tokens", "100"], "--prompt-tokens 1000 + --new-tokens 100"),
    (["profile", "MODEL", "--prompt-tokens", "1020", "--new-tokens", "10"], "--prompt-tokens 1020"),
    (["quantize", "MODEL", "--scheme", "w8a16", "--seq-len", "4096", "--out", "OUT"], "--seq-len 4096"),
    (["sparsify", "MODEL", "--seq-len", "2000", "--out", "OUT"], "--seq-len 2000"),
    (["prune", "MODEL", "--layers", "1", "--seq-len", "2000", "--out", "OUT"], "--seq-len 2000"),
    (["distill", "MODEL", "--teacher", "MODEL", "--tokens", "10000", "--seq-len", "2000", "--out", "OUT"], "--seq-len 2000"),
    (["draft", "MODEL", "--layers", "1", "--seq-len", "2000", "--out", "OUT"], "--seq-len 2000"),
    (["qat", "MODEL", "--scheme", "w8a16", "--budget", "10000", "--calib-seq-len", "2000", "--out", "OUT"], "--calib-seq-len 2000"),
    (["generate", "MODEL", "--prompt", "fox " * 600, "--max-new-tokens", "600"], "the prompt"),
    (["generate", "MODEL", "--prompt", "hi", "--max-seq-len", "5000"], "--max-seq-len 5000"),
    (["serve", "MODEL", "--max-model-len", "2048"], "--max-model-len 2048"),
])
def test_lengths_beyond_the_context(capsys, tmp_path, tiny_folder, argv, option):
    """The tiny model's context is 1024 tokens: refused once the model is known, before any work."""
    argv = [str(tiny_folder) if a == "MODEL" else str(tmp_path / "out") if a == "OUT" else a for a in argv]
    code, err = _run(capsys, argv)
    line = _one_line_error(err)
    assert code == 2 and option in line and "context of 1024 tokens" in line, line
    assert not (tmp_path / "out").exists()


def test_context_checks_only_what_the_command_measures(capsys, tiny_folder):
    """eval --speed uses no perplexity window, eval --ppl no speed prompt: their defaults are not refused."""
    from leanlm.cli_args import check_context
    from leanlm.core.models import load

    model, tok = load(str(tiny_folder))
    a = build_parser().parse_args(["eval", "m", "--speed", "--window", "4096"])
    check_context(a, model, tok)
    a = build_parser().parse_args(["eval", "m", "--ppl", "--prompt-tokens", "4096"])
    check_context(a, model, tok)
    with pytest.raises(LeanLMError, match="--window 4096"):
        check_context(build_parser().parse_args(["eval", "m", "--window", "4096"]), model, tok)


def test_chunked_prefill_matches_one_shot():
    from leanlm.runtime import Engine

    m = make_llama(vocab_size=300)
    ids = torch.randint(0, 300, (1, 45), generator=torch.Generator().manual_seed(0))
    one, chunked = Engine(m, "fp32", max_seq_len=64), Engine(m, "fp32", max_seq_len=64, prefill_chunk=8)
    a, b = one.forward(ids), chunked.forward(ids)
    assert b.shape == a.shape and torch.allclose(a, b, atol=1e-5)
    assert chunked.length == 45
    assert torch.allclose(chunked.forward(ids[:, :1]), one.forward(ids[:, :1]), atol=1e-5)   # the cache is the same
    one.reset(), chunked.reset()
    assert torch.allclose(chunked.forward(ids, last_only=True), a[:, -1], atol=1e-5)
    assert torch.equal(one.generate(ids, 6), chunked.generate(ids, 6))


# ------------------------------------------------------------------------------ sizes downstream accept (defect 7)


def test_pruned_sizes_are_multiples(tiny_tokenizer):
    from leanlm.prune import PruneTarget, count_params, dims_of, prune

    m = make_llama(vocab_size=len(tiny_tokenizer), hidden=128, intermediate=384, heads=4, kv_heads=2, layers=2)
    calib = torch.randint(0, len(tiny_tokenizer), (2, 16), generator=torch.Generator().manual_seed(0))
    want = int(count_params(m, dims_of(m)) * 0.6)
    for multiple in (64, 32):
        d = dims_of(prune(m, PruneTarget(params=want, multiple_of=multiple), calib=calib, progress=False))
        assert d.hidden % multiple == 0 and d.intermediate % multiple == 0, d
        assert count_params(m, d) <= want
        for name, orig in (("hidden", 128), ("intermediate", 384)):   # and each is the largest multiple that fits
            up = {**d.to_dict(), name: getattr(d, name) + multiple}
            assert up[name] > orig or count_params(m, type(d)(**up)) > want, (name, d)


def test_group_size_error_suggests_a_divisor():
    import leanlm

    m = make_llama(hidden=48, heads=4, kv_heads=2, intermediate=96)
    with pytest.raises(LeanLMError, match=r"input dimension 48 to be a multiple of 64; use 16 or 8"):
        leanlm.quantize(m, "w4a16-rtn", progress=False)


# ------------------------------------------------------------------------------ GGUF summary (defect 8)


def test_gguf_summary_says_what_was_kept_and_why(tmp_path, tiny_tokenizer):
    import leanlm
    from leanlm.export import export
    from leanlm.export import gguf as G

    m = make_llama(vocab_size=len(tiny_tokenizer), hidden=48, heads=4, kv_heads=2, intermediate=64)
    leanlm.quantize(m, "w8a16", progress=False)
    export(m, "gguf", tmp_path / "m.gguf", tokenizer=tiny_tokenizer)
    rep = G.last_report
    # q/k/v/o/gate/up read rows of 48 values (no 32-value block fits): kept F16; down_proj (64) is stored exactly
    assert len(rep["kept_float"]) == 12 and len(rep["reused_exact"]) == 2 and not rep["requantized"]
    assert all(rep["types"][n] == "F16" for n in rep["kept_float"])
    lines = G.report_lines(rep)
    assert lines[0].startswith("2 linear layers stored exactly")
    assert any(ln.startswith("12 linear layers kept F16: their rows of 48 values are not a multiple") for ln in lines), lines


# ------------------------------------------------------------------------------ SIGTERM (defect 9)


def test_sigterm_during_a_save_leaves_nothing_behind(tmp_path, tiny_folder):
    """A TERM while `leanlm export` writes: exit 130, a one-line message, no temporary folder."""
    script = textwrap.dedent(f"""
        import sys, time, transformers
        from leanlm.cli import main
        real = transformers.PreTrainedModel.save_pretrained
        def slow(self, *a, **k):
            real(self, *a, **k)
            print("SAVING", flush=True)
            time.sleep(60)
        transformers.PreTrainedModel.save_pretrained = slow
        sys.exit(main(["export", {str(tiny_folder)!r}, "--to", "hf", "--out", {str(tmp_path / "out")!r}]))
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"), os.environ.get("PYTHONPATH", "")])}
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    for line in p.stdout:
        if "SAVING" in line:
            break
    assert any(x.name.endswith(".tmp") for x in tmp_path.iterdir())   # the save is under way in a temporary folder
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert "interrupted: stopped by SIGTERM" in err and "Traceback" not in err
    assert _left(tmp_path) == ["tiny"]


# ------------------------------------------------------------------------------ no pickle (defect 10)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "pwned"))


def test_payload_runs_under_a_full_pickle_load(tmp_path):
    """The planted files below are real attacks: loaded with weights_only=False they run their code."""
    marker = tmp_path / "pwned"
    torch.save({"x": _Payload(str(marker))}, tmp_path / "p.pt")
    torch.load(tmp_path / "p.pt", weights_only=False)
    assert marker.read_text() == "pwned"


def test_resume_does_not_run_a_planted_pickle(tmp_path, tiny_tokenizer):
    from leanlm.distill.trainer import TrainConfig, train

    marker = tmp_path / "pwned"
    ck = tmp_path / "ck" / "step-0000003"
    ck.mkdir(parents=True)
    torch.save({"step": _Payload(str(marker))}, ck / "state.pt")   # a full pickle load would write `marker`
    m = make_llama(vocab_size=len(tiny_tokenizer))

    def loss(model, batch):
        return model(batch, labels=batch).loss, {}

    ids = torch.randint(0, len(tiny_tokenizer), (400,))
    with pytest.raises(LeanLMError, match="cannot read checkpoint"):
        train(m, loss, ids, TrainConfig(max_tokens=64, batch_size=1, seq_len=32, checkpoint_dir=str(tmp_path / "ck"),
                                         progress=False, autocast_bf16=False))
    assert not marker.exists()


def test_bin_weights_load_without_running_code(tmp_path, tiny_folder):
    import leanlm

    marker = tmp_path / "pwned"
    for w in tiny_folder.glob("*.safetensors"):
        w.unlink()
    torch.save({"model.embed_tokens.weight": _Payload(str(marker))}, tiny_folder / "pytorch_model.bin")
    with pytest.raises(LeanLMError, match="cannot load model"):
        leanlm.load(str(tiny_folder))
    assert not marker.exists()


# ------------------------------------------------------------------------------ mixed precision (quantization/mixed.py)

MIXED = [
    (["quantize", "MODEL", "--mixed", "4.5", "--cost", "watts", "--out", "OUT"], "argument --cost: invalid choice: 'watts'"),
    (["quantize", "MODEL", "--mixed", "4.5", "--mixed-algorithm", "hqq", "--out", "OUT"], "argument --mixed-algorithm: invalid choice: 'hqq'"),
    (["quantize", "MODEL", "--scheme", "w8a16", "--cost", "latency", "--out", "OUT"], "apply to mixed precision"),
    (["quantize", "MODEL", "--scheme", "w8a16", "--mixed-algorithm", "gptq", "--out", "OUT"], "apply to mixed precision"),
    (["quantize", "MODEL", "--mixed", "2", "--menu", "int4_g64,int8", "--out", "OUT"], "below the cheapest menu choice"),
    (["quantize", "MODEL", "--mixed", "5", "--menu", "int4_g64,int4_g64", "--out", "OUT"], "names a format twice"),
    (["quantize", "MODEL", "--mixed", "5", "--menu", "int4_g48,int8", "--out", "OUT"], "multiple of 48"),
    (["run", "RECIPE:quantize: {mixed: 4.5, cost: watts}", "--out", "OUT"], "unknown mixed-precision cost 'watts'"),
    (["run", "RECIPE:quantize: {mixed: 4.5, mixed_algorithm: hqq}", "--out", "OUT"], "unknown mixed-precision algorithm 'hqq'"),
]


@pytest.mark.parametrize("argv,msg", MIXED, ids=[m[:30] for _, m in MIXED])
def test_bad_mixed_precision(capsys, tmp_path, tiny_folder, argv, msg):
    """An unknown cost model or algorithm, mixed-only flags without --mixed, a budget below the menu, a bad menu:
    one clear line, nothing written."""
    def arg(a):
        if a.startswith("RECIPE:"):
            (tmp_path / "r.yaml").write_text(f"model: {tiny_folder}\nsteps:\n  - {a[len('RECIPE:'):]}\n")
            return str(tmp_path / "r.yaml")
        return {"MODEL": str(tiny_folder), "OUT": str(tmp_path / "out")}.get(a, a)

    code, err = _run(capsys, [arg(a) for a in argv] + (["--samples", "2", "--seq-len", "16"] if argv[0] == "quantize" else []))
    assert code == 2 and msg in _one_line_error(err), err
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------ rotations (quantization/rotate.py)

# (argv, message): MODEL is the tiny Llama folder, GEMMA a tiny Gemma-3 folder, RECIPE a recipe file's text.
ROTATE = [
    (["quantize", "MODEL", "--scheme", "w8a16", "--rotate", "givens", "--out", "OUT"], "argument --rotate: invalid choice: 'givens'"),
    (["quantize", "MODEL", "--mixed", "4.5", "--rotate", "hadamard", "--out", "OUT"], "rotate does not combine with mixed"),
    (["quantize", "GEMMA", "--scheme", "w8a16", "--rotate", "hadamard", "--seq-len", "64", "--out", "OUT"], "Gemma-3 cannot absorb a rotation"),
    (["quantize", "m.onnx", "--scheme", "int8-dynamic", "--rotate", "hadamard", "--out", "OUT"], "--rotate folds a rotation"),
    (["run", "RECIPE:quantize: {scheme: w8a16, rotate: givens}", "--out", "OUT"], "unknown rotation 'givens'"),
    (["run", "RECIPE:quantize: {scheme: w4a16-rtn, rotate: hadamard}\n  - export: {to: gguf}", "--out", "OUT"],
     "gguf cannot carry the online Hadamard"),
    (["quantize", "MODEL", "--scheme", "w4a16-rtn", "--rotate", "hadamard", "--max-memory", "2GB", "--out", "OUT"],
     "does not run block by block"),
]


@pytest.mark.parametrize("argv,msg", ROTATE, ids=[m[:30] for _, m in ROTATE])
def test_bad_rotations(capsys, tmp_path, tiny_folder, tiny_tokenizer, argv, msg):
    """An unknown rotation, one that cannot combine, a family whose norms cannot absorb it (Gemma-3's sandwich
    norms), an exporter that cannot carry the online Hadamard: one clear line, before any work, nothing written."""
    from test_arch import make_model

    def arg(a):
        if a == "GEMMA":
            make_model("gemma3").save_pretrained(tmp_path / "gemma")
            tiny_tokenizer.save_pretrained(tmp_path / "gemma")
            return str(tmp_path / "gemma")
        if a.startswith("RECIPE:"):
            (tmp_path / "r.yaml").write_text(f"model: {tiny_folder}\nsteps:\n  - {a[len('RECIPE:'):]}\n")
            return str(tmp_path / "r.yaml")
        return {"MODEL": str(tiny_folder), "OUT": str(tmp_path / "out")}.get(a, a)

    code, err = _run(capsys, [arg(a) for a in argv])
    assert code == 2 and msg in _one_line_error(err), err
    assert not (tmp_path / "out").exists()
