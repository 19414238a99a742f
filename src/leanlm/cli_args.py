"""Checks of command-line input, in one place: numeric option types (range shown in --help) and option
lengths against the model's context once it is loaded (`cli.main` also checks the output location,
`core.io.check_output`, before any model is loaded).

A bad number is argparse's usage error (exit 2, `argument --windows: must be >= 0, got -2`); the context
check raises `LeanLMError` (one line, exit 2) before any long step starts.
"""

from __future__ import annotations

import argparse
import math


class Number:
    """An argparse `type=` for an int or float within a range; `range` is the text `--help` shows."""

    def __init__(self, kind: type = int, lo: float | None = None, hi: float | None = None, *,
                 lo_open: bool = False, hi_open: bool = False):
        self.kind, self.lo, self.hi, self.lo_open, self.hi_open = kind, lo, hi, lo_open, hi_open
        if lo is not None and hi is not None:
            self.range = f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        elif lo is not None:
            self.range = f"{'>' if lo_open else '>='} {lo:g}"
        else:
            self.range = f"{'<' if hi_open else '<='} {hi:g}"
        self.__name__ = kind.__name__  # argparse names the type in its own messages

    def __call__(self, text: str):
        try:
            v = self.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {'an integer' if self.kind is int else 'a number'} "
                                             f"{self.range}, got {text!r}") from None
        lo_bad = self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo)
        hi_bad = self.hi is not None and (v >= self.hi if self.hi_open else v > self.hi)
        if (isinstance(v, float) and not math.isfinite(v)) or lo_bad or hi_bad:
            raise argparse.ArgumentTypeError(f"must be {self.range}, got {text}")
        return v


COUNT = Number(int, 1)                    # how many of something: at least one
COUNT0 = Number(int, 0)                   # 0 means none / all (the help says which)
SEQ_LEN = Number(int, 2)                  # a window of tokens: next-token loss needs two
SEED = Number(int, 0)
POSITIVE = Number(float, 0, lo_open=True)
NONNEG = Number(float, 0)
FRACTION = Number(float, 0, 1, lo_open=True, hi_open=True)
PROBABILITY = Number(float, 0, 1, lo_open=True)   # top-p: (0, 1]
SHARE = Number(float, 0, 1, hi_open=True)         # a share of something that must leave some for the rest: [0, 1)
BITS = Number(float, 1, 16)
PORT = Number(int, 1, 65535)


def device(text: str) -> str:
    """`--device`: cpu, cuda or cuda:N (argparse `type=`; whether a GPU is there is checked when the model moves)."""
    t = text.strip().lower()
    if t == "cpu" or t == "cuda" or (t.startswith("cuda:") and t[5:].isdigit()):
        return t
    raise argparse.ArgumentTypeError(f"must be cpu, cuda or cuda:N, got {text!r}")


def size(text: str) -> int:
    """A parameter count such as 90M, 0.09B or 90000000 (argparse `type=`)."""
    from .core.errors import LeanLMError
    from .prune.api import parse_count

    try:
        v = parse_count(text)
    except LeanLMError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be {size.range}, got {text!r}")
    return v


size.range = "a positive count such as 90M, 0.09B or 90000000"


def memory(text: str) -> str:
    """A memory budget such as 2GB, 1.5GB or 512MiB (argparse `type=`); kept as written."""
    from .core.errors import LeanLMError
    from .core.offload import parse_bytes

    try:
        parse_bytes(text)
    except LeanLMError:
        raise argparse.ArgumentTypeError(f"must be {memory.range}, got {text!r}") from None
    return text


memory.range = "a size such as 2GB, 1.5GB or 512MiB"


def state_ranges(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Append each checked option's range to its --help text (every subcommand)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sp in action.choices.values():
                state_ranges(sp)
        elif hasattr(action.type, "range") and action.help != argparse.SUPPRESS:
            action.help = f"{action.help}; {action.type.range}" if action.help else action.type.range
    return parser


# Options that are token lengths the model must hold (checked once the model is known, before work).
_CONTEXT_OPTIONS = ("seq_len", "calib_seq_len", "window", "max_seq_len", "max_model_len")


def check_context(a: argparse.Namespace, model, tokenizer=None) -> None:
    """Every token length the options ask for fits the model's context (max_position_embeddings)."""
    from .core.errors import LeanLMError

    ctx = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if not isinstance(ctx, int) or ctx < 1:
        return
    fix = "lower it, or use a model with a longer context"
    ppl, speed = getattr(a, "ppl", False), getattr(a, "speed", False)   # eval measures both when neither is given
    for name in _CONTEXT_OPTIONS:
        v = getattr(a, name, None)
        if name == "window" and speed and not ppl:
            continue
        if isinstance(v, int) and v > ctx:
            raise LeanLMError(f"--{name.replace('_', '-')} {v} exceeds the model's context of {ctx} tokens "
                              f"(max_position_embeddings); {fix}")
    if isinstance(getattr(a, "prompt_tokens", None), int) and isinstance(getattr(a, "new_tokens", None), int) and not (ppl and not speed):
        if a.prompt_tokens + a.new_tokens > ctx:
            raise LeanLMError(f"--prompt-tokens {a.prompt_tokens} + --new-tokens {a.new_tokens} exceed the model's context "
                              f"of {ctx} tokens (max_position_embeddings); {fix}")
    if isinstance(getattr(a, "prompt", None), str) and tokenizer is not None and isinstance(getattr(a, "max_new_tokens", None), int):
        n = len(tokenizer(a.prompt, return_attention_mask=False)["input_ids"])
        if n + a.max_new_tokens > ctx:
            raise LeanLMError(f"the prompt ({n} tokens) + --max-new-tokens {a.max_new_tokens} exceed the model's context of "
                              f"{ctx} tokens (max_position_embeddings); shorten the prompt or lower --max-new-tokens")
