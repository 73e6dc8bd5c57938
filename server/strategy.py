"""The federation loop: one generic driver that delegates every piece of math to
fedlora.aggregation.

Per round: sample clients (deterministically, by partition), send each its downlink
envelope, collect replies until all arrive or the round timeout passes (exchange.py),
decode and validate every update (intake.py: rejections are logged and listed, never
fatal), aggregate when at least ``min_clients`` valid updates arrived (else skip the
round), step the server optimizer, evaluate centrally, write metrics and a checkpoint.

Why not Flower's ``Strategy.start()``: it broadcasts one ArrayRecord to every sampled node
and folds replies with a single aggregate call. fedlora needs an init round before round
1, a downlink per client (its rank, what it already keeps), per-round timeouts with
partial replies, refusals and rejections with reasons, resumable checkpoints and a server
optimizer with state. So this loop drives Flower's Grid directly (Message API only) and
does not pretend to be a Flower Strategy with dummy records.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flwr.app import Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedlora.aggregation import GlobalState, Method
from fedlora.privacy import BudgetExhausted
from fedlora.protos import Envelope, Expectation, encode, payload_bytes
from fedlora.task import messages as msgs
from fedlora.task.secure_sum import client_level_config
from fedlora.task.training import ServerOptimizerConfig, round_lr

from .checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    load_optimizer_state,
    save_checkpoint,
)
from .client_dp import ClientLevelDP
from .evaluation import CentralEvaluator
from .exchange import MessageExchange, NodeInfo
from .intake import RoundOutcome, collect, released_weights
from .optimizer import ServerOptimizer
from .progress import Progress
from .report import MetricsLog, simulated_spend
from .secure_training import SecureTraining

_log = logging.getLogger(__name__)


class FedLoraStrategy:
    """The ServerApp's federation loop around a fedlora aggregation Method."""

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
        client_level = client_level_config(cfg)
        self.client_dp = None if client_level is None else ClientLevelDP(
            client_level, cfg["privacy"]["client_level"].get("ledger_dir")
            or self.run_dir / "privacy", str(cfg["run_name"]))
        self._round_report: dict[str, Any] = {}
        self.secure = SecureTraining(self) if cfg.get("secure_aggregation") else None

    # -- messages ---------------------------------------------------------------------------
    def _train_messages(self, server_round: int) -> list[Message]:
        return [self._message(info, server_round, msgs.PHASE_TRAIN, MessageType.TRAIN)
                for info in self.sample(server_round)]

    def _evaluate_messages(self, server_round: int) -> list[Message]:
        fraction = float(self.fed.get("fraction_evaluate", 0.0))
        if fraction <= 0 or not self.nodes:
            return []
        count = max(1, round(fraction * len(self.nodes)))
        rng = random.Random(f"{self.fed['seed']}:evaluate:{server_round}")
        chosen = rng.sample(sorted(self.nodes.values(), key=lambda n: n.partition), count)
        return [self._message(info, server_round, msgs.PHASE_TRAIN, MessageType.EVALUATE)
                for info in chosen]

    @staticmethod
    def _client_evaluation(replies: list[Message]) -> dict[str, float] | None:
        total, loss, accuracy = 0.0, 0.0, 0.0
        for reply in replies:
            if reply.has_error():
                continue
            metrics = reply.content.metric_records[msgs.METRICS]
            if float(metrics.get("refused", 0.0)) or "num-examples" not in metrics:
                continue  # a node whose policy keeps its evaluation results to itself
            weight = float(metrics["num-examples"])
            total += weight
            loss += weight * float(metrics["eval-loss"])
            accuracy += weight * float(metrics["eval-accuracy"])
        if total == 0:
            return None
        return {"client_loss": loss / total, "client_accuracy": accuracy / total}

    def summary(self) -> None:
        self.progress.line(
            f"{self.method.name}: {self.method.summary} | {len(self.spec.shapes)} modules, "
            f"rank {self.spec.rank}, {self.fed['num_clients']} clients, "
            f"{self.fed['clients_per_round']} per round, {self.fed['rounds']} rounds"
        )
        self.progress.line(f"privacy: {privacy_line(self.cfg)}")

    # -- the run ----------------------------------------------------------------------------
    def run(self, grid: Grid, *, resume: bool = False,
            on_round: Callable[[dict[str, Any]], None] | None = None) -> GlobalState:
        first = 1
        if resume:
            first = self._restore() + 1
        self.summary()
        self.exchange = MessageExchange(grid, self.progress, self.timeout)
        self.nodes = self.exchange.discover(int(self.fed["num_clients"]), self._job(),
                                            self.connect_timeout)
        if first == 1 and self.method.init_round_roles and not resume:
            self._init_round()
        for server_round in range(first, int(self.fed["rounds"]) + 1):
            if not self._budget_allows(server_round):
                break
            row = self.round(grid, server_round)
            if on_round is not None:
                on_round(row)
        return self.state

    def round(self, grid: Grid, server_round: int) -> dict[str, Any]:
        started = time.perf_counter()
        self._round_report = {}
        if self.secure is not None:
            outcome, bytes_down, skipped = self.secure.train_round(
                server_round, self.sample(server_round))
            error = None
        else:
            messages = self._train_messages(server_round)
            bytes_down = {m.metadata.dst_node_id: self._sent_bytes[m.metadata.dst_node_id]
                          for m in messages}
            replies, missing = self.exchange.push_pull(messages, server_round)
            outcome = collect(replies, f"round {server_round}",
                              lambda node_id: self._expectation(server_round, node_id),
                              self._name, self._partition)
            for node_id in missing:
                outcome.lost.append({"node": self._name(node_id), "reason": "no reply before "
                                     f"the round timeout ({self.timeout:g} s)"})
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
            **self._round_report,
        }
        epsilons = [c["epsilon"] for c in outcome.clients if c.get("epsilon") is not None]
        row["epsilon_max"] = max(epsilons) if epsilons else simulated_spend(self.cfg)
        row.update(self._evaluate(server_round))
        row["wall_seconds"] = time.perf_counter() - started
        self.metrics.append(row)
        save_checkpoint(self.run_dir, self.state, self._checkpoint_extra(),
                        keep=int(self.cfg.get("keep_checkpoints", 2)),
                        optimizer_state=self.server_optimizer.state_tensors())
        self.progress.round(row)
        return row

    # -- pieces -------------------------------------------------------------------------------
    def _aggregate(self, server_round: int, outcome: RoundOutcome) -> tuple[bool, float | None]:
        """Aggregate the valid updates, or skip the round below min_clients.

        Returns (skipped, aggregation error): the error is the root-sum-square over modules
        of ||sum_k p_k s B_k A_k - s B A||_F for inexact methods, None for exact ones.
        """
        before = self.state
        # Under client-level DP every round is released (noise over whatever arrived, even
        # nothing): skipping when few clients took part would make the output depend on the
        # participation count without accounting for it.
        if self.client_dp is None and len(outcome.updates) < int(self.fed["min_clients"]):
            _log.warning("round %d skipped: %d valid updates, %d needed", server_round,
                         len(outcome.updates), int(self.fed["min_clients"]))
            self.state = GlobalState(server_round, before.factors, before.head, before.meta)
            return True, None
        updates = released_weights(outcome.updates)
        if self.client_dp is not None:
            averaged, report = self.client_dp.aggregate(self.method, before, updates,
                                                        server_round)
            self._round_report.update(report)
            errors = None
        else:
            averaged = self.method.aggregate(before, updates)
            errors = self.method.aggregation_error(before, updates, averaged)
        # The method's aggregate is exact (or its error is reported) before this step.
        self.state = self.server_optimizer.step(before, averaged)
        return False, None if errors is None else float(sum(e * e for e in errors.values()) ** 0.5)

    def sample(self, server_round: int) -> list[NodeInfo]:
        """Deterministic in (seed, round): a resumed run samples the same partitions
        (client-level DP with Poisson sampling draws from OS entropy instead)."""
        ordered = sorted(self.nodes.values(), key=lambda n: n.partition)
        count = min(int(self.fed["clients_per_round"]), len(ordered))
        rng = random.Random(f"{self.fed['seed']}:sample:{server_round}")
        if self.client_dp is not None:
            return self.client_dp.sample(ordered, rng)
        return sorted(rng.sample(ordered, count), key=lambda n: n.partition)

    def _budget_allows(self, server_round: int) -> bool:
        """Client-level DP: never start a round whose release the budget cannot pay for."""
        if self.client_dp is None:
            return True
        try:
            self.client_dp.check_budget()
        except BudgetExhausted as exc:
            self.progress.line(f"stopping before round {server_round}: client-level budget "
                               f"exhausted ({exc})")
            return False
        return True

    # -- internals ------------------------------------------------------------------------------
    def _job(self) -> dict[str, Any]:
        return {k: v for k, v in self.cfg.items() if k != "hydra"}

    def _partition(self, node_id: int) -> int:
        info = self.nodes.get(node_id)
        return info.partition if info else 1 << 30

    def _name(self, node_id: int) -> str:
        info = self.nodes.get(node_id)
        return info.name if info else f"node-{node_id}"

    def _message(self, info: NodeInfo, server_round: int, phase: str, kind: str) -> Message:
        first = bool(self.method.node_keeps) and info.partition not in self.contacted
        if kind == MessageType.TRAIN and first:
            self.contacted.add(info.partition)
        data, payload = self._downlink(server_round, first, info.rank)
        self._sent_bytes[info.node_id] = len(data)
        self._sent_payload[info.node_id] = payload
        record = msgs.config_record(self._job(), phase=phase, **{"server-round": server_round},
                                    **self._extra_config())
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
                                fingerprint=self.evaluator.fingerprint,
                                rank=rank if self.method.per_client_rank else self.spec.rank,
                                scaling=self.spec.scaling)
            data = encode(envelope, self.cfg["wire_dtype"])
            if self._downlink_cache and next(iter(self._downlink_cache))[:2] != key[:2]:
                self._downlink_cache.clear()  # a new round: the old envelopes are stale
            self._downlink_cache[key] = (data, payload_bytes(envelope, self.cfg["wire_dtype"]))
        return self._downlink_cache[key]

    def _extra_config(self) -> dict[str, Any]:
        ledger_dir = self.cfg.get("ledger_dir")
        return {"ledger-dir": str(ledger_dir)} if ledger_dir else {}

    def _expectation(self, server_round: int, node_id: int) -> Expectation:
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

    def _init_round(self) -> None:
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
        if self.secure is not None:
            by_node = {m.metadata.dst_node_id: m for m in messages}
            state, result = self.secure.init_round(nodes, lambda info: by_node[info.node_id])
            if state is None:
                raise RuntimeError(f"{self.method.name} init round under secure aggregation "
                                   f"released nothing: {result.reason}")
            self.state, self.init_bytes_up = state, result.bytes_up
            self.progress.line(f"{self.method.name} init round (secure aggregation): "
                               f"{len(result.survivors)} contributions summed, "
                               f"{time.perf_counter() - started:.1f} s")
            return
        replies, _ = self.exchange.push_pull(messages, 0, label="init round",
                                             timeout=self.connect_timeout)
        shapes = dict(self.spec.shapes)
        expected = Expectation(method=self.method.name, round=0, direction="up", shapes=shapes,
                               roles=tuple(self.method.init_round_roles),
                               max_bytes=8 * sum(o * i for o, i in shapes.values()) + 65536,
                               fingerprint=self.evaluator.fingerprint)
        outcome = collect(replies, "init round", lambda node_id: expected, self._name,
                          self._partition)
        if not outcome.updates:
            raise RuntimeError(f"{self.method.name} init round: no valid update arrived "
                               f"(refused {outcome.refused}, rejected {outcome.rejected}, "
                               f"lost {outcome.lost})")
        self.state = self.method.init_from_updates(self.spec, released_weights(outcome.updates),
                                                   head=self.evaluator.initial_head)
        self.init_bytes_up = outcome.bytes_up
        self.progress.line(f"{self.method.name} init round: {len(outcome.updates)} updates, "
                           f"{outcome.bytes_up / 1e6:.2f} MB up, "
                           f"{time.perf_counter() - started:.1f} s")

    def _evaluate(self, server_round: int) -> dict[str, Any]:
        rounds = int(self.fed["rounds"])
        every = max(1, int(self.cfg.get("eval_every", 1)))
        out: dict[str, Any] = {"accuracy": None, "loss": None}
        if server_round % every == 0 or server_round == rounds:
            result = self.evaluator.evaluate(self.method, self.state)
            out.update(accuracy=result["accuracy"], loss=result["loss"])
            if "perplexity" in result:
                out["perplexity"] = result["perplexity"]
        messages = self._evaluate_messages(server_round)
        if messages:
            replies, _ = self.exchange.push_pull(messages, server_round,
                                                 label="client evaluation")
            client_metrics = self._client_evaluation(replies)
            if client_metrics is not None:
                out.update(client_metrics)
        return out

    def secure_summary(self) -> dict[str, Any]:
        return self.secure.summary() if self.secure is not None else {}

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


def privacy_line(cfg: dict[str, Any]) -> str:
    """What protects the data in this job, in one line (printed when the run starts)."""
    privacy, parts = cfg["privacy"], []
    if privacy.get("enabled"):
        recipe = cfg.get("recipe_name") or "none (the method's own training settings)"
        parts.append(f"sample-level DP-SGD on every client, epsilon {privacy['epsilon']:g}, "
                     f"delta {privacy['delta']:g} ({privacy['accountant']}); recipe {recipe}")
    client_level = privacy.get("client_level") or {}
    if client_level.get("enabled"):
        parts.append(f"client-level DP, epsilon {client_level['epsilon']:g}, "
                     f"delta {client_level['delta']:g}")
    return "; ".join(parts) or "none (no DP)"
