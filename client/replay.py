"""Answers a DP node already released for a round, so a repeated request gets the same bytes.

A request is the round's downlink, the job and the phase (and, under secure aggregation,
the round's secure-aggregation record). The same request again (a server that resumes
after a crash) gets exactly the bytes already sent: nothing new is released and nothing is
charged. A different request trains anew from fresh randomness and is charged anew.

Under secure aggregation the masks of a round may cover one vector only: two different
vectors under the same masks would let the server subtract them and see their unmasked
difference. So the node keeps the masked reply of the round in its Flower node state and
re-sends it for the same request, and refuses any other request for that round
(``secure-round-already-masked``).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedlora.privacy import PrivacyLedger
from fedlora.privacy.policy import PolicyRefusal
from fedlora.task import messages as msgs
from fedlora.task.files import atomic_write

_MASKED = "fedlora-masked-reply"


def request_digest(msg: Message, downlink: bytes, job: dict[str, Any]) -> str:
    """What makes two requests the same: downlink, job, phase and secure record."""
    config = msg.content.config_records[msgs.CONFIG]
    digest = hashlib.sha256(downlink)
    digest.update(json.dumps(job, sort_keys=True).encode())
    digest.update(str(config.get("phase", msgs.PHASE_TRAIN)).encode())
    secure = msg.content.config_records.get(msgs.SECAGG)
    if secure is not None:
        for key in sorted(secure):
            value = secure[key]
            digest.update(key.encode())
            digest.update(bytes(value) if isinstance(value, bytes) else repr(value).encode())
    return digest.hexdigest()[:32]


class ReplayCache:
    """The plain path: the released envelope and metrics, beside the ledger (mode 0600)."""

    def __init__(self, ledger: PrivacyLedger, round_: int, request: str):
        self.path = ledger.path.with_suffix(f".round-{round_}.{request[:16]}.update")
        self.meta = self.path.with_suffix(".json")

    def load(self) -> tuple[bytes, dict[str, float]] | None:
        if self.path.is_file() and self.meta.is_file():
            return self.path.read_bytes(), json.loads(self.meta.read_text())
        return None

    def store(self, data: bytes, metrics: dict[str, float]) -> None:
        atomic_write(self.path, data, mode=0o600)
        atomic_write(self.meta, json.dumps(metrics).encode(), mode=0o600)


def remember_masked(context: Context, round_: int, request: str, reply: Message) -> None:
    """Keep the round's masked reply (masked vector and metrics) in the node state."""
    masked = np.asarray(reply.content.array_records[msgs.SECAGG]["masked"].numpy())
    metrics = dict(reply.content.metric_records[msgs.METRICS])
    context.state.config_records[_MASKED] = ConfigRecord({
        "round": round_, "request": request, "dtype": str(masked.dtype),
        "masked": masked.tobytes(), "metrics": json.dumps(metrics)})


def secure_again(msg: Message, context: Context, round_: int, request: str) -> Message | None:
    """None when this round has not been masked yet; the same reply for the same request;
    a refusal (PolicyRefusal) for any other request of the round."""
    record = context.state.config_records.get(_MASKED)
    if record is None or int(record["round"]) != round_:
        return None
    if str(record["request"]) != request:
        raise PolicyRefusal("secure-round-already-masked")
    masked = np.frombuffer(bytes(record["masked"]), dtype=np.dtype(str(record["dtype"])))
    content = RecordDict({msgs.METRICS: MetricRecord(json.loads(str(record["metrics"])))})
    content.array_records[msgs.SECAGG] = ArrayRecord({"masked": Array(masked.copy())})
    return Message(content=content, reply_to=msg)
