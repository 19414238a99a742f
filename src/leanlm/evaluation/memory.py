"""Memory, size on disk and money."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..core.offload import peak_rss_bytes  # noqa: F401  (one measure of peak memory, re-exported)


def current_rss_bytes() -> int:
    import psutil

    return psutil.Process(os.getpid()).memory_info().rss


def tensor_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters and buffers in memory, each storage counted once (tied weights)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.untyped_storage().data_ptr(), t.device)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def checkpoint_bytes(path: str | os.PathLike) -> int:
    """Bytes on disk of a checkpoint file or of every file in a checkpoint folder."""
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def model_folder(model: torch.nn.Module) -> Path | None:
    """The folder a transformers model was loaded from, if any."""
    name = getattr(getattr(model, "config", None), "_name_or_path", None) or getattr(model, "name_or_path", None)
    if name and Path(name).is_dir():
        return Path(name)
    return None


def cost_per_million_tokens(tokens_per_s: float, price_per_hour: float) -> float:
    """Dollars per 1M generated tokens on a machine billed at `price_per_hour`."""
    return price_per_hour / 3600.0 / tokens_per_s * 1e6
