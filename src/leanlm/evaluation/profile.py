"""Roofline profile of batch-1 decode: is it memory-, compute- or overhead-bound on this machine?

Measures the machine's memory read bandwidth (a streaming reduction over a buffer far larger than
the caches) and its matmul FLOP/s, counts the bytes a decode step must read (weights + KV cache)
and the FLOPs it must do, and compares the two limits with a measured decode speed.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..core.arch import arch_of


def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__}


def _median_time(fn, runs: int) -> float:
    fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure_bandwidth(mbytes: int = 512, runs: int = 7) -> float:
    """Memory read bandwidth in bytes/s: median time of summing a `mbytes` float32 buffer."""
    x = torch.ones(mbytes * (1 << 20) // 4, dtype=torch.float32)
    return x.numel() * 4 / _median_time(lambda: x.sum(), runs)


def measure_matmul_flops(n: int = 2048, dtype: torch.dtype = torch.float32, runs: int = 5) -> float:
    """Dense matmul FLOP/s for an n x n x n product in `dtype`."""
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    return 2 * n**3 / _median_time(lambda: a @ b, runs)


def decode_costs(model: nn.Module, context: int) -> dict:
    """Bytes read and FLOPs done by one batch-1 decode step at `context` tokens of KV cache.

    Weights: every parameter and buffer is read once per token, except embedding tables that are
    only looked up (one row); a table tied to the output head is read whole by the head.
    """
    arch = arch_of(model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_ptr = head.weight.data_ptr() if head is not None else None
    lookup_only = {
        m.weight.data_ptr(): m.weight.shape[-1] * m.weight.element_size()
        for m in model.modules() if isinstance(m, nn.Embedding) and m.weight.data_ptr() != head_ptr
    }
    seen, weight_bytes = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        ptr = t.data_ptr()
        if ptr in seen:
            continue
        seen.add(ptr)
        weight_bytes += lookup_only.get(ptr, t.numel() * t.element_size())
    matmul_params = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    kv_elem = next(model.parameters()).element_size()
    attended = sum(min(context, w) if w else context for w in arch.windows)   # sliding layers read their window only
    kv_bytes = 2 * arch.kv_heads * arch.head_dim * attended * kv_elem
    attn_flops = 4 * arch.heads * arch.head_dim * attended  # q.k and p.v
    return {
        "weight_bytes": weight_bytes,
        "kv_bytes": kv_bytes,
        "bytes_per_token": weight_bytes + kv_bytes,
        "flops_per_token": 2 * matmul_params + attn_flops,
        "context": context,
    }


@dataclass
class RooflineReport:
    machine: dict
    bandwidth_gbs: float
    matmul_gflops: float
    dtype: str
    weight_bytes: int
    kv_bytes: int
    bytes_per_token: int
    flops_per_token: int
    arithmetic_intensity: float   # FLOPs per byte of one decode step
    machine_balance: float        # FLOPs per byte the machine can sustain
    memory_limit_tps: float       # tokens/s if bound by reading bytes_per_token
    compute_limit_tps: float      # tokens/s if bound by the matmul FLOP/s
    roofline_tps: float           # min of the two
    roofline_bound: str           # "memory" or "compute"
    measured_decode_tps: float | None
    fraction_of_bandwidth_limit: float | None
    verdict: str

    def to_dict(self) -> dict:
        return asdict(self)


def roofline(model: nn.Module, measured_decode_tps: float | None, context: int = 192, bandwidth: float | None = None, flops: float | None = None) -> RooflineReport:
    """Compare batch-1 decode with this machine's roofline.

    `context` defaults to the mean KV length of the protocol run (128 prompt + 128 new tokens).
    Decode is called overhead-bound when it reaches under half of the roofline limit: most of each
    step's time then goes neither to moving bytes nor to arithmetic but to framework overhead.
    """
    dtype = next(model.parameters()).dtype
    bw = bandwidth or measure_bandwidth()
    fl = flops or measure_matmul_flops(dtype=dtype if dtype in (torch.float32, torch.bfloat16) else torch.float32)
    c = decode_costs(model, context)
    mem_tps = bw / c["bytes_per_token"]
    comp_tps = fl / c["flops_per_token"]
    bound = "memory" if mem_tps <= comp_tps else "compute"
    limit = min(mem_tps, comp_tps)
    frac = measured_decode_tps / mem_tps if measured_decode_tps else None
    if measured_decode_tps is None:
        verdict = f"{bound}-bound by the roofline (not measured)"
    elif measured_decode_tps >= 0.5 * limit:
        verdict = f"{bound}-bound: decode reaches {measured_decode_tps / limit:.0%} of the {bound} limit"
    else:
        verdict = (
            f"overhead-bound: decode reaches only {measured_decode_tps / limit:.0%} of the {bound} limit "
            f"({limit:.0f} tok/s); about {1 - measured_decode_tps / limit:.0%} of each step is framework overhead"
        )
    return RooflineReport(
        machine=machine_info(), bandwidth_gbs=bw / 1e9, matmul_gflops=fl / 1e9, dtype=str(dtype).replace("torch.", ""),
        weight_bytes=c["weight_bytes"], kv_bytes=c["kv_bytes"], bytes_per_token=c["bytes_per_token"],
        flops_per_token=c["flops_per_token"], arithmetic_intensity=c["flops_per_token"] / c["bytes_per_token"],
        machine_balance=fl / bw, memory_limit_tps=mem_tps, compute_limit_tps=comp_tps, roofline_tps=limit,
        roofline_bound=bound, measured_decode_tps=measured_decode_tps, fraction_of_bandwidth_limit=frac, verdict=verdict,
    )
