"""Secure aggregation driven from fedlora's loop over Flower's Message API.

One round (or the init round) runs four exchanges with the cohort (client/secure.py is
the other side, task/secagg.py the protocol):

1. keys: each node returns two public keys; nodes that do not answer leave the round;
2. shares: every node gets everyone's public keys and returns its encrypted Shamir shares;
3. train: the usual training message plus the ciphertexts addressed to the node; the node
   trains and returns only its MASKED contribution (and its released metrics);
4. unmask: the nodes still there return the shares that remove the masks of the sum:
   self-mask seeds of the survivors, mask keys of the nodes that dropped before step 3.

The server holds masked vectors and, after step 4, their sum: never one node's update.
Fewer than t survivors at any stage: the round releases nothing (it is skipped; under
client-level DP it is charged all the same, see secure_training.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from fedlora.task import messages as msgs
from fedlora.task.secagg import SecAggParams, SecAggServer

from .exchange import MessageExchange, NodeInfo

_log = logging.getLogger(__name__)


def secagg_id(info: NodeInfo) -> int:
    """Protocol ids start at 1 (Shamir evaluates shares at x = id)."""
    return info.partition + 1


@dataclass
class SecureOutcome:
    total: np.ndarray | None = None  # the unmasked sum (None: nothing released)
    survivors: list[NodeInfo] = field(default_factory=list)
    replies: list[Message] = field(default_factory=list)  # stage-3 replies (metrics)
    dropped: list[dict[str, str]] = field(default_factory=list)
    reason: str | None = None  # why nothing was released
    bytes_up: int = 0
    bytes_down: int = 0
    seconds: dict[str, float] = field(default_factory=dict)


class SecureRound:
    """Runs the four stages for one cohort."""

    def __init__(self, cfg: dict[str, Any], exchange: MessageExchange, job: dict[str, Any],
                 threshold: int, init_round: bool = False, noised: bool = False):
        sec = cfg["secagg"]
        self.clip_range = float(sec["clip_range"])
        # The init round's estimates get their own, finer precision (secagg.init_bits).
        self.bits = int(sec["init_bits"] if init_round else sec["bits"])
        self.threshold = threshold
        self.noised = noised  # distributed DP: clients send grid values with noise
        self.exchange = exchange
        self.job = job

    def params(self, cohort_size: int) -> SecAggParams:
        return SecAggParams(num_clients=cohort_size, threshold=self.threshold,
                            clip_range=self.clip_range, bits=self.bits)

    def _stage(self, nodes: Sequence[NodeInfo], server_round: int, phase: str,
               payload: Callable[[NodeInfo], dict[str, Any]], params: SecAggParams,
               out: SecureOutcome) -> dict[int, Message]:
        config = {"phase": phase, "server-round": server_round, "secagg-n": params.num_clients,
                  "secagg-t": params.threshold, "secagg-clip-range": params.clip_range,
                  "secagg-bits": params.bits}
        messages = []
        for info in nodes:
            record = msgs.config_record(self.job, **config, **{"secagg-id": secagg_id(info)})
            content = RecordDict({msgs.CONFIG: record, msgs.SECAGG: ConfigRecord(payload(info))})
            messages.append(Message(content, info.node_id, MessageType.TRAIN))
        started = time.perf_counter()
        replies, _ = self.exchange.push_pull(messages, server_round, label=f"secure {phase}")
        out.seconds[phase] = time.perf_counter() - started
        by_node = {info.node_id: info for info in nodes}
        good: dict[int, Message] = {}
        for reply in replies:
            info = by_node[reply.metadata.src_node_id]
            if reply.has_error():
                out.dropped.append({"node": info.name, "stage": phase,
                                    "reason": f"client error: {reply.error.reason}"})
                continue
            good[secagg_id(info)] = reply
            out.bytes_up += _record_bytes(reply.content.config_records.get(msgs.SECAGG))
        for info in nodes:
            if secagg_id(info) not in good and not any(d["node"] == info.name
                                                       for d in out.dropped):
                out.dropped.append({"node": info.name, "stage": phase, "reason": "no reply"})
        return good

    def run(self, cohort: Sequence[NodeInfo], server_round: int,
            train_message: Callable[[NodeInfo], Message]) -> SecureOutcome:
        """The four stages; each ends the round (``reason`` set, nothing released) when
        fewer than t nodes took part in it."""
        out = SecureOutcome()
        if len(cohort) < self.threshold:  # before building params, which require n >= t
            out.reason = f"cohort of {len(cohort)} is below the threshold t = {self.threshold}"
            return out
        params = self.params(len(cohort))
        run = _Run(server_round, params,
                   SecAggServer(params, [secagg_id(n) for n in cohort], noised=self.noised),
                   {secagg_id(n): n for n in cohort}, out)
        public = self._collect_keys(run, cohort)
        if public is None:
            return out
        dealt = self._deal_shares(run, public)
        if dealt is None:
            return out
        masked = self._collect_masked(run, *dealt, train_message)
        if masked is None:
            return out
        self._unmask(run, masked)
        return out

    def _enough(self, run: _Run, count: int, what: str) -> bool:
        """At least t took part in a stage; otherwise the round's reason says how many."""
        if count < self.threshold:
            run.out.reason = f"{count} {what}, below t = {self.threshold}"
            return False
        return True

    def _collect_keys(self, run: _Run, cohort: Sequence[NodeInfo]
                      ) -> dict[int, tuple[bytes, bytes]] | None:
        """Stage 1: every node's two public keys (None: fewer than t answered)."""
        keys = self._stage(cohort, run.server_round, msgs.PHASE_SECAGG_KEYS, lambda n: {},
                           run.params, run.out)
        public = run.server.collect_public_keys(
            {i: (bytes(r.content.config_records[msgs.SECAGG]["pk-c"]),
                 bytes(r.content.config_records[msgs.SECAGG]["pk-s"])) for i, r in keys.items()})
        return public if self._enough(run, len(public), "nodes answered the key stage") else None

    def _deal_shares(self, run: _Run, public: dict[int, tuple[bytes, bytes]]
                     ) -> tuple[list[NodeInfo], dict[int, dict[int, bytes]]] | None:
        """Stage 2: the key holders get everyone's public keys and deal their encrypted
        shares: the dealers, and the ciphertexts routed to each recipient (None: fewer
        than t dealt)."""
        broadcast: dict[str, Any] = {}
        for i, (pk_c, pk_s) in public.items():
            broadcast[f"pk-c:{i}"], broadcast[f"pk-s:{i}"] = pk_c, pk_s
        holders = [run.ids[i] for i in sorted(public)]
        shared = self._stage(holders, run.server_round, msgs.PHASE_SECAGG_SHARES,
                             lambda n: broadcast, run.params, run.out)
        run.out.bytes_down += len(holders) * _record_bytes(ConfigRecord(broadcast))
        routed = run.server.route({i: {int(d): bytes(ct) for d, ct in
                                       r.content.config_records[msgs.SECAGG].items()}
                                   for i, r in shared.items()})
        if not self._enough(run, len(shared), "nodes dealt shares"):
            return None
        return [run.ids[i] for i in sorted(shared)], routed

    def _collect_masked(self, run: _Run, maskers: list[NodeInfo],
                        routed: dict[int, dict[int, bytes]],
                        train_message: Callable[[NodeInfo], Message]
                        ) -> dict[int, np.ndarray] | None:
        """Stage 3: the dealers train and send their masked contributions (None: fewer
        than t arrived)."""
        messages = [_with_shares(train_message(info), info, routed) for info in maskers]
        started = time.perf_counter()
        replies, _ = self.exchange.push_pull(messages, run.server_round)
        run.out.seconds["train"] = time.perf_counter() - started
        masked: dict[int, np.ndarray] = {}
        by_node = {n.node_id: n for n in maskers}
        for reply in replies:
            info = by_node[reply.metadata.src_node_id]
            run.out.replies.append(reply)
            vector = _masked_vector(reply, info, run.out)
            if vector is not None:
                masked[secagg_id(info)] = vector
        for info in maskers:
            if secagg_id(info) not in masked:
                run.out.dropped.append({"node": info.name, "stage": "mask",
                                        "reason": "no masked contribution"})
        return masked if self._enough(run, len(masked), "masked contributions") else None

    def _unmask(self, run: _Run, masked: dict[int, np.ndarray]) -> None:
        """Stage 4: the survivors' shares remove the masks; the sum is released (or the
        round's reason says why unmasking failed)."""
        survivors, dropped = run.server.unmask_request(masked)
        request = {"survivors": survivors, "dropped": dropped}
        unmaskers = [run.ids[i] for i in survivors]
        answers = self._stage(unmaskers, run.server_round, msgs.PHASE_SECAGG_UNMASK,
                              lambda n: request, run.params, run.out)
        shares = {i: _unmask_shares(reply.content.config_records[msgs.SECAGG])
                  for i, reply in answers.items()}
        try:
            run.out.total = run.server.unmask(masked, shares)
        except ValueError as exc:
            run.out.reason = f"unmasking failed: {exc}"
            return
        run.out.survivors = [run.ids[i] for i in survivors]


@dataclass
class _Run:
    """One run of the protocol: its round, parameters, server side, nodes by protocol id,
    and the outcome being filled in."""

    server_round: int
    params: SecAggParams
    server: SecAggServer
    ids: dict[int, NodeInfo]
    out: SecureOutcome


def _with_shares(message: Message, info: NodeInfo,
                 routed: dict[int, dict[int, bytes]]) -> Message:
    """A node's training message plus the ciphertexts addressed to it and its protocol id."""
    shares = {str(src): ct for src, ct in routed.get(secagg_id(info), {}).items()}
    message.content.config_records[msgs.SECAGG] = ConfigRecord(shares)
    record = ConfigRecord(dict(message.content.config_records[msgs.CONFIG]))
    record["secagg-id"] = secagg_id(info)  # a copy: callers may share one record
    message.content.config_records[msgs.CONFIG] = record
    return message


def _masked_vector(reply: Message, info: NodeInfo, out: SecureOutcome) -> np.ndarray | None:
    """The masked vector a stage-3 reply carries (as uint64), counted in ``out``; None
    when it carries none, or one of the wrong dtype (then listed as dropped)."""
    if reply.has_error() or msgs.SECAGG not in reply.content.array_records:
        return None
    vector = reply.content.array_records[msgs.SECAGG]["masked"].numpy()
    out.bytes_up += int(vector.nbytes)
    if vector.dtype not in (np.uint32, np.uint64):
        out.dropped.append({"node": info.name, "stage": "mask",
                            "reason": f"masked vector of dtype {vector.dtype}"})
        return None
    return vector.astype(np.uint64)


def _unmask_shares(record: ConfigRecord) -> dict[str, dict[int, bytes]]:
    """A stage-4 answer's shares by kind: "b" (self-mask seeds of survivors) and "sk"
    (mask keys of nodes that dropped), each by the protocol id they belong to."""
    parts: dict[str, dict[int, bytes]] = {"b": {}, "sk": {}}
    for key in record:
        kind, _, u = key.partition(":")
        if kind in parts:
            parts[kind][int(u)] = bytes(record[key])
    return parts


def _record_bytes(record: ConfigRecord | None) -> int:
    if record is None:
        return 0
    total = 0
    for value in record.values():
        if isinstance(value, bytes):
            total += len(value)
        elif isinstance(value, list):
            total += 8 * len(value)
    return total
