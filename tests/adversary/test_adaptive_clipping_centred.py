"""Adaptive clipping's released count must be centred (sum of b_k - 1/2, sensitivity 1/2):
only then is the pair (clipped sum, count) one Gaussian mechanism of multiplier z, the
figure the planner and the server's ledger charge."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from opacus.accountants import RDPAccountant

from fedlora.privacy import epsilon_for_history
from fedlora.privacy.client_level import ClientLevelConfig
from fedlora.server.client_dp import ClientLevelDP

# The planner's case: 20 of 100 clients per round, 50 rounds, epsilon 8.
CFG = ClientLevelConfig(epsilon=8.0, delta=1e-5, clip=1.0, rounds=50, num_clients=100,
                        cohort=20, adaptive=True)


def _independent_epsilon(sum_sensitivity: float, count_sensitivity: float,
                         dp: ClientLevelDP) -> float:
    """Epsilon of the pair released each round: noise stds (z_u C, sigma_b); scaling the
    count by z_u C / sigma_b makes the noise isotropic, so the multiplier is
    z_u C / sqrt(s_sum^2 + (z_u C s_count / sigma_b)^2). Opacus's RDP accountant, directly."""
    z_u, sigma_b, clip = dp.plan.update_noise_multiplier, dp.plan.count_noise, dp.clip
    whitened = math.hypot(sum_sensitivity, z_u * clip * count_sensitivity / sigma_b)
    accountant = RDPAccountant()
    accountant.history = [(z_u * clip / whitened, CFG.cohort / CFG.num_clients, CFG.rounds)]
    return accountant.get_epsilon(CFG.delta)


def test_adaptive_clipping_counts_are_centred(tmp_path) -> None:
    dp = ClientLevelDP(CFG, tmp_path / "a", "fed")
    reference = {"w": torch.zeros(6, dtype=torch.float64)}
    small = {"w": torch.full((6,), 0.01)}  # norm below C: unclipped
    big = {"w": torch.full((6,), 5.0)}  # clipped
    cohort = [small, big, small]
    total, count, _ = dp.clipped_sum(cohort, reference)
    # Neighbouring cohorts: one client more, clipped or not. The real server code measures
    # how far one client moves the released statistics.
    sum_sens, count_sens = 0.0, 0.0
    for extra in (small, big):
        total2, count2, _ = dp.clipped_sum([*cohort, extra], reference)
        sum_sens = max(sum_sens, float((total2["w"] - total["w"]).norm()))
        count_sens = max(count_sens, abs(count2 - count))
    assert sum_sens <= dp.clip + 1e-12
    assert count_sens == pytest.approx(0.5)  # a 0/1 count would move by 1

    # The planner's (and so the ledger's) epsilon for the planned rounds ...
    ledger_eps = dp.ledger.epsilon_after(dp.plan.noise_multiplier, dp.plan.sample_rate,
                                         CFG.rounds)
    assert ledger_eps <= CFG.epsilon
    # ... is the epsilon of the mechanism the server really runs.
    assert _independent_epsilon(sum_sens, count_sens, dp) == pytest.approx(ledger_eps, rel=0.01)
    # With uncentred 0/1 indicators (sensitivity 1) the same noise spends far more.
    assert _independent_epsilon(dp.clip, 1.0, dp) > 1.5 * ledger_eps


def test_the_clip_update_de_centres_the_noised_count(tmp_path) -> None:
    dp = ClientLevelDP(CFG, tmp_path / "b", "fed")
    # Noise negligible, to read the estimate: a centred count of 0 is half the cohort
    # unclipped, which is the target quantile: the clip stays.
    dp.plan = dataclasses.replace(dp.plan, count_noise=1e-12)
    _, report = dp.release({"w": torch.zeros(3, dtype=torch.float64)}, 0.0, 1)
    assert report["client_level_unclipped_fraction"] == pytest.approx(0.5)
    assert dp.clip == pytest.approx(CFG.clip)
    # The ledger was charged (z, q) for the round before the release.
    assert dp.ledger.epsilon_spent == pytest.approx(epsilon_for_history(
        [(dp.plan.noise_multiplier, dp.plan.sample_rate, 1)], CFG.delta, CFG.accountant))
