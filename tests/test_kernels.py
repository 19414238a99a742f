"""The fused batch-1 GEMV kernels (leanlm.runtime.kernels) against PyTorch's int4/int8 kernels (the
reference layouts) on random shapes, groups and every instruction-set path this CPU has."""

from __future__ import annotations

import os

import pytest
import torch

from leanlm.runtime import kernels
from leanlm.runtime.layouts import Int4Weight, Int8Weight

@pytest.fixture(scope="module", autouse=True)
def built():
    """The kernels are opt-in (LEANLM_KERNELS=1): turned on for this module, back to the default after it."""
    old = os.environ.get("LEANLM_KERNELS")
    os.environ["LEANLM_KERNELS"] = "1"
    kernels._state.clear()
    assert kernels.load(), f"the fused kernels did not build: {kernels.path()}"
    yield
    torch.ops.leanlm.set_path(-1)  # back to the CPU's own choice
    if old is None:
        del os.environ["LEANLM_KERNELS"]
    else:
        os.environ["LEANLM_KERNELS"] = old
    kernels._state.clear()


def _paths(size: int):
    """The instruction-set paths this CPU runs (the scalar loop on small shapes only: it is slow)."""
    best = int(torch.ops.leanlm.kernel_path())
    return [p for p in (2, 1, 0) if p <= best and (p > 0 or size <= 4_000_000)]


def _exact(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return (x.double() @ w.double().t()).reshape(-1)


def _check(fast, ref, exact):
    """The fused kernel quantizes the activation row to int8 per 32 values where the reference rounds it to
    bfloat16: both errors are rounding of the same size, so the fast output must sit as close to the exact
    product as the reference does (within a small factor), and within 1.5% of its norm."""
    e_ref = (ref.double() - exact).abs().max()
    e_fast = (fast.double() - exact).abs().max()
    scale = exact.abs().max()
    assert e_fast <= 4 * e_ref + 2e-3 * scale, (float(e_fast), float(e_ref), float(scale))
    assert (fast.double() - exact).norm() <= 0.015 * exact.norm()


@pytest.mark.parametrize("N,K,G", [(16, 64, 32), (576, 576, 64), (1536, 576, 32), (576, 1536, 128), (1536, 2048, 256),
                                   (49152, 576, 64), (48, 96, 32), (80, 160, 32)])
def test_int4_gemv_matches_reference(N, K, G):
    g = torch.Generator().manual_seed(N + K + G)
    w = torch.randn(N, K, generator=g) * (1 + torch.rand(N, 1, generator=g))
    lay = Int4Weight.from_float(w, G, torch.bfloat16)
    assert lay.tiled is not None
    assert torch.equal(kernels.untile16(lay.tiled, N, K).int() - 8, _codes(lay))
    dq = lay.dequantize()
    x = torch.randn(1, K, generator=g).bfloat16()
    ref = lay.reference(x).float().reshape(-1)
    exact = _exact(dq, x.float())
    outs = []
    for p in _paths(N * K):
        torch.ops.leanlm.set_path(p)
        _check(lay(x).float().reshape(-1), ref, exact)
        outs.append(torch.ops.leanlm.int4_gemv(x.float().reshape(-1), lay.tiled, lay.scales_zeros, G, N))
    torch.ops.leanlm.set_path(-1)
    for o in outs[1:]:   # AVX-512, AVX2 and scalar compute the same integer sums: float32 outputs agree to rounding
        torch.testing.assert_close(o, outs[0], rtol=1e-5, atol=1e-5 * float(outs[0].abs().max()))


def _codes(lay: Int4Weight) -> torch.Tensor:
    """Signed codes of a symmetric int4 layout, recovered from the reference kernel's dequantized weight."""
    s = lay.scales_zeros[..., 0].float().t().repeat_interleave(lay.group_size, dim=1)  # [N, K]
    return torch.round(lay.dequantize() / s).int()


@pytest.mark.parametrize("N,K", [(16, 32), (576, 576), (1536, 576), (576, 1536), (49152, 576), (40, 96), (300, 64)])
def test_int8_gemv_matches_reference(N, K):
    g = torch.Generator().manual_seed(N * K)
    w = torch.randn(N, K, generator=g) * (1 + torch.rand(N, 1, generator=g))
    lay = Int8Weight.from_float(w, torch.bfloat16)
    assert lay.fast
    x = torch.randn(1, 1, K, generator=g).bfloat16()
    ref = lay.reference(x).float().reshape(-1)
    exact = _exact(lay.dequantize(), x.float().reshape(1, K))
    outs = []
    for p in _paths(N * K):
        torch.ops.leanlm.set_path(p)
        y = lay(x)
        assert y.shape == (1, 1, N) and y.dtype == torch.bfloat16
        _check(y.float().reshape(-1), ref, exact)
        outs.append(torch.ops.leanlm.int8_gemv(x.float().reshape(-1), lay.qweight, lay.scale))
    torch.ops.leanlm.set_path(-1)
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], rtol=1e-5, atol=1e-5 * float(outs[0].abs().max()))


def test_several_rows_take_the_reference_kernel():
    lay = Int4Weight.from_float(torch.randn(64, 128), 32, torch.bfloat16)
    x = torch.randn(3, 128).bfloat16()
    assert torch.equal(lay(x), lay.reference(x))


def test_build_key_changes_with_torch_version_and_source(monkeypatch):
    key = kernels.build_key()
    monkeypatch.setattr(torch, "__version__", torch.__version__ + "+other")
    assert kernels.build_key() != key
    monkeypatch.undo()
    assert kernels.build_key() == key
    monkeypatch.setattr(kernels, "_cpu_flags", lambda: "avx2 fma")
    assert kernels.build_key() != key


def test_compile_cache_key_changes_with_library_versions(monkeypatch):
    import leanlm
    from leanlm.runtime.engine import compile_cache_key

    key = compile_cache_key()
    monkeypatch.setattr(leanlm, "__version__", leanlm.__version__ + ".dev1")
    assert compile_cache_key() != key
    monkeypatch.undo()
    monkeypatch.setattr(torch, "__version__", torch.__version__ + "+other")
    assert compile_cache_key() != key
    monkeypatch.undo()
    monkeypatch.setattr(kernels, "build_key", lambda: "another-kernel-source")
    assert compile_cache_key() != key


def test_engine_fused_path_matches_reference_engine():
    """A tiny Llama with peaky logits: the default engine (fused kernels at batch 1, int8 head) gives the greedy
    tokens of the same packing on PyTorch's kernels, and its logits agree to rounding."""
    from conftest import make_llama
    from leanlm.runtime import Engine

    model = make_llama(vocab_size=256, hidden=128, layers=2, heads=4, kv_heads=2, intermediate=256)
    with torch.no_grad():
        model.model.norm.weight.mul_(40)
    fast, ref = Engine(model, "int4", max_seq_len=64), Engine(model, "int4", max_seq_len=64, kernels=False)
    assert fast.model.head_format == "int8" and fast.kernels != ref.kernels and ref.kernels.startswith("reference")
    ids = torch.randint(1, 256, (1, 8), generator=torch.Generator().manual_seed(0))
    assert torch.equal(fast.generate(ids, 16), ref.generate(ids, 16))
    fast.reset(), ref.reset()
    fast.forward(ids), ref.forward(ids)
    a, b = fast.forward(ids[:, :1])[0, -1], ref.forward(ids[:, :1])[0, -1]
    assert (a - b).abs().max() <= 0.03 * b.abs().max()
    assert fast.warmup(8, 16) >= 0 and fast.length == 0


def test_missing_compiler_says_so_and_uses_the_reference_path(monkeypatch, capsys):
    """A failed build is one line naming the reason and the fix; layouts then take PyTorch's kernels."""
    from torch.utils import cpp_extension

    saved = dict(kernels._state)

    def no_compiler(**_):
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    kernels._state.clear()
    try:
        assert not kernels.load()
        err = capsys.readouterr().err
        assert "cannot build the fused kernels (Ninja is required" in err and "PyTorch's int4/int8 kernels" in err
        assert kernels.path().startswith("reference")
        lay = Int4Weight.from_float(torch.randn(32, 64), 32, torch.bfloat16)
        x = torch.randn(1, 64).bfloat16()
        assert lay.tiled is None and torch.equal(lay(x), lay.reference(x))
    finally:
        kernels._state.clear()
        kernels._state.update(saved)
