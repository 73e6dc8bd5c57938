"""The message exchange with the nodes: push messages, pull replies until all arrive or
the timeout passes (late replies are discarded), and discover who is there."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from flwr.app import Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedlora.task import messages as msgs

from .progress import Progress

_log = logging.getLogger(__name__)


@dataclass
class NodeInfo:
    node_id: int
    partition: int
    examples: int | None  # None: the node did not release its size (DP)
    rank: int

    @property
    def name(self) -> str:
        return msgs.node_name(self.partition)


class MessageExchange:
    def __init__(self, grid: Grid, progress: Progress, timeout: float):
        self.grid = grid
        self.progress = progress
        self.timeout = timeout

    def push_pull(self, messages: list[Message], server_round: int, label: str | None = None,
                  timeout: float | None = None) -> tuple[list[Message], list[int]]:
        """(replies, node ids that did not answer in time)."""
        timeout = self.timeout if timeout is None else timeout
        expected = len(messages)
        if not expected:
            return [], []
        dst: dict[str, int] = {}
        for message in messages:
            for message_id in self.grid.push_messages([message]):
                dst[message_id] = message.metadata.dst_node_id
        pending = set(dst)
        replies: list[Message] = []
        deadline = time.monotonic() + timeout
        while pending and time.monotonic() < deadline:
            for reply in self.grid.pull_messages(list(pending)):
                pending.discard(reply.metadata.reply_to_message_id)
                replies.append(reply)
                self.progress.clients(server_round, len(replies), expected)
            if pending:
                time.sleep(0.1)
        if pending:
            _log.warning("%s: %d of %d replies missing after %g s; late replies are discarded",
                         label or f"round {server_round}", len(pending), expected, timeout)
        return replies, [dst[i] for i in pending]

    def discover(self, wanted: int, job: dict[str, Any], timeout: float) -> dict[int, NodeInfo]:
        """Wait for ``wanted`` nodes and learn each one's partition, released size and rank."""
        deadline = time.monotonic() + timeout
        while len(node_ids := list(self.grid.get_node_ids())) < wanted:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(node_ids)} of {wanted} nodes connected "
                                   f"within {timeout:g} s")
            time.sleep(0.5)
        config = msgs.config_record(job, phase=msgs.PHASE_DESCRIBE)
        messages = [Message(RecordDict({msgs.CONFIG: config}), node_id, MessageType.TRAIN)
                    for node_id in node_ids]
        replies, missing = self.push_pull(messages, 0, label="connecting", timeout=timeout)
        nodes: dict[int, NodeInfo] = {}
        for reply in replies:
            if reply.has_error():
                raise RuntimeError(f"node {reply.metadata.src_node_id} failed to start: "
                                   f"{reply.error.reason}")
            metrics = reply.content.metric_records[msgs.METRICS]
            node_id = reply.metadata.src_node_id
            examples = int(metrics["num-examples"]) if "num-examples" in metrics else None
            nodes[node_id] = NodeInfo(node_id, int(metrics["partition-id"]), examples,
                                      int(metrics["rank"]))
        if missing:
            _log.warning("%d nodes did not answer the discovery message", len(missing))
        partitions = sorted(n.partition for n in nodes.values())
        if len(set(partitions)) != len(partitions):
            raise RuntimeError(f"two nodes claim the same partition: {partitions}")
        return nodes
