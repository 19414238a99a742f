"""The fused batch-1 GEMV kernels (leanlm.runtime.kernels) against PyTorch's int4/int8 kernels (the
reference layouts) on random shapes, groups and every instruction-set path this CPU has."""

from __future__ import annotations

import os

import pytest
import torch

from leanlm.runtime import Engine, kernels
from leanlm.runtime.layouts import Int4Weight, Int8Weight

@pytest.fixture(scope="module", autouse=True)
def built():
    """The float kernels (the default, LEANLM_KERNELS unset or 1) for this module, back to the caller's setting after it."""
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


def _paths(size: int, best: int):
    """The instruction-set paths this CPU runs (the scalar loop on small shapes only: it is slow)."""
    return [p for p in (2, 1, 0) if p <= best and (p > 0 or size <= 4_000_000)]


def _exact(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return (x.double() @ w.double().t()).reshape(-1)


def _ulp(y: torch.Tensor) -> torch.Tensor:
    """One bfloat16 step at each value's magnitude."""
    return torch.exp2(torch.floor(torch.log2(y.abs().clamp_min(1e-30))) - 7)


def _same_as_reference(fast: torch.Tensor, ref: torch.Tensor):
    """The float kernels do the reference's arithmetic (bfloat16 row and output, float32 sums) in another
    order: every output equals the reference's or sits one bfloat16 step from it (plus float32 rounding of the
    sums, which matters only for outputs near zero after cancellation), and few differ at all."""
    fast, ref = fast.float().reshape(-1), ref.float().reshape(-1)
    d = (fast - ref).abs()
    tol = _ulp(ref) * 1.01 + 2.0 ** -18 * ref.abs().max()
    assert torch.all(d <= tol), float((d / tol).max())
    assert (d > 0).float().mean() <= 0.01, float((d > 0).float().mean())


def _q8_close(fast, ref, exact):
    """The opt-in int8-activation kernels quantize the row to int8 per 32 values where the reference rounds it
    to bfloat16: the fast output must sit as close to the exact product as the reference does (within a
    small factor), and within 1.5% of its norm."""
    e_ref = (ref.double() - exact).abs().max()
    e_fast = (fast.double() - exact).abs().max()
    scale = exact.abs().max()
    assert e_fast <= 4 * e_ref + 2e-3 * scale, (float(e_fast), float(e_ref), float(scale))
    assert (fast.double() - exact).norm() <= 0.015 * exact.norm()


INT4_SHAPES = [(16, 64, 32), (576, 576, 64), (1536, 576, 32), (576, 1536, 128), (1536, 2048, 256),
               (49152, 576, 64), (48, 96, 32), (80, 160, 32), (16, 8, 8), (32, 24, 8)]


@pytest.mark.parametrize("N,K,G", INT4_SHAPES)
def test_int4_gemv_matches_reference(N, K, G):
    g = torch.Generator().manual_seed(N + K + G)
    if G < 32:   # groups of 8 and 16 (the float kernel takes them; PyTorch's int4 kernel does not): exact product
        lay = None
        u = torch.randint(0, 16, (N, K), generator=g, dtype=torch.int32)
        tiled = kernels.tile16(u)
        scale = (torch.rand(N, K // G, generator=g) + 0.05).bfloat16()
        sz = torch.stack([scale, torch.zeros_like(scale)], -1).transpose(0, 1).contiguous()
        dq = (u - 8).float() * scale.float().repeat_interleave(G, 1)
    else:
        w = torch.randn(N, K, generator=g) * (1 + torch.rand(N, 1, generator=g))
        lay = Int4Weight.from_float(w, G, torch.bfloat16)
        assert lay.tiled is not None
        assert torch.equal(kernels.untile16(lay.tiled, N, K).int(), lay.codes())
        tiled, sz, dq = lay.tiled, lay.scales_zeros, None
    x = torch.randn(1, K, generator=g)
    ref = lay.reference(x.bfloat16()).float().reshape(-1) if lay is not None else _exact(dq, x.bfloat16().float()).float().bfloat16()
    outs = []
    for p in _paths(N * K, int(torch.ops.leanlm.float_path())):
        torch.ops.leanlm.set_path(p)
        y = torch.ops.leanlm.int4_gemv(x, tiled, sz, G, N)
        assert y.dtype == torch.float32 and y.shape == (N,)
        _same_as_reference(y, ref)
        if lay is not None:
            yb = lay(x.bfloat16())   # bfloat16 in, bfloat16 out through the layout
            assert yb.dtype == torch.bfloat16 and yb.shape == (1, N)
            _same_as_reference(yb, ref)
        outs.append(y)
    torch.ops.leanlm.set_path(-1)
    for o in outs[1:]:   # AVX-512 BF16, AVX2 and scalar: the same sums in other orders
        _same_as_reference(o, outs[0])


@pytest.mark.parametrize("N,K,G", [(576, 576, 64), (1536, 2048, 256), (48, 96, 32)])
def test_int4_gemv_q8_is_close(N, K, G):
    g = torch.Generator().manual_seed(N + K)
    lay = Int4Weight.from_float(torch.randn(N, K, generator=g), G, torch.bfloat16)
    x = torch.randn(1, K, generator=g).bfloat16()
    ref, exact = lay.reference(x).float().reshape(-1), _exact(lay.dequantize(), x.float())
    for p in _paths(N * K, int(torch.ops.leanlm.kernel_path())):
        torch.ops.leanlm.set_path(p)
        _q8_close(torch.ops.leanlm.int4_gemv_q8(x.float().reshape(-1), lay.tiled, lay.scales_zeros, G, N), ref, exact)
    torch.ops.leanlm.set_path(-1)


def test_asymmetric_int4_matches_reference():
    """Asymmetric codes carry a zero per group (`(8 - z) * scale`): the float kernels add it exactly like the reference."""
    g = torch.Generator().manual_seed(5)
    N, K, G = 96, 256, 64
    u = torch.randint(0, 16, (N, K), generator=g, dtype=torch.uint8)
    scale = torch.rand(N, K // G, 1, generator=g) + 0.05
    zero = torch.randint(0, 16, (N, K // G, 1), generator=g).float()
    lay = Int4Weight.from_codes(u, scale, zero, G, torch.bfloat16)
    x = torch.randn(1, K, generator=g)
    _same_as_reference(lay(x), lay.reference(x.bfloat16()))


def test_int4_from_float_takes_the_grid_with_the_lower_error():
    """Round-to-nearest packing compares the symmetric and the asymmetric grid per matrix (same bytes, same kernel) and
    keeps the one whose dequantized weight, as the kernel computes it, is closer to the float weight."""
    g = torch.Generator().manual_seed(7)
    err = lambda lay, w: float((lay.dequantize() - w).square().sum())  # noqa: E731
    on_sym = torch.randint(-7, 8, (32, 128), generator=g).float()   # codes -7..7 times 2^-7, every group reaching +-7
    on_sym[:, ::64], on_sym[:, 1::64] = 7, -7
    on_sym = on_sym / 128
    on_asym = torch.randint(0, 16, (32, 128), generator=g).float()  # codes 0..15 around zero point 3, step 2^-6
    on_asym[:, ::64], on_asym[:, 1::64] = 0, 15
    on_asym = (on_asym - 3) / 64
    skewed = torch.rand(32, 128, generator=g) + 0.5                 # all positive
    for w, want in ((on_sym, "sym"), (on_asym, "asym"), (skewed, "asym")):
        lays = {grid: Int4Weight.from_float(w, 64, torch.bfloat16, grid=grid) for grid in ("auto", "sym", "asym")}
        errs = {grid: err(lay, w) for grid, lay in lays.items()}
        assert errs["auto"] == errs[want] < errs["sym" if want == "asym" else "asym"], errs
        assert torch.equal(lays["auto"].scales_zeros, lays[want].scales_zeros)
        if w is not skewed:
            assert errs[want] == 0   # weights on a grid come back exactly
    with pytest.raises(ValueError, match="grid"):
        Int4Weight.from_float(skewed, 64, torch.bfloat16, grid="nf4")


@pytest.mark.parametrize("N,K", [(16, 32), (576, 576), (1536, 576), (576, 1536), (49152, 576), (40, 96), (300, 64),
                                 (7, 100), (33, 17)])
def test_int8_gemv_matches_reference(N, K):
    g = torch.Generator().manual_seed(N * K)
    w = torch.randn(N, K, generator=g) * (1 + torch.rand(N, 1, generator=g))
    lay = Int8Weight.from_float(w, torch.bfloat16)
    assert lay.fast
    # the batch-1 kernel reads the tiled copy where the shape tiles, the row-major codes elsewhere
    assert (lay.tiled is not None) == (N % 16 == 0 and K % 4 == 0)
    if lay.tiled is not None:
        assert torch.equal(kernels.untile8(lay.tiled), lay.qweight)
    x = torch.randn(1, 1, K, generator=g)
    if K % 32 == 0:
        ref = lay.reference(x.bfloat16()).float().reshape(-1)
    else:   # odd K: PyTorch's int8 kernel is not used there; the exact product of the same operands, rounded once
        ref = (_exact(lay.qweight.float(), x.bfloat16().float().reshape(1, K)) * lay.scale.double()).float().bfloat16()
    outs = []
    for p in _paths(N * K, int(torch.ops.leanlm.float_path())):
        torch.ops.leanlm.set_path(p)
        y = lay(x.bfloat16())
        assert y.shape == (1, 1, N) and y.dtype == torch.bfloat16
        _same_as_reference(y, ref)
        outs.append(torch.ops.leanlm.int8_gemv(x.reshape(-1), lay.qweight, lay.scale))
        if K % 32 == 0:
            exact = _exact(lay.dequantize(), x.bfloat16().float().reshape(1, K))
            _q8_close(torch.ops.leanlm.int8_gemv_q8(x.bfloat16().reshape(-1), lay.qweight, lay.scale).float(), ref, exact)
    torch.ops.leanlm.set_path(-1)
    for o in outs[1:]:
        _same_as_reference(o, outs[0])


@pytest.mark.parametrize("kind,N,K,G", [("int4", 576, 576, 64), ("int4", 49152, 576, 64), ("int4", 48, 96, 32),
                                         ("int8", 1536, 576, 0), ("int8", 49152, 576, 0), ("int8", 33, 17, 0)])
def test_a_few_rows_are_exactly_one_row_calls(kind, N, K, G):
    """Up to MAX_ROWS rows (a speculative verification, a small batch) run the fused kernel row by row over cached
    chunks of the weight: every row is bit-identical to a one-row call (so a multi-token verification rounds as the
    one-token steps do), on every instruction-set path, and as close to PyTorch's kernel as one row is."""
    g = torch.Generator().manual_seed(N + K)
    w = torch.randn(N, K, generator=g)
    lay = Int4Weight.from_float(w, G, torch.bfloat16) if kind == "int4" else Int8Weight.from_float(w, torch.bfloat16)
    for p in _paths(N * K, int(torch.ops.leanlm.float_path())):
        torch.ops.leanlm.set_path(p)
        for M in (2, 5, kernels.MAX_ROWS):
            x = torch.randn(1, M, K, generator=g).bfloat16()
            y = lay(x)
            assert y.shape == (1, M, N) and y.dtype == torch.bfloat16
            assert torch.equal(y[0], torch.stack([lay(x[0, i]) for i in range(M)]))
            if K % 32 == 0:
                _same_as_reference(y, lay.reference(x))
    torch.ops.leanlm.set_path(-1)


@pytest.mark.parametrize("N,K", [(576, 576), (3072, 576), (49152, 576), (33, 17), (7, 100)])
def test_f32_rows_are_exact_one_row_calls(N, K):
    """The float32 kernel: every row of an M-row call is bit-identical to a one-row call (the order of its sums does
    not depend on M), on every instruction-set path, and within float32 rounding of the exact product."""
    from leanlm.runtime.layouts import DenseWeight

    g = torch.Generator().manual_seed(N + K)
    lay = DenseWeight(torch.randn(N, K, generator=g), torch.float32)
    assert lay.f32_rows and not lay.transposed and torch.equal(lay.weight, lay.stored)
    for p in _paths(N * K, int(torch.ops.leanlm.float_path())):
        torch.ops.leanlm.set_path(p)
        for M in (1, 3, 5, kernels.MAX_ROWS):
            x = torch.randn(1, M, K, generator=g)
            y = lay(x)
            assert y.shape == (1, M, N) and y.dtype == torch.float32
            assert torch.equal(y[0], torch.stack([lay(x[0, i]) for i in range(M)]))
            exact = (x[0].double() @ lay.weight.double().t())
            assert (y[0].double() - exact).abs().max() <= 1e-5 * exact.abs().max() + 1e-5
    torch.ops.leanlm.set_path(-1)
    x = torch.randn(kernels.MAX_ROWS + 1, K, generator=g)   # a prefill: MKL
    torch.testing.assert_close(lay(x), x @ lay.weight.t())


def test_more_rows_take_the_reference_kernel():
    lay = Int4Weight.from_float(torch.randn(64, 128), 32, torch.bfloat16)
    x = torch.randn(kernels.MAX_ROWS + 1, 128).bfloat16()
    assert torch.equal(lay(x), lay.reference(x))
    lay8 = Int8Weight.from_float(torch.randn(64, 128), torch.bfloat16)
    assert torch.equal(lay8(x), lay8.reference(x))


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
    """A tiny Llama: the default engine (the fused C++ step, int8 head) gives the greedy tokens and the logits of
    the same packing on PyTorch's kernels (the reference path)."""
    from conftest import make_llama
    from leanlm.runtime import Engine

    model = make_llama(vocab_size=256, hidden=128, layers=2, heads=4, kv_heads=2, intermediate=256)
    with torch.no_grad():
        model.model.norm.weight.mul_(40)
    fast, ref = Engine(model, "int4", max_seq_len=64), Engine(model, "int4", max_seq_len=64, kernels=False)
    assert fast.model.head_format == "int8" and fast.kernels != ref.kernels and ref.kernels.startswith("reference")
    assert fast.model.step is not None and ref.model.step is None
    ids = torch.randint(1, 256, (1, 8), generator=torch.Generator().manual_seed(0))
    assert torch.equal(fast.generate(ids, 16), ref.generate(ids, 16))
    fast.reset(), ref.reset()
    fast.forward(ids), ref.forward(ids)
    a, b = fast.forward(ids[:, :1])[0, -1], ref.forward(ids[:, :1])[0, -1]
    assert (a - b).abs().max() <= 0.03 * b.abs().max()
    assert fast.warmup(8, 16) >= 0 and fast.length == 0


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen3", "gemma3", "phi3"])
def test_verification_is_bit_for_bit_one_token_steps(family):
    """A speculative verification (T tokens in one forward) and a draft tree on the int4 engine run through the one-call
    C++ step (Step.rows): the logits and the final norm's features (an EAGLE head's input) are the bits of one-token
    steps over the same keys, past Gemma-3's and Mistral's sliding windows too, so greedy output cannot part."""
    from test_arch import _ids, make_model
    from leanlm.speculative.tree import DraftTree

    model = make_model(family)
    eng = Engine(model, "int4", max_seq_len=64)
    assert eng.model.step is not None
    ids = _ids(40)

    def run(T, upto=40, hidden=False):
        eng.reset()
        eng.keep_hidden = hidden
        eng.forward(ids[:, :20])   # a 20-token prefill: the per-op path, shared by every run
        outs, hid = [], []
        for i in range(20, upto, T):
            outs.append(eng.forward(ids[:, i:i + T]))
            hid.append(eng.hidden)
        return torch.cat(outs, 1), torch.cat(hid, 1) if hidden else None

    steps, _ = run(1)   # plain decoding: Step.step
    _, steps_h = run(1, hidden=True)
    for T in (2, 5, 16):
        for hidden in (False, True):
            verify, verify_h = run(T, 20 + T * (20 // T), hidden)
            n = verify.shape[1]
            assert torch.equal(verify, steps[:, :n]), (family, T, hidden)
            assert not hidden or torch.equal(verify_h, steps_h[:, :n]), (family, T)
    # a tree: after compacting one path, the tree's logits at the kept nodes and the next step are one-token steps'
    tree = DraftTree.from_paths([[0], [1], [0, 0], [1, 0], [1, 1], [1, 1, 0]])
    path = [2, 5, 6]   # nodes (1,), (1,1), (1,1,0)
    nodes = torch.randint(1, 300, (1, tree.size), generator=torch.Generator().manual_seed(3))
    nodes[0, [c - 1 for c in path]] = ids[0, 21:24]
    eng.reset()
    eng.keep_hidden = False
    eng.forward(ids[:, :20])
    tl = eng.forward_tree(torch.cat([ids[:, 20:21], nodes], 1), 20 + tree.depth, tree.mask)
    eng.compact(20, torch.tensor([0] + path))
    nxt = eng.forward(ids[:, 24:25])
    assert torch.equal(tl[:, [0] + path], steps[:, :4]) and torch.equal(nxt, steps[:, 4:5]), family


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "gemma3", "phi3"])
def test_fused_step_matches_reference_every_family(family):
    """The one-call C++ decode step (norms, RoPE incl. partial rotary, q/k norms, sliding windows, Gemma's sandwich
    norms and GELU, KV-cache write, attention, head) against the reference engine (PyTorch's kernels), step by step
    past the sliding window, and against the per-op Python path with the same fused GEMVs."""
    from test_arch import _ids, make_model
    from leanlm.runtime import Engine

    model = make_model(family)
    fast, ref = Engine(model, "int4", max_seq_len=64), Engine(model, "int4", max_seq_len=64, kernels=False)
    if family == "qwen2":   # q/k/v biases: the per-op path runs, and says why
        assert fast.model.step is None and "bias" in fast.model.step_why
        return
    step = fast.model.step
    assert step is not None
    ids = _ids(24)

    def run(eng):
        eng.reset()
        eng.forward(ids[:, :12])
        return torch.cat([eng.forward(ids[:, i:i + 1]) for i in range(12, 24)], 1)

    got, want = run(fast), run(ref)
    fast.model.step = None
    per_op = run(fast)
    fast.model.step = step
    tol = 2 * _ulp(want.abs().max())   # the same bfloat16 roundings as the reference; float32 sums in another order
    assert (got - want).abs().max() <= tol, float((got - want).abs().max())
    assert (got - per_op).abs().max() <= 0.05 * want.abs().max()
    assert torch.equal(fast.generate(ids, 16), ref.generate(ids, 16))
    gemv_s, att_s, all_s, steps = step.timings(True)
    assert steps >= 12 and 0 < gemv_s < all_s and 0 <= att_s < all_s


def test_kernels_off_says_so(monkeypatch, capsys):
    """LEANLM_KERNELS=0: one line saying PyTorch's kernels run; layouts and the engine take the reference path."""
    from leanlm.runtime import Engine
    from conftest import make_llama

    saved = dict(kernels._state)
    monkeypatch.setenv("LEANLM_KERNELS", "0")
    kernels._state.clear()
    try:
        assert not kernels.load() and kernels.path() == "reference (LEANLM_KERNELS=0)"
        assert "fused batch-1 kernels are off: LEANLM_KERNELS=0" in capsys.readouterr().err
        eng = Engine(make_llama(vocab_size=64, hidden=64, layers=1), "int4", max_seq_len=16)
        assert eng.model.step is None and eng.kernels.startswith("reference")
    finally:
        kernels._state.clear()
        kernels._state.update(saved)


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


def _attention_reference(q, k, v, tables, pos, bs, window, scale):
    """Each sequence's keys gathered one by one, attended in float64."""
    S, H, D = q.shape
    g = H // k.shape[0]
    out = torch.empty(S, H * D, dtype=torch.float64)
    for s in range(S):
        p = int(pos[s])
        keys = torch.arange(max(0, p - window + 1) if window else 0, p + 1)
        slots = tables[s][keys // bs] * bs + keys % bs
        K, V = k[:, slots].double(), v[:, slots].double()                 # [Hkv, T, D]
        qs = q[s].double().view(-1, g, D)
        out[s] = ((qs @ K.transpose(1, 2)) * scale).softmax(-1).matmul(V).reshape(-1)
    return out


@pytest.mark.parametrize("kv_heads,group,window,D", [(3, 3, 0, 32), (2, 1, 0, 64), (1, 4, 7, 32), (2, 2, 16, 48),
                                                      (1, 6, 0, 16), (1, 7, 0, 32), (2, 3, 0, 24)])
@pytest.mark.parametrize("portable", [False, True])
def test_paged_attention_matches_gathered_attention(kv_heads, group, window, D, portable):
    """The serving engine's decode attention read in place from paged pools (float32, bfloat16, and int8 codes with
    their per-token scales) equals attention over the gathered keys, for any block placement, length and sliding window;
    on the AVX-512 path (query groups up to 6, head_dim a multiple of 16) and the portable one (forced, or any other
    shape)."""
    g = torch.Generator().manual_seed(kv_heads * 10 + group)
    bs, blocks = 4, 96
    if portable:
        torch.ops.leanlm.set_path(1)
    try:
        _check_paged_attention(g, kv_heads, group, window, D, bs, blocks)
    finally:
        torch.ops.leanlm.set_path(-1)


def _check_paged_attention(g, kv_heads, group, window, D, bs, blocks):
    pos = torch.tensor([0, 3, 4, 17, 41, 9])
    nb = int(pos.max()) // bs + 1
    tables = torch.randperm(blocks, generator=g)[: len(pos) * nb].view(len(pos), nb).contiguous()
    q = torch.randn(len(pos), kv_heads * group, D, generator=g)
    k, v = torch.randn(kv_heads, blocks * bs, D, generator=g), torch.randn(kv_heads, blocks * bs, D, generator=g)
    got = torch.ops.leanlm.paged_attention(q, k, v, None, None, tables, pos, bs, window, D ** -0.5)
    torch.testing.assert_close(got.double(), _attention_reference(q, k, v, tables, pos, bs, window, D ** -0.5), rtol=1e-5, atol=1e-5)
    kb, vb = k.bfloat16(), v.bfloat16()   # bfloat16 pools: read as the float32 values they hold
    gotb = torch.ops.leanlm.paged_attention(q, kb, vb, None, None, tables, pos, bs, window, D ** -0.5)
    torch.testing.assert_close(gotb.double(), _attention_reference(q, kb.float(), vb.float(), tables, pos, bs, window, D ** -0.5),
                               rtol=1e-5, atol=1e-5)
    ks, vs = torch.rand(kv_heads, blocks * bs, generator=g) / 50, torch.rand(kv_heads, blocks * bs, generator=g) / 50
    k8 = torch.randint(-127, 128, k.shape, generator=g, dtype=torch.int8)
    v8 = torch.randint(-127, 128, v.shape, generator=g, dtype=torch.int8)
    got8 = torch.ops.leanlm.paged_attention(q, k8, v8, ks, vs, tables, pos, bs, window, D ** -0.5)
    want8 = _attention_reference(q, k8.float() * ks[..., None], v8.float() * vs[..., None], tables, pos, bs, window, D ** -0.5)
    torch.testing.assert_close(got8.double(), want8, rtol=1e-5, atol=1e-5)


def test_paged_attention_refuses_tables_outside_the_pools():
    q, k = torch.zeros(1, 2, 8), torch.zeros(2, 16, 8)
    with pytest.raises(RuntimeError, match="outside the pools"):
        torch.ops.leanlm.paged_attention(q, k, k, None, None, torch.tensor([[4]]), torch.tensor([2]), 4, 0, 1.0)
    with pytest.raises(RuntimeError, match="outside the block table"):
        torch.ops.leanlm.paged_attention(q, k, k, None, None, torch.tensor([[0]]), torch.tensor([4]), 4, 0, 1.0)


@pytest.mark.parametrize("V", [1, 15, 16, 63, 64, 100, 49152, 262144 + 7])
def test_greedy_argmax_is_torch_argmax(V):
    """`sampling.argmax` (the fused `argmax_rows` once the kernels are loaded) returns torch.argmax's index: the first
    of the largest value, on random rows, ties, -inf, signed zeros and NaN (NaN is the largest for torch)."""
    from leanlm.runtime.sampling import Sampling, argmax, next_token

    g = torch.Generator().manual_seed(V)
    rows = [torch.randn(V, generator=g), torch.full((V,), float("-inf")), torch.zeros(V)]
    tie = torch.randn(V, generator=g)
    tie[V // 3] = tie[V - 1] = tie.max() + 1     # two equal maxima: the first wins
    rows.append(tie)
    signed = torch.full((V,), -1.0)
    signed[V - 1] = 0.0
    signed[V // 2] = -0.0                         # -0.0 == 0.0: the first of them
    rows.append(signed)
    nan = torch.randn(V, generator=g)
    nan[V // 2] = float("nan")
    rows.append(nan)
    logits = torch.stack(rows)
    assert kernels.loaded()
    assert torch.equal(torch.ops.leanlm.argmax_rows(logits), logits.argmax(-1))
    assert torch.equal(argmax(logits), logits.argmax(-1))
    assert torch.equal(next_token(logits[:, None, :][:, -1], Sampling()), logits.argmax(-1))   # a strided view too
