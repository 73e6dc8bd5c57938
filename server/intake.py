"""Update intake: every reply (a training round's or the init round's) goes through one
path: errors and refusals recorded, the envelope parsed and validated once against what
the method expects, a bad update rejected with its reason, never fatal."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ConfigRecord, Message, MetricRecord

from fedlora.aggregation import ClientUpdate
from fedlora.protos import Expectation, UpdateRejected, decode, payload_bytes
from fedlora.task import messages as msgs

_log = logging.getLogger(__name__)


@dataclass
class RoundOutcome:
    updates: list[ClientUpdate] = field(default_factory=list)
    clients: list[dict[str, Any]] = field(default_factory=list)
    rejected: list[dict[str, str]] = field(default_factory=list)
    refused: list[dict[str, str]] = field(default_factory=list)
    lost: list[dict[str, str]] = field(default_factory=list)
    bytes_up: int = 0
    adapter_bytes_up: int = 0


def released_weights(updates: list[ClientUpdate]) -> list[ClientUpdate]:
    """Example counts as released: a count of 0 means "not released" (a private node that
    declared no public size), and then every client of the round weighs the same: mixing
    counts with placeholders would be meaningless, and guessing a size would leak it."""
    if all(u.num_examples > 0 for u in updates):
        return updates
    return [dataclasses.replace(u, num_examples=1) for u in updates]


def contribution_metrics(reply: Message, who: str, label: str,
                         outcome: RoundOutcome) -> MetricRecord | None:
    """The reply's metrics when it carries a contribution; else None, with the error or the
    refusal (and its reason) recorded in ``outcome``."""
    if reply.has_error():
        outcome.lost.append({"node": who, "reason": f"client error: {reply.error.reason}"})
        _log.warning("%s: %s failed: %s", label, who, reply.error.reason)
        return None
    metrics = reply.content.metric_records.get(msgs.METRICS, MetricRecord())
    if float(metrics.get("refused", 0.0)):
        notes = reply.content.config_records.get(msgs.CONFIG, ConfigRecord())
        reason = str(notes.get("reason", "refused"))
        outcome.refused.append({"node": who, "reason": reason})
        _log.warning("%s: %s refused: %s", label, who, reason)
        return None
    return metrics


def released_metrics(metrics: MetricRecord) -> dict[str, Any]:
    """Only what the client released: under DP no training loss and no example count unless
    the node declared one public (task/release.py)."""
    out: dict[str, Any] = {}
    if "train-loss" in metrics:
        out["train_loss"] = float(metrics["train-loss"])
    # epsilon only from nodes that declared their size; the public figures from every
    # private node
    for key, field_name, kind in (("epsilon", "epsilon", float), ("delta", "delta", float),
                                  ("max-grad-norm", "max_grad_norm", float),
                                  ("steps", "steps", int)):
        if key in metrics:
            out[field_name] = kind(metrics[key])
    return out


def collect(replies: Iterable[Message], label: str, expectation: Callable[[int], Expectation],
            name: Callable[[int], str], order: Callable[[int], int]) -> RoundOutcome:
    """Decode and validate every reply (sorted by partition); bad ones are rejected.

    ``expectation(node_id)`` says what that node's update must look like; ``name`` and
    ``order`` map node ids to names and partitions.
    """
    outcome = RoundOutcome()
    for reply in sorted(replies, key=lambda r: order(r.metadata.src_node_id)):
        node_id = reply.metadata.src_node_id
        who = name(node_id)
        metrics = contribution_metrics(reply, who, label, outcome)
        if metrics is None:
            continue
        try:
            data = msgs.envelope_bytes(reply.content)
            outcome.bytes_up += len(data)
            envelope = decode(data, expectation(node_id))
        except (UpdateRejected, ValueError) as exc:
            outcome.rejected.append({"node": who, "reason": str(exc)})
            _log.warning("%s: rejected update from %s: %s", label, who, exc)
            continue
        payload = payload_bytes(data)
        outcome.adapter_bytes_up += payload
        outcome.updates.append(ClientUpdate(factors=envelope.factors,
                                            num_examples=envelope.num_examples,
                                            scaling=envelope.scaling, head=envelope.head,
                                            node=who))
        outcome.clients.append({"node": who, "_node_id": node_id,
                                "examples": envelope.num_examples or None,
                                "bytes_up": len(data), "adapter_bytes_up": payload,
                                "rank": envelope.rank, **released_metrics(metrics)})
    return outcome
