"""The runtime's fused batch-1 GEMV kernels (csrc/gemv.cpp): int4 groups and int8 per channel, dequantized
in registers with int8 dot products (AVX-512 VNNI or AVX2, chosen at run time; a scalar loop elsewhere).

The C++ source is compiled on first use by `torch.utils.cpp_extension` (g++ and ninja) into
`cache_dir()/kernels/<key>`, the key hashing the source, the torch version and the CPU's flags, so a
process after the first loads the binary in well under a second (scripts/setup.sh builds it at install).
They are opt-in (`LEANLM_KERNELS=1`): their int8 activation rows change greedy tokens beyond ties on
SmolLM2-135M (docs/runtime.md). `available()` says whether they run; when they are off or cannot be built
(no compiler), the layouts call PyTorch's own int4/int8 kernels (the reference path) and one log
line says which path runs and why.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import torch

log = logging.getLogger("leanlm")
SRC = Path(__file__).parent / "csrc" / "gemv.cpp"
PATHS = {2: "avx512-vnni", 1: "avx2", 0: "scalar"}
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
    if os.environ.get("LEANLM_KERNELS", "0") != "1":
        # opt-in: on SmolLM2-135M the int8 activation rows changed a greedy token where the reference's top two
        # logits differed by 0.25 (not a tie; bench/results/decode_loaded.md), and no quiet end-to-end speed-up is measured yet
        _state["why"] = "opt-in: LEANLM_KERNELS=1"
        _say("leanlm runtime: PyTorch's int4/int8 kernels (the fused batch-1 kernels are opt-in: LEANLM_KERNELS=1)")
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
                           extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"], is_python_module=False, verbose=verbose)
        _register_fakes()
        _state["ok"] = True
        _state["path"] = PATHS[int(torch.ops.leanlm.kernel_path())]
        _say(f"leanlm runtime: fused int4/int8 batch-1 kernels ({_state['path']})")
    except Exception as e:  # noqa: BLE001 - any build failure means the reference path, said once
        first = (str(e).strip().splitlines() or [type(e).__name__])[-1][:200]
        _state["why"] = first
        _say(f"leanlm runtime: cannot build the fused kernels ({first}); decoding with PyTorch's int4/int8 kernels "
             "(slower at batch 1). Install g++ and ninja (scripts/setup.sh) to get them.")
    return _state["ok"]


def available() -> bool:
    return load()


def path() -> str:
    """'avx512-vnni', 'avx2', 'scalar', or 'reference (why)'."""
    return _state["path"] if load() else f"reference ({_state.get('why')})"


def _register_fakes() -> None:
    """Shapes for torch.compile (the ops are opaque to inductor, called from its generated code)."""
    if _state.get("fakes"):
        return

    @torch.library.register_fake("leanlm::int4_gemv")
    def _(x, w, sz, group, n):
        return x.new_empty(n)

    @torch.library.register_fake("leanlm::int8_gemv")
    def _(x, w, scale):
        return x.new_empty(w.shape[0])

    _state["fakes"] = True


def tile16(u: torch.Tensor) -> torch.Tensor:
    """Unsigned int4 codes [N, K] (N % 16 == 0, K % 8 == 0) -> the int4 kernel's layout uint8 [N/16, K*8]:
    per 16 rows and 8 k, 64 bytes; byte r*4+j = code (r, k0+j) | code (r, k0+4+j) << 4."""
    N, K = u.shape
    t = u.to(torch.uint8).reshape(N // 16, 16, K // 8, 2, 4).permute(0, 2, 1, 4, 3)  # nb, c, r, j, half
    return (t[..., 0] | (t[..., 1] << 4)).reshape(N // 16, K * 8).contiguous()


def untile16(w: torch.Tensor, N: int, K: int) -> torch.Tensor:
    """Inverse of `tile16`: uint8 [N, K] codes."""
    t = w.reshape(N // 16, K // 8, 16, 4)
    u = torch.stack([t & 15, t >> 4], dim=-1)  # nb, c, r, j, half
    return u.permute(0, 2, 1, 4, 3).reshape(N, K)
