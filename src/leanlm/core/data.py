"""Offline text for calibration and evaluation, split as ../shared/PROTOCOL.md says.

Sources:
- ``"wiki"``: the English Wikipedia excerpt shipped in the gensim wheel, read with gensim's
  ``extract_pages`` + ``filter_wiki``, redirects and articles under 500 characters dropped, in dump
  order. The first 40 articles are calibration/training text, all later ones evaluation text.
- ``"news"``: the 300 Lee news articles shipped in the same wheel (one per line), same 40 / rest split.
- a path to the user's own ``.txt`` (documents separated by blank lines) or ``.jsonl`` (one
  ``{"text": ...}`` object or JSON string per line). A user file is used whole for both roles: the
  user decides what is held out.
"""

from __future__ import annotations

import bz2
import json
from functools import lru_cache
from pathlib import Path

import torch

from .errors import LeanLMError
from .io import atomic_file
from .models import cache_dir

WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
NEWS_FILE = "lee_background.cor"
N_CALIBRATION = 40
MIN_ARTICLE_CHARS = 500
SOURCES = ("wiki", "news")


def _gensim_path(name: str) -> Path:
    try:
        from gensim.test.utils import datapath
    except ImportError:
        raise LeanLMError("the protocol text ships in the gensim wheel; run: pip install gensim") from None
    p = Path(datapath(name))
    if not p.is_file():
        raise LeanLMError(f"gensim's test data file {name} is missing; reinstall gensim (pip install --force-reinstall gensim)")
    return p


def _wiki_articles() -> list[str]:
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    out = []
    with bz2.BZ2File(_gensim_path(WIKI_FILE)) as f:
        for _title, raw, _pageid in extract_pages(f):
            if raw.lstrip().lower().startswith("#redirect"):
                continue
            text = filter_wiki(raw).strip()
            if len(text) >= MIN_ARTICLE_CHARS:
                out.append(text)
    return out


def _news_articles() -> list[str]:
    lines = _gensim_path(NEWS_FILE).read_text(encoding="utf-8").splitlines()
    return [ln.strip() for ln in lines if ln.strip()]


@lru_cache(maxsize=None)
def _builtin_articles(source: str) -> tuple[str, ...]:
    # Parsing the wiki dump takes seconds; keep the result in the cache dir (keyed by gensim version).
    import gensim

    cached = cache_dir() / "text" / f"{source}-gensim{gensim.__version__}-v1.json"
    if cached.is_file():
        try:
            return tuple(json.loads(cached.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            pass  # a damaged cache file is rebuilt below
    arts = _wiki_articles() if source == "wiki" else _news_articles()
    with atomic_file(cached) as tmp:
        tmp.write_text(json.dumps(arts), encoding="utf-8")
    return tuple(arts)


def read_text_file(path: str | Path, what: str = "text file") -> str:
    """A user's file as UTF-8 text, or a LeanLMError that names the file and the fix (missing, binary, not UTF-8)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise LeanLMError(f"{what} {p} does not exist or is not a file; check the path")
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise LeanLMError(f"cannot read {what} {p} ({e.strerror}); check its permissions") from None
    if b"\x00" in raw[:8192]:
        raise LeanLMError(f"{what} {p} is a binary file, not text; pass a UTF-8 text file")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise LeanLMError(f"{what} {p} is not UTF-8 text (undecodable byte at offset {e.start}); save it as UTF-8") from None


def read_user_texts(path: str | Path) -> list[str]:
    """Documents from a .txt (blank-line separated) or .jsonl file."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise LeanLMError(f"text file {p} does not exist; pass 'wiki', 'news' or a .txt/.jsonl path")
    if p.suffix == ".jsonl":
        docs = []
        for i, line in enumerate(read_text_file(p).splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                raise LeanLMError(f"{p}:{i} is not valid JSON; each line must be {{\"text\": ...}} or a JSON string") from None
            text = obj.get("text") if isinstance(obj, dict) else obj
            if not isinstance(text, str):
                raise LeanLMError(f"{p}:{i} has no string 'text' field; each line must be {{\"text\": ...}} or a JSON string")
            docs.append(text)
    elif p.suffix in (".txt", ".md", ""):
        raw = read_text_file(p)
        docs = [d.strip() for d in raw.replace("\r\n", "\n").split("\n\n")]
    else:
        raise LeanLMError(f"unknown text format {p.suffix!r} for {p}; use a .txt or .jsonl file")
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise LeanLMError(f"{p} holds no text; pass a file with at least one non-empty document")
    return docs


def articles(source: str | Path = "wiki") -> list[str]:
    """All articles of a source, in order."""
    if str(source) in SOURCES:
        return list(_builtin_articles(str(source)))
    return read_user_texts(source)


def calibration_texts(source: str | Path = "wiki") -> list[str]:
    """Calibration/training text: the first 40 articles of a built-in source (a user file whole)."""
    arts = articles(source)
    return arts[:N_CALIBRATION] if str(source) in SOURCES else arts


def evaluation_texts(source: str | Path = "wiki") -> list[str]:
    """Held-out evaluation text: every article after the first 40 (a user file whole)."""
    arts = articles(source)
    return arts[N_CALIBRATION:] if str(source) in SOURCES else arts


def join_and_tokenize(tokenizer, texts: list[str]) -> torch.Tensor:
    """Join documents with a blank line and tokenize once; returns a 1-D LongTensor."""
    if tokenizer is None:
        raise LeanLMError("no tokenizer: load the model with leanlm.load(...) or pass tokenizer=")
    text = "\n\n".join(texts)
    ids = tokenizer(text, return_attention_mask=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def calibration_batches(
    tokenizer, n_samples: int = 128, seq_len: int = 512, source: str | Path = "wiki"
) -> torch.Tensor:
    """`n_samples` x `seq_len` token ids cut consecutively, without overlap, from the calibration text."""
    if n_samples < 1 or seq_len < 2:
        raise LeanLMError(f"need n_samples >= 1 and seq_len >= 2, got {n_samples} x {seq_len}")
    ids = join_and_tokenize(tokenizer, calibration_texts(source))
    need = n_samples * seq_len
    if ids.numel() < need:
        raise LeanLMError(
            f"calibration text has {ids.numel()} tokens but {n_samples} x {seq_len} = {need} were asked; "
            "ask for fewer or shorter samples, or pass a longer text file"
        )
    return ids[:need].view(n_samples, seq_len).clone()
