"""Export benchmark on SmolLM2-135M, per PROTOCOL.md: every exported file loaded and run in its
consuming engine, next to leanlm's in-process figures for the same model.

For each row: file size, load time, held-out perplexity (wiki eval split, 512-token windows) and
batch-1 greedy decode tokens/s in the engine: transformers + compressed-tensors for
compressed-tensors checkpoints, llama.cpp (llama-cpp-python) for GGUF files, onnxruntime for ONNX
files, and leanlm's own model (transformers, fake quantization) as the in-process reference. GGUF
rows also carry llama.cpp's own quantization (`llama_model_quantize`) of leanlm's F16 file for the
same type, so the two writers are compared on the same weights and the same tensor types; the
calibrated source (w4a16-awq) is written by leanlm's writer, which carries AWQ's pre-scaling and
leanlm's codes. ONNX rows are leanlm's exports (float, int8 QDQ, int4 MatMulNBits) and the float
export quantized by onnxruntime ("ONNX in": int8 dynamic / static, int4 weight-only).

Decode speed is measured in one interleaved run over every timed row (A B C ... A B C, median of
--runs after a warm-up) and reported as a ratio to leanlm's float32 model through transformers'
`generate`. leanlm's fake-quantized in-process models are reference perplexities, not timed (fake
quantization dequantizes on every call; it is not a deployment engine).

Rows come from a list of per-format functions (ROW_FUNCTIONS); each returns `Row`s and logs every
finished row to bench/.work/export/partial-PID.json. Perplexity and speed can run as separate
commands: `--no-speed --only gguf_rows` (one format, any window count) writes a partial file, and
`--from-partial A.json,B.json` rebuilds every row's engine from its file and times them all in
one interleaved run. "vs float32" compares with leanlm's float32 model on the same windows.

Quantized source models are calibrated once and cached with leanlm.save in
bench/.work/export/ (delete it to recalibrate).

    python bench/export.py                                      # everything, one process
    python bench/export.py --only onnx_rows --windows 10 --no-speed   # one format's perplexities
    python bench/export.py --from-partial bench/.work/export/partial-1.json,bench/.work/export/partial-2.json
"""

from __future__ import annotations

import argparse
import fcntl
import gc
import json
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from common import md_table, setup_threads, write_results

import leanlm
from leanlm.core.data import evaluation_texts, join_and_tokenize
from leanlm.evaluation import perplexity
from leanlm.evaluation.memory import checkpoint_bytes
from leanlm.evaluation.speed import compare_speed, hf_generator, protocol_prompts

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench" / ".work" / "export"
OUT = WORK / "out"
# Schemes that load on CPU in transformers + compressed-tensors (int4 is AWQ-calibrated, symmetric g64).
CT_SCHEMES = ("w8a16", "w4a16-awq", "w8a8", "fp8")
CALIBRATED = "w4a16-awq"
GGUF_FLOAT = ("F16", "Q8_0", "Q4_0", "Q4_1", "Q4_K_M")


@dataclass
class Row:
    format: str                     # "compressed-tensors", "gguf Q4_0 (leanlm writer)", "leanlm (in-process)", ...
    source: str                     # which model: "float32", "w4a16-awq", ...
    engine: str                     # who runs it
    kind: str                       # "leanlm" | "ct" | "gguf" | "onnx": how to rebuild the engine from `path`
    path: str | None = None         # the file or folder the engine loads (None: leanlm's model `source`)
    bytes: int | None = None
    load_s: float | None = None
    ppl: float | None = None
    windows: int | None = None
    notes: str = ""
    decode_tps: float | None = None
    extra: dict = field(default_factory=dict)


@dataclass
class Ctx:
    model_name: str
    tok: object
    windows: torch.Tensor           # [n, 512] evaluation token ids
    samples: int
    threads: int
    ct_schemes: tuple = CT_SCHEMES
    onnx_calib_samples: int = 32
    reuse: bool = False
    gguf_quants: tuple = GGUF_FLOAT           # float-source GGUF types (each next to llama.cpp's quantize of the F16 file)
    f16_written: bool = False                 # the F16 GGUF (source of llama.cpp's quantize) was written by this run
    calibrated: str | None = CALIBRATED       # the calibrated source exported to GGUF and ONNX (None: skip those rows)
    done: list = field(default_factory=list)   # rows so far, saved after each (a late crash keeps them)

    @property
    def n_windows(self) -> int:
        return int(self.windows.shape[0])

    def ppl(self, model) -> float:
        """leanlm.evaluation.perplexity over the first n windows (any model returning logits: HF, OnnxCausalLM)."""
        return perplexity(model, self.tok, max_windows=self.n_windows, progress=False).perplexity


def _log(ctx: Ctx, row: Row) -> Row:
    """Print a finished row and append it to bench/.work/export/partial-PID.json."""
    ctx.done.append(row.__dict__.copy())
    print(f"ROW {row.format} | {row.source} | {row.engine} | ppl {row.ppl:.4f} ({row.windows} windows) | load {row.load_s} | "
          f"bytes {row.bytes} | {row.notes}", flush=True)
    (WORK / f"partial-{os.getpid()}.json").write_text(json.dumps(ctx.done, indent=1, default=str))
    return row


def _timed(load: Callable):
    t0 = time.perf_counter()
    obj = load()
    return obj, time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------- sources

_SOURCES: dict[str, object] = {}


def _folder(ctx: Ctx, scheme: str) -> Path:
    return WORK / f"{ctx.model_name}-{scheme}-{ctx.samples}"


def source(ctx: Ctx, scheme: str):
    """leanlm's model for `scheme` ("float32" or a preset), calibrated once and cached on disk
    (a file lock lets several benchmark processes share one calibration)."""
    if scheme in _SOURCES:
        return _SOURCES[scheme]
    if scheme == "float32":
        model, _ = leanlm.load(ctx.model_name)
    else:
        folder = _folder(ctx, scheme)
        with open(WORK / f"{folder.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not folder.is_dir():
                from leanlm.core.data import calibration_batches

                model, tok = leanlm.load(ctx.model_name)
                t0 = time.perf_counter()
                leanlm.quantize(model, scheme, calibration_batches(tok, ctx.samples, 512), tokenizer=tok)
                print(f"calibrated {scheme} in {time.perf_counter() - t0:.0f} s", flush=True)
                leanlm.save(model, folder, tokenizer=tok)
        model, _ = leanlm.load(str(folder))
    _SOURCES[scheme] = model
    return model


def leanlm_row(ctx: Ctx, scheme: str) -> Row:
    """leanlm's own model, in process (transformers over fake-quantized or float weights)."""
    model = source(ctx, scheme)
    if scheme == "float32":
        from leanlm.core.models import builtin_gguf, convert_gguf

        _, load_s = _timed(lambda: leanlm.load(ctx.model_name))
        size = checkpoint_bytes(convert_gguf(builtin_gguf(ctx.model_name)))
        engine = "transformers"
    else:
        _, load_s = _timed(lambda: leanlm.load(str(_folder(ctx, scheme))))
        size = checkpoint_bytes(_folder(ctx, scheme))
        engine = "transformers (leanlm fake-quant)"
    return _log(ctx, Row("leanlm (in-process)", scheme, engine, "leanlm", None, size, load_s, ctx.ppl(model), ctx.n_windows))


def _have(ctx: Ctx, fmt: str, scheme: str) -> bool:
    """Whether this run (or the run it resumes) already logged that row."""
    return any(d["format"] == fmt and d["source"] == scheme for d in ctx.done)


def _leanlm_rows(ctx: Ctx, rows: list[Row], scheme: str) -> None:
    """Add leanlm's in-process row for `scheme` unless this run already has it."""
    if not any(r.kind == "leanlm" and r.source == scheme for r in rows + [Row(**d) for d in ctx.done]):
        rows.append(leanlm_row(ctx, scheme))


# ---------------------------------------------------------------------------------------------- compressed-tensors


def compressed_tensors_rows(ctx: Ctx) -> list[Row]:
    from leanlm.export import export
    from leanlm.export.consumers import load_compressed_tensors

    rows: list[Row] = []
    _leanlm_rows(ctx, rows, "float32")
    for scheme in ctx.ct_schemes:
        _leanlm_rows(ctx, rows, scheme)
        if _have(ctx, "compressed-tensors", scheme):
            continue
        out = export(source(ctx, scheme), "compressed-tensors", OUT / f"ct-{scheme}", tokenizer=ctx.tok, overwrite=True)
        gc.collect()
        model, load_s = _timed(lambda: load_compressed_tensors(out))
        note = ("dynamic int8 activation scale amax/127.5 in compressed-tensors (leanlm: /127)" if "w8a8" in scheme
                else "same codes and scales as leanlm")
        rows.append(_log(ctx, Row("compressed-tensors", scheme, "transformers + compressed-tensors", "ct", str(out), checkpoint_bytes(out),
                                  load_s, ctx.ppl(model), ctx.n_windows, note)))
        del model
        gc.collect()
    return rows


# ---------------------------------------------------------------------------------------------- GGUF

GGUF_CALIBRATED = ("Q4_0", "Q4_K_M")   # written from the calibrated source (ctx.calibrated)
LLAMA_FTYPE = {"Q8_0": 7, "Q4_0": 2, "Q4_1": 3, "Q4_K_M": 15}   # llama.cpp's LLAMA_FTYPE_MOSTLY_*


def _types(path) -> dict[str, str]:
    import gguf

    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}


def _gguf_row(ctx: Ctx, path: Path, fmt: str, src: str, notes: str = "") -> Row:
    from leanlm.export.consumers import llamacpp_perplexity, load_llamacpp

    llm, load_s = _timed(lambda: load_llamacpp(path, n_ctx=512, threads=ctx.threads))
    del llm
    scorer = load_llamacpp(path, n_ctx=512, threads=ctx.threads, logits_all=True)
    ppl = llamacpp_perplexity(scorer, ctx.windows)["perplexity"]
    del scorer
    return _log(ctx, Row(fmt, src, f"llama.cpp ({ctx.threads} threads)", "gguf", str(path), path.stat().st_size, load_s, ppl,
                         ctx.n_windows, notes))


def gguf_rows(ctx: Ctx) -> list[Row]:
    import llama_cpp

    from leanlm.export import export
    from leanlm.export import gguf as G

    rows: list[Row] = []
    _leanlm_rows(ctx, rows, "float32")

    def write(q):
        path = OUT / f"float-{q}.gguf"
        if (ctx.reuse or q == "F16" and ctx.f16_written) and path.is_file():
            return path
        ctx.f16_written |= q == "F16"
        return export(source(ctx, "float32"), "gguf", path, tokenizer=ctx.tok, quant=q, overwrite=True)

    for q in ctx.gguf_quants:
        path = write(q)
        notes = ""
        ref = None
        if q in LLAMA_FTYPE:
            ref = OUT / f"float-{q}-llamacpp.gguf"
            if not (ctx.reuse and ref.is_file()):
                params = llama_cpp.llama_model_quantize_default_params()
                params.ftype = LLAMA_FTYPE[q]
                params.nthread = ctx.threads
                rc = llama_cpp.llama_model_quantize(str(write("F16")).encode(), str(ref).encode(), params)
                if rc != 0:
                    raise RuntimeError(f"llama_model_quantize failed ({rc}) for {q}")
            ours, theirs = _types(path), _types(ref)
            diff = [k for k in ours if ours[k] != theirs.get(k)]
            notes = "tensor types identical to llama.cpp's" if not diff else f"{len(diff)} tensor types differ from llama.cpp's: {diff[:3]}"
        rows.append(_gguf_row(ctx, path, f"gguf {q} (leanlm writer)", "float32", notes))
        if ref is not None:
            rows.append(_gguf_row(ctx, ref, f"gguf {q} (llama.cpp quantize of the F16 file)", "float32"))
    for q in GGUF_CALIBRATED if ctx.calibrated else ():
        scheme = ctx.calibrated
        _leanlm_rows(ctx, rows, scheme)
        path = export(source(ctx, scheme), "gguf", OUT / f"{scheme}-{q}.gguf", tokenizer=ctx.tok, quant=q, overwrite=True)
        rep = G.last_report
        rows.append(_gguf_row(ctx, path, f"gguf {q} (leanlm writer)", scheme,
                              f"{len(rep['reused_exact'])} tensors with leanlm's codes, {len(rep['requantized'])} re-quantized from its "
                              "calibrated (AWQ-pre-scaled) weights"))
    return rows


# ---------------------------------------------------------------------------------------------- ONNX

# (row label, leanlm source exported as it is): float, int8 per channel as QDQ, int4 g64 as MatMulNBits
ONNX_EXPORTS = (("onnx float (leanlm export)", "float32"), ("onnx int8 QDQ (leanlm export)", "w8a16"),
                ("onnx int4 MatMulNBits (leanlm export)", "w4a16-rtn"), ("onnx int4 MatMulNBits (leanlm export)", "calibrated"))
ONNX_IN = ("int8-dynamic", "int4-weight", "int8-static")


def _onnx_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.parent.glob(p.name + "*"))   # model.onnx + model.onnx.data


def _onnx_row(ctx: Ctx, path: Path, fmt: str, src: str, ref_model=None) -> Row:
    from leanlm.export.onnx_run import OnnxCausalLM

    lm, load_s = _timed(lambda: OnnxCausalLM(path, threads=ctx.threads))
    notes = ""
    if ref_model is not None:   # the exported graph against leanlm's model on one 512-token window
        ids = ctx.windows[:1]
        with torch.no_grad():
            diff = float((lm(ids) - ref_model(ids).logits).abs().max())
        notes = f"max logit diff vs leanlm {diff:.1e}"
    row = Row(fmt, src, f"onnxruntime ({ctx.threads} threads)", "onnx", str(path), _onnx_bytes(path), load_s, ctx.ppl(lm),
              ctx.n_windows, notes)
    del lm
    return _log(ctx, row)


def onnx_rows(ctx: Ctx) -> list[Row]:
    from leanlm.export.onnx import export_onnx
    from leanlm.export.onnx_in import quantize_onnx

    rows: list[Row] = []
    float_onnx = OUT / "onnx-float32" / "model.onnx"

    def exports(which):
        for label, scheme in which:
            scheme = ctx.calibrated if scheme == "calibrated" else scheme
            if scheme is None or _have(ctx, label, scheme):
                continue
            _leanlm_rows(ctx, rows, scheme)
            path = export_onnx(source(ctx, scheme), OUT / f"onnx-{scheme}", tokenizer=ctx.tok, overwrite=True)
            rows.append(_onnx_row(ctx, path, label, scheme, source(ctx, scheme)))

    exports(ONNX_EXPORTS[:1])   # float first: ONNX in starts from it
    for scheme in ONNX_IN:
        if _have(ctx, f"onnx {scheme} (ONNX in: onnxruntime.quantization of the float export)", "float32"):
            continue
        path = quantize_onnx(float_onnx, OUT / f"onnx-in-{scheme}.onnx", scheme=scheme, tokenizer=ctx.tok, samples=ctx.onnx_calib_samples,
                             seq_len=256, overwrite=True, progress=False)
        rows.append(_onnx_row(ctx, path, f"onnx {scheme} (ONNX in: onnxruntime.quantization of the float export)", "float32"))
    exports(ONNX_EXPORTS[1:])
    return rows


# The table is built from these, in order; each returns a list of Row.
ROW_FUNCTIONS: list[Callable[[Ctx], list[Row]]] = [gguf_rows, compressed_tensors_rows, onnx_rows]


# ---------------------------------------------------------------------------------------------- speed


def generator(ctx: Ctx, row: Row):
    """The decode generator of `row`'s engine, rebuilt from its file (None: not timed)."""
    from leanlm.export.consumers import llamacpp_generator, load_compressed_tensors, load_llamacpp
    from leanlm.export.onnx_run import OnnxCausalLM, onnx_generator

    if row.kind == "leanlm":
        return hf_generator(source(ctx, "float32"), ctx.tok) if row.source == "float32" else None
    if row.kind == "ct":
        return hf_generator(load_compressed_tensors(row.path), ctx.tok)
    if row.kind == "gguf":
        return llamacpp_generator(load_llamacpp(row.path, n_ctx=512, threads=ctx.threads))
    if row.kind == "onnx":
        return onnx_generator(OnnxCausalLM(row.path, threads=ctx.threads))
    raise ValueError(row.kind)


def read_partial(files: list[str]) -> list[Row]:
    """Rows logged by earlier runs (partial-*.json), in order, without duplicates."""
    rows: list[Row] = []
    for f in files:
        for d in json.loads(Path(f).read_text()):
            row = Row(**d)
            if not any((x.format, x.source, x.windows) == (row.format, row.source, row.windows) for x in rows):
                rows.append(row)
    return rows


def _fmt(x, spec, default="-"):
    return format(x, spec) if x is not None else default


def report(a, rows: list[Row], speed: dict, done_runs: int) -> Path:
    """Write bench/results/NAME.md/.json from the rows and the speed medians so far."""
    try:
        import llama_cpp

        llama_version = llama_cpp.__version__
    except ImportError:
        llama_version = "not installed"
    if speed:
        for i, r in enumerate(rows):
            r.decode_tps = speed[str(i)].decode_tps if str(i) in speed else None
    timed_base = next((r for r in rows if r.kind == "leanlm" and r.source == "float32" and r.decode_tps), None)
    float_ppl = {r.windows: r.ppl for r in rows if r.kind == "leanlm" and r.source == "float32"}
    windows = sorted({r.windows for r in rows})
    md = [f"# Export: files in their consuming engines, SmolLM2-135M\n\n"
          f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared with other jobs); torch {torch.__version__} "
          f"({torch.get_num_threads()} threads); llama-cpp-python {llama_version} and onnxruntime on {a.threads} threads. "
          f"Perplexity: wiki eval split, the first N windows x 512 tokens (N per row in 'windows': {', '.join(map(str, windows))}), the same "
          f"token ids in every engine; 'vs float32' compares with leanlm's float32 model on the same N windows. Decode: batch 1, greedy, "
          f"128-token prompt + {a.new_tokens} new tokens, median of {done_runs} runs after a warm-up, every timed row interleaved in one run; "
          f"ratio to leanlm's float32 model through transformers `generate` in that run. leanlm's fake-quantized in-process rows are "
          f"reference perplexities, not timed ('-'). Quantized sources are calibrated on {a.samples} x 512 tokens; ONNX-in int8-static on "
          f"{a.onnx_calib_samples} x 256 tokens. Load: time to construct the engine's model from the file (page cache warm)."]
    if a.from_partial:
        md.append(f"Perplexities from the runs logged in {a.from_partial}; "
                  + (f"decode speed from the interleaved run recorded in {a.speed_from} (its rows only; '-' for rows "
                     "logged after it started)." if a.speed_from else "decode speed measured by this command."))
    if done_runs < a.runs and (not a.no_speed or a.speed_from):
        md.append(f"**Speed run incomplete: {done_runs} of {a.runs} interleaved rounds done when this file was written.**")
    cols = ["format", "source", "engine", "file MB", "load s", "windows", "perplexity", "vs float32", "decode tok/s", "decode vs float32", "notes"]
    base_tps = timed_base.decode_tps if timed_base else None
    table = [[r.format, r.source, r.engine, _fmt(r.bytes and r.bytes / 1e6, ".1f"), _fmt(r.load_s, ".2f"), r.windows, _fmt(r.ppl, ".4f"),
              f"{r.ppl / float_ppl[r.windows] - 1:+.2%}" if r.windows in float_ppl else "-", _fmt(r.decode_tps, ".1f"),
              f"{r.decode_tps / base_tps:.2f}x" if r.decode_tps and base_tps else "-", r.notes] for r in rows]
    md.append(md_table(cols, table))
    data = {"settings": vars(a), "speed_rounds_done": done_runs, "rows": [r.__dict__ for r in rows],
            "speed": {rows[int(k)].format + " | " + rows[int(k)].source: v.to_dict() for k, v in speed.items()}}
    return write_results(a.name, data, "\n\n".join(md))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--windows", type=int, default=40, help="512-token evaluation windows per perplexity")
    ap.add_argument("--runs", type=int, default=5, help="timed decode runs per row (interleaved, after a warm-up)")
    ap.add_argument("--new-tokens", type=int, default=128, help="new tokens per decode run (protocol: 128)")
    ap.add_argument("--ct-schemes", default=",".join(CT_SCHEMES), help="leanlm presets exported to compressed-tensors")
    ap.add_argument("--samples", type=int, default=8, help="calibration sequences (x 512 tokens) for quantized sources")
    ap.add_argument("--onnx-calib-samples", type=int, default=32, help="ONNX-in int8-static calibration sequences (x 256 tokens)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="llama.cpp / onnxruntime threads (default: all cores)")
    ap.add_argument("--name", default="export", help="results file name under bench/results/")
    ap.add_argument("--reuse-files", action="store_true", help="reuse float-model GGUF files left in bench/.work/export/out by an earlier run")
    ap.add_argument("--from-partial", default="", help="comma list of partial-*.json files of earlier runs: report their rows "
                    "(perplexity as logged) and time every row's engine in one interleaved run")
    ap.add_argument("--gguf-quants", default=",".join(GGUF_FLOAT), help="GGUF types written from the float model ('' for none)")
    ap.add_argument("--calibrated", default=CALIBRATED, help="calibrated leanlm source written to GGUF and ONNX ('none': skip those rows)")
    ap.add_argument("--speed-from", default="", help="with --no-speed: decode speeds of an earlier results .json (matched by format, "
                    "source and windows), e.g. a speed run made while other rows' perplexities were still running")
    ap.add_argument("--no-speed", action="store_true", help="skip the decode-speed run")
    ap.add_argument("--resume", default="", help="comma list of partial-*.json of interrupted runs: its rows are kept (leanlm's in-process rows "
                    "there are not measured again) and this run's rows are added to them")
    ap.add_argument("--only", default="", help="comma list of row functions: " + ",".join(f.__name__ for f in ROW_FUNCTIONS))
    a = ap.parse_args()
    setup_threads()
    WORK.mkdir(parents=True, exist_ok=True)
    OUT.mkdir(parents=True, exist_ok=True)
    print(f"logging rows to {WORK / f'partial-{os.getpid()}.json'}", flush=True)
    _, tok = leanlm.load(a.model)
    ids = join_and_tokenize(tok, evaluation_texts("wiki"))
    ctx = Ctx(a.model, tok, ids[: a.windows * 512].view(a.windows, 512), a.samples, a.threads, tuple(a.ct_schemes.split(",")),
              onnx_calib_samples=a.onnx_calib_samples, reuse=a.reuse_files, calibrated=None if a.calibrated == "none" else a.calibrated,
              gguf_quants=tuple(q for q in a.gguf_quants.split(",") if q))
    if a.only and (bad := set(a.only.split(",")) - {f.__name__ for f in ROW_FUNCTIONS}):
        ap.error(f"--only: unknown row functions {sorted(bad)}; choose from {[f.__name__ for f in ROW_FUNCTIONS]}")
    if a.resume:
        ctx.done = [r.__dict__.copy() for r in read_partial(a.resume.split(","))]
    if a.from_partial:
        rows = read_partial(a.from_partial.split(","))
    else:
        rows = []
        for fn in ROW_FUNCTIONS:
            if a.only and fn.__name__ not in a.only.split(","):
                continue
            t0 = time.perf_counter()
            rows += fn(ctx)
            print(f"{fn.__name__}: {time.perf_counter() - t0:.0f} s", flush=True)
    if not any(r.kind == "leanlm" and r.source == "float32" for r in rows):
        rows.insert(0, leanlm_row(ctx, "float32"))   # the baseline of every ratio
    if a.no_speed:
        done_runs = 0
        if a.speed_from:
            old = json.loads(Path(a.speed_from).read_text())
            tps = {(d["format"], d["source"], d["windows"]): d["decode_tps"] for d in old["rows"]}
            for r in rows:
                r.decode_tps = tps.get((r.format, r.source, r.windows))
            done_runs = old["speed_rounds_done"]
            a.new_tokens, a.runs = old["settings"]["new_tokens"], old["settings"]["runs"]
        path = report(a, rows, {}, done_runs)
    else:
        # one interleaved speed run over every timed row; the results file is rewritten after each round
        gens = {}
        for i, r in enumerate(rows):
            if r.kind == "leanlm" and any(g for j, g in gens.items() if rows[int(j)].kind == "leanlm"):
                continue   # one float32 baseline
            if (g := generator(ctx, r)) is not None:
                gens[str(i)] = g
        rounds = []
        speed = compare_speed(gens, protocol_prompts(tok, 1, 128), a.new_tokens, a.runs,
                              on_round=lambda s: (rounds.append(1), report(a, rows, s, len(rounds))))
        path = report(a, rows, speed, a.runs)
    print(path.read_text())


if __name__ == "__main__":
    main()
