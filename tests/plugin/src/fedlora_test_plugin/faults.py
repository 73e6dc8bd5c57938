"""Test-only fault injection: simulated clients that send a malformed update on purpose,
crash mid-round or straggle.

:class:`FaultInjection` is a Flower ClientApp mod (a map partition-id -> fault kind) that
turns the training replies of the chosen partitions into faults; a simulation runs under
it through fedlora's ``client_mods`` seam (fedlora.deploy.simulate), which
``python -m fedlora_test_plugin.faulty_cli`` wraps around the `fedlora` command line. The
fault suite (tests/test_reliability.py, tests/test_secure_aggregation.py, bench/faults.py)
uses it to show that the server rejects each kind with its reason and aggregates the
valid updates. It is not part of fedlora: nothing in a federation can turn it on.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Mapping

import torch
from flwr.app import Context, Message, MessageType

from fedlora.protos import Envelope, decode, encode, to_message
from fedlora.task import messages as msgs

FAULTS = (
    "nan", "inf", "wrong_shape", "wrong_rank", "unknown_module", "wrong_role", "wrong_method",
    "stale_round", "unsupported_dtype", "truncated", "oversized", "norm", "duplicate_module",
    "schema_version", "crash", "slow",
)
# The reason (fedlora.protos.RejectReason value) the server must give for each malformed kind.
EXPECTED_REJECTION = {
    "nan": "non_finite", "inf": "non_finite", "wrong_shape": "wrong_shape",
    "wrong_rank": "wrong_rank", "unknown_module": "unknown_module", "wrong_role": "wrong_role",
    "wrong_method": "wrong_method", "stale_round": "stale_round",
    "unsupported_dtype": "unsupported_dtype", "truncated": "truncated",
    "oversized": "oversized", "norm": "norm_bound", "duplicate_module": "duplicate_module",
    "schema_version": "schema_version",
}
# How long a "slow" client (a straggler) sleeps before replying.
SLOW_SECONDS = 30.0
_UNKNOWN_WIRE_DTYPE = 99


def _with_first_module(envelope: Envelope, change) -> Envelope:
    """A copy of ``envelope`` whose first module's roles are replaced by change(roles)."""
    factors = {m: dict(roles) for m, roles in envelope.factors.items()}
    first = next(iter(factors))
    factors[first] = change(first, factors[first])
    return dataclasses.replace(envelope, factors=factors)


def _grow_rank(roles: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    grown = {}
    for role, t in roles.items():
        if role == "A":  # r x d_in
            grown[role] = torch.cat([t, torch.zeros(1, t.shape[1])], 0)
        elif role == "B":  # d_out x r
            grown[role] = torch.cat([t, torch.zeros(t.shape[0], 1)], 1)
        else:  # R: r x r
            grown[role] = torch.nn.functional.pad(t, (0, 1, 0, 1))
    return grown


def _grow_shape(roles: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    role, t = next(iter(roles.items()))
    axis = 1 if role == "A" else 0  # the non-rank dimension (R: any)
    pad = torch.zeros(1, t.shape[1]) if axis == 0 else torch.zeros(t.shape[0], 1)
    return {**roles, role: torch.cat([t, pad], axis)}


def _poison(roles: dict[str, torch.Tensor], value: float) -> dict[str, torch.Tensor]:
    role, t = next(iter(roles.items()))
    bad = t.clone()
    bad.view(-1)[0] = value
    return {**roles, role: bad}


def corrupt(data: bytes, envelope: Envelope, fault: str, wire_dtype: str) -> bytes:
    """The encoded update ``data`` (of ``envelope``) turned into the malformed kind
    ``fault`` (a key of :data:`EXPECTED_REJECTION`)."""
    if fault not in EXPECTED_REJECTION:
        raise ValueError(f"not a malformed-update fault: {fault!r}; known: "
                         f"{', '.join(EXPECTED_REJECTION)}")
    if fault == "truncated":
        return data[: len(data) // 2]
    changed = {
        "nan": lambda: _with_first_module(envelope, lambda m, r: _poison(r, math.nan)),
        "inf": lambda: _with_first_module(envelope, lambda m, r: _poison(r, math.inf)),
        "wrong_shape": lambda: _with_first_module(envelope, lambda m, r: _grow_shape(r)),
        "wrong_rank": lambda: _with_first_module(envelope, lambda m, r: _grow_rank(r)),
        "wrong_role": lambda: _with_first_module(
            envelope, lambda m, r: {("R" if k != "R" else "A"): t for k, t in r.items()}),
        "unknown_module": lambda: dataclasses.replace(envelope, factors={
            (m + ".not_a_module" if i == 0 else m): roles
            for i, (m, roles) in enumerate(envelope.factors.items())}),
        "wrong_method": lambda: dataclasses.replace(envelope, method="fedprox"),
        "stale_round": lambda: dataclasses.replace(envelope, round=envelope.round - 1),
        "norm": lambda: dataclasses.replace(envelope, factors={
            m: {r: t * 1e6 for r, t in roles.items()} for m, roles in envelope.factors.items()}),
    }
    if fault in changed:
        return encode(changed[fault](), wire_dtype)
    # The rest cannot be expressed as an Envelope: edit the protobuf message itself.
    msg = to_message(envelope, wire_dtype)
    if fault == "unsupported_dtype":
        msg.tensors[0].dtype = _UNKNOWN_WIRE_DTYPE
    elif fault == "oversized":
        msg.extra["padding"] = "x" * (8 * len(data) + 2**20)
    elif fault == "duplicate_module":
        msg.tensors.append(msg.tensors[0])
        if msg.HasField("tensor_count"):
            msg.tensor_count = len(msg.tensors)
    elif fault == "schema_version":
        msg.schema_version += 1
    return msg.SerializeToString(deterministic=True)


@dataclasses.dataclass(frozen=True)
class FaultInjection:
    """A ClientApp mod: the partitions in ``faults`` (partition-id -> kind) misbehave.

    Only a training round's reply that carries an update is touched (not the describe
    phase, the init round, an evaluation, a refusal, or secure aggregation's key, share and
    unmask stages): its envelope is corrupted (:func:`corrupt`); ``crash`` raises once the
    node has answered (under secure aggregation: after the shares were dealt, so the
    others' masks must cancel without it); ``slow`` answers :data:`SLOW_SECONDS` late. A
    masked contribution (secure aggregation) has no envelope: only crash and slow apply.
    """

    faults: Mapping[int, str]

    def __post_init__(self) -> None:
        unknown = sorted(set(self.faults.values()) - set(FAULTS))
        if unknown:
            raise ValueError(f"unknown fault(s) {unknown}; known: {', '.join(FAULTS)}")

    def __call__(self, msg: Message, context: Context,
                 call_next: Callable[[Message, Context], Message]) -> Message:
        reply = call_next(msg, context)
        fault = self.faults.get(int(context.node_config.get("partition-id", 0)))
        if fault is None or not _carries_update(msg, reply):
            return reply
        if fault == "crash":
            raise RuntimeError("fault injection: the client crashed mid-round")
        if fault == "slow":  # a straggler: a valid update, too late for a short round timeout
            time.sleep(SLOW_SECONDS)
            return reply
        if msgs.ENVELOPE not in reply.content.array_records:
            return reply
        data = msgs.envelope_bytes(reply.content)
        wire_dtype = json.loads(str(msg.content.config_records[msgs.CONFIG][
            msgs.JOB_CONFIG_KEY]))["wire_dtype"]
        bad = corrupt(data, decode(data), fault, wire_dtype)
        reply.content.array_records[msgs.ENVELOPE] = msgs.envelope_record(bad)
        reply.content.metric_records[msgs.METRICS]["bytes-up"] = float(len(bad))
        return reply


def _carries_update(msg: Message, reply: Message) -> bool:
    """``reply`` answers a training round's message with an update (plain or masked)."""
    if msg.metadata.message_type != MessageType.TRAIN or reply.has_error():
        return False
    if str(msg.content.config_records[msgs.CONFIG].get("phase", msgs.PHASE_TRAIN)) \
            != msgs.PHASE_TRAIN:
        return False
    arrays = reply.content.array_records
    return msgs.ENVELOPE in arrays or msgs.SECAGG in arrays
