"""Sparsity configs: the method, the default pattern, per-layer ordered glob rules.

A pattern is ``"unstructured"`` (a fraction of each output row's weights is zeroed) or ``"n:m"``
(semi-structured: at most ``n`` non-zero weights in every ``m`` consecutive input weights of a row,
NVIDIA's convention; ``"2:4"`` zeroes 2 of every 4, i.e. 50%). Rules are ``(glob, value)`` pairs
matched with ``fnmatch`` against the full module names of the decoder layers' Linears (such as
``model.layers.3.mlp.down_proj``); later rules win. A value is a float (unstructured at that
fraction), a pattern string (``"2:4"``, ``"unstructured"`` at ``sparsity``) or None (leave dense)::

    SparsityConfig("sparsegpt", pattern="2:4", rules=[("*.layers.0.*", None),          # first layer dense
                                                      ("*down_proj", 0.3)])            # 30% unstructured
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field

from ..core.errors import LeanLMError

METHODS = ("magnitude", "wanda", "sparsegpt")


@dataclass(frozen=True)
class Target:
    """What one Linear gets: ``n`` kept of every ``m`` (n:m), or ``m == 0`` and a fraction ``sparsity``."""

    sparsity: float
    n: int = 0
    m: int = 0

    @property
    def structured(self) -> bool:
        return self.m > 0

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.m else f"{self.sparsity:.0%} unstructured"


def _check_ratio(x, where: str) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not 0.0 < float(x) < 1.0:
        raise LeanLMError(f"{where}: sparsity {x!r} is outside (0, 1); give the fraction of weights to zero, e.g. 0.5")
    return float(x)


def parse_pattern(p: str, sparsity: float | None = None, where: str = "pattern") -> Target:
    """``"unstructured"`` (at ``sparsity``, default 0.5) or ``"n:m"``; a one-line LeanLMError otherwise."""
    p = str(p).strip().lower()
    if p == "unstructured":
        return Target(_check_ratio(0.5 if sparsity is None else sparsity, where))
    mt = re.fullmatch(r"(\d+):(\d+)", p)
    if not mt:
        raise LeanLMError(f"{where}: unknown sparsity pattern {p!r}; use 'unstructured' or 'n:m' such as '2:4'")
    n, m = int(mt.group(1)), int(mt.group(2))
    if n > m:
        raise LeanLMError(f"{where}: pattern {p} keeps n={n} of every m={m} weights, but n > m; use n < m, e.g. 2:4")
    if n == 0 or n == m:
        raise LeanLMError(f"{where}: pattern {p} gives sparsity {1 - n / m:.0%}, outside (0, 1); use 0 < n < m, e.g. 2:4")
    s = 1.0 - n / m
    if sparsity is not None and abs(sparsity - s) > 1e-9:
        raise LeanLMError(f"{where}: pattern {p} means sparsity {s:g}, but sparsity={sparsity:g} was given; drop one of them")
    return Target(s, n, m)


@dataclass
class SparsityConfig:
    """How to sparsify a model (see the module docstring for patterns and rules).

    method: ``magnitude`` (|W|, no data), ``wanda`` (|W| * ||X_j||_2, Sun et al. 2023) or
    ``sparsegpt`` (OBS reconstruction with the inverse Hessian, Frantar & Alistarh 2023).
    sparsity: fraction of weights to zero for the unstructured pattern (default 0.5); with ``n:m``
    it follows from the pattern (1 - n/m). Only the Linears inside the decoder layers are candidates:
    the output head and the embeddings stay dense. calib_*: the calibration text that wanda and
    sparsegpt read (``calib_samples`` x ``calib_seq_len`` tokens). block_size / damp: SparseGPT's
    lazy-update block and Hessian dampening (fraction of the mean diagonal). one_pass_max_gib: above
    this estimated activation memory a layer is calibrated in two passes (see sparsify_).
    """

    method: str = "magnitude"
    sparsity: float | None = None
    pattern: str = "unstructured"
    rules: list[tuple[str, float | str | None]] = field(default_factory=list)
    calib_samples: int = 128
    calib_seq_len: int = 512
    calib_batch: int = 8
    block_size: int = 128
    damp: float = 0.01
    one_pass_max_gib: float = 4.0

    def __post_init__(self):
        if self.method not in METHODS:
            raise LeanLMError(f"unknown sparsity method {self.method!r}; choose one of: {', '.join(METHODS)}")
        self.default = parse_pattern(self.pattern, self.sparsity)
        for pat, v in self.rules:
            self._value(pat, v)
        if self.calib_samples < 1 or self.calib_seq_len < 2:
            raise LeanLMError("calib_samples must be >= 1 and calib_seq_len >= 2")

    @property
    def needs_data(self) -> bool:
        return self.method != "magnitude"

    def _value(self, pat: str, v) -> Target | None:
        where = f"rule {pat!r}"
        if v is None:
            return None
        if isinstance(v, str):
            return parse_pattern(v, self.default.sparsity if v.strip().lower() == "unstructured" else None, where)
        return Target(_check_ratio(v, where))

    def resolve(self, names: list[str]) -> dict[str, Target]:
        """Each candidate Linear's target (later rules win); names a rule sets to None are left out.
        A rule that matches no name is an error (almost always a typo)."""
        chosen: dict[str, Target | None] = {n: self.default for n in names}
        for pat, v in self.rules:
            hits = [n for n in names if fnmatch.fnmatchcase(n, pat)]
            if not hits:
                raise LeanLMError(f"rule pattern {pat!r} matches no sparsifiable Linear (names look like: "
                                  f"{', '.join(names[:3])}); fix the pattern")
            t = self._value(pat, v)
            for n in hits:
                chosen[n] = t
        return {n: t for n, t in chosen.items() if t is not None}

    def to_dict(self) -> dict:
        return {"method": self.method, "sparsity": self.default.sparsity, "pattern": self.pattern,
                "rules": [[p, v] for p, v in self.rules], "calib_samples": self.calib_samples,
                "calib_seq_len": self.calib_seq_len, "calib_batch": self.calib_batch, "block_size": self.block_size,
                "damp": self.damp}

    @classmethod
    def from_dict(cls, d: dict) -> "SparsityConfig":
        d = dict(d)
        if d.get("pattern", "unstructured") != "unstructured":
            d.pop("sparsity", None)
        d["rules"] = [tuple(r) for r in d.get("rules", [])]
        return cls(**d)
