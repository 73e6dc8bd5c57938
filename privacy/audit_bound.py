"""A high-confidence lower bound on epsilon from one run with m canaries.

Steinke, Nasr and Jagielski, "Privacy auditing with one (1) training run" (2023), main
theorem for (epsilon, delta)-DP. Each of m canaries is included independently with
probability 1/2 (S_i in {in, out}); after one run an auditor makes r guesses (abstaining
on the rest) of which V are correct. If the mechanism is (epsilon, delta)-DP then, with
f(v) = P[Binomial(r, p) >= v] and p = e^epsilon / (1 + e^epsilon),

    P[V >= v] <= f(v) + 2 m delta * max_{1 <= i <= v} (f(v - i) - f(v)) / i.

The right-hand side is a p-value for the claim "(epsilon, delta)-DP". At significance
beta = 1 - confidence the audit rejects every epsilon whose p-value is <= beta; the lower
bound is the supremum of the rejected epsilons. (epsilon', delta)-DP implies
(epsilon, delta)-DP for epsilon >= epsilon', so the rejected set is an interval [0, bound)
and the bound is found by scanning up from 0 to the first epsilon not rejected.

Guesses come from the canaries' scores: "in" for the k highest, "out" for the k lowest
(r = 2k). Trying several k and keeping the best spends the significance on all of them
(Bonferroni: beta / number of k tried), so the bound stays a (1 - beta) bound.

Pure NumPy/SciPy: no torch, no Opacus.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import special, stats

# Fractions of m guessed on each side ("in" for the top k, "out" for the bottom k). A weak
# signal (a correct mechanism) scores best with few, confident guesses; a strong one with
# many: the grid spans both, and costs log(len) in significance.
DEFAULT_GUESS_FRACTIONS: tuple[float, ...] = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.35, 0.5)

_SCAN_STEP = 0.05  # coarse scan of epsilon, then bisection inside the failing step
_EPSILON_CAP = 60.0  # e^60 / (1 + e^60) is 1 in float64: no larger epsilon is testable


def _check_fraction(name: str, value: float, *, closed: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not (0.0 <= value < 1.0 if closed else 0.0 < value < 1.0):
        interval = "[0, 1)" if closed else "(0, 1)"
        raise ValueError(f"{name} must be in {interval}, got {value!r}")
    return float(value)


def one_run_p_value(epsilon: float, delta: float, canaries: int, guesses: int,
                    correct: int) -> float:
    """The p-value of ``correct`` right guesses out of ``guesses`` under (epsilon, delta)-DP.

    ``canaries`` is m (the delta term scales with it, not with the number of guesses).
    """
    if not 0 <= correct <= guesses <= canaries:
        raise ValueError(f"need 0 <= correct <= guesses <= canaries, got "
                         f"{correct}, {guesses}, {canaries}")
    if correct == 0:
        return 1.0
    p = float(special.expit(epsilon))
    tail = float(stats.binom.sf(correct - 1, guesses, p))  # f(v) = P[X >= v]
    if delta == 0 or tail >= 1.0:
        return min(tail, 1.0)
    # f(v - i) - f(v) = P[v - i <= X <= v - 1]: cumulative sums of the pmf, i = 1..v.
    pmf = stats.binom.pmf(np.arange(correct - 1, -1, -1), guesses, p)
    alpha = float(np.max(np.cumsum(pmf) / np.arange(1, correct + 1)))
    return min(tail + 2.0 * canaries * delta * alpha, 1.0)


def epsilon_from_counts(canaries: int, guesses: int, correct: int, *, delta: float,
                        significance: float) -> float:
    """The largest epsilon that ``correct`` of ``guesses`` rejects at ``significance``.

    0.0 when not even epsilon = 0 is rejected (no evidence of any leakage).
    """
    significance = _check_fraction("significance", significance)
    delta = _check_fraction("delta", delta, closed=True)

    def rejected(eps: float) -> bool:
        return one_run_p_value(eps, delta, canaries, guesses, correct) <= significance

    if not rejected(0.0):
        return 0.0
    low = 0.0
    high = _SCAN_STEP
    while rejected(high):
        low, high = high, high + _SCAN_STEP
        if high > _EPSILON_CAP:
            return _EPSILON_CAP
    for _ in range(40):  # bisection to ~1e-12 of the scan step
        mid = 0.5 * (low + high)
        if rejected(mid):
            low = mid
        else:
            high = mid
    return low


@dataclass(frozen=True)
class AuditBound:
    """The best guess count and the bound it gives."""

    epsilon: float  # the (1 - significance) lower bound on epsilon
    guesses: int  # r = 2k at the best k
    correct: int  # right guesses at the best k
    significance: float  # 1 - confidence, before the split over the ks tried
    ks_tried: int


def guess_counts(canaries: int, fractions: Sequence[float] = DEFAULT_GUESS_FRACTIONS,
                 ) -> list[int]:
    """The distinct k (guesses per side) for ``canaries``: each fraction of m, at least 1
    and at most m // 2."""
    if canaries < 2:
        raise ValueError(f"need at least 2 canaries, got {canaries}")
    ks = {min(canaries // 2, max(1, round(f * canaries))) for f in fractions}
    return sorted(ks)


def count_correct(scores: np.ndarray, included: np.ndarray, k: int) -> int:
    """Right guesses when the k highest scores are guessed "in" and the k lowest "out".

    Ties are broken by canary index (a stable sort), which does not depend on who is in.
    """
    order = np.argsort(scores, kind="stable")
    bottom, top = order[:k], order[len(order) - k:]
    return int(included[top].sum() + (~included[bottom]).sum())


def epsilon_lower_bound(scores: Sequence[float] | np.ndarray,
                        included: Sequence[bool] | np.ndarray, *, delta: float,
                        confidence: float = 0.95, ks: Sequence[int] | None = None,
                        ) -> AuditBound:
    """The (``confidence``) lower bound on epsilon from the canaries' scores.

    ``scores``: one per canary, larger meaning "more likely in"; ``included``: whether each
    canary was in. ``ks``: the guess counts per side to try (default: :func:`guess_counts`);
    the significance is split evenly over them.
    """
    scores = np.asarray(scores, dtype=np.float64)
    included = np.asarray(included, dtype=bool)
    if scores.ndim != 1 or scores.shape != included.shape:
        raise ValueError(f"scores and included must be 1-D of one length, got "
                         f"{scores.shape} and {included.shape}")
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores must be finite")
    m = int(scores.size)
    significance = 1.0 - _check_fraction("confidence", confidence)
    ks = guess_counts(m) if ks is None else sorted({int(k) for k in ks})
    if not ks or ks[0] < 1 or 2 * ks[-1] > m:
        raise ValueError(f"every k must be in [1, m/2] = [1, {m // 2}], got {ks}")
    split = significance / len(ks)
    best = AuditBound(0.0, 0, 0, significance, len(ks))
    for k in ks:
        correct = count_correct(scores, included, k)
        eps = epsilon_from_counts(m, 2 * k, correct, delta=delta, significance=split)
        if eps > best.epsilon:
            best = AuditBound(eps, 2 * k, correct, significance, len(ks))
    return best


def epsilon_ceiling(canaries: int, *, delta: float, confidence: float = 0.95,
                    ks: Sequence[int] | None = None) -> float:
    """The largest bound ``canaries`` canaries can show: every guess right at the best k.

    A claim above this cannot be refuted by any mechanism, however broken: use more
    canaries.
    """
    significance = 1.0 - _check_fraction("confidence", confidence)
    ks = guess_counts(canaries) if ks is None else sorted({int(k) for k in ks})
    split = significance / len(ks)
    return max(epsilon_from_counts(canaries, 2 * k, 2 * k, delta=delta, significance=split)
               for k in ks)
