"""Calibration, replay, delta and budget rules, and the report table (privacy/)."""

from __future__ import annotations

import math

import pytest
from opacus.accountants import PRVAccountant, create_accountant

from fedlora.privacy import (
    ACCOUNTANTS,
    calibrate_noise_multiplier,
    effective_epsilon,
    epsilon_for_history,
    format_privacy_table,
    validate_delta,
)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(target_epsilon=0.0),
        dict(target_epsilon=-1.0),
        dict(target_epsilon=math.inf),
        dict(delta=0.0),
        dict(delta=1.0),
        dict(sample_rate=0.0),
        dict(sample_rate=1.5),
        dict(steps=0),
        dict(steps=2.5),
        dict(accountant="gdp"),
        dict(tolerance=0.0),
    ],
)
def test_calibration_rejects_bad_inputs(kwargs: dict) -> None:
    args = dict(target_epsilon=3.0, delta=1e-5, sample_rate=0.01, steps=100, accountant="rdp")
    args.update(kwargs)
    with pytest.raises(ValueError):
        calibrate_noise_multiplier(**args)


def test_federation_wide_calibration_keeps_budget_and_per_round_does_not() -> None:
    """Accounting view of the make_private_with_epsilon-every-round trap (RDP, fast; the
    PRV version runs real rounds in test_privacy_training.py)."""
    target, delta, q, tau, rounds = 3.0, 1e-5, 0.02, 50, 5
    federation = calibrate_noise_multiplier(target, delta, q, tau * rounds, "rdp")
    per_round = calibrate_noise_multiplier(target, delta, q, tau, "rdp")
    spent_ok = epsilon_for_history([(federation, q, tau)] * rounds, delta, "rdp")
    spent_trap = epsilon_for_history([(per_round, q, tau)] * rounds, delta, "rdp")
    assert target - 0.05 <= spent_ok <= target  # on target, not wastefully over-noised
    assert spent_trap > 1.3 * target


@pytest.mark.parametrize("accountant", ACCOUNTANTS)
@pytest.mark.parametrize("target, q, steps", [(2.0, 16 / 300, 30), (8.0, 0.09, 100)])
def test_calibration_lands_just_below_the_target_as_opacus_does(
        accountant: str, target: float, q: float, steps: int) -> None:
    """Our bracket-and-interpolate search keeps Opacus get_noise_multiplier's promise:
    the replayed epsilon is at most the target and within its 0.01 tolerance (compared
    with Opacus's own search under RDP, whose evaluations are cheap)."""
    from opacus.accountants.utils import get_noise_multiplier

    delta = 1e-5
    sigma = calibrate_noise_multiplier(target, delta, q, steps, accountant)
    assert target - 0.01 <= epsilon_for_history([(sigma, q, steps)], delta, accountant) <= target
    if accountant == "rdp":
        theirs = get_noise_multiplier(target_epsilon=target, target_delta=delta, sample_rate=q,
                                      steps=steps, accountant=accountant)
        assert sigma == pytest.approx(theirs, rel=0.01)


def test_calibration_refuses_a_budget_no_noise_reaches() -> None:
    # RDP's conversion has a floor (its largest order): no noise multiplier gets below it.
    with pytest.raises(ValueError, match="noise multiplier above"):
        calibrate_noise_multiplier(0.1, 1e-5, 0.01, 1000, "rdp")


def test_replay_empty_and_noiseless() -> None:
    assert epsilon_for_history([], 1e-5) == 0.0
    assert epsilon_for_history([(0.0, 0.1, 10)], 1e-5, "rdp") == math.inf
    assert epsilon_for_history([(0.0, 0.1, 10)], 1e-5, "prv") == math.inf
    with pytest.raises(ValueError):
        epsilon_for_history([(1.0, 0.1)], 1e-5)  # type: ignore[list-item]


@pytest.mark.parametrize("accountant", ACCOUNTANTS)
def test_replay_equals_a_fresh_opacus_accountant(accountant: str) -> None:
    history = [(1.1, 0.05, 40), (1.3, 0.04, 20)]
    acc = create_accountant(accountant)
    acc.history = list(history)
    assert epsilon_for_history(history, 1e-5, accountant) == acc.get_epsilon(delta=1e-5)


def test_prv_epsilon_is_the_upper_bound_not_the_estimate() -> None:
    history = [(1.0, 0.05, 60)]
    acc = PRVAccountant()
    acc.history = list(history)
    delta, eps_error = 1e-5, 0.01
    dprv = acc._get_dprv(eps_error=eps_error, delta_error=delta / 1000)
    lower, estimate, upper = dprv.compute_epsilon(delta, delta / 1000, eps_error)
    got = epsilon_for_history(history, delta, "prv")
    assert lower < estimate < upper
    assert got == pytest.approx(upper, abs=1e-12)


def test_validate_delta() -> None:
    validate_delta(1e-5, 1000)
    with pytest.raises(ValueError, match=r"0\.001.*1000|1000.*0\.001"):
        validate_delta(1e-3, 1000)  # delta == 1/N
    with pytest.raises(ValueError, match="250"):
        validate_delta(0.01, 250)  # delta > 1/N
    with pytest.raises(ValueError):
        validate_delta(0.0, 10)
    with pytest.raises(ValueError):
        validate_delta(1e-5, 0)


def test_effective_epsilon_the_stricter_wins() -> None:
    assert effective_epsilon(8.0, 2.0) == 2.0  # node cap wins
    assert effective_epsilon(3.0, 10.0) == 3.0
    assert effective_epsilon(3.0, None) == 3.0
    with pytest.raises(ValueError):
        effective_epsilon(3.0, 0.0)


def test_privacy_table() -> None:
    rows = [
        dict(node="node-0", epsilon=1.25, delta=1e-5, noise_multiplier=1.1, max_grad_norm=1.0,
             sample_rate=0.02, steps=200, rounds=4),
        dict(node="node-long-name", epsilon=2.5, delta=1e-4, noise_multiplier=0.9,
             max_grad_norm=0.5, sample_rate=0.05, steps=100, rounds=2),
        dict(node="fresh", epsilon=0.0, delta=1e-5, noise_multiplier=None, max_grad_norm=None,
             sample_rate=None, steps=0, rounds=0),
    ]
    table = format_privacy_table(rows)
    lines = table.splitlines()
    assert lines[0].split() == ["node", "epsilon", "delta", "sigma", "C", "q", "steps", "rounds"]
    assert len({len(line) for line in lines[2:5]}) == 1  # fixed width
    assert "node-long-name" in table and "2.5000" in table
    assert lines[-1] == "guarantee (max over clients): epsilon = 2.5000 at delta = 0.0001"
    assert format_privacy_table([]).endswith("none (no client reported)")
