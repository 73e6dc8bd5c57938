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
        out = SecureOutcome()
        if len(cohort) < self.threshold:  # before building params, which require n >= t
            out.reason = f"cohort of {len(cohort)} is below the threshold t = {self.threshold}"
            return out
        params = self.params(len(cohort))
        server = SecAggServer(params, [secagg_id(n) for n in cohort], noised=self.noised)
        ids = {secagg_id(n): n for n in cohort}

        keys = self._stage(cohort, server_round, msgs.PHASE_SECAGG_KEYS, lambda n: {}, params,
                           out)
        public = server.collect_public_keys(
            {i: (bytes(r.content.config_records[msgs.SECAGG]["pk-c"]),
                 bytes(r.content.config_records[msgs.SECAGG]["pk-s"])) for i, r in keys.items()})
        broadcast: dict[str, Any] = {}
        for i, (pk_c, pk_s) in public.items():
            broadcast[f"pk-c:{i}"], broadcast[f"pk-s:{i}"] = pk_c, pk_s
        if len(public) < self.threshold:
            out.reason = f"{len(public)} nodes answered the key stage, below t = {self.threshold}"
            return out
        holders = [ids[i] for i in sorted(public)]
        shared = self._stage(holders, server_round, msgs.PHASE_SECAGG_SHARES,
                             lambda n: broadcast, params, out)
        out.bytes_down += len(holders) * _record_bytes(ConfigRecord(broadcast))
        routed = server.route({i: {int(d): bytes(ct) for d, ct in
                                   r.content.config_records[msgs.SECAGG].items()}
                               for i, r in shared.items()})
        if len(shared) < self.threshold:
            out.reason = f"{len(shared)} nodes dealt shares, below t = {self.threshold}"
            return out

        maskers = [ids[i] for i in sorted(shared)]
        messages = []
        for info in maskers:
            message = train_message(info)
            shares = {str(src): ct for src, ct in routed.get(secagg_id(info), {}).items()}
            message.content.config_records[msgs.SECAGG] = ConfigRecord(shares)
            record = ConfigRecord(dict(message.content.config_records[msgs.CONFIG]))
            record["secagg-id"] = secagg_id(info)  # a copy: callers may share one record
            message.content.config_records[msgs.CONFIG] = record
            messages.append(message)
        started = time.perf_counter()
        replies, _ = self.exchange.push_pull(messages, server_round)
        out.seconds["train"] = time.perf_counter() - started
        masked: dict[int, np.ndarray] = {}
        by_node = {n.node_id: n for n in maskers}
        for reply in replies:
            info = by_node[reply.metadata.src_node_id]
            out.replies.append(reply)
            if reply.has_error() or msgs.SECAGG not in reply.content.array_records:
                continue
            vector = reply.content.array_records[msgs.SECAGG]["masked"].numpy()
            out.bytes_up += int(vector.nbytes)
            if vector.dtype not in (np.uint32, np.uint64):
                out.dropped.append({"node": info.name, "stage": "mask",
                                    "reason": f"masked vector of dtype {vector.dtype}"})
                continue
            masked[secagg_id(info)] = vector.astype(np.uint64)
        for info in maskers:
            if secagg_id(info) not in masked:
                out.dropped.append({"node": info.name, "stage": "mask",
                                    "reason": "no masked contribution"})
        if len(masked) < self.threshold:
            out.reason = f"{len(masked)} masked contributions, below t = {self.threshold}"
            return out

        survivors, dropped = server.unmask_request(masked)
        request = {"survivors": survivors, "dropped": dropped}
        unmaskers = [ids[i] for i in survivors]
        answers = self._stage(unmaskers, server_round, msgs.PHASE_SECAGG_UNMASK,
                              lambda n: request, params, out)
        shares: dict[int, dict[str, dict[int, bytes]]] = {}
        for i, reply in answers.items():
            record = reply.content.config_records[msgs.SECAGG]
            parts: dict[str, dict[int, bytes]] = {"b": {}, "sk": {}}
            for key in record:
                kind, _, u = key.partition(":")
                if kind in parts:
                    parts[kind][int(u)] = bytes(record[key])
            shares[i] = parts
        try:
            out.total = server.unmask(masked, shares)
        except ValueError as exc:
            out.reason = f"unmasking failed: {exc}"
            return out
        out.survivors = [ids[i] for i in survivors]
        return out


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
