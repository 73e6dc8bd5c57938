"""The client's side of secure aggregation (task/secagg.py holds the protocol).

Stages, each one server message: keys (two fresh key pairs), shares (Shamir shares of the
self-mask seed and of the mask key, encrypted per peer), then the round's training message
carrying the shares addressed to this node: the client trains, turns its update into a
contribution (task/secure_sum.py) and replies with the masked vector only; last, unmask
(shares that let the server remove the masks of the sum, never of one vector).

This module stays light (no torch): in a deployment Flower starts a ClientApp process per
message, and the key, share and unmask stages should not pay for importing the model stack.
Between stages the protocol state (private keys included) lives in the node's Flower
Context, in memory, as JSON bytes; it is dropped after the unmask stage.
The contribution itself (trained - start, clipped and noised as the server instructs
under client-level DP) is built in contribution.py.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedlora.task import messages as msgs
from fedlora.task.secagg import SecAggClient, SecAggParams

_STATE = "fedlora-secagg"


def params(config: ConfigRecord) -> SecAggParams:
    return SecAggParams(num_clients=int(config["secagg-n"]), threshold=int(config["secagg-t"]),
                        clip_range=float(config["secagg-clip-range"]),
                        bits=int(config["secagg-bits"]))


def _save(context: Context, client: SecAggClient, round_: int) -> None:
    context.state.config_records[_STATE] = ConfigRecord(
        {"round": round_, "client": client.to_bytes()})


def _load(context: Context, round_: int) -> SecAggClient:
    record = context.state.config_records.get(_STATE)
    if record is None or int(record["round"]) != round_:
        raise RuntimeError(f"secure aggregation: no protocol state for round {round_} on this "
                           f"node (it missed the key stage or restarted)")
    return SecAggClient.from_bytes(bytes(record["client"]))


def _reply(msg: Message, values: Mapping[str, bytes | list[int]]) -> Message:
    content = RecordDict({msgs.SECAGG: ConfigRecord(dict(values)),
                          msgs.METRICS: MetricRecord({})})
    return Message(content=content, reply_to=msg)


def handle_stage(msg: Message, context: Context, phase: str, config: ConfigRecord) -> Message:
    """The key, share and unmask stages (no model, no data involved)."""
    round_ = int(config["server-round"])
    if phase == msgs.PHASE_SECAGG_KEYS:
        client = SecAggClient(params(config), int(config["secagg-id"]))
        _save(context, client, round_)
        pk_c, pk_s = client.public_keys()
        return _reply(msg, {"pk-c": pk_c, "pk-s": pk_s})
    client = _load(context, round_)
    if phase == msgs.PHASE_SECAGG_SHARES:
        record = msg.content.config_records[msgs.SECAGG]
        keys = {int(k[5:]): (bytes(record[k]), bytes(record["pk-s:" + k[5:]]))
                for k in record if k.startswith("pk-c:")}
        ciphertexts = client.share_keys(keys)
        _save(context, client, round_)
        return _reply(msg, {str(dst): ct for dst, ct in ciphertexts.items()})
    if phase == msgs.PHASE_SECAGG_UNMASK:
        record = msg.content.config_records[msgs.SECAGG]
        shares = client.unmask_shares([int(i) for i in record["survivors"]],
                                      [int(i) for i in record.get("dropped", [])])
        del context.state.config_records[_STATE]
        out: dict[str, bytes] = {}
        for kind, by_id in shares.items():
            out.update({f"{kind}:{u}": share for u, share in by_id.items()})
        return _reply(msg, out)
    raise ValueError(f"unknown secure aggregation phase {phase!r}")


def masked_reply(reply: Message, msg: Message, context: Context, vector: np.ndarray) -> Message:
    """Add the masked vector to ``reply`` (which carries the released metrics only)."""
    round_ = int(msg.content.config_records[msgs.CONFIG]["server-round"])
    client = _load(context, round_)
    record = msg.content.config_records[msgs.SECAGG]
    masked = client.masked_input(vector, {int(src): bytes(ct) for src, ct in record.items()})
    _save(context, client, round_)
    if client.params.modulus_bits <= 32:  # values are < M: half the bytes of uint64
        masked = masked.astype(np.uint32)
    reply.content.array_records[msgs.SECAGG] = ArrayRecord({"masked": Array(np.asarray(masked))})
    reply.content.metric_records[msgs.METRICS]["bytes-up"] = float(np.asarray(masked).nbytes)
    return reply
