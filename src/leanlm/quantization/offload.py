"""`quantize_offloaded`: post-training quantization of a checkpoint too large for RAM, one block at a time.

The same QuantConfig, calibration rows and registered steps as `leanlm.quantize`, run on a meta-device
skeleton through the core's offloaded engine (``leanlm.core.offload``); each finished block is written
as its own shard in leanlm's quantized format (codes and scales; ``leanlm.load`` and every exporter
read it), bit-identical to `quantize` followed by `leanlm.save`.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch
from torch import nn

from ..core import offload as off
from ..core.data import calibration_batches
from ..core.errors import LeanLMError
from ..core.modules import decoder_layers
from .api import _check_shapes
from .calibrate import calibrate, needs_data
from .config import GPTQ, QuantConfig
from .modules import TensorQuantizer, insert_quantizers, quantizer_names, quantizers
from .serialize import module_tensors


def _writer(layer_quantizers):
    def write(i: int, layer: nn.Module, prefix: str):
        tensors, entries = module_tensors(layer, prefix)
        for q in layer_quantizers(layer):
            q.qparams = None   # the block's scales are written; keep nothing of it in memory
        return {"model": tensors}, {"quantizers": entries}
    return write


def manifest(spec: str, steps: list[dict], quantization: dict | None = None, sparsity: dict | None = None) -> dict:
    """The manifest of an offloaded run's folder (the keys `leanlm.state.manifest_of` writes)."""
    from ..state import FORMAT, _version, source_hash

    return {"format": FORMAT, "leanlm_version": _version(), "source": {"model": spec, "sha256": source_hash(spec)},
            "steps": steps, "quantization": quantization, "sparsity": sparsity, "prune": None, "draft": None}


def finish_folder(run: off.BlockOffload, model: nn.Module, rest: dict, tokenizer, man: dict, out: Path, overwrite: bool,
                  extra=None) -> None:
    """Assemble the finished run's folder beside `out` and rename it into place; `extra(folder)` adds files."""
    folder = run.work / "out"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    off.write_folder(run, rest, folder)
    model.config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    if extra is not None:
        extra(folder)
    (folder / "leanlm.json").write_text(json.dumps(man, indent=1, default=str))
    off.publish(folder, out, overwrite)
    shutil.rmtree(run.work, ignore_errors=True)


def calibration_ids(config_needs: bool, calib_data, tokenizer, samples: int, seq_len: int, what: str) -> torch.Tensor:
    if calib_data is None:
        if not config_needs:
            return torch.zeros((1, 8), dtype=torch.long)   # data-free algorithms: one short row only drives the block loop
        if tokenizer is None:
            raise LeanLMError(f"{what} needs calibration data: pass calib_data= (token ids) or tokenizer=")
        calib_data = calibration_batches(tokenizer, samples, seq_len)
    if not isinstance(calib_data, torch.Tensor) or calib_data.dim() != 2 or calib_data.dtype != torch.long:
        raise LeanLMError(f"calib_data must be a 2-D LongTensor of token ids [N, L], got {tuple(getattr(calib_data, 'shape', ()))}")
    return calib_data


@torch.no_grad()
def quantize_offloaded(model: str, config: QuantConfig, out: str | Path, *, max_memory: str | int, calib_data=None, tokenizer=None,
                       progress: bool = True, overwrite: bool = False, trust_remote_code: bool = False,
                       history: list[dict] | None = None, step: dict | None = None) -> dict:
    """Quantize the checkpoint `model` (a safetensors folder, a .gguf file or a built-in name) into the folder
    `out` within `max_memory` bytes ('2GB'), never holding more than one float decoder block.

    The budget is checked before any work; a run interrupted after some blocks resumes from the last finished
    one when started again with the same arguments. `history`/`step`: the manifest's earlier steps and this
    step's ``{"step", "config"}`` record. Returns the figures (calib_seconds, average_bits, peak_rss_bytes, ...).
    """
    from ..state import is_leanlm_folder, read_manifest

    out = Path(out).expanduser()
    budget = off.parse_bytes(max_memory)
    off.check_output(out, overwrite)
    if is_leanlm_folder(model) and read_manifest(model).get("quantization"):
        raise LeanLMError("this model is already quantized; load the original float model to quantize it again")
    source = off.WeightSource(model, trust_remote_code)
    sk = off.skeleton(source, trust_remote_code)
    resolved = config.resolve(quantizer_names(sk))
    if not resolved:
        raise LeanLMError("the config's rules enable no quantizer; nothing to do")
    _check_shapes(sk, resolved)
    prefix = off.arch_of(sk).layers_prefix()
    outside_static = [n for n, qc in resolved.items() if not n.endswith(".weight_quantizer") and not qc.dynamic
                      and not n.startswith(prefix)]
    if outside_static:
        raise LeanLMError(f"{outside_static[0]}: a static activation range outside the decoder layers needs the whole model "
                          "in memory; make it dynamic or quantize without --max-memory")
    ids = calibration_ids(needs_data(resolved, config), calib_data, tokenizer, config.calib_samples, config.calib_seq_len, "this config")
    off.release_memory()
    gptq = next((a for a in config.algorithms if isinstance(a, GPTQ)), None)
    est = off.estimate(sk, source, ids.shape[0], ids.shape[1], gptq.one_pass_max_gib if gptq and gptq.one_pass else None)
    off.check_budget(est, budget)
    insert_quantizers(sk, resolved)
    from .api import average_bits

    bits = average_bits(sk)
    key = off.run_key("quantize", config.to_dict(), str(model), ids)
    run = off.BlockOffload(sk, source, off.work_dir(out), _writer(lambda layer: quantizers(layer).values()), key,
                           metadata={"format": "leanlm-quant"})
    layers = decoder_layers(sk)
    for i in range(run.done):   # finished by an interrupted run: nothing left to calibrate there
        for q in layers[i].modules():
            if isinstance(q, TensorQuantizer):
                q.fmt = None
    t0 = time.perf_counter()
    sk.eval()
    calibrate(sk, config, ids, progress=progress, offload=run)
    secs = time.perf_counter() - t0
    sk.leanlm_quant = {"config": config.to_dict(), "calib_seconds": secs}
    with off.without_layers(sk):
        rest, rest_entries = module_tensors(sk)
    entries = {}
    for b in run.blocks_meta():
        entries.update(b["quantizers"])
    entries.update(rest_entries)
    state = {"config": config.to_dict(), "calib_seconds": secs, "quantizers": entries}
    figures = {"calib_seconds": secs, "average_bits": bits, "max_memory_bytes": budget, "estimated_bytes": est.total,
               "peak_rss_bytes": off.peak_rss_bytes(), "blocks_resumed": run.resumed, "offloaded": True}
    steps = list(history or []) + ([{**step, "figures": figures, "seconds": secs}] if step else [])
    finish_folder(run, sk, rest, tokenizer, manifest(str(model), steps, quantization=state), out, overwrite)
    figures["peak_rss_bytes"] = off.peak_rss_bytes()
    return figures
