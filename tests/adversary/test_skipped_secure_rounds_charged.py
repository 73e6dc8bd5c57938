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
from fedlora.server.secure_training import SecureTraining


class _Method:
    weighting = "uniform"

    def uplink_reference(self, state, round):
        return state.factors


class _Exchange:
    def push_pull(self, *args, **kwargs):  # a cohort below t never gets this far
        raise AssertionError("no message may be sent to a cohort below the threshold")


def _strategy(tmp_path):
    cfg = {"secagg": {"threshold": 3, "clip_range": 1.0, "bits": 24, "init_bits": 40},
           "federation": {"clients_per_round": 4, "min_clients": 1}}
    client_dp = ClientLevelDP(
        ClientLevelConfig(epsilon=8.0, delta=1e-5, clip=0.5, rounds=10, num_clients=8,
                          cohort=4, min_survivors=3), tmp_path, "fed")
    factors = {"layer": {"B": torch.zeros(2, 2), "A": torch.zeros(2, 2)}}
    state = GlobalState(0, factors, {"w": torch.zeros(2)}, {})
    lines: list[str] = []
    return SimpleNamespace(cfg=cfg, fed=cfg["federation"], client_dp=client_dp, state=state,
                           method=_Method(), exchange=_Exchange(), _job=lambda: {},
                           _round_report={}, progress=SimpleNamespace(line=lines.append),
                           lines=lines)


def test_skipped_secure_round_is_charged(tmp_path) -> None:
    s = _strategy(tmp_path)
    secure = SecureTraining(s)
    # Poisson sampling drew 2 clients, below t = 3: nothing can be released.
    cohort = [NodeInfo(node_id=i, partition=i, examples=None, rank=2) for i in (1, 2)]
    _, _, skipped = secure.train_round(1, cohort)
    assert skipped and not secure.rounds[-1]["released"]
    dp = s.client_dp
    expected = epsilon_for_history([(dp.plan.noise_multiplier, dp.plan.sample_rate, 1)],
                                   1e-5, "rdp")
    assert dp.ledger.epsilon_spent == expected > 0
    assert s._round_report["client_level_charged_unreleased"] is True
    assert s._round_report["client_level_epsilon"] == expected
    assert any("charged" in line for line in s.lines)
    # A server restarted on the same ledger sees the charge too.
    again = ClientLevelDP(dp.config, tmp_path, "fed")
    assert again.ledger.epsilon_spent == expected
