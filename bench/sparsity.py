"""Sparsity benchmark on SmolLM2-135M, per PROTOCOL.md.

1. Quality: held-out perplexity (wiki eval split, 40 x 512 tokens) of the float32 model and of 50%
   unstructured and 2:4 sparsity with magnitude, Wanda and SparseGPT, calibrated on the protocol's
   calibration split (--samples x --seq-len tokens, the same ids for every method), with the
   calibration wall time and the 1-minute load average around it.
2. Speed: which sparse formats give real speed with PyTorch's own CPU kernels. A SmolLM2-sized
   Linear (576 -> 1536 and 1536 -> 576) at 50% unstructured and 2:4, batch 1 and 512 tokens,
   float32 and bfloat16: dense F.linear vs torch.sparse CSR, COO and BSR matmuls, interleaved
   (dense, csr, coo, bsr, dense, ...), median of --runs timings after a warm-up, ratio = dense time /
   sparse time (> 1 means the sparse format is faster). And whether `to_sparse_semi_structured`
   (2:4 kernels) runs on this machine.

    python bench/sparsity.py                              # everything (about 20-30 min on 2 quiet cores)
    python bench/sparsity.py --no-ppl                     # kernel table only
    python bench/sparsity.py --methods sparsegpt --patterns 2:4 --windows 10 --no-kernels

Sparsify then distill: --distill-tokens N distills each sparse model from the float32 model for N
tokens with the shared trainer (leanlm.distill) and MaskKeeper as an after_step callback, and reports
its perplexity after distillation (the same pipeline as leanlm.sparsity.sparsify_and_distill).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F
from common import RESULTS, md_table, setup_threads, write_results

import leanlm
from leanlm.core.data import calibration_batches
from leanlm.evaluation import perplexity
from leanlm.evaluation.profile import machine_info
from leanlm.sparsity import MaskKeeper, SparsityConfig, overall_sparsity, parse_pattern, sparsify_
from leanlm.sparsity.algorithms import magnitude_mask


def distill_hook(model, teacher, tok, tokens: int, lr: float) -> None:
    """Sparsify-then-distill: distil ``model`` from ``teacher`` for ``tokens`` tokens of the protocol's
    calibration text with ``after_step=[MaskKeeper(model)]`` (pruned weights stay zero); batches of
    2 x 512, warm-up a tenth of the steps (at most 20), cosine, the trainer's autocast default."""
    from leanlm.distill import TrainConfig, distill

    steps = tokens // 1024
    keeper = MaskKeeper(model)
    try:
        distill(model, teacher, "wiki", train_config=TrainConfig(max_tokens=tokens, lr=lr, batch_size=2, seq_len=512,
                                                                 warmup_steps=max(1, min(20, steps // 10)), progress=True),
                tokenizer=tok, after_step=[keeper])
    finally:
        keeper.remove()
    model.eval()


def quality(args, on_row=None) -> tuple[list[dict], dict]:
    model, tok = leanlm.load("smollm2-135m")
    ids = calibration_batches(tok, args.samples, args.seq_len)
    if args.float_ppl:
        base = args.float_ppl  # measured by an earlier run with the same code, model and windows (stated in the output)
    else:
        base = perplexity(model, tok, max_windows=args.windows, progress=False).perplexity
    print(f"float32: {base:.4f}{' (given)' if args.float_ppl else ''}", flush=True)
    rows = []
    for pattern in args.patterns.split(","):
        for method in args.methods.split(","):
            model, tok = leanlm.load("smollm2-135m")
            la0 = os.getloadavg()[0]
            t0 = time.perf_counter()
            rep = sparsify_(model, SparsityConfig(method, pattern=pattern), ids if method != "magnitude" else None,
                            progress=False)
            secs = time.perf_counter() - t0
            la1 = os.getloadavg()[0]
            ppl = perplexity(model, tok, max_windows=args.windows, progress=False).perplexity
            row = {"method": method, "pattern": pattern, "perplexity": ppl, "increase": ppl / base - 1,
                   "calib_seconds": secs, "load_average_1min": [la0, la1],
                   "masked_zero_fraction": rep["overall"]["masked_zero_fraction"],
                   "linear_zero_fraction": rep["overall"]["linear_zero_fraction"], "after_distill": None}
            if rep["errors"]:
                e = rep["errors"].values()
                row["sum_reconstruction_error"] = sum(x["reconstruction_error"] for x in e)
                row["sum_magnitude_error_same_inputs"] = sum(x["magnitude_error"] for x in e)
            if args.distill_tokens:
                teacher, _ = leanlm.load("smollm2-135m")
                distill_hook(model, teacher, tok, args.distill_tokens, args.distill_lr)
                after = perplexity(model, tok, max_windows=args.windows, progress=False).perplexity
                row["after_distill"] = {"tokens": args.distill_tokens, "perplexity": after, "increase": after / base - 1,
                                        "masked_zero_fraction": overall_sparsity(model)["masked_zero_fraction"]}
            rows.append(row)
            if on_row is not None:  # partial results on disk after every row (long runs on a shared machine)
                on_row(rows, {"perplexity": base, "measured_in_this_run": not args.float_ppl})
            print(f"{method} {pattern}: {ppl:.4f} ({ppl / base - 1:+.1%}), {secs:.1f} s, load {la0:.1f}/{la1:.1f}", flush=True)
    return rows, {"perplexity": base, "measured_in_this_run": not args.float_ppl}


def _time(fn, iters: int) -> float:
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) / iters


def _formats(w: torch.Tensor, tokens: int):
    """name -> (callable x -> y or None, note) for dense and each sparse layout of w [out, in]."""
    out = {"dense": (lambda x: F.linear(x, w), "")}
    builders = {"csr": lambda: w.to_sparse_csr(), "coo": lambda: w.to_sparse_coo(), "bsr": lambda: w.to_sparse_bsr((16, 16))}
    for name, build in builders.items():
        try:
            ws = build()
            fn = (lambda ws: lambda x: torch.sparse.mm(ws, x.T).T)(ws)
            fn(torch.randn(2, w.shape[1], dtype=w.dtype))
            note = ""
            if name == "bsr":
                blocks = w.reshape(w.shape[0] // 16, 16, w.shape[1] // 16, 16).ne(0).any(3).any(1)
                note = f"{blocks.float().mean():.0%} of 16x16 blocks non-empty"
            out[name] = (fn, note)
            if name == "csr" and tokens == 1:  # the matrix-vector kernel, what batch-1 decode would use
                out["csr mv"] = ((lambda ws: lambda x: torch.mv(ws, x[0])[None])(ws), "torch.mv")
        except (RuntimeError, NotImplementedError) as e:
            out[name] = (None, f"not supported: {str(e).splitlines()[0][:90]}")
    return out


def kernels(args) -> tuple[list[dict], dict]:
    rows = []
    for th in [int(t) for t in args.kernel_threads.split(",")]:
        torch.set_num_threads(th)
        rows += _kernel_rows(args)
    setup_threads()
    torch.manual_seed(0)
    w0 = torch.randn(1536, 576) * 0.02
    semi = {}
    try:
        from torch.sparse import to_sparse_semi_structured

        w = (w0 * magnitude_mask(w0, parse_pattern("2:4"))).half()
        to_sparse_semi_structured(w)
        semi = {"available": True, "note": "converted on CPU"}
    except Exception as e:  # noqa: BLE001 - recorded, this is what the check is for
        semi = {"available": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    print("to_sparse_semi_structured:", semi, flush=True)
    return rows, semi


def _kernel_rows(args) -> list[dict]:
    torch.manual_seed(0)
    rows = []
    for out_f, in_f in [(1536, 576), (576, 1536)]:
        w0 = torch.randn(out_f, in_f) * 0.02
        for pattern in ["unstructured", "2:4"]:
            w_sp = w0 * magnitude_mask(w0, parse_pattern(pattern))
            for dtype in [torch.float32, torch.bfloat16]:
                w = w_sp.to(dtype)
                for tokens in [1, 512]:
                    fmts = _formats(w, tokens)
                    x = torch.randn(tokens, in_f, dtype=dtype)
                    ref = fmts["dense"][0](x).float()
                    live = {k: v for k, v in fmts.items() if v[0] is not None}
                    rel_err = {}
                    for k, (fn, _) in live.items():  # correctness (recorded) and warm-up
                        rel_err[k] = (fn(x).float() - ref).abs().max().item() / ref.abs().max().item()
                        if dtype == torch.float32:
                            assert rel_err[k] <= 1e-4, (k, rel_err[k])
                    # about 10 ms of calls per timing (slow formats get few calls), at most 200
                    iters = {k: max(1, min(200, int(0.01 / max(_time(lambda: fn(x), 1), 1e-6)))) for k, (fn, _) in live.items()}
                    times = {k: [] for k in live}
                    for _ in range(args.runs):
                        for k, (fn, _) in live.items():
                            times[k].append(_time(lambda: fn(x), iters[k]))
                    med = {k: statistics.median(v) for k, v in times.items()}
                    for k, (fn, note) in fmts.items():
                        rows.append({"threads": torch.get_num_threads(), "shape": f"{in_f}->{out_f}", "pattern": pattern, "dtype": str(dtype).replace("torch.", ""),
                                     "tokens": tokens, "format": k, "median_us": med[k] * 1e6 if k in med else None,
                                     "speedup_vs_dense": med["dense"] / med[k] if k in med else None,
                                     "max_rel_error_vs_dense": rel_err.get(k), "note": note})
                    print(f"{torch.get_num_threads()} threads {in_f}->{out_f} {pattern} {dtype} T={tokens}: " +
                          ", ".join(f"{k} {med['dense'] / med[k]:.2f}x" for k in med), flush=True)
    return rows


def _quality_md(args, rows, base) -> list[str]:
    md = []
    md.append(f"## Held-out perplexity ({args.windows} x 512 tokens; calibration {args.samples} x {args.seq_len} tokens "
              f"of the protocol's calibration split)\n")
    label = "float32 (dense)" if base.get("measured_in_this_run", True) else "float32 (dense; --float-ppl, from an earlier run)"
    t = [[label, "-", f"{base['perplexity']:.4f}", "-", "-", "-"]]
    for r in rows:
        pat = "50% unstructured" if r["pattern"] == "unstructured" else r["pattern"]
        t.append([r["method"], pat, f"{r['perplexity']:.4f}", f"{r['increase']:+.1%}", f"{r['calib_seconds']:.1f}",
                  f"{r['linear_zero_fraction']:.1%}"])
    md.append(md_table(["method", "pattern", "perplexity", "vs float32", "calibration s", "zeros in all Linear weights (head incl.)"], t))
    if args.distill_tokens:
        t = [[r["method"], r["pattern"], f"{r['perplexity']:.4f}", f"{r['after_distill']['perplexity']:.4f}",
              f"{r['after_distill']['increase']:+.1%}", f"{r['after_distill']['masked_zero_fraction']:.1%}"] for r in rows]
        md.append(f"\n### After distillation from the float32 model ({args.distill_tokens:,} tokens, AdamW lr {args.distill_lr}, MaskKeeper)\n")
        md.append(md_table(["method", "pattern", "before", "after", "after vs float32", "zeros kept"], t))
    else:
        md.append("\nPerplexity after distillation: not measured in this run (`--distill-tokens N`).\n")
    return md


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=128, help="calibration sequences (wanda, sparsegpt)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--windows", type=int, default=40, help="perplexity windows of 512 tokens")
    ap.add_argument("--methods", default="magnitude,wanda,sparsegpt")
    ap.add_argument("--patterns", default="unstructured,2:4")
    ap.add_argument("--runs", type=int, default=7, help="interleaved timing runs per kernel (median)")
    ap.add_argument("--kernel-threads", default=f"1,{os.cpu_count()}", help="thread counts for the kernel table")
    ap.add_argument("--no-ppl", action="store_true")
    ap.add_argument("--no-kernels", action="store_true")
    ap.add_argument("--distill-tokens", type=int, default=0, help="sparsify then distill for N tokens (see distill_hook)")
    ap.add_argument("--distill-lr", type=float, default=2e-4, help="learning rate of that distillation")
    ap.add_argument("--float-ppl", type=float, default=None, help="reuse a float32 perplexity measured by an earlier run")
    ap.add_argument("--combine", help="comma-separated result names to merge into --name (rows kept with their own commands)")
    ap.add_argument("--name", default="sparsity")
    args = ap.parse_args()
    setup_threads()
    mach = machine_info()
    data: dict = {"machine": mach, "settings": vars(args)}
    md = [f"# Sparsity on SmolLM2-135M\n\nMachine: {mach['cpu']}, {mach['cores']} cores, torch {mach['torch']} "
          f"({mach['torch_threads']} threads).\n"]
    parts = []
    if args.combine:  # merge earlier runs (each part keeps the command and date that made it)
        parts = [json.loads((RESULTS / f"{n}.json").read_text()) for n in args.combine.split(",")]
        data["parts"] = [{"command": p["command"], "date": p["date"], "settings": p["settings"]} for p in parts]
        md.append("Merged from: " + "; ".join(f"`{p['command']}` ({p['date']})" for p in parts) + "\n")
        q = [p for p in parts if "quality" in p]
        k = [p for p in parts if "kernels" in p]
        args.no_ppl, args.no_kernels = not q, not k
        if q:
            args.windows, args.samples, args.seq_len = q[0]["settings"]["windows"], q[0]["settings"]["samples"], q[0]["settings"]["seq_len"]
            args.distill_tokens = 0
        if k:
            args.runs = k[0]["settings"]["runs"]
    if not args.no_ppl:
        if parts:
            rows = [r for p in q for r in p["quality"]]
            base = next((p["float32"] for p in q if p["float32"].get("measured_in_this_run")), q[0]["float32"])
        else:
            n_rows = len(args.methods.split(",")) * len(args.patterns.split(","))

            def on_row(rows, base):
                if len(rows) < n_rows:
                    write_results(args.name, {**data, "quality": rows, "float32": base, "partial": f"{len(rows)} of {n_rows} rows"},
                                  "\n".join(md + [f"**Partial: {len(rows)} of {n_rows} rows so far.**\n"] + _quality_md(args, rows, base)))

            rows, base = quality(args, on_row)
        data.update(quality=rows, float32=base)
        md += _quality_md(args, rows, base)

    if not args.no_kernels:
        la0 = os.getloadavg()[0]
        rows, semi = (k[0]["kernels"], k[0]["semi_structured"]) if parts else kernels(args)
        data.update(kernels=rows, semi_structured=semi)
        if not parts:
            data["kernels_load_average_1min"] = [la0, os.getloadavg()[0]]
        md.append(f"\n## Sparse matmul kernels on this CPU vs dense (median of {args.runs} interleaved runs; speedup = dense time / "
                  "sparse time, > 1 is faster)\n")
        t = [[r["threads"], r["shape"], r["pattern"], r["dtype"], r["tokens"], r["format"],
              "-" if r["median_us"] is None else f"{r['median_us']:.1f}",
              "-" if r["speedup_vs_dense"] is None else f"{r['speedup_vs_dense']:.2f}x",
              "-" if r["max_rel_error_vs_dense"] is None else f"{r['max_rel_error_vs_dense']:.1e}", r["note"]] for r in rows]
        md.append(md_table(["threads", "Linear", "pattern", "dtype", "tokens", "format", "median us", "vs dense",
                            "max error / max output", "note"], t))
        md.append(f"\n`torch.sparse.to_sparse_semi_structured` (2:4 kernels): {semi}\n")
    write_results(args.name, data, "\n".join(md))


if __name__ == "__main__":
    main()
