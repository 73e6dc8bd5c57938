"""Intervals for the results tables: a mean over seeds with its 95% t-interval, and a
paired comparison of two methods run on the same seeds.

Seeds are the unit: each seed fixes the clients' split, the sampling and the noise, so
two methods run on one seed share everything but the method, and their difference on
that seed is one paired observation.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from scipy import stats


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float  # nan with one value: no interval from one seed
    high: float
    n: int

    def excludes_zero(self) -> bool:
        return self.n > 1 and (self.low > 0 or self.high < 0)

    def zero_width(self) -> bool:
        """Every value the same (n > 1): the t-interval is a point, which is no evidence."""
        return self.n > 1 and self.high - self.low < 1e-12

    def text(self, digits: int = 3, signed: bool = False) -> str:
        sign = "+" if signed else ""
        if self.n == 1:
            return f"{self.mean:{sign}.{digits}f} (n=1)"
        half = (self.high - self.low) / 2
        return f"{self.mean:{sign}.{digits}f} ± {half:.{digits}f} (n={self.n})"


def mean_interval(values: Sequence[float], level: float = 0.95) -> Interval:
    """Mean and the two-sided ``level`` Student-t interval of ``values``."""
    if not values:
        raise ValueError("no values")
    mean = statistics.fmean(values)
    if len(values) == 1:
        return Interval(mean, math.nan, math.nan, 1)
    half = stats.t.ppf((1 + level) / 2, len(values) - 1) * statistics.stdev(values) \
        / math.sqrt(len(values))
    return Interval(mean, mean - half, mean + half, len(values))


def paired_difference(a: Mapping[int, float], b: Mapping[int, float],
                      level: float = 0.95) -> Interval | None:
    """a - b over the seeds both ran, with its paired t-interval; None if none are shared."""
    shared = sorted(set(a) & set(b))
    if not shared:
        return None
    return mean_interval([a[s] - b[s] for s in shared], level)
