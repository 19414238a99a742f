"""The serving engine's decode attention, one layer, side by side: the in-place paged kernel
(`torch.ops.leanlm.paged_attention`, float32 and int8 blocks) against the gather + batched-matmul path it
replaced. SmolLM2-135M's attention shape (3 KV heads of 3 queries, head dim 64), 16 sequences of 150-260
tokens in randomly placed 16-token blocks. Writes bench/results/NAME.md/json.

    python bench/paged_attention.py [--runs 300] [--name paged_attention]
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from common import md_table, write_results


def timed(f, runs: int) -> float:
    for _ in range(20):
        f()
    t0 = time.perf_counter()
    for _ in range(runs):
        f()
    return (time.perf_counter() - t0) / runs * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=300)
    ap.add_argument("--name", default="paged_attention")
    a = ap.parse_args()
    from leanlm.runtime import kernels

    if not kernels.load():
        raise SystemExit(f"the C++ kernels are not built: {kernels.path()}")
    torch.manual_seed(0)
    Hkv, g, D, bs, blocks, S = 3, 3, 64, 16, 1000, 16
    k, v = torch.randn(Hkv, blocks * bs, D), torch.randn(Hkv, blocks * bs, D)
    k8, v8 = (k * 20).round().clamp(-127, 127).to(torch.int8), (v * 20).round().clamp(-127, 127).to(torch.int8)
    ks, vs = torch.rand(Hkv, blocks * bs), torch.rand(Hkv, blocks * bs)
    pos = torch.randint(150, 260, (S,))
    nb = int(pos.max()) // bs + 1
    tables = torch.randperm(blocks)[: S * nb].view(S, nb).contiguous()
    q = torch.randn(S, Hkv * g, D)
    flat = tables.reshape(-1)

    def gather():   # the replaced path: every context copied out, then batched matmuls
        K = k.view(Hkv, blocks, bs, D).index_select(1, flat).view(Hkv * S, nb * bs, D)
        V = v.view(Hkv, blocks, bs, D).index_select(1, flat).view(Hkv * S, nb * bs, D)
        q3 = q.view(S, Hkv, g, D).transpose(0, 1).reshape(Hkv * S, g, D)
        return torch.bmm(torch.bmm(q3, K.transpose(1, 2)).softmax(-1), V)

    rows = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        f32 = timed(lambda: torch.ops.leanlm.paged_attention(q, k, v, None, None, tables, pos, bs, 0, 0.125), a.runs)
        i8 = timed(lambda: torch.ops.leanlm.paged_attention(q, k8, v8, ks, vs, tables, pos, bs, 0, 0.125), a.runs)
        ref = timed(gather, a.runs)
        rows.append([threads, f"{f32:.0f}", f"{i8:.0f}", f"{ref:.0f}", f"{ref / f32:.2f}x"])
        print(rows[-1], flush=True)
    md = (f"# Decode attention of a continuous batch, one layer\n\nMachine: {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}. 16 sequences of 150-260 tokens, 3 KV heads x 3 queries, head dim 64, 16-token blocks; "
          f"microseconds per call, mean of {a.runs} after 20 warm-up calls (the gather path without masks or int8 dequantization).\n\n"
          + md_table(["threads", "in place, float32 us", "in place, int8 us", "gather + bmm us", "gather / in place"], rows))
    write_results(a.name, {"rows": rows, "runs": a.runs}, md)


if __name__ == "__main__":
    main()
