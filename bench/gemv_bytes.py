"""Read rate of the runtime's fused batch-1 GEMVs by matrix size and layout: does a one-row int8 or int4 matmul run at
the machine's memory bandwidth, or is it held by its arithmetic or its access pattern? Matrices that fit in the last-level cache against ones
that do not (Gemma-3-270M's 262,144 x 640 output head is 168 MB in int8), next to the bandwidth `bench/decode.py`
measures (a float32 sum over 512 MB) and to the same sum with one thread. Each figure is the median of `--repeats`
one-row calls after a warm-up, the rows of the table interleaved.

    python bench/gemv_bytes.py [--repeats 20] [--name gemv_bytes]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from common import md_table, setup_threads, write_results

from leanlm.evaluation.profile import machine_info, measure_bandwidth
from leanlm.runtime import kernels
from leanlm.runtime.layouts import pack_weight

# (format, out_features, in_features): in cache / out of cache, int8 and int4 of the same bytes; "int8 row-major" is
# the int8 kernel on the row-major codes (what ran before the tiled copy, and what untileable shapes run)
SHAPES = [("int8", 16384, 640), ("int4", 32768, 640), ("int8", 65536, 640), ("int8", 262144, 640),
          ("int8 row-major", 262144, 640), ("int4", 262144, 640), ("int4", 524288, 640), ("int8", 49152, 576),
          ("int8 row-major", 49152, 576)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--name", default="gemv_bytes")
    a = ap.parse_args()
    setup_threads()
    if not kernels.load():
        raise SystemExit(f"the fused kernels are not built here: {kernels.path()}")
    mats = []
    for fmt, n, k in SHAPES:
        w = pack_weight(torch.randn(n, k, generator=torch.Generator().manual_seed(0)), fmt.split()[0], torch.bfloat16, 64, False)
        if fmt == "int8 row-major":
            w.tiled = None
        mats.append((fmt, n, k, w, n * k if fmt.startswith("int8") else n * k // 2))
    x = torch.randn(1, 640).to(torch.bfloat16)
    x576 = torch.randn(1, 576).to(torch.bfloat16)
    times = {i: [] for i in range(len(mats))}
    load = [os.getloadavg()[0]]
    with torch.inference_mode():
        for r in range(a.repeats + 2):
            for i, (fmt, n, k, w, _) in enumerate(mats):
                t0 = time.perf_counter()
                w(x if k == 640 else x576)
                if r >= 2:
                    times[i].append(time.perf_counter() - t0)
    load.append(os.getloadavg()[0])
    bw2 = measure_bandwidth()
    torch.set_num_threads(1)
    bw1 = measure_bandwidth()
    setup_threads()
    rows = []
    for i, (fmt, n, k, w, nbytes) in enumerate(mats):
        med = statistics.median(times[i])
        rows.append([fmt, f"{n} x {k}", f"{nbytes / 2**20:.1f}", f"{med * 1e3:.3f}", f"{nbytes / med / 1e9:.1f}"])
    mi = machine_info()
    md = (f"# Fused one-row GEMVs: read rate by matrix size\n\n"
          f"Machine: {mi.get('cpu', '?')}, {torch.get_num_threads()} torch threads, kernel path {kernels.path()}, torch "
          f"{torch.__version__}; 1-minute load average {load[0]:.1f} before, {load[1]:.1f} after. Median of {a.repeats} "
          f"interleaved one-row calls. Read bandwidth (float32 sum over 512 MB, as bench/decode.py measures it): "
          f"{bw2 / 1e9:.1f} GB/s with {torch.get_num_threads()} threads, {bw1 / 1e9:.1f} GB/s with one.\n\n"
          + md_table(["format", "matrix", "MB", "ms", "GB/s read"], rows) + "\n")
    path = write_results(a.name, {"machine": mi, "load_average_1min": load, "bandwidth_gbs": bw2 / 1e9,
                                  "bandwidth_1thread_gbs": bw1 / 1e9, "kernel_path": kernels.path(),
                                  "rows": rows}, md)
    print(path.read_text())


if __name__ == "__main__":
    main()
