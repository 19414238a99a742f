"""One model state: leanlm.save / leanlm.load round trips, folders of the sidecar era, newer manifests, core layering."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import leanlm
from conftest import make_llama
from leanlm import LeanLMError
from leanlm.prune import PruneTarget, prune
from leanlm.quantization import quant_tensors, quantize, summary
from leanlm.quantization.modules import quantizers
from leanlm.sparsity import SparsityConfig, mask_tensors, masked_linears, sparsify_
from leanlm.state import MANIFEST, MASKS_FILE


def _ids(vocab, n=4, t=32, seed=0):
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


def _logits(m, ids):
    with torch.no_grad():
        return m(ids).logits


def _pruned_sparse_quantized(tok):
    vocab = len(tok)
    m = make_llama(vocab_size=vocab, layers=3)
    p = prune(m, PruneTarget(intermediate=64, layers=2), calib=_ids(vocab, 8), progress=False)
    sparsify_(p, SparsityConfig("magnitude", pattern="2:4"), None, progress=False)
    quantize(p, "w4a16-rtn", _ids(vocab), progress=False)
    p.leanlm_steps = [{"step": "prune", "config": {"layers": 2}, "figures": {"params_after": 1}, "seconds": 0.1}]
    return p


def test_round_trip_restores_quantizers_masks_layer_map_and_history(tmp_path, tiny_tokenizer):
    p = _pruned_sparse_quantized(tiny_tokenizer)
    out = leanlm.save(p, tmp_path / "m", tokenizer=tiny_tokenizer)
    files = {f.name for f in out.iterdir()}
    assert {MANIFEST, MASKS_FILE, "model.safetensors", "config.json"} <= files
    assert not files & {"leanlm_quant.json", "leanlm_sparsity.json", "leanlm_prune.json"}  # one manifest, no sidecars
    man = json.loads((out / MANIFEST).read_text())
    assert man["format"] == leanlm.state.FORMAT and man["leanlm_version"] == leanlm.__version__
    back, tok = leanlm.load(out)
    assert tok is not None
    assert set(quantizers(back)) == set(quantizers(p))
    assert summary(back) == summary(p)
    assert set(masked_linears(back)) == set(masked_linears(p)) and masked_linears(back)
    for n, m in masked_linears(p).items():
        assert torch.equal(masked_linears(back)[n].weight_mask, m.weight_mask)
    assert back.leanlm_prune["kept_layers"] == p.leanlm_prune["kept_layers"] and back.leanlm_prune["to"]["layers"] == 2
    assert back.leanlm_steps == p.leanlm_steps
    ids = _ids(len(tiny_tokenizer), 2, 16, seed=3)
    assert torch.equal(_logits(back, ids), _logits(p, ids))


def test_source_and_hash_recorded(tmp_path, tiny_folder):
    m, tok = leanlm.load(tiny_folder)
    src = m.leanlm_source
    assert src["model"] == str(tiny_folder) and re.fullmatch(r"[0-9a-f]{64}", src["sha256"])
    out = leanlm.save(m, tmp_path / "copy", tokenizer=tok)
    assert json.loads((out / MANIFEST).read_text())["source"] == src
    assert leanlm.load(out)[0].leanlm_source == src


def _old_quant_folder(model, tok, folder: Path) -> None:
    """A folder as leanlm 0.1 wrote it: leanlm_quant.json + model.safetensors with masks stored as plain bool tensors."""
    tensors, state = quant_tensors(model)
    for n, m in masked_linears(model).items():
        tensors[f"{n}.weight_mask"] = m.weight_mask.contiguous()
    folder.mkdir()
    model.config.save_pretrained(folder)
    tok.save_pretrained(folder)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "leanlm-quant"})
    (folder / "leanlm_quant.json").write_text(json.dumps({"format_version": 1, **state}))


def test_old_sidecar_folders_still_load(tmp_path, tiny_tokenizer):
    vocab = len(tiny_tokenizer)
    ids = _ids(vocab, 2, 16, seed=4)
    # quantized (and sparse) folder of the sidecar era
    q = _pruned_sparse_quantized(tiny_tokenizer)
    _old_quant_folder(q, tiny_tokenizer, tmp_path / "q")
    back, tok = leanlm.load(tmp_path / "q")
    assert tok is not None and summary(back) == summary(q) and set(masked_linears(back)) == set(masked_linears(q))
    assert torch.equal(_logits(back, ids), _logits(q, ids)) and back.leanlm_steps == []
    # sparse folder: plain Hugging Face folder + leanlm_sparsity.json + sparsity_masks.safetensors
    s = make_llama(vocab_size=vocab)
    sparsify_(s, SparsityConfig("magnitude", sparsity=0.5), None, progress=False)
    packed, shapes = mask_tensors(s)
    d = tmp_path / "s"
    s.save_pretrained(d, state_dict={k: v for k, v in s.state_dict().items() if not k.endswith("weight_mask")})
    tiny_tokenizer.save_pretrained(d)
    save_file(packed, str(d / MASKS_FILE))
    (d / "leanlm_sparsity.json").write_text(json.dumps({"format_version": 1, "config": {"method": "magnitude"}, "masks": shapes}))
    back, _ = leanlm.load(d)
    assert set(masked_linears(back)) == set(shapes) and back.leanlm_sparsity["config"]["method"] == "magnitude"
    for n, m in masked_linears(s).items():
        assert torch.equal(masked_linears(back)[n].weight_mask, m.weight_mask)
    # pruned folder: plain Hugging Face folder + leanlm_prune.json (never read back before the manifest)
    p = prune(make_llama(vocab_size=vocab), PruneTarget(intermediate=64), calib=_ids(vocab, 8), progress=False)
    d = tmp_path / "p"
    p.save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    (d / "leanlm_prune.json").write_text(json.dumps({**p.leanlm_prune, "distill": {"steps": 3}}))
    back, _ = leanlm.load(d)
    assert back.leanlm_prune["to"] == p.leanlm_prune["to"] and back.leanlm_steps[0]["figures"] == {"steps": 3}
    # and saving it again writes the one manifest
    out = leanlm.save(back, tmp_path / "p2", tokenizer=tiny_tokenizer)
    assert not (out / "leanlm_prune.json").exists() and json.loads((out / MANIFEST).read_text())["prune"]["to"] == p.leanlm_prune["to"]


def test_newer_manifest_is_refused(tmp_path, tiny_model, tiny_tokenizer):
    out = leanlm.save(tiny_model, tmp_path / "m", tokenizer=tiny_tokenizer)
    man = json.loads((out / MANIFEST).read_text())
    man.update(format=man["format"] + 1, leanlm_version="9.1.0")
    (out / MANIFEST).write_text(json.dumps(man))
    with pytest.raises(LeanLMError, match=r"written by leanlm 9\.1\.0 .*upgrade leanlm to 9\.1\.0"):
        leanlm.load(out)
    (out / MANIFEST).write_text("{not json")
    with pytest.raises(LeanLMError, match="not valid JSON"):
        leanlm.load(out)


def test_masks_file_missing_is_one_clear_error(tmp_path, tiny_model, tiny_tokenizer):
    sparsify_(tiny_model, SparsityConfig("magnitude", pattern="2:4"), None, progress=False)
    out = leanlm.save(tiny_model, tmp_path / "m", tokenizer=tiny_tokenizer)
    (out / MASKS_FILE).unlink()
    with pytest.raises(LeanLMError, match=f"no {MASKS_FILE}"):
        leanlm.load(out)


def test_core_imports_no_technique_package():
    core = Path(leanlm.__file__).parent / "core"
    techniques = ("quantization", "sparsity", "prune", "distill", "qat", "speculative", "export", "runtime")
    for f in core.glob("*.py"):
        for t in techniques:
            assert not re.search(rf"from \.\.{t}\b|import leanlm\.{t}\b|from leanlm\.{t}\b", f.read_text()), f"{f.name} imports {t}"
