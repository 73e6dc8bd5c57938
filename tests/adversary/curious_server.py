"""A curious server, as small as it can be: it composes jobs, builds downlinks and calls
the real client handlers (client/handlers.py) on a node whose config its owner set."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import torch
from flwr.app import Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedlora.client import handlers
from fedlora.client.runtime import get_runtime
from fedlora.protos import Envelope, decode, encode
from fedlora.task import messages as msgs
from fedlora.task.config import compose_job

# Messages are built outside a Flower run: give this process the identity a run would.
TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1

BASE = ["model=tiny_bert", "data=synthetic", "strategy=ffa", "strategy.optimizer=sgd",
        "privacy=dp", "federation.num_clients=1", "federation.clients_per_round=1",
        "federation.min_clients=1", "federation.rounds=3", "strategy.local_steps=2"]


def job(*overrides: str) -> dict[str, Any]:
    return compose_job([*BASE, *overrides])


def node_context(node_config: dict[str, Any], node_id: int = 7) -> Context:
    return Context(run_id=1, node_id=node_id, node_config=dict(node_config),
                   state=RecordDict(), run_config={})


def downlink(cfg: dict[str, Any], round_: int = 1, *, head_shift: float = 0.0) -> bytes:
    """The server's downlink for ``cfg`` (head_shift: a tweak only this server makes)."""
    runtime = get_runtime(cfg, "cpu")
    method, spec = runtime.method, runtime.spec
    state = method.init_state(spec)
    head = {k: v.clone() + head_shift for k, v in runtime.host.head_state().items()}
    envelope = Envelope(method=method.name, round=round_, direction="down",
                        factors=method.downlink(state, first_contact=True, rank=spec.rank),
                        head=head, fingerprint=runtime.fingerprint, rank=spec.rank,
                        scaling=spec.scaling)
    return encode(envelope, cfg["wire_dtype"])


def message(cfg: dict[str, Any], round_: int = 1, *, phase: str = msgs.PHASE_TRAIN,
            data: bytes | None = None, kind: str = "train", **extra: Any) -> Message:
    record = msgs.config_record(cfg, phase=phase, **{"server-round": round_}, **extra)
    content = RecordDict({msgs.ENVELOPE: msgs.envelope_record(data or downlink(cfg, round_)),
                          msgs.CONFIG: record})
    return Message(content, 7, kind)


def send(cfg: dict[str, Any], context: Context, round_: int = 1, **kwargs: Any) -> Message:
    return handlers.train(message(copy.deepcopy(cfg), round_, **kwargs), context)


def evaluate(cfg: dict[str, Any], context: Context) -> Message:
    return handlers.evaluate_global(message(copy.deepcopy(cfg), kind="evaluate"), context)


def refused(reply: Message) -> str | None:
    metrics = reply.content.metric_records[msgs.METRICS]
    if not float(metrics.get("refused", 0.0)):
        return None
    return str(reply.content.config_records[msgs.CONFIG]["reason"])


def update(reply: Message) -> Envelope:
    return decode(msgs.envelope_bytes(reply.content))


def flat(envelope: Envelope) -> torch.Tensor:
    return torch.cat([t.flatten().float() for roles in envelope.factors.values()
                      for t in roles.values()])


def strings(reply: Message) -> list[str]:
    """Every string the reply carries (notes, and the error text Flower would forward)."""
    out = [str(v) for record in reply.content.config_records.values() for v in record.values()]
    if reply.has_error():
        out.append(reply.error.reason)
    return out


def has_numbers(text: str) -> bool:
    return re.search(r"\d", text) is not None


def owner(tmp_path: Path, **settings: Any) -> dict[str, Any]:
    """A deployed node's config as its owner writes it (ledger and key directories)."""
    return {"partition-id": 0, "num-partitions": 1, "ledger-dir": str(tmp_path / "ledger"),
            "key-dir": str(tmp_path / "keys"), **settings}
