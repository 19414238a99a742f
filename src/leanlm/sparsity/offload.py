"""`sparsify_offloaded`: Wanda or SparseGPT on a checkpoint too large for RAM, one block at a time.

The same SparsityConfig, calibration rows and registered step (``prune_step``) as `sparsify_`, run on a
meta-device skeleton through the core's offloaded engine (``leanlm.core.offload``). Each finished block
is written as its own shard of an ordinary Hugging Face folder (dense weights holding exact zeros), its
masks bit-packed into ``sparsity_masks.safetensors`` at the end; bit-identical to `sparsify_` followed
by `leanlm.save`.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn

from ..core import offload as off
from ..core.calibrate import calibrate_blocks
from ..core.errors import LeanLMError
from ..quantization.offload import calibration_ids, finish_folder, manifest
from .api import _check, _Pruner, candidates
from .config import SparsityConfig
from .masks import MASK, MASKS_FILE, mask_tensors, overall_sparsity


def _write(i: int, layer: nn.Module, prefix: str):
    tensors = {prefix + k: v for k, v in layer.state_dict().items() if not k.endswith("." + MASK)}
    packed, shapes = mask_tensors(layer)
    o = overall_sparsity(layer)
    counts = {"masked_params": o["masked_params"], "masked_zeros": round(o["masked_zero_fraction"] * o["masked_params"]),
              "linear_params": o["linear_params"], "linear_zeros": round(o["linear_zero_fraction"] * o["linear_params"])}
    return ({"model": tensors, "masks": {prefix + k: v for k, v in packed.items()}},
            {"masks": {prefix + k: v for k, v in shapes.items()}, "counts": counts})


@torch.no_grad()
def sparsify_offloaded(model: str, config: SparsityConfig, out: str | Path, *, max_memory: str | int, calibration_ids_=None,
                       tokenizer=None, progress: bool = True, overwrite: bool = False, trust_remote_code: bool = False,
                       history: list[dict] | None = None, step: dict | None = None) -> dict:
    """Sparsify the checkpoint `model` (a safetensors folder, a .gguf file or a built-in name) into the folder
    `out` within `max_memory` bytes ('2GB'), never holding more than one float decoder block. Wanda and
    SparseGPT only (they run on the block-by-block engine). Budget check, resume and figures as
    `leanlm.quantization.offload.quantize_offloaded`."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    if not config.needs_data:
        raise LeanLMError(f"--max-memory runs the calibrated methods (wanda, sparsegpt) block by block, not {config.method}; "
                          "use --method wanda or sparsegpt, or drop --max-memory")
    out = Path(out).expanduser()
    budget = off.parse_bytes(max_memory)
    off.check_output(out, overwrite)
    source = off.WeightSource(model, trust_remote_code)
    sk = off.skeleton(source, trust_remote_code)
    mods = candidates(sk)
    targets = config.resolve(list(mods))
    if not targets:
        raise LeanLMError("the config's rules leave every Linear dense; nothing to sparsify")
    _check(sk, targets, mods)
    ids = calibration_ids(True, calibration_ids_, tokenizer, config.calib_samples, config.calib_seq_len, config.method)
    off.release_memory()
    est = off.estimate(sk, source, ids.shape[0], ids.shape[1], config.one_pass_max_gib)
    off.check_budget(est, budget)
    key = off.run_key("sparsify", config.to_dict(), str(model), ids)
    run = off.BlockOffload(sk, source, off.work_dir(out), _write, key)
    stats: dict = {}
    pruner = _Pruner(config, targets, {id(m): n for n, m in mods.items()}, stats)
    t0 = time.perf_counter()
    calibrate_blocks(sk, ids, [(config.method, pruner)], batch=config.calib_batch, progress=progress,
                     desc=f"{config.method} pruning", offload=run)
    secs = time.perf_counter() - t0
    with off.without_layers(sk):
        seen, rest = set(), {}
        for k, v in sk.state_dict().items():
            if v.untyped_storage().data_ptr() not in seen:   # a tied head: saved once, as transformers does
                seen.add(v.untyped_storage().data_ptr())
                rest[k] = v.detach().contiguous()
        o = overall_sparsity(sk)
    blocks = run.blocks_meta()
    shapes = {k: v for b in blocks for k, v in b["masks"].items()}
    c = {k: sum(b["counts"][k] for b in blocks) for k in blocks[0]["counts"]}
    c["linear_params"] += o["linear_params"]
    c["linear_zeros"] += round(o["linear_zero_fraction"] * o["linear_params"])
    overall = {"masked_params": c["masked_params"], "masked_zero_fraction": c["masked_zeros"] / max(c["masked_params"], 1),
               "linear_params": c["linear_params"], "linear_zero_fraction": c["linear_zeros"] / max(c["linear_params"], 1)}
    tg = {n: str(t) for n, t in targets.items()}
    sparsity = {"config": config.to_dict(), "calib_seconds": secs, "targets": tg, "masks": shapes}
    figures = {"pattern": str(config.default), "seconds": secs, "overall": overall, "max_memory_bytes": budget,
               "estimated_bytes": est.total, "peak_rss_bytes": off.peak_rss_bytes(), "blocks_resumed": run.resumed, "offloaded": True,
               "masked_linears": len(shapes)}
    steps = list(history or []) + ([{**step, "figures": figures, "seconds": secs}] if step else [])

    def masks(folder: Path) -> None:   # bit-packed masks: 1/32 of the float weights, gathered into one file
        packed = {}
        for f in run.kind_files("masks"):
            with safe_open(str(f), framework="pt") as h:
                packed.update({k: h.get_tensor(k) for k in h.keys()})
        save_file(packed, str(folder / MASKS_FILE), metadata={"format": "leanlm-sparsity-masks", "packing": "bits-lsb-first"})

    finish_folder(run, sk, rest, tokenizer, manifest(str(model), steps, sparsity=sparsity), out, overwrite, extra=masks)
    figures["peak_rss_bytes"] = off.peak_rss_bytes()
    return figures
