"""One round of aggregation behind one small interface, three implementations.

- :class:`PlainRound`: every sampled node gets its downlink, replies are decoded and
  validated (intake.py), and the method aggregates them (skipped below ``min_clients``).
- :class:`ClientLevelRound`: the same exchange; the server clips each update, adds the
  Gaussian noise to the sum and divides by the expected cohort (client_dp.py). Every round
  is released, so none is skipped.
- ``SecureRound`` (secure_training.py): the four secure-aggregation exchanges; with
  client-level DP the nodes add the noise themselves (distributed DP).

The federation loop (loop.py) offers each of them the same read-only view,
:class:`Federation`, and applies what they return (:class:`RoundResult`): the server
optimizer steps on ``averaged``, or the round is skipped when it is None. None of them
reads or writes the loop's internals.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from flwr.app import Message

from fedlora.aggregation import SEP, AdapterSpec, ClientUpdate, GlobalState, Method
from fedlora.protos import Expectation
from fedlora.task.secure_sum import named, split

from .client_dp import ClientLevelDP, cast_like
from .exchange import MessageExchange, NodeInfo
from .intake import RoundOutcome, collect, released_weights

_log = logging.getLogger(__name__)


@dataclass
class RoundResult:
    """What one round produced. ``averaged`` is the method's new state before the server
    optimizer's step; None means nothing was released (the round is skipped)."""

    outcome: RoundOutcome
    bytes_down: dict[int, int]
    averaged: GlobalState | None
    error: float | None = None  # root-sum-square aggregation error of inexact methods
    report: dict[str, Any] = field(default_factory=dict)  # extra fields of the round's row


class Progress(Protocol):
    def line(self, text: str) -> None: ...


class Federation(Protocol):
    """What the loop lets a round see and do."""

    cfg: dict[str, Any]
    method: Method
    spec: AdapterSpec
    exchange: MessageExchange
    progress: Progress
    fingerprint: str  # the base model's

    @property
    def state(self) -> GlobalState: ...

    @property
    def initial_head(self) -> dict[str, Any]: ...

    def job(self) -> dict[str, Any]: ...

    def train_message(self, info: NodeInfo, server_round: int) -> tuple[Message, int]:
        """The node's training message for the round and its downlink size in bytes."""
        ...

    def expectation(self, server_round: int, node_id: int) -> Expectation: ...

    def node_name(self, node_id: int) -> str: ...

    def node_partition(self, node_id: int) -> int: ...


class RoundAggregation(Protocol):
    """One round of aggregation (and the method's init round, where it has one)."""

    def train_round(self, fed: Federation, server_round: int,
                    cohort: list[NodeInfo]) -> RoundResult: ...

    def init_round(self, fed: Federation, cohort: list[NodeInfo],
                   message: Callable[[NodeInfo], Message]) -> tuple[GlobalState, int, str]:
        """(first state, bytes up, a line for the progress display)."""
        ...

    def summary(self) -> dict[str, Any]: ...


def gather(fed: Federation, server_round: int,
           cohort: list[NodeInfo]) -> tuple[RoundOutcome, dict[int, int]]:
    """Send the cohort its downlinks and collect the validated replies (the plain
    exchange shared by the plain and the client-level round)."""
    messages, bytes_down = [], {}
    for info in cohort:
        message, size = fed.train_message(info, server_round)
        messages.append(message)
        bytes_down[info.node_id] = size
    replies, missing = fed.exchange.push_pull(messages, server_round)
    outcome = collect(replies, f"round {server_round}",
                      lambda node_id: fed.expectation(server_round, node_id),
                      fed.node_name, fed.node_partition)
    timeout = fed.exchange.timeout
    for node_id in missing:
        outcome.lost.append({"node": fed.node_name(node_id),
                             "reason": f"no reply before the round timeout ({timeout:g} s)"})
    return outcome, bytes_down


class PlainRound:
    """The method's own aggregate of the valid updates; skipped below ``min_clients``."""

    def __init__(self, min_clients: int):
        self.min_clients = int(min_clients)

    def train_round(self, fed: Federation, server_round: int,
                    cohort: list[NodeInfo]) -> RoundResult:
        outcome, bytes_down = gather(fed, server_round, cohort)
        if len(outcome.updates) < self.min_clients:
            _log.warning("round %d skipped: %d valid updates, %d needed", server_round,
                         len(outcome.updates), self.min_clients)
            return RoundResult(outcome, bytes_down, None)
        before, updates = fed.state, released_weights(outcome.updates)
        averaged = fed.method.aggregate(before, updates)
        errors = fed.method.aggregation_error(before, updates, averaged)
        error = None if errors is None else float(sum(e * e for e in errors.values()) ** 0.5)
        return RoundResult(outcome, bytes_down, averaged, error)

    def init_round(self, fed: Federation, cohort: list[NodeInfo],
                   message: Callable[[NodeInfo], Message]) -> tuple[GlobalState, int, str]:
        """Every node sends the method's init_round_roles (e.g. Fed-SB's DP gradient
        estimates); the method turns their weighted mean into the first state."""
        method = fed.method
        outcome = collect_init(fed, cohort, message)
        if not outcome.updates:
            raise RuntimeError(f"{method.name} init round: no valid update arrived "
                               f"(refused {outcome.refused}, rejected {outcome.rejected}, "
                               f"lost {outcome.lost})")
        state = method.init_from_updates(fed.spec, released_weights(outcome.updates),
                                         head=fed.initial_head)
        line = (f"{method.name} init round: {len(outcome.updates)} updates, "
                f"{outcome.bytes_up / 1e6:.2f} MB up")
        return state, outcome.bytes_up, line

    def summary(self) -> dict[str, Any]:
        return {}


def collect_init(fed: Federation, cohort: list[NodeInfo],
                 message: Callable[[NodeInfo], Message]) -> RoundOutcome:
    """Send the cohort the init message and collect the validated init replies."""
    method, shapes = fed.method, dict(fed.spec.shapes)
    timeout = max(fed.exchange.timeout, 300.0)  # nodes start (and import torch) first
    replies, _ = fed.exchange.push_pull([message(n) for n in cohort], 0,
                                        label="init round", timeout=timeout)
    # At most float64 of what the method says a client sends per module.
    floats = sum(method.init_uplink_floats(o, i, fed.spec.rank) for o, i in shapes.values())
    expected = Expectation(method=method.name, round=0, direction="up", shapes=shapes,
                           roles=tuple(method.init_round_roles),
                           max_bytes=8 * floats + 65536, fingerprint=fed.fingerprint)
    return collect(replies, "init round", lambda node_id: expected, fed.node_name,
                   fed.node_partition)


def state_from_init_mean(fed: Federation, mean: dict[str, torch.Tensor], node: str
                         ) -> GlobalState:
    """The first state from the released mean of the init round (flat "module::role"
    names, float64), as one update of weight 1 for the method's init_from_updates."""
    factors, _ = split(mean)
    released = ClientUpdate(factors=cast_like(factors, None), num_examples=1,
                            scaling=fed.spec.scaling, node=node)
    return fed.method.init_from_updates(fed.spec, [released], head=fed.initial_head)


class ClientLevelRound(PlainRound):
    """DP-FedAvg with a trusted server: clip, noise the sum, divide by the expected cohort.

    Every round is released (noise over whatever arrived, even nothing): skipping when few
    clients took part would make the output depend on participation without accounting.
    """

    def __init__(self, client_dp: ClientLevelDP):
        super().__init__(min_clients=0)
        self.client_dp = client_dp

    def train_round(self, fed: Federation, server_round: int,
                    cohort: list[NodeInfo]) -> RoundResult:
        outcome, bytes_down = gather(fed, server_round, cohort)
        averaged, report = self.client_dp.aggregate(fed.method, fed.state,
                                                    released_weights(outcome.updates),
                                                    server_round)
        return RoundResult(outcome, bytes_down, averaged, None, report)

    def init_round(self, fed: Federation, cohort: list[NodeInfo],
                   message: Callable[[NodeInfo], Message]) -> tuple[GlobalState, int, str]:
        """The init round as one more release of the mechanism: a cohort sampled as for a
        round (not every node), each init vector scaled to unit norm, noise on the sum,
        divided by the expected cohort; charged as round 0 before anything is released."""
        self.client_dp.check_budget()  # before any node works for a release it cannot pay
        seeded = random.Random(f"{fed.cfg['federation']['seed']}:sample:0")
        sampled = self.client_dp.sample(cohort, seeded)
        outcome = collect_init(fed, sampled, message) if sampled else RoundOutcome()
        shapes = {f"{m}{SEP}{r}": torch.Size(shape) for m, roles in
                  fed.method.init_round_shapes(fed.spec).items() for r, shape in roles.items()}
        contributions = [named(u.factors, {}) for u in outcome.updates]
        mean, report = self.client_dp.release_init(contributions, shapes)
        state = state_from_init_mean(fed, mean, "noised mean of the init round")
        failed = len(outcome.refused) + len(outcome.rejected) + len(outcome.lost)
        line = (f"{fed.method.name} init round (client-level DP): {len(sampled)} sampled, "
                f"{len(outcome.updates)} updates"
                + (f" ({failed} refused, rejected or lost: the init is noisier)" if failed else "")
                + f", epsilon {report['client_level_epsilon']:.3f}")
        return state, outcome.bytes_up, line

    def summary(self) -> dict[str, Any]:
        return self.client_dp.summary()
