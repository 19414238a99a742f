"""Shared calibration/evaluation helpers for the peer-tool scripts in bench/peers/.

The peer scripts run inside their own virtual environments (bench/.venvs/<tool>), where leanlm is
installed with ``--no-deps``. They prefer leanlm's own implementation of the measurement protocol
(``leanlm.evaluation...perplexity`` and ``leanlm...data.join_and_tokenize``) so that a peer's figure is
computed by the same code as leanlm's figures; if leanlm cannot be imported, the fallback below
implements the same protocol (../../shared/PROTOCOL.md, "Perplexity"):

* evaluation text = a list of documents, joined with "\\n\\n", tokenized once with the tokenizer's
  default special tokens;
* cut into non-overlapping windows of 512 tokens, the first 40 windows are scored;
* perplexity = exp(mean NLL over every predicted token, i.e. 511 per window).

Calibration samples are cut the same way leanlm cuts them: the calibration documents are joined with
"\\n\\n", tokenized once, and the first ``n_samples * seq_len`` tokens are split into ``n_samples``
consecutive, non-overlapping rows of ``seq_len`` tokens.

This file only depends on torch (and on leanlm/gensim for the built-in "wiki"/"news" sources).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import resource
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

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


def _local_join_and_tokenize(tokenizer, texts: list[str]) -> torch.Tensor:
    text = "\n\n".join(texts)
    ids = tokenizer(text, return_attention_mask=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def join_and_tokenize(tokenizer, texts: list[str]) -> torch.Tensor:
    """1-D LongTensor: documents joined with a blank line, tokenized once (leanlm's when present)."""
    fn = _leanlm_join_and_tokenize()
    return (fn or _local_join_and_tokenize)(tokenizer, texts).reshape(-1)


def calibration_ids(tokenizer, texts: list[str], n_samples: int, seq_len: int) -> torch.Tensor:
    """(n_samples, seq_len) ids cut consecutively, without overlap, from the joined calibration text."""
    if n_samples < 1 or seq_len < 2:
        raise SystemExit(f"need --samples >= 1 and --seq-len >= 2, got {n_samples} x {seq_len}")
    ids = join_and_tokenize(tokenizer, texts)
    need = n_samples * seq_len
    if ids.numel() < need:
        raise SystemExit(
            f"calibration text has {ids.numel()} tokens but {n_samples} x {seq_len} = {need} were asked"
        )
    return ids[:need].view(n_samples, seq_len).clone()


# ------------------------------------------------------------------------------ leanlm hooks
def _leanlm_join_and_tokenize():
    for mod in ("leanlm.data", "leanlm.core.data"):
        try:
            m = __import__(mod, fromlist=["join_and_tokenize"])
            fn = getattr(m, "join_and_tokenize", None)
            if callable(fn):
                return fn
        except Exception:
            continue
    return None


def _leanlm_perplexity():
    """leanlm's perplexity function, or None. `leanlm.evaluation.perplexity` may be the module."""
    for mod in ("leanlm.evaluation", "leanlm.evaluation.perplexity"):
        try:
            m = __import__(mod, fromlist=["perplexity"])
        except Exception:
            continue
        obj = getattr(m, "perplexity", None)
        if obj is not None and not callable(obj):
            obj = getattr(obj, "perplexity", None)
        if callable(obj):
            return obj
    return None


# -------------------------------------------------------------------------------- perplexity
@torch.inference_mode()
def local_perplexity(model, ids: torch.Tensor, window: int = WINDOW, max_windows: int | None = MAX_WINDOWS,
                     batch_size: int = 4) -> dict:
    ids = ids.reshape(-1)
    n_full = ids.numel() // window
    if n_full == 0:
        raise SystemExit(f"evaluation text has {ids.numel()} tokens, fewer than one window of {window}")
    n = n_full if max_windows is None else min(n_full, max_windows)
    if max_windows is not None and n < max_windows:
        print(f"warning: evaluation text gives only {n} windows of {window} tokens (asked for {max_windows})",
              file=sys.stderr)
    windows = ids[: n * window].view(n, window)
    device = next(model.parameters()).device
    total_nll, total_tok = 0.0, 0
    for i in range(0, n, batch_size):
        batch = windows[i: i + batch_size].to(device)
        out = model(input_ids=batch, use_cache=False)
        logits = (out.logits if hasattr(out, "logits") else out)[:, :-1].float()
        targets = batch[:, 1:]
        nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="sum")
        if not torch.isfinite(nll):
            raise RuntimeError("the model produced NaN/inf log-likelihoods")
        total_nll += nll.item()
        total_tok += targets.numel()
    mean = total_nll / total_tok
    return {"perplexity": math.exp(mean), "nll": mean, "tokens": total_tok, "windows": n, "window": window}


def evaluate(model, tokenizer, texts: list[str], *, window: int = WINDOW, max_windows: int | None = MAX_WINDOWS,
             batch_size: int = 4, force_local: bool = False) -> dict:
    """Held-out perplexity of `model` on `texts` under the protocol; says which implementation ran."""
    model.eval()
    t0 = time.perf_counter()
    fn = None if force_local else _leanlm_perplexity()
    res = None
    if fn is not None:
        try:
            r = fn(model, tokenizer, texts=texts, window=window, max_windows=max_windows,
                   batch_size=batch_size, progress=False)
            d = r.to_dict() if hasattr(r, "to_dict") else dict(vars(r))
            res = {k: d[k] for k in ("perplexity", "nll", "tokens", "windows", "window") if k in d}
            res["implementation"] = f"{fn.__module__}.{fn.__name__}"
        except TypeError as e:  # leanlm's signature changed under us: fall back, but say so
            print(f"warning: leanlm perplexity() not usable ({e}); using bench/peers/_ppl.py", file=sys.stderr)
            res = None
    if res is None:
        ids = join_and_tokenize(tokenizer, texts)
        res = local_perplexity(model, ids, window=window, max_windows=max_windows, batch_size=batch_size)
        res["implementation"] = "bench/peers/_ppl.py"
    res["tokenizer_impl"] = "leanlm" if _leanlm_join_and_tokenize() else "bench/peers/_ppl.py"
    res["eval_texts_sha256"] = text_digest(texts)
    res["eval_seconds"] = round(time.perf_counter() - t0, 2)
    return res


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
