"""The runtime engine and the serving engine on a GPU (`device="cuda"`): what runs without one (the int4 codes a
CUDA repack starts from, the clear errors), and, when a CUDA GPU is present, every weight format against the CPU
reference. CI has no GPU: the CUDA tests skip there and run on a lent GPU machine (bench/gpu_check.py)."""

from __future__ import annotations

import pytest
import torch

from conftest import make_llama
from leanlm.core.errors import LeanLMError
from leanlm.runtime import Engine
from leanlm.runtime.layouts import Int4Weight

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _int4(out_f, in_f, group, symmetric, seed):
    """Random int4 codes (signed for a symmetric grid, unsigned with integer zero points otherwise) and their layout."""
    torch.manual_seed(seed)
    scale = torch.rand(out_f, in_f // group, 1) * 0.05 + 1e-3
    if symmetric:
        codes, zero = torch.randint(-8, 8, (out_f, in_f), dtype=torch.int8), None
    else:
        codes, zero = torch.randint(0, 16, (out_f, in_f), dtype=torch.uint8), torch.randint(0, 16, (out_f, in_f // group, 1)).float()
    return codes, zero, Int4Weight.from_codes(codes, scale, zero, group, torch.bfloat16)


@pytest.mark.parametrize("group,symmetric", [(32, True), (64, False), (128, True)])
def test_int4_codes_are_recovered_exactly(group, symmetric):
    """A CUDA repack starts from the codes recovered from the CPU layout: they must be the codes that were packed."""
    codes, zero, lay = _int4(48, 256, group, symmetric, seed=0)
    assert torch.equal(lay.codes(), codes.to(torch.int32) + (8 if symmetric else 0))


def test_device_errors_are_one_line(tiny_model):
    with pytest.raises(LeanLMError, match="unknown device 'mps'"):
        Engine(tiny_model, "fp32", max_seq_len=16, device="mps")
    if not torch.cuda.is_available():
        with pytest.raises(LeanLMError, match="no CUDA GPU is visible"):
            Engine(tiny_model, "int4", max_seq_len=16, device="cuda")


def _model(vocab=300, seed=0):
    m = make_llama(vocab_size=vocab, hidden=128, intermediate=256, seed=seed)
    with torch.no_grad():   # larger weights than the default init: greedy outputs vary from token to token
        for p in m.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.1)
    return m


@cuda
@pytest.mark.parametrize("group,symmetric", [(32, True), (64, False), (128, True)])
def test_int4_cuda_kernel_equals_the_dequantized_weight(group, symmetric):
    in_f = 384
    _, _, lay = _int4(96, in_f, group, symmetric, seed=1)
    w = lay.dequantize()
    lay.for_device(torch.device("cuda"))
    lay.cuda()
    for rows in (1, 5, 64):
        x = torch.randn(rows, in_f, dtype=torch.bfloat16)
        ref = x.float() @ w.t()
        got = lay(x.cuda()).float().cpu()
        torch.testing.assert_close(got, ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())


@cuda
@pytest.mark.parametrize("weights", ["fp32", "bf16", "int8", "int4"])
def test_engine_on_cuda_matches_the_cpu_reference(weights):
    """Logits of a prompt and of decode steps agree with the CPU engine's reference path (PyTorch kernels), and
    float32 greedy tokens are identical."""
    m = _model()
    ids = torch.randint(0, 300, (1, 20), generator=torch.Generator().manual_seed(0))
    cpu = Engine(m, weights, max_seq_len=64, kernels=False)
    gpu = Engine(m, weights, max_seq_len=64, device="cuda")
    assert gpu.model.device.type == "cuda" and gpu.model.step is None
    a, b = cpu.forward(ids), gpu.forward(ids)
    assert b.device.type == "cpu"
    tol = 1e-4 if weights == "fp32" else 3e-2
    torch.testing.assert_close(b, a, rtol=tol, atol=tol * a.abs().max().item())
    cpu.reset(), gpu.reset()
    if weights == "fp32":
        assert torch.equal(gpu.generate(ids, 24), cpu.generate(ids, 24))
    else:
        out = gpu.generate(ids, 24)
        assert out.shape == (1, 44) and torch.equal(out[:, :20], ids)


@cuda
@pytest.mark.parametrize("weights", ["fp32", "int4"])
def test_continuous_batching_on_cuda_equals_the_cpu_engine(weights):
    """The same continuous batch (staggered arrivals, chunked prefill, a shared prefix) on the GPU gives the CPU
    engine's greedy tokens (float32), or tokens of the right count with every block freed (int4)."""
    from leanlm.serving import LLMEngine, SamplingParams

    m = _model()
    g = torch.Generator().manual_seed(3)
    shared = torch.randint(0, 300, (24,), generator=g).tolist()
    prompts = [shared + torch.randint(0, 300, (n,), generator=g).tolist() for n in (5, 40, 11, 3)]
    outs = {}
    for dev in ("cpu", "cuda"):
        eng = LLMEngine(m, None, weights, kv_cache_mb=4, block_size=8, max_num_seqs=3, max_num_batched_tokens=32,
                        dense_rows=4, device=dev)
        got = {}
        for i, p in enumerate(prompts):
            eng.add_request(str(i), p, SamplingParams(max_tokens=12, ignore_eos=True))
            if i == 1:
                for o in eng.step():
                    got.setdefault(o.request_id, []).extend(o.token_ids)
        eng.add_request("s", prompts[0], SamplingParams(max_tokens=6, temperature=0.8, seed=5, ignore_eos=True))
        while eng.has_unfinished():
            for o in eng.step():
                got.setdefault(o.request_id, []).extend(o.token_ids)
        b = eng.blocks
        assert b.num_free == b.num_blocks and not b.tables
        outs[dev] = got
    assert all(len(outs["cuda"][str(i)]) == 12 for i in range(4)) and len(outs["cuda"]["s"]) == 6
    if weights == "fp32":
        assert {k: v for k, v in outs["cuda"].items() if k != "s"} == {k: v for k, v in outs["cpu"].items() if k != "s"}
