"""One generic Flower strategy that delegates every piece of math to fedlora.aggregation.

Per round: sample clients (deterministically, by partition), send each its downlink
envelope, collect replies until all arrive or the round timeout passes (late replies are
discarded and counted), decode and validate every update (rejections are logged and
listed, never fatal), aggregate when at least ``min_clients`` valid updates arrived (else
skip the round), evaluate centrally, write metrics and a checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedlora.aggregation import ClientUpdate, GlobalState, Method
from fedlora.protos import Envelope, Expectation, UpdateRejected, decode, encode, payload_bytes
from fedlora.task import messages as msgs
from fedlora.task.training import ServerOptimizerConfig, round_lr

from .checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    load_optimizer_state,
    save_checkpoint,
)
from .evaluation import CentralEvaluator
from .optimizer import ServerOptimizer
from .report import MetricsLog

_log = logging.getLogger(__name__)


@dataclass
class NodeInfo:
    node_id: int
    partition: int
    examples: int | None  # None: the node did not release its size (DP)
    rank: int

    @property
    def name(self) -> str:
        return f"partition-{self.partition}"


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


class Progress:
    """Round i/N, clients done, latest accuracy: one line per round, live on a terminal."""

    def __init__(self, total_rounds: int, stream=None):
        self.total = total_rounds
        self.stream = stream or sys.stdout
        self.live = getattr(self.stream, "isatty", lambda: False)()

    def clients(self, round_: int, done: int, expected: int) -> None:
        if self.live:
            self.stream.write(f"\r[fedlora] round {round_}/{self.total}: {done}/{expected} clients")
            self.stream.flush()

    def line(self, text: str) -> None:
        if self.live:
            self.stream.write("\r\033[K")
        self.stream.write(f"[fedlora] {text}\n")
        self.stream.flush()


class FedLoraStrategy(Strategy):
    """The ServerApp's strategy: Flower plumbing around a fedlora aggregation Method."""

    def __init__(self, cfg: dict[str, Any], method: Method, evaluator: CentralEvaluator,
                 run_dir: Path, *, progress: Progress | None = None):
        self.cfg = cfg
        self.method = method
        self.evaluator = evaluator
        self.run_dir = Path(run_dir)
        self.fed = cfg["federation"]
        self.progress = progress or Progress(int(self.fed["rounds"]))
        self.spec = evaluator.spec()
        self.state: GlobalState = method.init_state(self.spec, evaluator.initial_head)
        self.server_optimizer = ServerOptimizer(
            ServerOptimizerConfig.from_config(cfg["strategy"].get("server_optimizer")),
            method.server_step_roles)
        self.nodes: dict[int, NodeInfo] = {}
        self.contacted: set[int] = set()  # partitions holding the method's node_keeps roles
        self.metrics = MetricsLog(self.run_dir)
        self.timeout = float(self.fed["round_timeout_s"])
        # Nodes start (and import torch) before they first answer: never a short wait.
        self.connect_timeout = max(self.timeout, 300.0)
        self.max_norm = self.fed.get("max_update_norm")
        self._sent_bytes: dict[int, int] = {}
        self._sent_payload: dict[int, int] = {}
        self._downlink_cache: dict[tuple[int, int, bool, int | None], tuple[bytes, int]] = {}
        self.init_bytes_up = 0

    # -- Flower Strategy interface --------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        del arrays  # the global adapter lives in self.state and travels as an envelope
        sampled = self.sample(server_round)
        return [self._message(info, server_round, msgs.PHASE_TRAIN, MessageType.TRAIN, config)
                for info in sampled]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        outcome = self.collect(server_round, replies)
        skipped, _ = self._aggregate(server_round, outcome)
        if skipped:
            return None, None
        return ArrayRecord(), MetricRecord({"num-updates": len(outcome.updates)})

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        del arrays
        fraction = float(self.fed.get("fraction_evaluate", 0.0))
        if fraction <= 0 or not self.nodes:
            return []
        count = max(1, round(fraction * len(self.nodes)))
        rng = random.Random(f"{self.fed['seed']}:evaluate:{server_round}")
        chosen = rng.sample(sorted(self.nodes.values(), key=lambda n: n.partition), count)
        return [self._message(info, server_round, msgs.PHASE_TRAIN, MessageType.EVALUATE, config)
                for info in chosen]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        total, loss, accuracy = 0.0, 0.0, 0.0
        for reply in replies:
            if reply.has_error():
                continue
            metrics = reply.content.metric_records[msgs.METRICS]
            weight = float(metrics["num-examples"])
            total += weight
            loss += weight * float(metrics["eval-loss"])
            accuracy += weight * float(metrics["eval-accuracy"])
        if total == 0:
            return None
        return MetricRecord({"client-loss": loss / total, "client-accuracy": accuracy / total})

    def summary(self) -> None:
        self.progress.line(
            f"{self.method.name}: {self.method.summary} | {len(self.spec.shapes)} modules, "
            f"rank {self.spec.rank}, {self.fed['num_clients']} clients, "
            f"{self.fed['clients_per_round']} per round, {self.fed['rounds']} rounds"
        )

    # -- the run ----------------------------------------------------------------------------
    def run(self, grid: Grid, *, resume: bool = False,
            on_round: Callable[[dict[str, Any]], None] | None = None) -> GlobalState:
        first = 1
        if resume:
            first = self._restore() + 1
        self.summary()
        self.discover(grid)
        if first == 1 and self.method.init_round_roles and not resume:
            self._init_round(grid)
        for server_round in range(first, int(self.fed["rounds"]) + 1):
            row = self.round(grid, server_round)
            if on_round is not None:
                on_round(row)
        return self.state

    def round(self, grid: Grid, server_round: int) -> dict[str, Any]:
        started = time.perf_counter()
        messages = list(self.configure_train(server_round, ArrayRecord(), ConfigRecord(), grid))
        bytes_down = {m.metadata.dst_node_id: self._sent_bytes[m.metadata.dst_node_id]
                      for m in messages}
        replies, missing = self.exchange(grid, messages, server_round)
        outcome = self.collect(server_round, replies)
        for node_id in missing:
            outcome.lost.append({"node": self._name(node_id), "reason": "no reply before the "
                                 f"round timeout ({self.timeout:g} s)"})
        skipped, error = self._aggregate(server_round, outcome)
        for client in outcome.clients:
            client["bytes_down"] = bytes_down.get(client.pop("_node_id"), 0)
        row: dict[str, Any] = {
            "round": server_round,
            "clients": outcome.clients,
            "bytes_up": outcome.bytes_up,
            "bytes_down": sum(bytes_down.values()),
            "adapter_bytes_up": outcome.adapter_bytes_up,
            "adapter_bytes_down": sum(self._sent_payload[n] for n in bytes_down),
            "aggregation_error": error,
            "rejected": outcome.rejected,
            "refused": outcome.refused,
            "lost": outcome.lost,
            "skipped": skipped,
            "lr": round_lr(self.cfg, server_round),
        }
        epsilons = [c["epsilon"] for c in outcome.clients if c.get("epsilon") is not None]
        row["epsilon_max"] = max(epsilons) if epsilons else None
        row.update(self._evaluate(grid, server_round))
        row["wall_seconds"] = time.perf_counter() - started
        self.metrics.append(row)
        save_checkpoint(self.run_dir, self.state, self._checkpoint_extra(),
                        keep=int(self.cfg.get("keep_checkpoints", 2)),
                        optimizer_state=self.server_optimizer.state_tensors())
        self._report(row)
        return row

    # -- pieces -------------------------------------------------------------------------------
    def _aggregate(self, server_round: int, outcome: RoundOutcome) -> tuple[bool, float | None]:
        """Aggregate the valid updates, or skip the round below min_clients.

        Returns (skipped, aggregation error): the error is the root-sum-square over modules
        of ||sum_k p_k s B_k A_k - s B A||_F for inexact methods, None for exact ones.
        """
        before = self.state
        if len(outcome.updates) < int(self.fed["min_clients"]):
            _log.warning("round %d skipped: %d valid updates, %d needed", server_round,
                         len(outcome.updates), int(self.fed["min_clients"]))
            self.state = GlobalState(server_round, before.factors, before.head, before.meta)
            return True, None
        updates = released_weights(outcome.updates)
        averaged = self.method.aggregate(before, updates)
        errors = self.method.aggregation_error(before, updates, averaged)
        # The method's aggregate is exact (or its error is reported) before this step.
        self.state = self.server_optimizer.step(before, averaged)
        return False, None if errors is None else float(sum(e * e for e in errors.values()) ** 0.5)

    def sample(self, server_round: int) -> list[NodeInfo]:
        """Deterministic in (seed, round): a resumed run samples the same partitions."""
        ordered = sorted(self.nodes.values(), key=lambda n: n.partition)
        count = min(int(self.fed["clients_per_round"]), len(ordered))
        rng = random.Random(f"{self.fed['seed']}:sample:{server_round}")
        return sorted(rng.sample(ordered, count), key=lambda n: n.partition)

    def discover(self, grid: Grid) -> None:
        """Wait for the federation's nodes and learn each one's partition, size and rank."""
        wanted = int(self.fed["num_clients"])
        deadline = time.monotonic() + self.connect_timeout
        while len(node_ids := list(grid.get_node_ids())) < wanted:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(node_ids)} of {wanted} nodes connected "
                                   f"within {self.connect_timeout:g} s")
            time.sleep(0.5)
        config = msgs.config_record(self._job(), phase=msgs.PHASE_DESCRIBE)
        messages = [Message(RecordDict({msgs.CONFIG: config}), node_id, MessageType.TRAIN)
                    for node_id in node_ids]
        replies, missing = self.exchange(grid, messages, 0, label="connecting",
                                         timeout=self.connect_timeout)
        for reply in replies:
            if reply.has_error():
                raise RuntimeError(f"node {reply.metadata.src_node_id} failed to start: "
                                   f"{reply.error.reason}")
            metrics = reply.content.metric_records[msgs.METRICS]
            node_id = reply.metadata.src_node_id
            examples = int(metrics["num-examples"]) if "num-examples" in metrics else None
            self.nodes[node_id] = NodeInfo(node_id, int(metrics["partition-id"]), examples,
                                           int(metrics["rank"]))
        if missing:
            _log.warning("%d nodes did not answer the discovery message", len(missing))
        partitions = sorted(n.partition for n in self.nodes.values())
        if len(set(partitions)) != len(partitions):
            raise RuntimeError(f"two nodes claim the same partition: {partitions}")

    def exchange(self, grid: Grid, messages: list[Message], server_round: int,
                 label: str | None = None, timeout: float | None = None
                 ) -> tuple[list[Message], list[int]]:
        """Push, then pull replies until all arrive or the round timeout passes."""
        timeout = self.timeout if timeout is None else timeout
        expected = len(messages)
        if not expected:
            return [], []
        dst = {}
        ids = []
        for message in messages:
            dst_node = message.metadata.dst_node_id
            for message_id in grid.push_messages([message]):
                ids.append(message_id)
                dst[message_id] = dst_node
        pending = set(ids)
        replies: list[Message] = []
        deadline = time.monotonic() + timeout
        while pending and time.monotonic() < deadline:
            for reply in grid.pull_messages(list(pending)):
                pending.discard(reply.metadata.reply_to_message_id)
                replies.append(reply)
                self.progress.clients(server_round, len(replies), expected)
            if pending:
                time.sleep(0.1)
        if pending:
            _log.warning("%s: %d of %d replies missing after %g s; late replies are discarded",
                         label or f"round {server_round}", len(pending), expected, timeout)
        return replies, [dst[i] for i in pending]

    def collect(self, server_round: int, replies: Iterable[Message]) -> RoundOutcome:
        """Decode and validate every reply; bad ones are rejected with a reason."""
        outcome = RoundOutcome()
        for reply in sorted(replies, key=lambda r: self._partition(r.metadata.src_node_id)):
            node_id = reply.metadata.src_node_id
            name = self._name(node_id)
            if reply.has_error():
                outcome.lost.append({"node": name, "reason": f"client error: {reply.error.reason}"})
                _log.warning("round %d: %s failed: %s", server_round, name, reply.error.reason)
                continue
            metrics = reply.content.metric_records.get(msgs.METRICS, MetricRecord())
            if float(metrics.get("refused", 0.0)):
                notes = reply.content.config_records.get(msgs.CONFIG, ConfigRecord())
                reason = str(notes.get("reason", "refused"))
                outcome.refused.append({"node": name, "reason": reason})
                _log.warning("round %d: %s refused: %s", server_round, name, reason)
                continue
            try:
                data = msgs.envelope_bytes(reply.content)
                outcome.bytes_up += len(data)
                envelope = decode(data, self._expectation(server_round, node_id, ("up",)))
            except (UpdateRejected, ValueError) as exc:
                reason = str(exc)
                outcome.rejected.append({"node": name, "reason": reason})
                _log.warning("round %d: rejected update from %s: %s", server_round, name, reason)
                continue
            payload = payload_bytes(data)
            outcome.adapter_bytes_up += payload
            outcome.updates.append(ClientUpdate(factors=envelope.factors,
                                                num_examples=envelope.num_examples,
                                                scaling=envelope.scaling, head=envelope.head,
                                                node=name))
            # Only what the client released: under DP no training loss and no example count
            # unless the node declared one public (client/release.py).
            client = {"node": name, "_node_id": node_id,
                      "examples": envelope.num_examples or None,
                      "bytes_up": len(data), "adapter_bytes_up": payload,
                      "rank": envelope.rank}
            if "train-loss" in metrics:
                client["train_loss"] = float(metrics["train-loss"])
            if "epsilon" in metrics:
                client.update({
                    "epsilon": float(metrics["epsilon"]), "delta": float(metrics["delta"]),
                    "max_grad_norm": float(metrics["max-grad-norm"]),
                    "steps": int(metrics["steps"]),
                })
            outcome.clients.append(client)
        return outcome

    # -- internals ------------------------------------------------------------------------------
    def _job(self) -> dict[str, Any]:
        return {k: v for k, v in self.cfg.items() if k != "hydra"}

    def _partition(self, node_id: int) -> int:
        info = self.nodes.get(node_id)
        return info.partition if info else 1 << 30

    def _name(self, node_id: int) -> str:
        info = self.nodes.get(node_id)
        return info.name if info else f"node-{node_id}"

    def _message(self, info: NodeInfo, server_round: int, phase: str, kind: str,
                 config: ConfigRecord) -> Message:
        first = bool(self.method.node_keeps) and info.partition not in self.contacted
        if kind == MessageType.TRAIN and first:
            self.contacted.add(info.partition)
        data, payload = self._downlink(server_round, first, info.rank)
        self._sent_bytes[info.node_id] = len(data)
        self._sent_payload[info.node_id] = payload
        record = msgs.config_record(self._job(), phase=phase, **{"server-round": server_round},
                                    **self._extra_config())
        for key, value in config.items():
            record[key] = value
        content = RecordDict({msgs.ENVELOPE: msgs.envelope_record(data), msgs.CONFIG: record})
        return Message(content, info.node_id, kind)

    def _downlink(self, server_round: int, first_contact: bool, rank: int) -> tuple[bytes, int]:
        # Same state, round, contact and (for per-client ranks) rank: the same envelope.
        key = (self.state.round, server_round, first_contact,
               rank if self.method.per_client_rank else None)
        if key not in self._downlink_cache:
            factors = self.method.downlink(self.state, first_contact=first_contact, rank=rank)
            envelope = Envelope(method=self.method.name, round=server_round, direction="down",
                                factors=factors, head=self.state.head,
                                fingerprint=self.evaluator.fingerprint, rank=self.spec.rank,
                                scaling=self.spec.scaling)
            data = encode(envelope, self.cfg["wire_dtype"])
            if self._downlink_cache and next(iter(self._downlink_cache))[:2] != key[:2]:
                self._downlink_cache.clear()  # a new round: the old envelopes are stale
            self._downlink_cache[key] = (data, payload_bytes(envelope, self.cfg["wire_dtype"]))
        return self._downlink_cache[key]

    def _extra_config(self) -> dict[str, Any]:
        ledger_dir = self.cfg.get("ledger_dir")
        return {"ledger-dir": str(ledger_dir)} if ledger_dir else {}

    def _expectation(self, server_round: int, node_id: int, roles: Iterable[str] = ()
                     ) -> Expectation:
        info = self.nodes.get(node_id)
        own_rank = self.method.per_client_rank
        return Expectation(
            method=self.method.name, round=server_round, direction="up",
            shapes=dict(self.spec.shapes), roles=tuple(self.method.uplink_in_round(server_round)),
            rank=None if own_rank else self.spec.rank,
            max_rank=(info.rank if info else self.spec.rank) if own_rank else None,
            head_shapes={k: tuple(v.shape) for k, v in self.state.head.items()},
            max_bytes=self._max_bytes(server_round), max_norm=self.max_norm,
            fingerprint=self.evaluator.fingerprint,
        )

    def _max_bytes(self, server_round: int) -> int:
        configured = self.fed.get("max_update_bytes")
        if configured:
            return int(configured)
        # Four times the largest legitimate float32 update, plus room for metadata.
        rank = max([self.spec.rank] + [n.rank for n in self.nodes.values()])
        floats = sum(self.method.uplink_floats(o, i, rank, round=server_round)
                     for o, i in self.spec.shapes.values())
        head = sum(t.numel() for t in self.state.head.values())
        return 4 * 4 * (floats + head) + 65536

    def _init_round(self, grid: Grid) -> None:
        """The method's init round: every client sends its init_round_roles (e.g. Fed-SB's
        DP gradient estimates); the method turns them into the first state."""
        started = time.perf_counter()
        nodes = sorted(self.nodes.values(), key=lambda n: n.partition)
        config = msgs.config_record(self._job(), phase=msgs.PHASE_INIT,
                                    **{"server-round": 0}, **self._extra_config())
        empty = encode(Envelope(method=self.method.name, round=0, direction="down", factors={},
                                fingerprint=self.evaluator.fingerprint), self.cfg["wire_dtype"])
        messages = [Message(RecordDict({msgs.ENVELOPE: msgs.envelope_record(empty),
                                        msgs.CONFIG: config}), n.node_id, MessageType.TRAIN)
                    for n in nodes]
        replies, _ = self.exchange(grid, messages, 0, label="init round",
                                   timeout=self.connect_timeout)
        updates, total = [], 0
        for reply in sorted(replies, key=lambda r: self._partition(r.metadata.src_node_id)):
            if reply.has_error():
                continue
            data = msgs.envelope_bytes(reply.content)
            total += len(data)
            shapes = dict(self.spec.shapes)
            try:
                env = decode(data, Expectation(method=self.method.name, round=0, direction="up",
                                               shapes=shapes,
                                               roles=tuple(self.method.init_round_roles),
                                               max_bytes=8 * sum(o * i for o, i in shapes.values())
                                               + 65536,
                                               fingerprint=self.evaluator.fingerprint))
            except UpdateRejected as exc:
                _log.warning("init round: rejected %s: %s", self._name(reply.metadata.src_node_id),
                             exc)
                continue
            updates.append(ClientUpdate(factors=env.factors, num_examples=env.num_examples,
                                        scaling=env.scaling, node=env.node))
        if not updates:
            raise RuntimeError(f"{self.method.name} init round: no valid update arrived")
        self.state = self.method.init_from_updates(self.spec, released_weights(updates),
                                                   head=self.evaluator.initial_head)
        self.init_bytes_up = total
        self.progress.line(f"{self.method.name} init round: {len(updates)} updates, "
                           f"{total / 1e6:.2f} MB up, {time.perf_counter() - started:.1f} s")

    def _evaluate(self, grid: Grid, server_round: int) -> dict[str, Any]:
        rounds = int(self.fed["rounds"])
        every = max(1, int(self.cfg.get("eval_every", 1)))
        out: dict[str, Any] = {"accuracy": None, "loss": None}
        if server_round % every == 0 or server_round == rounds:
            result = self.evaluator.evaluate(self.method, self.state)
            out.update(accuracy=result["accuracy"], loss=result["loss"])
            if "perplexity" in result:
                out["perplexity"] = result["perplexity"]
        messages = list(self.configure_evaluate(server_round, ArrayRecord(), ConfigRecord(), grid))
        if messages:
            replies, _ = self.exchange(grid, messages, server_round, label="client evaluation")
            client_metrics = self.aggregate_evaluate(server_round, replies)
            if client_metrics is not None:
                out.update({k.replace("-", "_"): v for k, v in client_metrics.items()})
        return out

    def _checkpoint_extra(self) -> dict[str, Any]:
        return {"method": self.method.name, "fingerprint": self.evaluator.fingerprint}

    def _restore(self) -> int:
        path = latest_checkpoint(self.run_dir)
        if path is None:
            raise RuntimeError(f"no checkpoint under {self.run_dir}/checkpoints to resume from")
        state, meta = load_checkpoint(path)
        if meta.get("fingerprint") != self.evaluator.fingerprint:
            raise RuntimeError("checkpoint was made for another base model (fingerprint differs)")
        self.state = state
        self.server_optimizer.load_state_tensors(load_optimizer_state(path))
        self.metrics.truncate(state.round)
        # Node state (node_keeps roles) may not survive a restart: contact everyone again.
        self.contacted = set()
        self.progress.line(f"resuming from {path.name} (round {state.round} complete)")
        return state.round

    def _report(self, row: dict[str, Any]) -> None:
        parts = [f"round {row['round']}/{self.fed['rounds']}",
                 f"{len(row['clients'])} updates"]
        if row["accuracy"] is not None:
            parts.append(f"accuracy {row['accuracy']:.4f}")
            parts.append(f"loss {row['loss']:.4f}")
        if row.get("epsilon_max") is not None:
            parts.append(f"epsilon {row['epsilon_max']:.3f}")
        if row["rejected"]:
            parts.append(f"{len(row['rejected'])} rejected")
        if row["refused"]:
            parts.append(f"{len(row['refused'])} refused")
        if row["lost"]:
            parts.append(f"{len(row['lost'])} lost")
        if row["skipped"]:
            parts.append("SKIPPED")
        parts.append(f"{row['bytes_up'] / 1e3:.1f} kB up / {row['bytes_down'] / 1e3:.1f} kB down")
        parts.append(f"{row['wall_seconds']:.1f} s")
        self.progress.line(" | ".join(parts))
