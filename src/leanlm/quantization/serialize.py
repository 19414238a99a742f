"""The quantized part of a saved model: safetensors with real codes and scales (`leanlm.state` writes
the folder and its manifest, leanlm.json, whose ``quantization`` entry this module fills and reads).

    model.safetensors                   float tensors as they are; each quantized weight replaced by
                                        <name>.weight.codes (packed), .scale, and .zero / .global_scale
                                        where the format has them; static activation ranges as <quantizer>.amax
    leanlm.json "quantization"          the QuantConfig, every quantizer's format and state, the packing

Codes are packed as the format table says (`formats.pack_codes`): 8-bit ints as int8/uint8; ints of
4 bits or fewer, NF4 indices and E2M1 (NVFP4/MXFP4) values as two 4-bit codes per byte; FP8 and
MXFP8 elements as float8 tensors.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from ..core.errors import LeanLMError
from .config import QuantizerConfig
from .formats import QParams, dequantize, pack_codes, parse_format, quantize, unpack_codes
from .modules import insert_quantizers, quantizers



def quant_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors (codes, scales, float tensors) and the quantization state of a quantized model,
    as `leanlm.state.save` writes them (``weight_mask`` buffers are left to the sparsity state)."""
    meta = getattr(model, "leanlm_quant", None)
    if meta is None:
        raise LeanLMError("this model was not quantized by leanlm.quantize; nothing to save as a quantized checkpoint")
    state = {"config": meta["config"], "calib_seconds": meta.get("calib_seconds"), "quantizers": {}}
    if meta.get("qat"):  # how quantization-aware training continued from the calibration (leanlm.qat)
        state["qat"] = meta["qat"]
    tensors, state["quantizers"] = module_tensors(model)
    return tensors, state


def module_tensors(model: nn.Module, prefix: str = "") -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors and the quantizer entries of `model` (or of one decoder block, its names given `prefix`)."""
    qs = quantizers(model)
    mods = dict(model.named_modules())
    tensors: dict[str, torch.Tensor] = {}
    state = {"quantizers": {}}
    replaced = set()
    for name, q in qs.items():
        if not q.enabled:
            continue
        entry = {"config": vars(q.cfg).copy(), "folded": q.folded}
        if q.folded:
            owner = name[: -len(".weight_quantizer")]
            w = mods[owner].weight.detach().float().cpu()
            qp = QParams(*(t.cpu() if t is not None else None for t in (q.qparams.scale, q.qparams.zero, q.qparams.global_scale)))
            stored, packing = pack_codes(quantize(w, q.fmt, qp), q.fmt)
            tensors[f"{owner}.weight.codes"] = stored
            tensors[f"{owner}.weight.scale"] = qp.scale.contiguous()
            if qp.zero is not None:
                tensors[f"{owner}.weight.zero"] = qp.zero.contiguous()
            if qp.global_scale is not None:
                tensors[f"{owner}.weight.global_scale"] = qp.global_scale.reshape(1).contiguous()
            entry.update(packing=packing, shape=list(w.shape), dtype=str(mods[owner].weight.dtype).replace("torch.", ""))
            replaced.add(f"{owner}.weight")
        elif q.amax is not None:
            tensors[f"{name}.amax"] = q.amax.detach().float().cpu().reshape(1)
        state["quantizers"][name] = entry
    seen = set()
    for k, v in model.state_dict().items():
        if (k in replaced or ".weight_quantizer." in k or ".input_quantizer." in k or k.endswith(("k_quantizer.amax", "v_quantizer.amax"))
                or k.endswith(".weight_mask")):
            continue
        ptr = v.untyped_storage().data_ptr()
        if ptr in seen:  # a tied weight: saved once, re-tied on load
            continue
        seen.add(ptr)
        tensors[k] = v.detach().cpu().contiguous()
    if prefix:
        tensors = {prefix + k: v for k, v in tensors.items()}
        state["quantizers"] = {prefix + k: v for k, v in state["quantizers"].items()}
    return tensors, state["quantizers"]


def weight_files(folder: Path) -> list[Path]:
    """model.safetensors, or the shards named by model.safetensors.index.json (each checked complete)."""
    import json

    from ..core.models import check_safetensors

    index = folder / "model.safetensors.index.json"
    if (folder / "model.safetensors").is_file() or not index.is_file():
        files = [folder / "model.safetensors"]
    else:
        files = [folder / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    for f in files:
        if not f.is_file():
            raise LeanLMError(f"{f} is missing; the checkpoint is incomplete, copy or re-save it")
        check_safetensors(f)
    return files


@torch.no_grad()
def load_quantized(folder: str | Path, recipe: dict, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False) -> nn.Module:
    """Rebuild a quantized model from `folder`'s model.safetensors and its quantization state `recipe`
    (the manifest's ``quantization`` entry): same classes, quantizers and exactly the same weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    files = weight_files(folder)
    config = AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    resolved = {n: QuantizerConfig(**e["config"]) for n, e in recipe["quantizers"].items()}
    insert_quantizers(model, resolved)
    tensors = {}
    for f in files:   # one file, or the shards an offloaded calibration wrote (core/offload.py)
        tensors.update(load_file(str(f)))
    plain = {k: v for k, v in tensors.items() if not k.endswith((".codes", ".weight.scale", ".weight.zero", ".weight.global_scale", ".amax"))}
    mods = dict(model.named_modules())
    for k in [k for k in plain if k.endswith(".weight_mask")]:  # masks as folders of leanlm 0.1 stored them
        owner = k[: -len(".weight_mask")]
        if owner in mods:
            mods[owner].register_buffer("weight_mask", plain.pop(k).bool(), persistent=True)
    missing, unexpected = model.load_state_dict(plain, strict=False)
    if unexpected:
        raise LeanLMError(f"{folder}: unexpected tensors {unexpected[:3]}; the checkpoint does not match its config")
    qs = quantizers(model)
    for name, e in recipe["quantizers"].items():
        q = qs[name]
        if e["folded"]:
            owner = name[: -len(".weight_quantizer")]
            fmt = parse_format(e["config"]["format"])
            qp = QParams(tensors[f"{owner}.weight.scale"], tensors.get(f"{owner}.weight.zero"),
                         tensors[f"{owner}.weight.global_scale"].reshape(()) if f"{owner}.weight.global_scale" in tensors else None)
            codes = unpack_codes(tensors[f"{owner}.weight.codes"], e["packing"], fmt, e["shape"])
            mods[owner].weight.data.copy_(dequantize(codes, fmt, qp).to(dtype))
            q.qparams, q.folded = qp, True
        elif f"{name}.amax" in tensors:
            q.amax = tensors[f"{name}.amax"].reshape(())
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    model.leanlm_quant = {"config": recipe["config"], "calib_seconds": recipe.get("calib_seconds")}
    if recipe.get("qat"):
        model.leanlm_quant["qat"] = recipe["qat"]
    return model.eval()
