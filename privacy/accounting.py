"""Noise calibration for a whole federation, and epsilon by accountant replay.

One rule drives this file: calibrate and report with the *same* Opacus accountant. The
noise multiplier is computed once for every step the client may take in the federation
(local steps x planned rounds), never per round, and epsilon spent is always a fresh
accountant's replay of the recorded ``(noise_multiplier, sample_rate, steps)`` history.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from functools import lru_cache

import numpy as np

ACCOUNTANTS: tuple[str, ...] = ("prv", "rdp")

HistoryEntry = tuple[float, float, int]
# Calibration stops once the replayed epsilon is this close below the target (Opacus's
# get_noise_multiplier uses the same absolute tolerance).
CALIBRATION_TOLERANCE = 0.01
_MIN_SIGMA, _MAX_SIGMA = 1e-2, 1e4


def check_accountant(accountant: str) -> str:
    """Return ``accountant`` if it is one of :data:`ACCOUNTANTS`, else raise ValueError."""
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
    return accountant


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


def check_delta(delta: float) -> float:
    if not _is_number(delta) or not 0.0 < float(delta) < 1.0:
        raise ValueError(f"delta must be a number with 0 < delta < 1, got {delta!r}")
    return float(delta)


def check_sample_rate(sample_rate: float) -> float:
    if not _is_number(sample_rate) or not 0.0 < float(sample_rate) <= 1.0:
        raise ValueError(
            f"sample_rate must be a number with 0 < q <= 1 (q = batch size / N_k), "
            f"got {sample_rate!r}"
        )
    return float(sample_rate)


def check_steps(steps: int) -> int:
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    return int(steps)


def check_noise_multiplier(noise_multiplier: float) -> float:
    if (
        not _is_number(noise_multiplier)
        or not math.isfinite(float(noise_multiplier))
        or noise_multiplier < 0
    ):
        raise ValueError(f"noise_multiplier must be finite and >= 0, got {noise_multiplier!r}")
    return float(noise_multiplier)


def check_epsilon(epsilon: float, name: str = "epsilon") -> float:
    if not _is_number(epsilon) or not math.isfinite(float(epsilon)) or epsilon <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {epsilon!r}")
    return float(epsilon)


def calibrate_noise_multiplier(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "prv",
    tolerance: float = CALIBRATION_TOLERANCE,
) -> float:
    """The noise multiplier that spends at most ``target_epsilon`` over ``steps`` steps.

    Call it ONCE per federation with ``steps = local_steps * rounds`` (plus any extra DP
    steps, e.g. Fed-SB's init batches). Calibrating per round, which is what
    ``make_private_with_epsilon`` does when called every round, spends several times the
    budget over the run.

    The answer is the noise multiplier whose replayed epsilon (the very replay the ledger
    reports with) is at most the target and within ``tolerance`` of it, as Opacus's
    ``get_noise_multiplier`` promises; it gets there in 5 to 7 accountant evaluations
    instead of about 20 (bracket, then interpolation in log-log, where epsilon(sigma) is
    nearly a straight line), because a deployed node calibrates in every ClientApp
    process and one PRV evaluation costs about 0.2 s.
    """
    check_accountant(accountant)
    target = check_epsilon(target_epsilon, "target_epsilon")
    delta = check_delta(delta)
    sample_rate = check_sample_rate(sample_rate)
    steps = check_steps(steps)
    if not _is_number(tolerance) or not 0 < tolerance < target:
        raise ValueError(f"tolerance must be in (0, target_epsilon), got {tolerance!r}")

    def spent(sigma: float) -> float:
        return epsilon_for_history([(sigma, sample_rate, steps)], delta, accountant)

    # Bracket: eps(low) > target >= eps(high); epsilon falls as sigma grows.
    high, e_high = 1.0, spent(1.0)
    low, e_low = high, e_high
    while e_high > target:
        low, e_low = high, e_high
        high *= 2.0
        e_high = spent(high)
        if high > _MAX_SIGMA:
            raise ValueError(f"target_epsilon={target} needs a noise multiplier above "
                             f"{_MAX_SIGMA}: is the budget meant to be that small?")
    while e_low <= target:
        high, e_high = low, e_low
        low /= 2.0
        if low < _MIN_SIGMA:
            return high  # a budget this large needs (almost) no noise
        e_low = spent(low)
    while target - e_high > tolerance:
        # Interpolate log sigma at log(target - tolerance / 2), kept inside the bracket.
        want = math.log(target - tolerance / 2)
        t = (want - math.log(e_low)) / (math.log(e_high) - math.log(e_low)) if \
            math.isfinite(e_low) else 0.5
        t = min(max(t, 0.05), 0.95)
        sigma = math.exp(math.log(low) + t * (math.log(high) - math.log(low)))
        e = spent(sigma)
        if e > target:
            low, e_low = sigma, e
        else:
            high, e_high = sigma, e
    return high


def merge_history(entries: Iterable[Sequence[float]]) -> list[HistoryEntry]:
    """Merge consecutive entries with equal (sigma, q), exactly as Opacus's step() does.

    The PRV accountant's numerical domain depends on how the history is split, so keeping
    the same canonical form as calibration (one entry per constant (sigma, q) stretch)
    makes the replay of a planned run equal the calibrated epsilon to the last digit.
    """
    merged: list[HistoryEntry] = []
    for sigma, q, steps in entries:
        sigma, q, steps = float(sigma), float(q), int(steps)
        if merged and merged[-1][0] == sigma and merged[-1][1] == q:
            merged[-1] = (sigma, q, merged[-1][2] + steps)
        else:
            merged.append((sigma, q, steps))
    return merged


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence the accountants' numerical chatter (RDP alpha range, PRV overflow); a
    bad number still surfaces as inf/NaN, which the callers treat as over budget."""
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.filterwarnings("ignore", message="Optimal order is the")
        yield


@lru_cache(maxsize=512)
def _replay(history: tuple[HistoryEntry, ...], delta: float, accountant: str) -> float:
    if any(sigma == 0.0 for sigma, _, _ in history):
        return math.inf  # no noise: no finite epsilon (and PRV would overflow)
    from opacus.accountants import create_accountant  # slow import: on first use

    acc = create_accountant(mechanism=accountant)
    acc.history = list(history)
    with _quiet():
        eps = float(acc.get_epsilon(delta=delta))
    # A NaN from numerical trouble must never read as "under budget".
    return math.inf if math.isnan(eps) else max(eps, 0.0)


def epsilon_for_history(
    history: Sequence[tuple[float, float, int]], delta: float, accountant: str = "prv"
) -> float:
    """Epsilon spent by ``history`` at ``delta``: a fresh Opacus accountant's replay.

    The value is an upper bound: Opacus's RDP conversion is one, and its PRV accountant
    returns the upper end of its numerical error interval (``eps_upper`` of
    ``compute_epsilon``, i.e. the estimate plus ``eps_error``), not the point estimate.
    An empty history spends 0.0; any step with no noise spends ``inf``.
    """
    check_accountant(accountant)
    delta = check_delta(delta)
    entries = []
    for entry in history:
        if len(entry) != 3:
            raise ValueError(f"history entries are (noise_multiplier, sample_rate, steps), got {entry!r}")
        sigma, q, steps = entry
        entries.append(
            (check_noise_multiplier(sigma), check_sample_rate(q), check_steps(steps))
        )
    if not entries:
        return 0.0
    return _replay(tuple(entries), delta, accountant)


def validate_delta(delta: float, num_examples: int) -> None:
    """Raise ValueError unless 0 < delta < 1/N_k (N_k examples, not batches)."""
    if isinstance(num_examples, bool) or not isinstance(num_examples, (int, np.integer)):
        raise ValueError(f"num_examples must be an integer, got {num_examples!r}")
    if num_examples < 1:
        raise ValueError(f"num_examples must be >= 1, got {num_examples}")
    check_delta(delta)
    if not delta < 1.0 / num_examples:
        raise ValueError(
            f"delta={delta:g} must be < 1/N_k = 1/{num_examples} = {1.0 / num_examples:.6g}: "
            f"a larger delta allows releasing a whole record outright"
        )


def effective_epsilon(server_epsilon: float, node_max_epsilon: float | None) -> float:
    """The budget a node enforces: the stricter of the server's and its owner's cap."""
    server_epsilon = check_epsilon(server_epsilon, "server_epsilon")
    if node_max_epsilon is None:
        return server_epsilon
    return min(server_epsilon, check_epsilon(node_max_epsilon, "node_max_epsilon"))
