"""The federation loop: one generic driver that delegates every piece of math to
fedlora.aggregation and every way of aggregating a round to a RoundAggregation.

Per round: sample clients (deterministically, by partition), let the round's aggregation
(rounds.py: plain, client-level DP, or secure aggregation in secure_training.py) exchange
messages and produce the method's new state, step the server optimizer on it (or skip the
round when nothing was released), evaluate centrally, write metrics and a checkpoint.

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
from fedlora.task.secure_sum import client_level_config, secagg_threshold
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
from .optimizer import ServerOptimizer
from .progress import Progress
from .report import MetricsLog, simulated_spend
from .rounds import ClientLevelRound, PlainRound, RoundAggregation
from .secure_training import SecureAggregationRound

_log = logging.getLogger(__name__)


class FederationLoop:
    """The ServerApp's federation loop around a fedlora aggregation Method.

    It is the :class:`~.rounds.Federation` view every RoundAggregation receives: the
    config, the method, the current state, the exchange, and how to build a node's
    message; the rounds return their result and the loop applies it."""

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
            method.server_step_roles, int(self.fed["rounds"]))
        self.nodes: dict[int, NodeInfo] = {}
        self.max_node_rank = 0  # the largest rank among self.nodes, set with them
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
        self.fingerprint = evaluator.fingerprint
        self.aggregation: RoundAggregation
        if cfg.get("secure_aggregation"):
            self.aggregation = SecureAggregationRound(secagg_threshold(cfg),
                                                      int(self.fed["min_clients"]),
                                                      self.client_dp)
        elif self.client_dp is not None:
            self.aggregation = ClientLevelRound(self.client_dp)
        else:
            self.aggregation = PlainRound(int(self.fed["min_clients"]))

    # -- the view a round gets (rounds.Federation) ------------------------------------------
    @property
    def initial_head(self) -> dict[str, Any]:
        return self.evaluator.initial_head

    def job(self) -> dict[str, Any]:
        return {k: v for k, v in self.cfg.items() if k != "hydra"}

    def train_message(self, info: NodeInfo, server_round: int) -> tuple[Message, int]:
        message = self._message(info, server_round, msgs.PHASE_TRAIN, MessageType.TRAIN)
        return message, self._sent_bytes[info.node_id]

    def node_partition(self, node_id: int) -> int:
        info = self.nodes.get(node_id)
        return info.partition if info else 1 << 30

    def node_name(self, node_id: int) -> str:
        info = self.nodes.get(node_id)
        return info.name if info else f"node-{node_id}"

    def expectation(self, server_round: int, node_id: int) -> Expectation:
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

    # -- messages ---------------------------------------------------------------------------
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
        self.nodes = self.exchange.discover(int(self.fed["num_clients"]), self.job(),
                                            self.connect_timeout)
        self.max_node_rank = max((n.rank for n in self.nodes.values()), default=0)
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
        before = self.state
        result = self.aggregation.train_round(self, server_round, self.sample(server_round))
        skipped = result.averaged is None
        if skipped:
            self.state = GlobalState(server_round, before.factors, before.head, before.meta)
        else:
            # The method's aggregate is exact (or its error is reported) before this step.
            self.state = self.server_optimizer.step(before, result.averaged)
        outcome, bytes_down = result.outcome, result.bytes_down
        for client in outcome.clients:
            client["bytes_down"] = bytes_down.get(client.pop("_node_id"), 0)
        row: dict[str, Any] = {
            "round": server_round,
            "clients": outcome.clients,
            "bytes_up": outcome.bytes_up,
            "bytes_down": sum(bytes_down.values()),
            "adapter_bytes_up": outcome.adapter_bytes_up,
            "adapter_bytes_down": sum(self._sent_payload[n] for n in bytes_down),
            "aggregation_error": result.error,
            "rejected": outcome.rejected,
            "refused": outcome.refused,
            "lost": outcome.lost,
            "skipped": skipped,
            "lr": round_lr(self.cfg, server_round),
            **result.report,
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
    def _message(self, info: NodeInfo, server_round: int, phase: str, kind: str) -> Message:
        first = bool(self.method.node_keeps) and info.partition not in self.contacted
        if kind == MessageType.TRAIN and first:
            self.contacted.add(info.partition)
        data, payload = self._downlink(server_round, first, info.rank)
        self._sent_bytes[info.node_id] = len(data)
        self._sent_payload[info.node_id] = payload
        record = msgs.config_record(self.job(), phase=phase, **{"server-round": server_round},
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

    def _max_bytes(self, server_round: int) -> int:
        configured = self.fed.get("max_update_bytes")
        if configured:
            return int(configured)
        # Four times the largest legitimate float32 update, plus room for metadata. Asked
        # for every reply: the nodes' largest rank is kept, not recomputed over all nodes.
        rank = max(self.spec.rank, self.max_node_rank)
        floats = sum(self.method.uplink_floats(o, i, rank, round=server_round)
                     for o, i in self.spec.shapes.values())
        head = sum(t.numel() for t in self.state.head.values())
        return 4 * 4 * (floats + head) + 65536

    def _init_round(self) -> None:
        """The method's init round: every client sends its init_round_roles (e.g. Fed-SB's
        DP gradient estimates); the round's aggregation turns them into the first state."""
        started = time.perf_counter()
        nodes = sorted(self.nodes.values(), key=lambda n: n.partition)
        config = msgs.config_record(self.job(), phase=msgs.PHASE_INIT,
                                    **{"server-round": 0}, **self._extra_config())
        empty = encode(Envelope(method=self.method.name, round=0, direction="down", factors={},
                                fingerprint=self.evaluator.fingerprint), self.cfg["wire_dtype"])

        def message(info: NodeInfo) -> Message:
            return Message(RecordDict({msgs.ENVELOPE: msgs.envelope_record(empty),
                                       msgs.CONFIG: config}), info.node_id, MessageType.TRAIN)

        self.state, self.init_bytes_up, line = self.aggregation.init_round(self, nodes, message)
        self.progress.line(f"{line}, {time.perf_counter() - started:.1f} s")

    def _evaluate(self, server_round: int) -> dict[str, Any]:
        rounds = int(self.fed["rounds"])
        every = max(1, int(self.cfg.get("eval_every", 1)))
        out: dict[str, Any] = {"accuracy": None, "loss": None}
        if server_round % every == 0 or server_round == rounds:
            result = self.evaluator.evaluate(self.method, self.state)
            out.update(accuracy=result["accuracy"], loss=result["loss"])
            for key in ("perplexity", "exact_match", "rougeL",  # causal LMs
                        "val_accuracy", "val_loss"):  # with data.validation_fraction
                if key in result:
                    out[key] = result[key]
        messages = self._evaluate_messages(server_round)
        if messages:
            replies, _ = self.exchange.push_pull(messages, server_round,
                                                 label="client evaluation")
            client_metrics = self._client_evaluation(replies)
            if client_metrics is not None:
                out.update(client_metrics)
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
