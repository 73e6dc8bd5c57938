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
from typing import TYPE_CHECKING, Any

import torch
from flwr.app import ConfigRecord, Message, MessageType

from fedlora.aggregation import ClientUpdate, GlobalState
from fedlora.task import messages as msgs
from fedlora.task.secure_sum import (
    UNCLIPPED,
    Layout,
    distributed_instructions,
    named,
    secagg_threshold,
    split,
)

from .client_dp import cast_head, cast_like
from .intake import RoundOutcome, contribution_metrics, released_metrics
from .secure_round import SecureOutcome, SecureRound

if TYPE_CHECKING:
    from .exchange import NodeInfo
    from .strategy import FedLoraStrategy


class SecureTraining:
    def __init__(self, strategy: FedLoraStrategy):
        self.strategy = strategy
        self.threshold = secagg_threshold(strategy.cfg)
        self.rounds: list[dict[str, Any]] = []

    def _driver(self, init_round: bool = False) -> SecureRound:
        s = self.strategy
        noised = s.client_dp is not None and not init_round
        return SecureRound(s.cfg, s.exchange, s._job(), self.threshold, init_round, noised)

    def _weights(self, cohort: list[NodeInfo]) -> dict[int, float]:
        s = self.strategy
        if s.client_dp is not None:
            return {n.node_id: 1.0 / s.client_dp.config.cohort for n in cohort}
        counts = [n.examples for n in cohort]
        if s.method.weighting == "examples" and all(c for c in counts):
            total = float(sum(counts))  # type: ignore[arg-type]
            return {n.node_id: n.examples / total for n in cohort}  # type: ignore[operator]
        return {n.node_id: 1.0 / len(cohort) for n in cohort}

    def _instructions(self, server_round: int) -> dict[str, Any]:
        s = self.strategy
        dp = s.client_dp
        if dp is None:
            return {}
        reference = named(s.method.uplink_reference(s.state, server_round), s.state.head)
        size = Layout.of_named(reference).size
        step = self._driver().params(max(dp.config.cohort, self.threshold, 2)).step
        return distributed_instructions(dp.config, dp.plan, dp.clip, size, step)

    def train_round(self, server_round: int, cohort: list[NodeInfo]
                    ) -> tuple[RoundOutcome, dict[int, int], bool]:
        """(outcome, bytes down per node, skipped)."""
        s = self.strategy
        weights = self._weights(cohort)
        extra = self._instructions(server_round) if s.client_dp is not None else {}
        bytes_down: dict[int, int] = {}

        def message(info: NodeInfo) -> Message:
            m = s._message(info, server_round, msgs.PHASE_TRAIN, MessageType.TRAIN)
            bytes_down[info.node_id] = s._sent_bytes[info.node_id]
            record = m.content.config_records[msgs.CONFIG]
            record["secagg-scale"] = weights[info.node_id]
            for key, value in extra.items():
                record[key] = value
            return m

        result = self._driver().run(cohort, server_round, message)
        outcome = self._outcome(result)
        before = s.state
        minimum = max(int(s.fed["min_clients"]), self.threshold)
        if result.total is None or len(result.survivors) < minimum:
            s.state = GlobalState(server_round, before.factors, before.head, before.meta)
            self._log(server_round, result, None)
            if s.client_dp is not None:
                s._round_report.update(s.client_dp.charge_unreleased(server_round))
                s.progress.line(f"round {server_round}: charged to the client-level ledger "
                                "although nothing was released (a skip depends on who took "
                                "part)")
            return outcome, bytes_down, True
        reference = named(s.method.uplink_reference(before, server_round), before.head)
        adaptive = s.client_dp is not None and s.client_dp.config.adaptive
        layout = Layout.of_named(reference, unclipped=adaptive)
        total = layout.unflatten(result.total)
        if s.client_dp is not None:
            # The count coordinate carries kappa (sum_k (b_k - 1/2) + noise) / m.
            centred = (float(total[UNCLIPPED]) * s.client_dp.config.cohort
                       / float(extra["secagg-count-scale"]) if adaptive else None)
            mean, report = s.client_dp.release(total, centred, server_round, noised=True)
            report["client_level_rounded_sensitivity"] = (
                float(extra["secagg-norm-bound"]) * float(extra["secagg-grid-step"])
                * s.client_dp.config.cohort)
            s._round_report.update(report)
            share = 1.0
        else:
            share = sum(weights[n.node_id] for n in result.survivors)
            mean = {k: v / share for k, v in total.items()}
        factors, head = split({k: reference[k].double() + mean[k] for k in reference})
        averaged = s.method.aggregate_mean(before, cast_like(factors, before),
                                           cast_head(head, before))
        s.state = s.server_optimizer.step(before, averaged)
        # Quantization error of the released mean, per coordinate (task/secagg.py).
        bound = self._driver().params(len(cohort)).sum_error_bound(len(result.survivors))
        self._log(server_round, result, bound / share)
        return outcome, bytes_down, False

    def init_round(self, cohort: list[NodeInfo], message: Callable[[NodeInfo], Message]
                   ) -> tuple[GlobalState | None, SecureOutcome]:
        """The method's init round through secure aggregation: the mean of what clients
        send (e.g. Fed-SB's gradient estimates), as init_from_updates needs."""
        s = self.strategy
        weights = self._weights(cohort)

        def build(info: NodeInfo) -> Message:
            m = message(info)
            # The init messages share one ConfigRecord: give each node its own copy, or
            # every node would read the last node's weight.
            record = ConfigRecord(dict(m.content.config_records[msgs.CONFIG]))
            record["secagg-scale"] = weights[info.node_id]
            m.content.config_records[msgs.CONFIG] = record
            return m

        driver = self._driver(init_round=True)
        result = driver.run(cohort, 0, build)
        share = sum(weights[n.node_id] for n in result.survivors)
        self._log(0, result, driver.params(len(cohort)).sum_error_bound(len(result.survivors))
                  / share if result.survivors else None)
        if result.total is None:
            return None, result
        zeros = {m: {r: torch.zeros(shape, dtype=torch.float64)
                     for r in s.method.init_round_roles}
                 for m, shape in s.spec.shapes.items()}
        layout = Layout.of(zeros, {})
        factors, _ = split({k: v / share for k, v in layout.unflatten(result.total).items()})
        mean = ClientUpdate(factors=cast_like(factors, None), num_examples=1,
                            scaling=s.spec.scaling, node="mean of the init round")
        return s.method.init_from_updates(s.spec, [mean], head=s.evaluator.initial_head), result

    def _outcome(self, result: SecureOutcome) -> RoundOutcome:
        outcome = RoundOutcome(bytes_up=result.bytes_up)
        s = self.strategy
        for reply in result.replies:
            if reply.has_error():  # SecureRound listed it among the dropped
                continue
            info = s.nodes.get(reply.metadata.src_node_id)
            name = info.name if info else str(reply.metadata.src_node_id)
            metrics = contribution_metrics(reply, name, "secure round", outcome)
            if metrics is None:
                continue
            outcome.clients.append({"node": name, "_node_id": reply.metadata.src_node_id,
                                    "bytes_up": int(metrics.get("bytes-up", 0)),
                                    **released_metrics(metrics)})
        outcome.lost.extend(result.dropped)
        return outcome

    def _log(self, server_round: int, result: SecureOutcome, bound: float | None) -> None:
        row = {"round": server_round, "survivors": len(result.survivors),
               "dropped": result.dropped, "released": result.total is not None,
               "reason": result.reason, "bytes_up": result.bytes_up,
               "bytes_down_keys": result.bytes_down,
               "seconds": {k: round(v, 3) for k, v in result.seconds.items()},
               "mean_error_bound": bound}
        self.rounds.append(row)
        self.strategy._round_report["secure_aggregation"] = row
        if result.reason:
            self.strategy.progress.line(f"round {server_round}: secure aggregation released "
                                        f"nothing: {result.reason}")

    def summary(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "rounds": self.rounds}

