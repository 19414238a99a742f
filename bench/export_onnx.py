"""ONNX rows of the export benchmark: SmolLM2-135M exported to ONNX and run in onnxruntime, per PROTOCOL.md.

For the float, int8 and int4 exports (`leanlm.export.onnx.export_onnx`) and for the float export
quantized by onnxruntime (`leanlm.export.onnx_in.quantize_onnx`: int8 dynamic / static, int4
weight-only): file size, load time (InferenceSession creation), held-out perplexity through
onnxruntime, decode tokens/s through the onnxruntime KV-cache loop, next to leanlm's in-process
model (perplexity of the same quantized model in torch; speed of the float model through transformers'
generate). Speed: batch 1, 128 prompt + 128 new tokens, greedy, all generators interleaved, median of
`--runs` after a warm-up, onnxruntime and torch both on `--threads` threads.

    python bench/export_onnx.py [--runs 5] [--windows 40] [--awq]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from common import md_table, write_results

import leanlm
from leanlm.evaluation import perplexity
from leanlm.evaluation.profile import machine_info
from leanlm.evaluation.speed import compare_speed, hf_generator, protocol_prompts
from leanlm.export.onnx import export_onnx
from leanlm.export.onnx_in import quantize_onnx
from leanlm.export.onnx_run import OnnxCausalLM, onnx_generator, session


def file_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.parent.glob(p.name + "*"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--calib-samples", type=int, default=32, help="int8-static calibration: samples x 256 tokens of the calibration split")
    ap.add_argument("--awq", action="store_true", help="also export leanlm's AWQ-calibrated int4 model (about 5 minutes of calibration)")
    ap.add_argument("--workdir", default=None, help="where the ONNX files go (default: a temporary folder)")
    a = ap.parse_args()
    import torch

    torch.set_num_threads(a.threads)
    model, tok = leanlm.load("smollm2-135m")
    work = Path(a.workdir or tempfile.mkdtemp(prefix="leanlm-onnx-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    ppl_kw = dict(max_windows=a.windows, progress=False)
    rows: dict[str, dict] = {}

    # leanlm in-process references (torch): float32, and the quantized models whose codes are exported
    lean = {"float": model}
    for name, scheme in [("int8", "w8a16"), ("int4", "w4a16-rtn")] + ([("int4 awq", "w4a16-awq")] if a.awq else []):
        lean[name] = leanlm.quantize(leanlm.load("smollm2-135m")[0], scheme, tokenizer=tok, progress=False)
    lean_ppl = {k: perplexity(m, tok, **ppl_kw).perplexity for k, m in lean.items()}
    print("leanlm perplexities:", lean_ppl, flush=True)

    def add(label: str, path: Path, kind: str, export_s: float, leanlm_key: str | None):
        loads = []
        for _ in range(3):
            t = time.perf_counter()
            session(path, a.threads)
            loads.append(time.perf_counter() - t)
        lm = OnnxCausalLM(path, threads=a.threads)
        ppl = perplexity(lm, tok, **ppl_kw)
        r = {"kind": kind, "path": str(path), "bytes": file_bytes(path), "export_s": export_s,
             "load_s": statistics.median(loads), "perplexity": ppl.perplexity, "windows": ppl.windows, "window": ppl.window}
        if leanlm_key:
            ids = protocol_prompts(tok, 1, 512, "wiki")
            with torch.no_grad():
                ref = lean[leanlm_key](ids).logits
            r["leanlm_perplexity"] = lean_ppl[leanlm_key]
            r["max_abs_logit_diff_vs_leanlm"] = float((lm(ids) - ref).abs().max())
        rows[label] = r
        print(label, {k: v for k, v in r.items() if k != "path"}, flush=True)

    for label, key in [("export float", "float"), ("export int8 (w8a16, QDQ)", "int8"), ("export int4 (w4a16-rtn g64, MatMulNBits)", "int4")] + (
            [("export int4 (w4a16-awq g64, MatMulNBits)", "int4 awq")] if a.awq else []):
        out = work / key.replace(" ", "_")
        t = time.perf_counter()
        path = export_onnx(lean[key], out, tokenizer=tok, overwrite=True)
        add(label, path, "leanlm export", time.perf_counter() - t, key)
    float_onnx = work / "float" / "model.onnx"
    for scheme in ("int8-dynamic", "int8-static", "int4-weight"):
        t = time.perf_counter()
        path = quantize_onnx(float_onnx, work / f"{scheme}.onnx", scheme=scheme, tokenizer=tok, samples=a.calib_samples,
                             seq_len=256, overwrite=True, progress=False)
        add(f"ONNX in: {scheme}", path, "onnxruntime.quantization", time.perf_counter() - t, None)

    # decode speed, every engine interleaved in one run
    prompts = protocol_prompts(tok, 1, 128)
    gens = {"leanlm float32 (transformers generate)": hf_generator(model, tok)}
    for label, r in rows.items():
        gens[label] = onnx_generator(OnnxCausalLM(r["path"], threads=a.threads))
    speed = compare_speed(gens, prompts, 128, a.runs, 1, progress=True)
    base = speed["leanlm float32 (transformers generate)"].decode_tps
    onnx_base = speed["export float"].decode_tps
    for label, r in rows.items():
        s = speed[label]
        r.update(decode_tps=s.decode_tps, prefill_tps=s.prefill_tps, ttft_s=s.ttft_s,
                 decode_vs_transformers=s.decode_tps / base, decode_vs_onnx_float=s.decode_tps / onnx_base)

    mach = machine_info()
    fp = lean_ppl["float"]
    tab = []
    for label, r in rows.items():
        lp = f"{r['leanlm_perplexity']:.3f}" if "leanlm_perplexity" in r else "-"
        diff = f"{r['max_abs_logit_diff_vs_leanlm']:.1e}" if "max_abs_logit_diff_vs_leanlm" in r else "-"
        tab.append([label, f"{r['bytes'] / 1e6:.0f}", f"{r['load_s']:.2f}", f"{r['perplexity']:.3f}", f"{r['perplexity'] / fp - 1:+.2%}",
                    lp, diff, f"{r['decode_tps']:.1f}", f"{r['decode_vs_onnx_float']:.2f}x", f"{r['decode_vs_transformers']:.2f}x"])
    tab.append(["leanlm float32 in process (transformers generate)", "-", "-", f"{fp:.3f}", "+0.00%", f"{fp:.3f}", "-",
                f"{base:.1f}", f"{base / onnx_base:.2f}x", "1.00x"])
    w = next(iter(rows.values()))
    md = (f"# ONNX export and ONNX in, SmolLM2-135M in onnxruntime\n\n"
          f"Machine: {mach['cpu']}, {mach['cores']} cores; onnxruntime and torch on {a.threads} threads; torch {mach['torch']}. "
          f"Perplexity: wiki eval split, {w['windows']} x {w['window']} tokens, float32 baseline {fp:.3f}. Speed: batch 1, 128 prompt + 128 new "
          f"tokens, greedy, onnxruntime KV-cache loop (`OnnxCausalLM.generate`), median of {a.runs} interleaved runs after a warm-up; "
          f"ratios are within this run. int8-static calibration: {a.calib_samples} x 256 tokens of the wiki calibration split. Load: InferenceSession creation, median of 3. Logit diff: max |logit| difference "
          "between onnxruntime and leanlm's in-process model (the fake-quant model for int8/int4) on one 512-token window. "
          "Exported int8/int4 keep the tied lm_head in float (as leanlm's presets do); ONNX-in schemes also leave the head in float. "
          "Sessions use `session.qdq_matmulnbits_accuracy_level=0` (float32 compute; onnxruntime's default 4 rounds activations to int8).\n\n"
          + md_table(["model", "file MB", "load s", "perplexity (onnxruntime)", "vs float32", "leanlm in-process perplexity",
                      "max logit diff", "decode tok/s", "vs ONNX float", "vs transformers fp32"], tab))
    write_results("export_onnx", {"machine": mach, "threads": a.threads, "runs": a.runs, "leanlm_perplexity": lean_ppl, "rows": rows,
                                  "transformers_float32_decode_tps": base}, md)
    print(md)


if __name__ == "__main__":
    main()
