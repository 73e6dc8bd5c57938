"""The results tables' statistics: t-intervals and paired differences, against values
computed by hand."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from stats import mean_interval, paired_difference  # noqa: E402


def test_t_interval_matches_the_textbook() -> None:
    # mean 2, sd 1, n 3: half width t_{0.975, 2} / sqrt(3) = 4.302653 / 1.732051
    iv = mean_interval([1.0, 2.0, 3.0])
    assert iv.mean == 2.0 and iv.n == 3
    assert iv.high - iv.mean == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)
    assert iv.text() == "2.000 ± 2.484 (n=3)"


def test_one_seed_has_no_interval() -> None:
    iv = mean_interval([0.9])
    assert math.isnan(iv.low) and not iv.excludes_zero() and iv.text() == "0.900 (n=1)"


def test_paired_difference_uses_only_shared_seeds() -> None:
    a = {2: 0.92, 3: 0.93, 4: 0.94, 5: 0.99}
    b = {2: 0.90, 3: 0.90, 4: 0.91}
    d = paired_difference(a, b)
    assert d is not None and d.n == 3
    assert d.mean == pytest.approx((0.02 + 0.03 + 0.03) / 3)
    assert d.excludes_zero()  # a consistent gain of 2-3 points over 3 paired seeds
    assert paired_difference({1: 0.5}, {2: 0.5}) is None
    noisy = paired_difference({1: 0.9, 2: 0.8, 3: 0.95}, {1: 0.85, 2: 0.9, 3: 0.9})
    assert noisy is not None and not noisy.excludes_zero()


def test_paired_table_judges_significance_from_three_seeds_only():
    from bench.quality import paired_lines

    # Two seeds whose differences are equal (one test article each): a zero-width interval.
    by_seed = {("fedavg", "dp_eps8"): {2: 0.900, 3: 0.910},
               ("ffa", "dp_eps8"): {2: 0.9045, 3: 0.9145}}
    (row,) = [line for line in paired_lines(by_seed, ["fedavg", "ffa"], ["dp_eps8"])
              if line.startswith("| ffa")]
    assert row.endswith("| too few seeds |")
    by_seed[("fedavg", "dp_eps8")][4], by_seed[("ffa", "dp_eps8")][4] = 0.905, 0.910
    (row,) = [line for line in paired_lines(by_seed, ["fedavg", "ffa"], ["dp_eps8"])
              if line.startswith("| ffa")]
    assert row.endswith("| yes |")
    # Three identical differences (two test articles each time): zero spread is no evidence.
    by_seed[("ffa", "dp_eps8")][4] = 0.9095
    (row,) = [line for line in paired_lines(by_seed, ["fedavg", "ffa"], ["dp_eps8"])
              if line.startswith("| ffa")]
    assert row.endswith("| not judged (identical differences) |")
