"""Shared calibration/evaluation helpers for the peer-tool scripts in bench/peers/.

The peer scripts run inside their own virtual environments (bench/.venvs/<tool>), where
bench/peers/setup_peers.sh installs leanlm with ``--no-deps``. They use leanlm's own protocol code
(``leanlm.core.data`` for the text split and calibration rows, ``leanlm.evaluation.perplexity``), so
a peer's figure is computed by exactly the same code as leanlm's figures.

"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import resource
import time
from pathlib import Path

import torch

WINDOW = 512
MAX_WINDOWS = 40
BUILTIN_SOURCES = ("wiki", "news")


# --------------------------------------------------------------------------------------- text
def load_texts(spec: str, role: str) -> list[str]:
    """Documents from a JSON file holding a list of strings.

    ``spec`` may also be ``wiki`` or ``news``: leanlm's built-in protocol text (the calibration
    split when ``role == "calibration"``, the held-out split when ``role == "evaluation"``).
    """
    if spec in BUILTIN_SOURCES and not Path(spec).exists():
        try:
            from leanlm.core import data as ldata
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise SystemExit(f"--{role[:5]}-file {spec!r} needs leanlm installed in this environment ({e})")
        return list(ldata.calibration_texts(spec) if role == "calibration" else ldata.evaluation_texts(spec))
    p = Path(spec).expanduser()
    if not p.is_file():
        raise SystemExit(f"{role} file {p} does not exist")
    obj = json.loads(p.read_text(encoding="utf-8"))
    if not isinstance(obj, list) or not all(isinstance(s, str) for s in obj):
        raise SystemExit(f"{role} file {p} must hold a JSON list of strings")
    obj = [s for s in obj if s.strip()]
    if not obj:
        raise SystemExit(f"{role} file {p} holds no non-empty string")
    return obj


def text_digest(texts: list[str]) -> str:
    return hashlib.sha256("\n\n".join(texts).encode("utf-8")).hexdigest()


def calibration_ids(tokenizer, texts: list[str], n_samples: int, seq_len: int) -> torch.Tensor:
    """(n_samples, seq_len) ids cut consecutively, without overlap, from the joined calibration text
    (the same cut as ``leanlm.core.data.calibration_batches``)."""
    from leanlm.core.data import join_and_tokenize

    if n_samples < 1 or seq_len < 2:
        raise SystemExit(f"need --samples >= 1 and --seq-len >= 2, got {n_samples} x {seq_len}")
    ids = join_and_tokenize(tokenizer, texts)
    need = n_samples * seq_len
    if ids.numel() < need:
        raise SystemExit(f"calibration text has {ids.numel()} tokens but {n_samples} x {seq_len} = {need} were asked")
    return ids[:need].view(n_samples, seq_len).clone()


def evaluate(model, tokenizer, texts: list[str], *, window: int = WINDOW, max_windows: int | None = MAX_WINDOWS,
             batch_size: int = 4) -> dict:
    """Held-out perplexity of `model` on `texts` under the protocol, by leanlm's own perplexity code."""
    from leanlm.evaluation import perplexity

    model.eval()
    t0 = time.perf_counter()
    r = perplexity(model, tokenizer, texts=texts, window=window, max_windows=max_windows, batch_size=batch_size, progress=False)
    return {"perplexity": r.perplexity, "nll": r.nll, "tokens": r.tokens, "windows": r.windows, "window": r.window,
            "implementation": "leanlm.evaluation.perplexity", "eval_texts_sha256": text_digest(texts),
            "eval_seconds": round(time.perf_counter() - t0, 2)}


# ------------------------------------------------------------------------------------ misc
def setup_threads() -> int:
    n = os.cpu_count() or 1
    torch.set_num_threads(n)
    return n


def peak_rss_mib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)  # Linux: KiB


def machine_info() -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__}


def pkg_version(name: str) -> str | None:
    try:
        from importlib.metadata import version
        return version(name)
    except Exception:
        return None


def write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def save_float_checkpoint(src_dir: str, out_dir: Path, state: dict[str, torch.Tensor], tokenizer,
                          extra_config: dict | None = None) -> dict:
    """Write a plain float32 HF checkpoint at `out_dir`: the original model class and config from
    `src_dir`, its parameters replaced by `state` (name -> tensor, the peer's dequantized weights).

    Every parameter of the original model must be given (strictly checked). If the exported
    lm_head differs from the embedding, the word embeddings are untied in the saved config.
    Returns a small report.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(src_dir)
    for k in ("quantization_config",):
        if hasattr(config, k):
            delattr(config, k)
    emb, head = state.get("model.embed_tokens.weight"), state.get("lm_head.weight")
    untied = False
    if getattr(config, "tie_word_embeddings", False) and emb is not None and head is not None \
            and not torch.equal(emb.float(), head.float()):
        config.tie_word_embeddings = False
        untied = True
    for k, v in (extra_config or {}).items():
        setattr(config, k, v)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    own = model.state_dict()
    missing = [k for k in own if k not in state and not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing:
        raise RuntimeError(f"export: no value for {missing[:5]}{'...' if len(missing) > 5 else ''}")
    with torch.no_grad():
        for k, p in own.items():
            if k in state:
                v = state[k]
                if v.shape != p.shape:
                    raise RuntimeError(f"export: shape of {k} is {tuple(v.shape)}, expected {tuple(p.shape)}")
                p.copy_(v.to(torch.float32))
    if config.tie_word_embeddings:
        model.tie_weights()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return {"dir": str(out_dir.resolve()), "dtype": "float32", "untied_word_embeddings": untied}


# ------------------------------------------------------------------------ the shared peer flow
def common_args(ap) -> None:
    """Arguments every peer script takes."""
    ap.add_argument("--model", required=True, help="float HF checkpoint folder")
    ap.add_argument("--calib-file", required=True, help="JSON list of calibration strings (or 'wiki'/'news' via leanlm)")
    ap.add_argument("--eval-file", default=None, help="JSON list of held-out strings (or 'wiki'/'news' via leanlm); "
                    "omit to skip perplexity")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--out", required=True)
    ap.add_argument("--eval-float", action="store_true", help="also score the float model before quantizing")
    ap.add_argument("--eval-export", choices=("auto", "yes", "no"), default="auto",
                    help="reload and score the exported float checkpoint (auto: only when activations are "
                         "quantized, i.e. when it differs from the in-process figure)")
    ap.add_argument("--batch-size", type=int, default=4, help="evaluation batch (windows)")
    ap.add_argument("--windows", type=int, default=MAX_WINDOWS, help="evaluation windows of 512 tokens")
    ap.add_argument("--eval-news", action="store_true",
                    help="also score the news domain's held-out split (leanlm's 'news' evaluation text, never calibrated on)")


def prepare(args, report: dict):
    """Threads, texts, the float model and tokenizer, calibration ids; fills the report's common fields."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    setup_threads()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    calib_texts = load_texts(args.calib_file, "calibration")
    eval_texts = load_texts(args.eval_file, "evaluation") if args.eval_file else None
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    report.update(model=str(Path(args.model).resolve()), machine=machine_info())
    report["versions"]["leanlm"] = pkg_version("leanlm")
    if eval_texts is not None and args.eval_float:
        report["float_eval"] = evaluate(model, tok, eval_texts, max_windows=args.windows, batch_size=args.batch_size)
        print(f"float perplexity {report['float_eval']['perplexity']:.4f}", flush=True)
    ids = calibration_ids(tok, calib_texts, args.samples, args.seq_len)
    report["calibration"] = {"samples": args.samples, "seq_len": args.seq_len, "tokens": int(ids.numel()),
                             "source": args.calib_file, "texts_sha256": text_digest(calib_texts),
                             "cut": "documents joined with a blank line, tokenized once, first samples*seq_len "
                                    "tokens in consecutive rows"}
    return tok, model, ids, eval_texts


def timed_calibration(report: dict, run):
    """Run the tool's calibration, recording wall time and the load average around it (other
    processes on the machine inflate wall time)."""
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    out = run()
    secs = time.perf_counter() - t0
    report["calibration_wall_seconds"] = round(secs, 2)
    report["calib_seconds"] = report["calibration_wall_seconds"]  # alias read by bench/ptq.py
    report["load_average_1min"] = {"before_calibration": round(load_before[0], 2),
                                   "after_calibration": round(os.getloadavg()[0], 2)}
    print(f"calibration done in {secs:.1f}s", flush=True)
    return out


def score_and_export(args, report: dict, model, tok, eval_texts, state: dict, act_quant: bool, what: str, note: str) -> None:
    """Score the in-process quantized model, write the dequantized float checkpoint and peer.json.

    what: how the in-process model computes; note: what the exported checkpoint holds."""
    from transformers import AutoModelForCausalLM

    out = Path(args.out)
    if eval_texts is not None:
        report["eval"] = evaluate(model, tok, eval_texts, max_windows=args.windows, batch_size=args.batch_size)
        report["eval"]["what"] = what
        report["perplexity"] = report["eval"]["perplexity"]
        print(f"{args.scheme}: perplexity {report['perplexity']:.4f}", flush=True)
    if getattr(args, "eval_news", False):
        news = load_texts("news", "evaluation")
        report["eval_news"] = evaluate(model, tok, news, max_windows=args.windows, batch_size=args.batch_size)
        report["perplexity_news"] = report["eval_news"]["perplexity"]
        print(f"{args.scheme}: news perplexity {report['perplexity_news']:.4f}", flush=True)
    report["export"] = save_float_checkpoint(args.model, out, state, tok)
    report["export"]["activation_quant_in_checkpoint"] = False
    report["export"]["note"] = note
    want_export_eval = args.eval_export == "yes" or (args.eval_export == "auto" and act_quant)
    if eval_texts is not None and want_export_eval:
        m2 = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        report["export"]["eval"] = evaluate(m2, tok, eval_texts, max_windows=args.windows, batch_size=args.batch_size)
        report["perplexity_exported_checkpoint"] = report["export"]["eval"]["perplexity"]
        print(f"exported checkpoint (weights only): perplexity {report['perplexity_exported_checkpoint']:.4f}")
    report["peak_rss_mib"] = peak_rss_mib()
    write_json(out / "peer.json", report)
    print(f"wrote {out}/peer.json", flush=True)
