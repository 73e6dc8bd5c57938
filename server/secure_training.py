"""A training round (and the init round) under secure aggregation: who gets which weight
and instructions, and how the unmasked sum becomes the next global state.

Without client-level DP each node's contribution is p_k (trained - start), p_k its share
of the cohort's released example counts (uniform when any count is withheld), and the
server divides the sum by the survivors' sum of p_k: the weighted mean of the survivors,
as without secure aggregation, up to the quantization bound. With client-level DP every
node clips to C, scales by 1/m, rounds onto the ring's grid and adds its discrete Gaussian
share of the noise, sized so that the honest clients among any t survivors (at most c
collude with the server) carry the calibrated noise (privacy/client_level.py): the sum is
the released, noised mean, charged to the server's ledger. A round that releases nothing
(fewer than t survivors) is charged too: whether it is skipped depends on who took part.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from flwr.app import ConfigRecord, Message

from fedlora.aggregation import GlobalState
from fedlora.task import messages as msgs
from fedlora.task.secure_sum import (
    UNCLIPPED,
    Layout,
    distributed_instructions,
    named,
    split,
)

from .client_dp import ClientLevelDP, cast_head, cast_like
from .exchange import NodeInfo
from .intake import RoundOutcome, contribution_metrics, released_metrics
from .rounds import Federation, RoundResult, state_from_init_mean
from .secure_round import SecureOutcome, SecureRound


class SecureAggregationRound:
    """A RoundAggregation (rounds.py) whose updates reach the server only as a masked sum."""

    def __init__(self, threshold: int, min_clients: int, client_dp: ClientLevelDP | None):
        self.threshold = int(threshold)
        self.min_clients = int(min_clients)
        self.client_dp = client_dp
        self.rounds: list[dict[str, Any]] = []

    def _driver(self, fed: Federation, init_round: bool = False) -> SecureRound:
        noised = self.client_dp is not None and not init_round
        return SecureRound(fed.cfg, fed.exchange, fed.job(), self.threshold, init_round, noised)

    def _weights(self, fed: Federation, cohort: list[NodeInfo]) -> dict[int, float]:
        if self.client_dp is not None:
            return {n.node_id: 1.0 / self.client_dp.config.cohort for n in cohort}
        counts = [n.examples for n in cohort]
        if fed.method.weighting == "examples" and all(c for c in counts):
            total = float(sum(counts))  # type: ignore[arg-type]
            return {n.node_id: n.examples / total for n in cohort}  # type: ignore[operator]
        return {n.node_id: 1.0 / len(cohort) for n in cohort}

    def _instructions(self, fed: Federation, server_round: int) -> dict[str, Any]:
        dp = self.client_dp
        if dp is None:
            return {}
        reference = named(fed.method.uplink_reference(fed.state, server_round), fed.state.head)
        size = Layout.of_named(reference).size
        step = self._driver(fed).params(max(dp.config.cohort, self.threshold, 2)).step
        return distributed_instructions(dp.config, dp.plan, dp.clip, size, step)

    def train_round(self, fed: Federation, server_round: int,
                    cohort: list[NodeInfo]) -> RoundResult:
        weights = self._weights(fed, cohort)
        extra = self._instructions(fed, server_round)
        bytes_down: dict[int, int] = {}

        def message(info: NodeInfo) -> Message:
            m, size = fed.train_message(info, server_round)
            bytes_down[info.node_id] = size
            record = m.content.config_records[msgs.CONFIG]
            record["secagg-scale"] = weights[info.node_id]
            for key, value in extra.items():
                record[key] = value
            return m

        result = self._driver(fed).run(cohort, server_round, message)
        outcome = self._outcome(fed, result)
        if result.total is None or len(result.survivors) < max(self.min_clients, self.threshold):
            return RoundResult(outcome, bytes_down, None, None,
                               self._unreleased(fed, server_round, result))
        report: dict[str, Any] = {}
        averaged, share = self._aggregate(fed, server_round, result, weights, extra, report)
        # Quantization error of the released mean, per coordinate (task/secagg.py).
        bound = self._driver(fed).params(len(cohort)).sum_error_bound(len(result.survivors))
        report["secure_aggregation"] = self._log(fed, server_round, result, bound / share)
        return RoundResult(outcome, bytes_down, averaged, None, report)

    def _unreleased(self, fed: Federation, server_round: int,
                    result: SecureOutcome) -> dict[str, Any]:
        """The report of a round that released nothing; under client-level DP it is
        charged all the same."""
        report: dict[str, Any] = {"secure_aggregation": self._log(fed, server_round, result,
                                                                  None)}
        if self.client_dp is not None:
            report.update(self.client_dp.charge_unreleased(server_round))
            fed.progress.line(f"round {server_round}: charged to the client-level ledger "
                              "although nothing was released (a skip depends on who took "
                              "part)")
        return report

    def _aggregate(self, fed: Federation, server_round: int, result: SecureOutcome,
                   weights: dict[int, float], extra: dict[str, Any],
                   report: dict[str, Any]) -> tuple[GlobalState, float]:
        """The next global state from the unmasked sum, and the survivors' share of the
        weights the mean divides by (1 under client-level DP: the noised mean over m)."""
        before = fed.state
        reference = named(fed.method.uplink_reference(before, server_round), before.head)
        adaptive = self.client_dp is not None and self.client_dp.config.adaptive
        layout = Layout.of_named(reference, unclipped=adaptive)
        total = layout.unflatten(result.total)
        if self.client_dp is not None:
            mean = self._noised_mean(self.client_dp, total, adaptive, extra, server_round,
                                     report)
            share = 1.0
        else:
            share = sum(weights[n.node_id] for n in result.survivors)
            mean = {k: v / share for k, v in total.items()}
        factors, head = split({k: reference[k].double() + mean[k] for k in reference})
        averaged = fed.method.aggregate_mean(before, cast_like(factors, before),
                                             cast_head(head, before))
        return averaged, share

    @staticmethod
    def _noised_mean(dp: ClientLevelDP, total: dict[str, torch.Tensor], adaptive: bool,
                     extra: dict[str, Any], server_round: int,
                     report: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Distributed DP: the released mean (the sum carries the noise), charged to the
        server's ledger; its accounting goes into ``report``."""
        # The count coordinate carries kappa (sum_k (b_k - 1/2) + noise) / m.
        centred = (float(total[UNCLIPPED]) * dp.config.cohort
                   / float(extra["secagg-count-scale"]) if adaptive else None)
        mean, dp_report = dp.release(total, centred, server_round, noised=True)
        dp_report["client_level_rounded_sensitivity"] = (
            float(extra["secagg-norm-bound"]) * float(extra["secagg-grid-step"])
            * dp.config.cohort)
        report.update(dp_report)
        return mean

    def init_round(self, fed: Federation, cohort: list[NodeInfo],
                   message: Callable[[NodeInfo], Message]) -> tuple[GlobalState, int, str]:
        """The method's init round through secure aggregation: the mean of what clients
        send (e.g. Fed-SB's gradient estimates), as init_from_updates needs."""
        weights = self._weights(fed, cohort)

        def build(info: NodeInfo) -> Message:
            m = message(info)
            # Each node its own ConfigRecord: a shared one would carry the last weight.
            record = ConfigRecord(dict(m.content.config_records[msgs.CONFIG]))
            record["secagg-scale"] = weights[info.node_id]
            m.content.config_records[msgs.CONFIG] = record
            return m

        driver = self._driver(fed, init_round=True)
        result = driver.run(cohort, 0, build)
        share = sum(weights[n.node_id] for n in result.survivors)
        self._log(fed, 0, result, driver.params(len(cohort)).sum_error_bound(
            len(result.survivors)) / share if result.survivors else None)
        if result.total is None:
            raise RuntimeError(f"{fed.method.name} init round under secure aggregation "
                               f"released nothing: {result.reason}")
        # What clients send may be smaller than d_out x d_in (e.g. a sketch): the
        # method says the shapes.
        zeros = {m: {r: torch.zeros(shape, dtype=torch.float64) for r, shape in roles.items()}
                 for m, roles in fed.method.init_round_shapes(fed.spec).items()}
        layout = Layout.of(zeros, {})
        state = state_from_init_mean(
            fed, {k: v / share for k, v in layout.unflatten(result.total).items()},
            "mean of the init round")
        line = (f"{fed.method.name} init round (secure aggregation): "
                f"{len(result.survivors)} contributions summed")
        return state, result.bytes_up, line

    def _outcome(self, fed: Federation, result: SecureOutcome) -> RoundOutcome:
        outcome = RoundOutcome(bytes_up=result.bytes_up)
        for reply in result.replies:
            if reply.has_error():  # SecureRound listed it among the dropped
                continue
            name = fed.node_name(reply.metadata.src_node_id)
            metrics = contribution_metrics(reply, name, "secure round", outcome)
            if metrics is None:
                continue
            outcome.clients.append({"node": name, "_node_id": reply.metadata.src_node_id,
                                    "bytes_up": int(metrics.get("bytes-up", 0)),
                                    **released_metrics(metrics)})
        outcome.lost.extend(result.dropped)
        return outcome

    def _log(self, fed: Federation, server_round: int, result: SecureOutcome,
             bound: float | None) -> dict[str, Any]:
        row = {"round": server_round, "survivors": len(result.survivors),
               "dropped": result.dropped, "released": result.total is not None,
               "reason": result.reason, "bytes_up": result.bytes_up,
               "bytes_down_keys": result.bytes_down,
               "seconds": {k: round(v, 3) for k, v in result.seconds.items()},
               "mean_error_bound": bound}
        self.rounds.append(row)
        if result.reason:
            fed.progress.line(f"round {server_round}: secure aggregation released "
                              f"nothing: {result.reason}")
        return row

    def summary(self) -> dict[str, Any]:
        out = {"secure_aggregation": {"threshold": self.threshold, "rounds": self.rounds}}
        if self.client_dp is not None:
            out.update(self.client_dp.summary())
        return out
