"""A secure round skipped under client-level DP (fewer than t clients took part) must be
charged like a released one: whether it is skipped depends on who took part."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from fedlora.aggregation import GlobalState
from fedlora.privacy import epsilon_for_history
from fedlora.privacy.client_level import ClientLevelConfig
from fedlora.server.client_dp import ClientLevelDP
from fedlora.server.exchange import NodeInfo
from fedlora.server.secure_training import SecureAggregationRound


class _Method:
    weighting = "uniform"

    def uplink_reference(self, state, round):
        return state.factors


class _Exchange:
    def push_pull(self, *args, **kwargs):  # a cohort below t never gets this far
        raise AssertionError("no message may be sent to a cohort below the threshold")


def _federation(tmp_path):
    """The read-only view a round gets from the loop (server/rounds.py: Federation)."""
    cfg = {"secagg": {"threshold": 3, "clip_range": 1.0, "bits": 24, "init_bits": 40},
           "federation": {"clients_per_round": 4, "min_clients": 1}}
    factors = {"layer": {"B": torch.zeros(2, 2), "A": torch.zeros(2, 2)}}
    state = GlobalState(0, factors, {"w": torch.zeros(2)}, {})
    lines: list[str] = []
    return SimpleNamespace(cfg=cfg, state=state, method=_Method(), exchange=_Exchange(),
                           job=lambda: {}, progress=SimpleNamespace(line=lines.append),
                           node_name=str, lines=lines)


def test_skipped_secure_round_is_charged(tmp_path) -> None:
    fed = _federation(tmp_path)
    dp = ClientLevelDP(
        ClientLevelConfig(epsilon=8.0, delta=1e-5, clip=0.5, rounds=10, num_clients=8,
                          cohort=4, min_survivors=3), tmp_path, "fed")
    secure = SecureAggregationRound(threshold=3, min_clients=1, client_dp=dp)
    # Poisson sampling drew 2 clients, below t = 3: nothing can be released.
    cohort = [NodeInfo(node_id=i, partition=i, examples=None, rank=2) for i in (1, 2)]
    result = secure.train_round(fed, 1, cohort)
    assert result.averaged is None and not secure.rounds[-1]["released"]
    expected = epsilon_for_history([(dp.plan.noise_multiplier, dp.plan.sample_rate, 1)],
                                   1e-5, "rdp")
    assert dp.ledger.epsilon_spent == expected > 0
    assert result.report["client_level_charged_unreleased"] is True
    assert result.report["client_level_epsilon"] == expected
    assert any("charged" in line for line in fed.lines)
    # A server restarted on the same ledger sees the charge too.
    again = ClientLevelDP(dp.config, tmp_path, "fed")
    assert again.ledger.epsilon_spent == expected
