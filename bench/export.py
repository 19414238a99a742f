"""Export benchmark on SmolLM2-135M, per PROTOCOL.md: every exported file loaded and run in its
consuming engine, next to leanlm's in-process figures for the same model.

For each row: file size, load time, held-out perplexity (wiki eval split, 512-token windows) and
batch-1 greedy decode tokens/s in the engine: transformers + compressed-tensors for
compressed-tensors checkpoints, llama.cpp (llama-cpp-python, 2 threads) for GGUF files, and
leanlm's own model (transformers generate, fake quantization) as the in-process reference. GGUF
rows also carry llama.cpp's own quantization (`llama_model_quantize`) of leanlm's F16 file for the
same type, so the two writers are compared on the same weights and the same tensor types. Decode
speed is measured in one interleaved run over all rows (A B C ... A B C, median of --runs after a
warm-up) and reported as a ratio to leanlm's float32 model.

Rows come from a list of per-format functions (ROW_FUNCTIONS); each returns `Row`s. A new format
(ONNX) adds its own function to that list.

Quantized source models are calibrated once and cached with save_quantized in
bench/.work/export/ (delete it to recalibrate).

    python bench/export.py                     # everything (about an hour on 2 busy cores)
    python bench/export.py --windows 4 --new-tokens 32 --ct-schemes w4a16-mse,w8a8,fp8 --reuse-files   # a busy machine
"""

from __future__ import annotations

import argparse
import gc
import os
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
CT_SCHEMES = ("w8a16", "w4a16-mse", "w8a8", "fp8")


@dataclass
class Row:
    format: str                     # "compressed-tensors", "gguf Q4_0", "leanlm (in-process)", ...
    source: str                     # which model: "float32", "w4a16-awq", ...
    engine: str                     # who runs it
    bytes: int | None = None
    load_s: float | None = None
    ppl: float | None = None
    windows: int | None = None
    gen: Callable | None = None     # leanlm.evaluation.speed generator, timed in the joint run
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
    reuse: bool = False
    no_speed: bool = False
    done: list = field(default_factory=list)   # rows so far, saved after each (a late crash keeps them)
    keep: list = field(default_factory=list)   # objects that must stay alive for the speed run

    @property
    def n_windows(self) -> int:
        return int(self.windows.shape[0])

    def ppl_hf(self, model) -> float:
        return perplexity(model, self.tok, max_windows=self.n_windows, progress=False).perplexity


# ---------------------------------------------------------------------------------------------- sources

_SOURCES: dict[str, object] = {}


def source(ctx: Ctx, scheme: str):
    """leanlm's model for `scheme` ("float32" or a preset), calibrated once and cached on disk."""
    if scheme in _SOURCES:
        return _SOURCES[scheme]
    if scheme == "float32":
        model, _ = leanlm.load(ctx.model_name)
    else:
        folder = WORK / f"{ctx.model_name}-{scheme}-{ctx.samples}"
        if not folder.is_dir():
            from leanlm.core.data import calibration_batches
            from leanlm.quantization import save_quantized

            model, tok = leanlm.load(ctx.model_name)
            t0 = time.perf_counter()
            leanlm.quantize(model, scheme, calibration_batches(tok, ctx.samples, 512), tokenizer=tok)
            print(f"calibrated {scheme} in {time.perf_counter() - t0:.0f} s")
            save_quantized(model, folder, tokenizer=tok)
        model, _ = leanlm.load(str(folder))
    _SOURCES[scheme] = model
    return model


def leanlm_row(ctx: Ctx, scheme: str) -> Row:
    """leanlm's own model, in process (transformers generate over fake-quantized or float weights)."""
    model = source(ctx, scheme)
    folder = None if scheme == "float32" else WORK / f"{ctx.model_name}-{scheme}-{ctx.samples}"
    load_s = size = None
    if folder is not None:
        t0 = time.perf_counter()
        leanlm.load(str(folder))
        load_s = time.perf_counter() - t0
        size = checkpoint_bytes(folder)
    else:
        t0 = time.perf_counter()
        leanlm.load(ctx.model_name)
        load_s = time.perf_counter() - t0
        from leanlm.core.models import builtin_gguf, convert_gguf

        size = checkpoint_bytes(convert_gguf(builtin_gguf(ctx.model_name)))
    return _log(ctx, Row("leanlm (in-process)", scheme, "transformers (leanlm fake-quant)" if scheme != "float32" else "transformers",
               size, load_s, ctx.ppl_hf(model), ctx.n_windows, hf_generator(model, ctx.tok)))


# ---------------------------------------------------------------------------------------------- compressed-tensors



def compressed_tensors_rows(ctx: Ctx) -> list[Row]:
    from leanlm.export import export
    from leanlm.export.consumers import load_compressed_tensors

    rows = []
    for scheme in ctx.ct_schemes:
        rows.append(leanlm_row(ctx, scheme))
        out = export(source(ctx, scheme), "compressed-tensors", WORK / "out" / f"ct-{scheme}", tokenizer=ctx.tok, overwrite=True)
        gc.collect()
        t0 = time.perf_counter()
        model = load_compressed_tensors(out)
        load_s = time.perf_counter() - t0
        ppl = ctx.ppl_hf(model)
        note = "dynamic int8 activation scale amax/127.5 in compressed-tensors (leanlm: /127)" if "w8a8" in scheme else "logits bit-identical to leanlm"
        rows.append(_log(ctx, Row("compressed-tensors", scheme, "transformers + compressed-tensors", checkpoint_bytes(out), load_s, ppl,
                        ctx.n_windows, hf_generator(model, ctx.tok), note)))
    return rows


# ---------------------------------------------------------------------------------------------- GGUF

GGUF_FLOAT = ("F16", "Q8_0", "Q4_0", "Q4_K_M")
GGUF_CALIBRATED = (("w4a16-mse", "Q4_0"), ("w4a16-mse", "Q4_K_M"))
LLAMA_FTYPE = {"Q8_0": 7, "Q4_0": 2, "Q4_K_M": 15}


def _log(ctx: Ctx, row: Row) -> Row:
    """Print a finished row and keep a partial record (bench/.work/export/partial.json)."""
    import json

    ctx.done.append({k: v for k, v in row.__dict__.items() if k != "gen"})
    print(f"ROW {row.format} | {row.source} | {row.engine} | ppl {row.ppl:.4f} | load {row.load_s} | bytes {row.bytes} | {row.notes}", flush=True)
    (WORK / f"partial-{os.getpid()}.json").write_text(json.dumps(ctx.done, indent=1, default=str))
    return row


def _types(path) -> dict[str, str]:
    import gguf

    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}


def _gguf_row(ctx: Ctx, path: Path, fmt: str, src: str, notes: str = "") -> Row:
    from leanlm.export.consumers import llamacpp_generator, llamacpp_perplexity, load_llamacpp

    t0 = time.perf_counter()
    llm = load_llamacpp(path, n_ctx=512, threads=ctx.threads)
    load_s = time.perf_counter() - t0
    del llm
    scorer = load_llamacpp(path, n_ctx=512, threads=ctx.threads, logits_all=True)
    ppl = llamacpp_perplexity(scorer, ctx.windows)["perplexity"]
    del scorer
    llm = load_llamacpp(path, n_ctx=512, threads=ctx.threads)
    ctx.keep.append(llm)
    return _log(ctx, Row(fmt, src, f"llama.cpp ({ctx.threads} threads)", path.stat().st_size, load_s, ppl, ctx.n_windows, llamacpp_generator(llm), notes))


def gguf_rows(ctx: Ctx) -> list[Row]:
    import llama_cpp

    from leanlm.export import export
    from leanlm.export import gguf as G

    rows = [leanlm_row(ctx, "float32")]
    d = WORK / "out"
    def write(q):
        path = d / f"float-{q}.gguf"
        if ctx.reuse and path.is_file():
            return path
        return export(source(ctx, "float32"), "gguf", path, tokenizer=ctx.tok, quant=q, overwrite=True)

    f16 = write("F16")
    for q in GGUF_FLOAT:
        path = write(q)
        rows.append(_gguf_row(ctx, path, f"gguf {q} (leanlm writer)", "float32"))
        if q in LLAMA_FTYPE:
            ref = d / f"float-{q}-llamacpp.gguf"
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = LLAMA_FTYPE[q]
            params.nthread = ctx.threads
            rc = 0 if ctx.reuse and ref.is_file() else llama_cpp.llama_model_quantize(str(f16).encode(), str(ref).encode(), params)
            if rc != 0:
                raise RuntimeError(f"llama_model_quantize failed ({rc}) for {q}")
            ours, theirs = _types(path), _types(ref)
            diff = [k for k in ours if ours[k] != theirs.get(k)]
            rows[-1].notes = "tensor types identical to llama.cpp's" if not diff else f"{len(diff)} tensor types differ from llama.cpp's: {diff[:3]}"
            rows.append(_gguf_row(ctx, ref, f"gguf {q} (llama.cpp quantize of the F16 file)", "float32"))
    for scheme, q in GGUF_CALIBRATED:
        if not any(r.source == scheme and r.format.startswith("leanlm") for r in rows):
            rows.append(leanlm_row(ctx, scheme))
        path = export(source(ctx, scheme), "gguf", d / f"{scheme}-{q}.gguf", tokenizer=ctx.tok, quant=q, overwrite=True)
        rep = G.last_report
        rows.append(_gguf_row(ctx, path, f"gguf {q} (leanlm writer)", scheme,
                              f"{len(rep['reused_exact'])} tensors with leanlm's codes, {len(rep['requantized'])} re-quantized from its calibrated weights"))
    return rows


# The table is built from these, in order; each returns a list of Row. (ONNX adds its function here.)
ROW_FUNCTIONS: list[Callable[[Ctx], list[Row]]] = [gguf_rows, compressed_tensors_rows]


# ---------------------------------------------------------------------------------------------- main


def _file_of(r: dict) -> Path | None:
    """The GGUF file a logged row measured (names as gguf_rows writes them)."""
    if not r["format"].startswith("gguf"):
        return None
    q = r["format"].split()[1]
    stem = f"float-{q}" if r["source"] == "float32" else f"{r['source']}-{q}"
    return WORK / "out" / (stem + ("-llamacpp.gguf" if "llama.cpp quantize" in r["format"] else ".gguf"))


def rows_from_partial(ctx: Ctx, files: list[str]) -> list[Row]:
    """Rows logged by interrupted runs (partial-*.json), re-attached to generators for the speed run.

    Only rows whose engine can be rebuilt cheaply are timed: llama.cpp files and the float32 baseline.
    """
    import json

    from leanlm.export.consumers import llamacpp_generator, load_llamacpp

    rows = []
    for f in files:
        for r in json.loads(Path(f).read_text()):
            row = Row(**r)
            path = _file_of(r)
            if path is not None and "leanlm writer" in row.format and row.source == "float32":
                ref = path.with_name(path.stem + "-llamacpp.gguf")
                if ref.is_file():
                    ours, theirs = _types(path), _types(ref)
                    diff = [k for k in ours if ours[k] != theirs.get(k)]
                    row.notes = "tensor types identical to llama.cpp's" if not diff else f"{len(diff)} tensor types differ from llama.cpp's"
            if path is not None:
                if not ctx.no_speed:
                    llm = load_llamacpp(path, n_ctx=512, threads=ctx.threads)
                    ctx.keep.append(llm)
                    row.gen = llamacpp_generator(llm)
            elif row.source == "float32" and row.format.startswith("leanlm"):
                row.gen = None if ctx.no_speed else hf_generator(source(ctx, "float32"), ctx.tok)
            if any(x.format == row.format and x.source == row.source for x in rows):
                continue
            rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--windows", type=int, default=40, help="512-token evaluation windows per perplexity")
    ap.add_argument("--runs", type=int, default=5, help="timed decode runs per row (interleaved, after a warm-up)")
    ap.add_argument("--new-tokens", type=int, default=128, help="new tokens per decode run (protocol: 128)")
    ap.add_argument("--ct-schemes", default=",".join(CT_SCHEMES), help="leanlm presets exported to compressed-tensors")
    ap.add_argument("--samples", type=int, default=8, help="calibration sequences (x 512 tokens) for quantized sources")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="llama.cpp threads (default: all cores)")
    ap.add_argument("--name", default="export", help="results file name under bench/results/")
    ap.add_argument("--reuse-files", action="store_true", help="reuse float-model GGUF files left in bench/.work/export/out by an earlier run")
    ap.add_argument("--from-partial", default="", help="comma list of partial-*.json files of interrupted runs: report their rows "
                    "and time the llama.cpp ones and the float32 baseline")
    ap.add_argument("--no-speed", action="store_true", help="skip the decode-speed run")
    ap.add_argument("--only", default="", help="comma list of row functions, e.g. gguf_rows")
    a = ap.parse_args()
    setup_threads()
    WORK.mkdir(parents=True, exist_ok=True)
    _, tok = leanlm.load(a.model)
    ids = join_and_tokenize(tok, evaluation_texts("wiki"))
    ctx = Ctx(a.model, tok, ids[: a.windows * 512].view(a.windows, 512), a.samples, a.threads, tuple(a.ct_schemes.split(",")), a.reuse_files, a.no_speed)
    fns = [f for f in ROW_FUNCTIONS if not a.only or f.__name__ in a.only.split(",")]
    rows: list[Row] = rows_from_partial(ctx, a.from_partial.split(",")) if a.from_partial else []
    for fn in (fns if not a.from_partial else []):
        t0 = time.perf_counter()
        rows += fn(ctx)
        print(f"{fn.__name__}: {time.perf_counter() - t0:.0f} s")
    if not any(r.format.startswith("leanlm") and r.source == "float32" for r in rows):
        rows.insert(0, leanlm_row(ctx, "float32"))   # the baseline of every ratio
    # one interleaved speed run over every row
    gens = {f"{i}": r.gen for i, r in enumerate(rows) if r.gen is not None and not a.no_speed}
    prompts = protocol_prompts(tok, 1, 128)
    speed = compare_speed(gens, prompts, a.new_tokens, a.runs) if gens else {}
    for i, r in enumerate(rows):
        if f"{i}" in speed:
            r.decode_tps = speed[f"{i}"].decode_tps
    base = next(r for r in rows if r.format.startswith("leanlm") and r.source == "float32")
    base_ppl = base.ppl

    import platform

    try:
        import llama_cpp

        llama_version = llama_cpp.__version__
    except ImportError:
        llama_version = "not installed"
    md = [f"# Export: files in their consuming engines, SmolLM2-135M\n\n"
          f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; torch {torch.__version__} "
          f"({torch.get_num_threads()} threads); llama-cpp-python {llama_version} ({a.threads} threads). "
          f"Perplexity: wiki eval split, {a.windows} windows x 512 tokens ({a.windows * 511} predicted tokens), the same token ids "
          f"in every engine. Decode: batch 1, greedy, 128-token prompt + {a.new_tokens} new tokens, median of {a.runs} runs, every row "
          f"interleaved in one run; ratio to leanlm's float32 model through transformers `generate`. Quantized sources are "
          f"calibrated on {a.samples} x 512 tokens. Load: time to construct the engine's model from the file (page cache warm)."]
    if a.from_partial:
        md.append(f"Rows collected from runs that were stopped before their end ({a.from_partial}); "
                  + ("decode speed not measured." if a.no_speed else "decode speed was then measured in one interleaved run "
                     "for the llama.cpp rows and the float32 baseline only ('-' elsewhere)."))
    cols = ["format", "source", "engine", "file MB", "load s", "perplexity", "vs float32", "decode tok/s", "decode vs float32", "notes"]
    table = [[r.format, r.source, r.engine, f"{r.bytes / 1e6:.1f}" if r.bytes else "-", f"{r.load_s:.2f}" if r.load_s is not None else "-",
              f"{r.ppl:.4f}", f"{r.ppl / base_ppl - 1:+.2%}", f"{r.decode_tps:.1f}" if r.decode_tps else "-",
              f"{r.decode_tps / base.decode_tps:.2f}x" if r.decode_tps and base.decode_tps else "-", r.notes] for r in rows]
    md.append(md_table(cols, table))
    data = {"settings": vars(a), "rows": [{k: v for k, v in r.__dict__.items() if k != "gen"} for r in rows],
            "speed": {k: v.to_dict() for k, v in speed.items()}}
    path = write_results(a.name, data, "\n\n".join(md))
    print(path.read_text())


if __name__ == "__main__":
    main()
