"""One model state, one save and one load: every folder leanlm writes carries a manifest, ``leanlm.json``.

    leanlm.save(model, "out/", tokenizer=tok)      # weights + masks + leanlm.json, written atomically
    model, tok = leanlm.load("out/")               # quantizers, weight_mask buffers, layer map, step history

The manifest (format ``FORMAT``; schema in docs/recipes.md)::

    {"format": 1, "leanlm_version": "0.1.0",
     "source": {"model": "smollm2-135m", "sha256": "..."},     # hash of the source weight files' names and sizes
     "steps": [{"step": "sparsify", "config": {...}, "figures": {...}, "seconds": 12.3}, ...],
     "quantization": {...} | null,    # QuantConfig and every quantizer's state (quantization/serialize.py)
     "sparsity": {"masks": {linear: shape}, ...} | null,   # masks bit-packed in sparsity_masks.safetensors
     "prune": {...} | null,           # the pruned layer map (prune.prune's model.leanlm_prune)
     "draft": {...} | null,           # a draft model's training log (speculative.make_shallow_draft)
     "rotation": {...} | null}        # a folded Hadamard rotation and its online parts (quantization/rotate.py)

Format 2 added ``rotation``: a leanlm that reads format 1 would drop a rotated model's online Hadamard.

The state lives on the model as attributes: ``leanlm_quant``, ``weight_mask`` buffers, ``leanlm_prune``,
``leanlm_draft``, ``leanlm_rotation``, ``leanlm_source`` and ``leanlm_steps``. This module is the only one that knows every
technique's saved form; the core (leanlm.core) knows none of them.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .core.errors import LeanLMError
from .core.io import atomic_dir

MANIFEST = "leanlm.json"
FORMAT = 2
MASKS_FILE = "sparsity_masks.safetensors"
# Sidecars written by leanlm before the manifest; read only to load such folders.
OLD_SIDECARS = {"quantization": "leanlm_quant.json", "sparsity": "leanlm_sparsity.json", "prune": "leanlm_prune.json",
                "draft": "leanlm_draft.json"}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")


def _version() -> str:
    from . import __version__

    return __version__


def source_hash(spec: str | os.PathLike) -> str | None:
    """SHA-256 of the source's weight files' names and sizes: cheap (no weight is read), and it changes
    whenever a weight file is replaced by one of another size. None for in-memory models."""
    from .core.models import BUILTINS, builtin_gguf

    spec = str(spec)
    try:
        path = builtin_gguf(spec) if spec in BUILTINS else Path(spec).expanduser()
    except LeanLMError:
        return None
    files = [path] if path.is_file() else sorted(p for p in path.glob("*") if p.suffix in WEIGHT_SUFFIXES) if path.is_dir() else []
    if not files:
        return None
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.name}\0{f.stat().st_size}\n".encode())
    return h.hexdigest()


def steps_of(model: nn.Module) -> list[dict]:
    """The step history carried by `model` (a list it owns, appended to by the step runner)."""
    if getattr(model, "leanlm_steps", None) is None:
        model.leanlm_steps = []
    return model.leanlm_steps


def manifest_of(model: nn.Module, masks: dict | None = None) -> dict:
    """The manifest `save` writes for `model` (without the tensors)."""
    from .quantization.serialize import quant_tensors

    quant = quant_tensors(model)[1] if getattr(model, "leanlm_quant", None) is not None else None
    sparsity = None
    if masks:
        sparsity = {**(getattr(model, "leanlm_sparsity", None) or {}), "masks": masks}
    return {"format": FORMAT, "leanlm_version": _version(), "source": getattr(model, "leanlm_source", None),
            "steps": list(getattr(model, "leanlm_steps", None) or []), "quantization": quant, "sparsity": sparsity,
            "prune": getattr(model, "leanlm_prune", None), "draft": getattr(model, "leanlm_draft", None),
            "rotation": getattr(model, "leanlm_rotation", None)}


def save(model: nn.Module, out: str | os.PathLike, tokenizer: Any = None, overwrite: bool = False) -> Path:
    """Write `model` and all its leanlm state to the folder `out`, atomically (a temporary folder renamed).

    A quantized model is stored as codes and scales (quantization/serialize.py); any other model as an
    ordinary Hugging Face folder that transformers alone loads. Masks go bit-packed into
    ``sparsity_masks.safetensors``; everything else into the manifest ``leanlm.json``.
    """
    from safetensors.torch import save_file

    from .quantization.serialize import quant_tensors
    from .sparsity.masks import MASK, mask_tensors

    packed, shapes = mask_tensors(model)
    man = manifest_of(model, shapes)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        if getattr(model, "leanlm_quant", None) is not None:
            tensors, _ = quant_tensors(model)
            model.config.save_pretrained(tmp)
            gc = getattr(model, "generation_config", None)
            if gc is not None:
                gc.save_pretrained(tmp)
            save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "leanlm-quant"})
        else:
            state = {k: v for k, v in model.state_dict().items() if not k.endswith("." + MASK)}
            model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if packed:
            save_file(packed, str(tmp / MASKS_FILE), metadata={"format": "leanlm-sparsity-masks", "packing": "bits-lsb-first"})
        (tmp / MANIFEST).write_text(json.dumps(man, indent=1, default=str))
    return Path(out)


def is_leanlm_folder(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and any((p / f).is_file() for f in (MANIFEST, *OLD_SIDECARS.values()))


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except ValueError:
        raise LeanLMError(f"{path} is not valid JSON; the checkpoint is corrupt, re-save it") from None


def read_manifest(folder: str | os.PathLike) -> dict:
    """The folder's manifest; for a folder written before the manifest, one assembled from its sidecars.

    A manifest of a newer format than this leanlm reads is refused, naming the version that wrote it.
    """
    folder = Path(folder)
    if (folder / MANIFEST).is_file():
        man = _read_json(folder / MANIFEST)
        fmt = man.get("format")
        if not isinstance(fmt, int) or fmt < 1:
            raise LeanLMError(f"{folder / MANIFEST} has no valid manifest format number; the checkpoint is corrupt, re-save it")
        if fmt > FORMAT:
            raise LeanLMError(f"{folder} was written by leanlm {man.get('leanlm_version', '?')} (manifest format {fmt}); this leanlm "
                              f"{_version()} reads format {FORMAT} and older: upgrade leanlm to {man.get('leanlm_version', 'a newer version')} or later")
        return man
    man = {"format": 0, "leanlm_version": None, "source": None, "steps": [], "quantization": None, "sparsity": None,
           "prune": None, "draft": None}
    for key, name in OLD_SIDECARS.items():
        if (folder / name).is_file():
            man[key] = _read_json(folder / name)
    q = man["quantization"]
    if q is not None and q.get("format_version") != 1:
        raise LeanLMError(f"{folder} uses quantized format version {q.get('format_version')}; this leanlm reads version 1")
    if man["sparsity"] is not None:  # the old sidecar held the masks' shapes and the sparsify recipe side by side
        man["sparsity"].pop("format_version", None)
    if man["prune"] is not None and "distill" in man["prune"]:
        man["steps"].append({"step": "distill", "config": None, "figures": man["prune"].pop("distill")})
    return man


def load(model: str | os.PathLike | nn.Module, *, dtype: str | torch.dtype = "float32", tokenizer: Any = None,
         trust_remote_code: bool = False):
    """`(model, tokenizer)` with all leanlm state restored (see `leanlm.core.models.load` for what `model` may be).

    A folder written by leanlm (a manifest ``leanlm.json``, or the sidecars of older versions) comes back with
    its quantizers, ``weight_mask`` buffers, pruned layer map and step history.
    """
    from .core.models import BUILTINS, load as load_plain, load_tokenizer, resolve_dtype

    if isinstance(model, nn.Module) or str(model) in BUILTINS or not is_leanlm_folder(Path(str(model)).expanduser()):
        m, tok = load_plain(model, dtype=dtype, tokenizer=tokenizer, trust_remote_code=trust_remote_code)
        if not isinstance(model, nn.Module) and getattr(m, "leanlm_source", None) is None:
            m.leanlm_source = {"model": str(model), "sha256": source_hash(model)}
        return m, tok
    folder = Path(str(model)).expanduser()
    man = read_manifest(folder)
    if man["quantization"] is not None:
        from .quantization.serialize import load_quantized

        if isinstance(tokenizer, (str, os.PathLike)) or tokenizer is None:
            tokenizer = load_tokenizer(tokenizer or folder, trust_remote_code, required=tokenizer is not None)
        m = load_quantized(folder, man["quantization"], resolve_dtype(dtype), trust_remote_code)
    else:
        m, tokenizer = load_plain(folder, dtype=dtype, tokenizer=tokenizer, trust_remote_code=trust_remote_code)
    sp = man["sparsity"]
    if sp and sp.get("masks"):
        from safetensors.torch import load_file

        from .core.models import check_safetensors
        from .sparsity.masks import restore_masks

        if not (folder / MASKS_FILE).is_file():
            raise LeanLMError(f"{folder} lists sparsity masks but has no {MASKS_FILE}; the checkpoint is incomplete, re-save it")
        check_safetensors(folder / MASKS_FILE)
        restore_masks(m, load_file(str(folder / MASKS_FILE)), sp["masks"], where=str(folder))
        m.leanlm_sparsity = {k: v for k, v in sp.items() if k != "masks"}
    if man.get("rotation"):
        from .quantization.rotate import attach_online

        attach_online(m, man["rotation"])
    for key, attr in (("prune", "leanlm_prune"), ("draft", "leanlm_draft")):
        if man.get(key) is not None:
            setattr(m, attr, man[key])
    m.leanlm_source = man.get("source") or {"model": str(folder), "sha256": source_hash(folder)}
    m.leanlm_steps = list(man.get("steps") or [])
    return m.eval(), tokenizer


