"""The runtime's fused batch-1 kernels (csrc/gemv.cpp), a small C++ extension registered as PyTorch operators.

- `torch.ops.leanlm.int4_gemv` / `int8_gemv` (the default): one activation row kept in floating point. The
  row is rounded to bfloat16 exactly as the reference path casts it, the int4/int8 weight is dequantized in
  registers (AVX-512 BF16 `vdpbf16ps`, or AVX2 FMA, or a scalar loop, chosen at run time), products are
  accumulated in float32 and the output is rounded to bfloat16: the reference layouts' arithmetic up to the
  order of float32 additions, so greedy tokens equal the reference path's except at exact ties.
  They take up to `MAX_ROWS` rows at once too (a speculative verification, a small decode batch), each row
  computed exactly as a one-row call computes it, the weight read from memory once for all of them.
- `torch.ops.leanlm.f32_gemv`: float32 weights [N, K], up to `MAX_ROWS` float32 rows, each row's sums in the same
  order whatever the number of rows (a float32 target's decode steps and speculative verifications).
- `torch.classes.leanlm.Step`: a whole batch-1 decode step (every layer and the head) in one call, built once
  per `Decoder` over its own buffers (`model.Decoder.fused_step`).
- `torch.ops.leanlm.paged_attention`: the serving engine's decode attention read straight from its paged KV
  pools (no gather into a contiguous copy; `serving/engine.py`).
- `torch.ops.leanlm.argmax_rows`: greedy decoding's argmax over the vocabulary (`sampling.argmax`), the same index as
  `torch.argmax`, a tenth of its time.
- `torch.ops.leanlm.round_to_nearest`: post-training quantization's round to nearest of a weight, one pass per
  group or row while it is in cache (`quantization.algorithms.round_to_nearest`, the same values as its PyTorch path).
- `int4_gemv_q8` / `int8_gemv_q8` (opt-in, ``LEANLM_KERNELS=q8``): the activation row quantized to int8 per 32
  values (llama.cpp's Q8_0) with VNNI integer dot products; not token-identical (docs/runtime.md).

The source is compiled on first use by `torch.utils.cpp_extension` (g++ and ninja) into
`cache_dir()/kernels/<key>`, the key hashing the source, the torch version and the CPU's flags, so a later
process loads the binary in well under a second (scripts/setup.sh builds it at install). ``LEANLM_KERNELS=0``
turns them off. When they are off or cannot be built (no compiler) the layouts call PyTorch's own int4/int8
kernels (the reference path) and one line on stderr says which path runs and why.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import torch

log = logging.getLogger("leanlm")
SRC = Path(__file__).parent / "csrc" / "gemv.cpp"
PATHS = {2: "avx512-bf16", 1: "avx2", 0: "scalar"}
Q8_PATHS = {2: "avx512-vnni", 1: "avx2", 0: "scalar"}
_state: dict = {}


def _cpu_flags() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                return " ".join(sorted(f for f in line.split(":", 1)[1].split() if f.startswith(("avx", "fma", "sse", "f16c"))))
    except OSError:
        pass
    import platform

    return platform.machine()


def build_key() -> str:
    """Hash of the kernel source, torch version and CPU flags: a change of any of them rebuilds."""
    h = hashlib.sha256(SRC.read_bytes())
    h.update(torch.__version__.encode())
    h.update(_cpu_flags().encode())
    return h.hexdigest()[:16]


def _say(msg: str) -> None:
    """One line on stderr (and to the `leanlm` logger's handlers, if an application set any)."""
    import sys

    print(msg, file=sys.stderr, flush=True)
    if log.handlers:
        log.info(msg)


def load(verbose: bool = False) -> bool:
    """Build (once, cached on disk) and load the kernels; True when they run. Never raises."""
    if "ok" in _state:
        return _state["ok"]
    _state["ok"] = False
    if mode() == "off":
        _state["why"] = "LEANLM_KERNELS=0"
        _say("leanlm runtime: PyTorch's int4/int8 kernels (the fused batch-1 kernels are off: LEANLM_KERNELS=0)")
        return False
    try:
        from torch.utils import cpp_extension

        from ..core.models import cache_dir

        key = build_key()
        out = cache_dir() / "kernels" / key
        out.mkdir(parents=True, exist_ok=True)
        so = out / f"leanlm_gemv_{key}.so"
        if not so.exists():
            _say(f"leanlm runtime: compiling the fused int4/int8 kernels once into {out} (about 30 s)")
        cpp_extension.load(name=f"leanlm_gemv_{key}", sources=[str(SRC)], build_directory=str(out),
                           extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"], is_python_module=False, verbose=verbose)
        _register_fakes()
        _state["ok"] = True
        if mode() == "q8":
            _state["path"] = f"{Q8_PATHS[int(torch.ops.leanlm.kernel_path())]}, int8 activations (LEANLM_KERNELS=q8)"
        else:
            _state["path"] = PATHS[int(torch.ops.leanlm.float_path())]
        _say(f"leanlm runtime: fused int4/int8 batch-1 kernels ({_state['path']})")
    except Exception as e:  # noqa: BLE001 - any build failure means the reference path, said once
        first = (str(e).strip().splitlines() or [type(e).__name__])[-1][:200]
        _state["why"] = first
        _say(f"leanlm runtime: cannot build the fused kernels ({first}); decoding with PyTorch's int4/int8 kernels "
             "(slower at batch 1). Install g++ and ninja (scripts/setup.sh) to get them.")
    return _state["ok"]


def mode() -> str:
    """``LEANLM_KERNELS``: unset or 1 -> "float" (the default), 0 -> "off", q8 -> "q8" (int8 activations, opt-in)."""
    v = os.environ.get("LEANLM_KERNELS", "1").strip().lower()
    if v in ("0", "off", "false", "no"):
        return "off"
    return "q8" if v == "q8" else "float"


# The float ops also take a few rows at once ([M, K] -> [M, N], each row exactly as a one-row call computes it, the
# weight read once for all rows): a speculative verification or a small decode batch runs them up to MAX_ROWS rows;
# more rows (a prefill) run PyTorch's GEMM kernels, faster there (bench/results/kernel_rows.md).
MAX_ROWS = 16


def few_rows(x: torch.Tensor, in_features: int) -> bool:
    """Whether `x` [..., in_features] holds 1..MAX_ROWS rows: what the fused float kernels take."""
    return 0 < x.numel() <= MAX_ROWS * in_features


def int4_op():
    """The batch-1 int4 operator of the current mode."""
    return torch.ops.leanlm.int4_gemv_q8 if mode() == "q8" else torch.ops.leanlm.int4_gemv


def int8_op():
    return torch.ops.leanlm.int8_gemv_q8 if mode() == "q8" else torch.ops.leanlm.int8_gemv


def available() -> bool:
    return load()


def loaded() -> bool:
    """Whether the kernels are loaded already (no build, no message): for helpers that use them only where the
    runtime runs."""
    return bool(_state.get("ok"))


def path() -> str:
    """'avx512-bf16', 'avx2', 'scalar' (float kernels), '... int8 activations (LEANLM_KERNELS=q8)', or 'reference (why)'."""
    return _state["path"] if load() else f"reference ({_state.get('why')})"


def _register_fakes() -> None:
    """Shapes for torch.compile (the ops are opaque to inductor, called from its generated code)."""
    if _state.get("fakes"):
        return

    def out(x, n):   # one row -> [n]; the float ops take M rows [M, K] -> [M, n]
        return x.new_empty(n) if x.numel() == x.shape[-1] else x.new_empty(x.numel() // x.shape[-1], n)

    for suffix in ("", "_q8"):   # the float and the int8-activation ops have the same shapes
        torch.library.register_fake(f"leanlm::int4_gemv{suffix}")(lambda x, w, sz, group, n: out(x, n))
        torch.library.register_fake(f"leanlm::int8_gemv{suffix}")(lambda x, w, scale: out(x, w.shape[0]))
    torch.library.register_fake("leanlm::f32_gemv")(lambda x, w: x.new_empty(w.shape[0]) if x.dim() == 1 else out(x, w.shape[0]))
    torch.library.register_fake("leanlm::paged_attention")(
        lambda q, k, v, ks, vs, tables, pos, block_size, window, scale: q.new_empty(q.shape[0], q.shape[1] * q.shape[2]))
    torch.library.register_fake("leanlm::argmax_rows")(lambda logits: logits.new_empty(logits.shape[0], dtype=torch.long))

    _state["fakes"] = True


def tile16(u: torch.Tensor) -> torch.Tensor:
    """Unsigned int4 codes [N, K] (N % 16 == 0, K % 8 == 0) -> the int4 kernel's layout uint8 [N/16, K*8]:
    per 16 rows and 8 k, 64 bytes; byte r*4+j = code (r, k0+j) | code (r, k0+4+j) << 4."""
    N, K = u.shape
    t = u.to(torch.uint8).reshape(N // 16, 16, K // 8, 2, 4).permute(0, 2, 1, 4, 3)  # nb, c, r, j, half
    return (t[..., 0] | (t[..., 1] << 4)).reshape(N // 16, K * 8).contiguous()


def tile8(codes: torch.Tensor) -> torch.Tensor:
    """int8 codes [N, K] (N % 16 == 0, K % 4 == 0) -> the int8 kernel's tile16 layout int8 [N/16, K/4, 64]: per 16 rows
    and 4 k, 64 bytes; byte j*16 + r = code (r, k0+j). One linear stream per thread, as the int4 layout."""
    N, K = codes.shape
    return codes.to(torch.int8).reshape(N // 16, 16, K // 4, 4).permute(0, 2, 3, 1).contiguous().reshape(N // 16, K // 4, 64)


def untile8(w: torch.Tensor) -> torch.Tensor:
    """Inverse of `tile8`: int8 [N, K] codes."""
    nb, c, _ = w.shape
    return w.reshape(nb, c, 4, 16).permute(0, 3, 1, 2).reshape(nb * 16, c * 4)


def untile16(w: torch.Tensor, N: int, K: int) -> torch.Tensor:
    """Inverse of `tile16`: uint8 [N, K] codes."""
    t = w.reshape(N // 16, K // 8, 16, 4)
    u = torch.stack([t & 15, t >> 4], dim=-1)  # nb, c, r, j, half
    return u.permute(0, 2, 1, 4, 3).reshape(N, K)
