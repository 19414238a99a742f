"""Adaptive speculation length: pick k from the running acceptance rate and the measured costs.

Model (geometric acceptance, as in Leviathan et al. 2023, section 3.1): each draft token is accepted
with probability ``a``, independently, given the ones before it were. A round that drafts ``k``
tokens then yields ``E(k) = (1 - a^(k+1)) / (1 - a)`` tokens (the accepted drafts plus the target's
own token) and costs ``k * d + t(k + 1)``: ``d`` the time of one draft token, ``t(n) = t0 + t1 * n``
the time of one target forward over ``n`` tokens. We choose the k in ``[k_min, k_max]`` that
maximises ``E(k) / cost(k)``, tokens per second.

Estimates, updated after every round:
- ``a``: accepted / (accepted + rejections) over the recent rounds (counts decay by ``decay`` per
  round, starting from a prior of ``prior`` worth 2 observations). A round that accepts n of k
  drafts gives n successes and one failure when n < k; this is the maximum-likelihood estimate for
  truncated geometric rounds.
- ``d``: exponential moving average of the draft time per drafted token.
- ``t0, t1``: a least-squares line through the recent (tokens, seconds) target forwards; until two
  different lengths have been seen, ``t1 = 0.05 * t0`` (on this CPU one verification over 5 tokens
  costs about as much as over 1: decode is overhead-bound).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from ..core.errors import LeanLMError


@dataclass
class AdaptiveK:
    k_min: int = 1
    k_max: int = 8
    prior: float = 0.6
    decay: float = 0.9
    acc: float = field(init=False, default=0.0)
    rej: float = field(init=False, default=0.0)
    d: float | None = field(init=False, default=None)
    target: deque = field(init=False, default_factory=lambda: deque(maxlen=32))

    def __post_init__(self):
        if not 1 <= self.k_min <= self.k_max:
            raise LeanLMError(f"need 1 <= k_min <= k_max for adaptive speculation, got {self.k_min} and {self.k_max}")
        self.acc, self.rej = 2 * self.prior, 2 * (1 - self.prior)

    @property
    def alpha(self) -> float:
        return self.acc / (self.acc + self.rej)

    def observe(self, k: int, accepted: int, draft_s: float, target_tokens: int, target_s: float) -> None:
        if k > 0:
            self.acc = self.decay * self.acc + accepted
            self.rej = self.decay * self.rej + (1 if accepted < k else 0)
            per = draft_s / k
            self.d = per if self.d is None else 0.8 * self.d + 0.2 * per
        self.target.append((target_tokens, target_s))

    def target_cost(self) -> tuple[float, float]:
        xs = [n for n, _ in self.target]
        ys = [s for _, s in self.target]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        var = sum((x - mx) ** 2 for x in xs)
        if var == 0:
            return my / (1 + 0.05 * mx), 0.05 * my / (1 + 0.05 * mx)
        t1 = max(0.0, sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var)
        return max(my - t1 * mx, 1e-9), t1

    def choose(self) -> int:
        if not self.target or self.d is None:
            return min(max(4, self.k_min), self.k_max)  # no measurements yet
        a = min(self.alpha, 0.999)
        t0, t1 = self.target_cost()
        best, best_rate = self.k_min, -1.0
        for k in range(self.k_min, self.k_max + 1):
            rate = (1 - a ** (k + 1)) / (1 - a) / (k * self.d + t0 + t1 * (k + 1))
            if rate > best_rate:
                best, best_rate = k, rate
        return best
