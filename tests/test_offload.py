"""Calibration in bounded memory (core/offload.py): the offloaded path writes exactly what the in-memory path
writes, for every algorithm on the block-by-block engine, on tiny Llama and Gemma-3 models saved as
sharded safetensors; the budget is refused up front; an interrupted run resumes from its last finished block."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import leanlm
from conftest import make_llama
from leanlm.core.errors import LeanLMError
from leanlm.quantization import QuantConfig, QuantizerConfig, preset, quantize
from leanlm.quantization.config import GPTQ
from leanlm.quantization.offload import quantize_offloaded
from leanlm.sparsity import SparsityConfig, sparsify_
from leanlm.sparsity.offload import sparsify_offloaded

IDS = torch.randint(0, 250, (4, 24), generator=torch.Generator().manual_seed(0))


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """Tensors are read in row chunks of a few KB, so the tiny models exercise the chunked reads of large ones."""
    from leanlm.core.offload import WeightSource

    monkeypatch.setattr(WeightSource, "CHUNK", 4096)


def _gemma(vocab: int):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=16, sliding_window=8, max_position_embeddings=1024,
                           layer_types=["sliding_attention", "full_attention"])
    return Gemma3ForCausalLM(cfg).eval()


def _sharded(tmp_path, tokenizer, family: str = "llama"):
    """A tiny model saved as several safetensors shards (and its tokenizer)."""
    n = len(tokenizer)
    model = make_llama(vocab_size=n, layers=3) if family == "llama" else _gemma(n)
    d = tmp_path / "src"
    model.save_pretrained(d, max_shard_size="60KB")
    tokenizer.save_pretrained(d)
    assert len(list(d.glob("*.safetensors"))) > 2
    return d


def _tensors(folder) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _same_folders(a, b, key: str) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    assert [k for k in ta if not torch.equal(ta[k], tb[k])] == []
    ma, mb = (json.loads((f / "leanlm.json").read_text())[key] for f in (a, b))
    for k in ("quantizers", "masks", "targets", "config"):
        assert ma.get(k) == mb.get(k), k


def _mixed() -> QuantConfig:
    """Per-layer formats as a mixed-precision search chooses them (int4 attention, int8 MLP), then GPTQ."""
    return QuantConfig([("*self_attn*.weight_quantizer", QuantizerConfig("int4_g32")),
                        ("*mlp*.weight_quantizer", QuantizerConfig("int8"))], [GPTQ()])


CONFIGS = {"rtn": lambda: preset("w4a16-rtn"), "gptq": lambda: preset("w4a16-gptq"), "awq": lambda: preset("w4a16-awq"),
           "smoothquant": lambda: preset("w8a8-smoothquant"), "static": lambda: preset("w8a8-static"), "mixed": _mixed}


@pytest.mark.parametrize("family,name", [("llama", n) for n in CONFIGS] + [("gemma3", n) for n in ("gptq", "static")])
def test_quantize_offloaded_equals_in_memory(tmp_path, tiny_tokenizer, family, name):
    sharded = _sharded(tmp_path, tiny_tokenizer, family)
    ref, tok = leanlm.load(str(sharded))
    quantize(ref, CONFIGS[name](), IDS.clone(), progress=False)
    leanlm.save(ref, tmp_path / "mem", tokenizer=tok)
    fig = quantize_offloaded(str(sharded), CONFIGS[name](), tmp_path / "off", max_memory="8GB", calib_data=IDS.clone(),
                             tokenizer=tok, progress=False)
    _same_folders(tmp_path / "mem", tmp_path / "off", "quantization")
    assert 0 < fig["peak_rss_bytes"] <= fig["max_memory_bytes"] and fig["blocks_resumed"] == 0
    back, _ = leanlm.load(str(tmp_path / "off"))   # the sharded quantized folder loads as the in-memory model
    sa, sb = ref.state_dict(), back.state_dict()
    assert [k for k in sa if not torch.equal(sa[k], sb[k])] == []
    assert not list(tmp_path.glob(".off.*"))      # the work folder is gone


@pytest.mark.parametrize("family,method,pattern", [("llama", "wanda", "2:4"), ("llama", "sparsegpt", "unstructured"),
                                                    ("gemma3", "sparsegpt", "2:4")])
def test_sparsify_offloaded_equals_in_memory(tmp_path, tiny_tokenizer, family, method, pattern):
    sharded = _sharded(tmp_path, tiny_tokenizer, family)
    ref, tok = leanlm.load(str(sharded))
    rep = sparsify_(ref, SparsityConfig(method, pattern=pattern), IDS.clone(), progress=False)
    leanlm.save(ref, tmp_path / "mem", tokenizer=tok)
    fig = sparsify_offloaded(str(sharded), SparsityConfig(method, pattern=pattern), tmp_path / "off", max_memory="8GB",
                             calibration_ids_=IDS.clone(), tokenizer=tok, progress=False)
    _same_folders(tmp_path / "mem", tmp_path / "off", "sparsity")
    assert fig["overall"] == pytest.approx(rep["overall"])
    back, _ = leanlm.load(str(tmp_path / "off"))   # an ordinary sharded HF folder plus masks
    sa, sb = ref.state_dict(), back.state_dict()
    assert sa.keys() == sb.keys() and [k for k in sa if not torch.equal(sa[k], sb[k])] == []


def test_budget_is_refused_before_any_work(tmp_path, tiny_folder):
    with pytest.raises(LeanLMError, match=r"--max-memory 10 MB is too small: one block .* raise --max-memory to at least"):
        quantize_offloaded(str(tiny_folder), preset("w4a16-gptq"), tmp_path / "q", max_memory="10MB", calib_data=IDS.clone())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]


def test_missing_and_truncated_shards_are_named(tmp_path, tiny_tokenizer):
    d = tmp_path / "src"
    make_llama(vocab_size=len(tiny_tokenizer), layers=3).save_pretrained(d, max_shard_size="60KB")
    shards = sorted(d.glob("model-*.safetensors"))
    data = shards[1].read_bytes()
    shards[1].write_bytes(data[: len(data) // 2])
    with pytest.raises(LeanLMError, match=f"{shards[1]} is truncated"):
        quantize_offloaded(str(d), preset("w4a16-rtn"), tmp_path / "q", max_memory="8GB")
    shards[1].unlink()
    with pytest.raises(LeanLMError, match=f"shard {shards[1]} listed in model.safetensors.index.json is missing"):
        quantize_offloaded(str(d), preset("w4a16-rtn"), tmp_path / "q", max_memory="8GB")


def test_interrupted_run_resumes_from_the_last_finished_block(tmp_path, tiny_tokenizer, monkeypatch):
    from leanlm.core import offload

    sharded = _sharded(tmp_path, tiny_tokenizer)
    ref, tok = leanlm.load(str(sharded))
    quantize(ref, preset("w4a16-gptq"), IDS.clone(), progress=False)
    leanlm.save(ref, tmp_path / "mem", tokenizer=tok)

    finish = offload.BlockOffload.finish_block

    def stop_after_first(self, i, layer, hidden):
        if i == 1:
            raise KeyboardInterrupt
        finish(self, i, layer, hidden)

    monkeypatch.setattr(offload.BlockOffload, "finish_block", stop_after_first)
    run = lambda: quantize_offloaded(str(sharded), preset("w4a16-gptq"), tmp_path / "off", max_memory="8GB",  # noqa: E731
                                     calib_data=IDS.clone(), tokenizer=tok, progress=False)
    with pytest.raises(KeyboardInterrupt):
        run()
    assert not (tmp_path / "off").exists() and (tmp_path / ".off.offload" / "block-00000.json").is_file()
    with pytest.raises(LeanLMError, match="interrupted run with other options"):
        quantize_offloaded(str(sharded), preset("w4a16-rtn"), tmp_path / "off", max_memory="8GB", calib_data=IDS.clone())
    monkeypatch.setattr(offload.BlockOffload, "finish_block", finish)
    fig = run()
    assert fig["blocks_resumed"] == 1
    _same_folders(tmp_path / "mem", tmp_path / "off", "quantization")


def test_cli_and_recipe(tmp_path, tiny_folder, text_file):
    """`leanlm quantize --max-memory` and a recipe whose first step has max_memory, then an export."""
    from leanlm.cli import main
    from leanlm.recipe import Recipe

    calib = ["--samples", "2", "--seq-len", "16", "--calib", str(text_file)]
    assert main(["quantize", str(tiny_folder), "--scheme", "w4a16-gptq", "--out", str(tmp_path / "mem"), "--json", *calib]) == 0
    assert main(["quantize", str(tiny_folder), "--scheme", "w4a16-gptq", "--out", str(tmp_path / "off"), "--json", *calib,
                 "--max-memory", "4GB"]) == 0
    _same_folders(tmp_path / "mem", tmp_path / "off", "quantization")
    man = json.loads((tmp_path / "off" / "leanlm.json").read_text())
    assert man["steps"][0]["config"]["max_memory"] == "4GB" and man["steps"][0]["figures"]["peak_rss_bytes"] > 0
    steps = [{"sparsify": {"method": "wanda", "samples": 2, "seq_len": 16, "calib": str(text_file), "max_memory": "4GB"}},
             {"export": {"to": "hf"}}]
    Recipe.from_dict({"model": str(tiny_folder), "steps": steps}).run(tmp_path / "r", progress=False)
    assert (tmp_path / "r" / "sparsity_masks.safetensors").is_file() and (tmp_path / "r" / "hf").is_dir()
    with pytest.raises(LeanLMError, match="only the first step of a recipe may use it"):
        Recipe.from_dict({"model": str(tiny_folder), "steps": steps[::-1]}).validate()


def test_gguf_source_is_dequantized_tensor_by_tensor(tmp_path, tiny_tokenizer, monkeypatch):
    """A .gguf file read tensor by tensor (q/k un-permuted by transformers' processor) gives what converting it
    whole and quantizing in memory gives."""
    from leanlm.export.gguf import export_gguf

    monkeypatch.setenv("LEANLM_CACHE", str(tmp_path / "cache"))
    export_gguf(make_llama(vocab_size=len(tiny_tokenizer), tie=False), tmp_path / "m.gguf", tokenizer=tiny_tokenizer, quant="F32")
    ref, tok = leanlm.load(str(tmp_path / "m.gguf"))
    quantize(ref, preset("w4a16-gptq"), IDS.clone(), progress=False)
    leanlm.save(ref, tmp_path / "mem")
    quantize_offloaded(str(tmp_path / "m.gguf"), preset("w4a16-gptq"), tmp_path / "off", max_memory="8GB", calib_data=IDS.clone(),
                       progress=False)
    _same_folders(tmp_path / "mem", tmp_path / "off", "quantization")


def test_gptq_solve_in_place_gives_the_same_bits_in_less_memory():
    """GPTQ's inverse Cholesky reuses one float64 matrix for the factor, the inverse and its factor (the peak of a
    wide down_proj's solve): the same bits as separate matrices, and the in-place mirror of the Hessian accumulator
    equals ``triu(H) + triu(H, 1).T``."""
    from pathlib import Path

    from leanlm.quantization import algorithms as alg

    g = torch.Generator().manual_seed(0)
    n = 1100   # several of the accumulator's row blocks and of the permuted copy's row slices
    x = torch.randn(3 * n, n, generator=g) * torch.rand(n, generator=g)
    x[:, :3] = 0                                    # dead inputs
    acc = alg.HessianAccumulator(n)
    acc.add(x[:n])
    acc.add(x[n:])
    upper = acc._H.clone()
    H = acc.H
    assert torch.equal(H, torch.triu(upper) + torch.triu(upper, 1).T)
    perm = torch.argsort(torch.where(H.diagonal() == 0, 1.0, H.diagonal()).double(), descending=True, stable=True)
    for p in (None, perm):
        ref = H.double() if p is None else H.double()[p][:, p]
        dead = ref.diagonal() == 0
        ref[dead, :] = 0
        ref[:, dead] = 0
        ref[dead, dead] = 1
        ref.diagonal().add_(0.01 * ref.diagonal().abs().mean())
        U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(ref)), upper=True).float()
        assert torch.equal(alg.inverse_cholesky(H, torch.device("cpu"), "GPTQ", 0.01, p), U)
    from leanlm.core.offload import _malloc_returns_memory

    _malloc_returns_memory()   # freed matrices go back to the OS, as in an offloaded run, so the peak is the solve's
    status = Path("/proc/self/status")
    try:
        Path("/proc/self/clear_refs").write_text("5")   # reset the kernel's peak (VmHWM) to the current RSS
    except OSError:
        pytest.skip("no /proc/self/clear_refs to measure the peak with")

    def kb(field):
        return next(int(ln.split()[1]) for ln in status.read_text().splitlines() if ln.startswith(field)) * 1024

    before = kb("VmRSS")
    alg.inverse_cholesky(H, torch.device("cpu"), "GPTQ", 0.01, perm)
    # one float64 matrix and the float32 result (12 n^2 bytes; separate matrices: over 40 n^2) plus slack
    assert kb("VmHWM") - before < 16 * n * n
