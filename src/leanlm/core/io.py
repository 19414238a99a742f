"""Atomic writes: outputs go to a temporary sibling and are renamed into place."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import LeanLMError

MIN_FREE_BYTES = 16 << 20   # refuse to start writing with less free space than this


def check_output(target: str | os.PathLike, overwrite: bool = False, option: str = "--out") -> None:
    """Raise LeanLMError unless `target` can be written: it exists only when `overwrite`, and its nearest
    existing parent is a writable folder with some free space. Creates nothing; cheap, so commands call
    it before loading a model and the atomic writers call it again."""
    target = Path(target).expanduser()
    if target.exists() and not overwrite:
        raise LeanLMError(f"output {target} already exists; choose another {option} or pass --overwrite")
    parent = target.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise LeanLMError(f"cannot write {target}: {parent} is a file, not a folder; choose another {option}")
    try:  # a probe file: os.access says yes to root on a read-only mount
        fd, probe = tempfile.mkstemp(prefix=".leanlm-probe.", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise LeanLMError(f"cannot write {target}: folder {parent} is not writable ({e.strerror}); choose another {option}") from None
    free = shutil.disk_usage(parent).free
    if free < MIN_FREE_BYTES:
        raise LeanLMError(f"cannot write {target}: only {free / 1e6:.1f} MB free in {parent}; free some space or choose another {option}")


def _readable(path: Path) -> None:
    """Give `path` (a file, or every file in a folder) the mode a plain new file gets under the umask:
    temporary files (mkstemp) and some writers (safetensors) make them private (0600)."""
    umask = os.umask(0)
    os.umask(umask)
    for f in [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]:
        os.chmod(f, 0o666 & ~umask)


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside `target`; on success rename it to `target`.

    On any exception (including KeyboardInterrupt) the temporary directory is removed, so a
    half-written output never appears under the final name.
    """
    target = Path(target)
    check_output(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the final output should not be
        yield tmp
        _readable(tmp)
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(target: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary file path beside `target`; on success rename it to `target`."""
    target = Path(target)
    check_output(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        _readable(tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
