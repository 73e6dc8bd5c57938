"""The work behind the fedlora ClientApp's handlers (client/app.py): train and evaluate.

The server sends each round one adapter envelope (protobuf, fedlora.protos) and the job
config; the client applies it as its method prescribes, trains ``local_steps`` steps
(DP-SGD when privacy is on), and replies with its own envelope and metrics. What a node
is (node config keys) lives in node.py, its DP setup in dp.py, what it may release under
DP in task/release.py, factors it keeps between rounds in kept.py, and resent updates in
replay.py.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedlora.aggregation import ClientStart
from fedlora.privacy import BudgetExhausted, DPSettings
from fedlora.privacy.policy import NodePolicy, PolicyRefusal
from fedlora.protos import Envelope, decode, encode
from fedlora.task import messages as msgs
from fedlora.task.evaluate import evaluate
from fedlora.task.partition import PartitionError
from fedlora.task.release import check_release, released_metrics, released_privacy
from fedlora.task.secure_sum import named
from fedlora.task.training import local_sample_rate, round_lr

from . import secure
from .contribution import contribution
from .dp import DPSetup, dp_setup
from .kept import keep_trained, with_kept_factors
from .node import NodeIdentity, round_seed
from .replay import ReplayCache, remember_masked, request_digest, secure_again
from .runtime import ClientRuntime, get_runtime
from .train import LocalResult, gradient_estimate, train_plain, train_private

_log = logging.getLogger(__name__)

# What a client can send in an init round, by role: "G" is the (DP) mean gradient of each
# target weight over init_round_steps() batches (e.g. LoRA-SB's init), "Y" and "W" a linear
# sketch of it (G Omega, Psi G); the method's client_init_payload makes them from G.
_INIT_ROLES = ("G", "Y", "W")


def _job(msg: Message) -> tuple[dict[str, Any], ConfigRecord]:
    config = msg.content.config_records[msgs.CONFIG]
    return json.loads(str(config[msgs.JOB_CONFIG_KEY])), config


def _reply(msg: Message, envelope: bytes | None, metrics: dict[str, float],
           notes: dict[str, str] | None = None) -> Message:
    content = RecordDict({msgs.METRICS: MetricRecord(metrics)})
    if envelope is not None:
        content[msgs.ENVELOPE] = msgs.envelope_record(envelope)
    if notes:
        content[msgs.CONFIG] = ConfigRecord(notes)
    return Message(content=content, reply_to=msg)


class _Release:
    """The reply this node may send: everything without DP; under DP only what
    task/release.py classifies (checked before anything leaves, strings included)."""

    def __init__(self, node: NodeIdentity, num_examples: int | None, private: bool):
        self.node, self.private = node, private
        self.base: dict[str, float] = {"partition-id": float(node.partition),
                                       "rank": float(node.rank)}
        declared = None if num_examples is None else node.declared_size(num_examples)
        self.declared = declared is not None
        count = declared if private else num_examples
        # 0 in the envelope = "not released": the server then weighs the round uniformly.
        self.count = int(count or 0)
        if count is not None:
            self.base["num-examples"] = float(count)

    def reply(self, msg: Message, envelope: Envelope | None, data: bytes | None,
              metrics: dict[str, float], notes: dict[str, str] | None = None, *,
              evaluation: bool = False) -> Message:
        metrics = dict(self.base, **metrics)
        if self.private:
            # Every envelope field that carries something (a new field must be classified).
            fields = None if envelope is None else {
                f.name: value for f in dataclasses.fields(envelope)
                if (value := getattr(envelope, f.name)) not in (None, {}, "", 0)}
            check_release(metrics, fields, None if envelope is None else envelope.privacy,
                          declared_size=self.declared, notes=notes, evaluation=evaluation)
        return _reply(msg, data, metrics, notes)


def _refusal(msg: Message, node: NodeIdentity, private: bool, code: str) -> Message:
    """A refusal: a fixed code and the node's public identity, nothing else."""
    release = _Release(node, None, private)
    return release.reply(msg, None, None, {"refused": 1.0}, {"reason": code})


def _guarded(handler):
    """Run a handler; a private node's refusals and failures leave as fixed codes only.

    Flower forwards an exception's text to the server, and that text can carry data
    (sizes, ratios, paths): under DP every failure is logged here and answered with the
    code "client-error"; a non-private node raises as before.
    """
    def run(msg: Message, context: Context) -> Message:
        cfg, config = _job(msg)
        node = NodeIdentity(cfg, config, context)
        secure = _secure(msg) or bool(cfg.get("secure_aggregation"))
        private = bool(cfg["privacy"].get("enabled"))
        try:
            policy = node.policy(cfg["privacy"], secure)
            private = policy.private(cfg["privacy"])
            return handler(msg, context, cfg, config, node, policy, private)
        except PolicyRefusal as exc:
            _log.warning("%s refuses: %s", node.name, exc)
            return _refusal(msg, node, private, exc.code)
        except Exception:
            if not private:
                raise
            _log.exception("%s failed; the server gets the code client-error only", node.name)
            return _refusal(msg, node, private, "client-error")

    return run


@dataclasses.dataclass(frozen=True)
class _Round:
    """What answering one training message needs once train() has set the round up."""

    msg: Message
    context: Context
    cfg: dict[str, Any]
    node: NodeIdentity
    runtime: ClientRuntime
    dataset: Any
    release: _Release
    dp: DPSetup | None
    number: int
    seed: int
    cache: ReplayCache | None = None  # a plain round's reply kept under DP (replay.py)
    request: str | None = None  # the request's digest under DP (replay.py)

    @property
    def secure(self) -> bool:
        return _secure(self.msg)


@_guarded
def train(msg: Message, context: Context, cfg: dict[str, Any], config: ConfigRecord,
          node: NodeIdentity, policy: NodePolicy, private: bool) -> Message:
    """A training message: describe this node, or run the init round or a training round."""
    runtime = get_runtime(node.cfg, node.device)
    node.bind(runtime)
    dataset = _partition(node, runtime)
    release = _Release(node, len(dataset), private)
    phase = str(config.get("phase", msgs.PHASE_TRAIN))
    if phase == msgs.PHASE_DESCRIBE:
        return release.reply(msg, None, None, {})
    policy.admit(cfg["privacy"], _secure(msg))
    number = int(config["server-round"])
    # The public seed: fresh LoRA draws and plain shuffling. DP sampling and noise never
    # come from it (a fresh keystream per release, privacy/csprng.py).
    seed = round_seed(cfg, number, node.partition)
    torch.manual_seed(seed)
    dp = dp_setup(node.cfg, node, policy, len(dataset), runtime.method.init_round_steps())
    round_ = _Round(msg, context, cfg, node, runtime, dataset, release, dp, number, seed)
    downlink_bytes = msgs.envelope_bytes(msg.content)
    downlink = decode(downlink_bytes)
    round_, again = _replayed(round_, downlink_bytes)
    if again is not None:
        return again
    if phase == msgs.PHASE_INIT:
        return _init_round(round_)
    return _train_round(round_, downlink)


def _partition(node: NodeIdentity, runtime: ClientRuntime) -> Any:
    """This node's training data; an invalid partition is refused with a code (the
    error's text names sizes: it is logged, not sent)."""
    try:
        return node.dataset(runtime)
    except PartitionError as exc:
        raise PolicyRefusal("invalid-partition", str(exc)) from exc


def _replayed(round_: _Round, downlink_bytes: bytes) -> tuple[_Round, Message | None]:
    """Under DP, a request this node already answered gets the same reply again (no budget
    spent twice, replay.py); otherwise ``round_`` with the request digest and, for a plain
    round, the cache its reply is kept in."""
    if round_.dp is None:
        return round_, None
    msg, number = round_.msg, round_.number
    request = request_digest(msg, downlink_bytes, round_.cfg)
    if round_.secure:
        again = secure_again(msg, round_.context, number, request)
        return dataclasses.replace(round_, request=request), again
    cache = ReplayCache(round_.dp.ledger, number, request)
    cached = cache.load()
    if cached is not None:
        _log.info("%s: round %d already answered; re-sending the same bytes",
                  round_.node.name, number)
        return round_, _reply(msg, cached[0], cached[1])
    return dataclasses.replace(round_, cache=cache, request=request), None


def _train_round(round_: _Round, downlink: Envelope) -> Message:
    """A training round: local steps from the downlink (with any factors this node
    keeps); the update goes up as an envelope, or masked under secure aggregation."""
    runtime = round_.runtime
    factors = with_kept_factors(round_.context, runtime, downlink.factors)
    start = runtime.method.client_start(factors, runtime.spec, rank=round_.node.rank,
                                        seed=round_.seed % 2**31, round=round_.number)
    result = _local_training(round_, start, downlink.head)
    envelope = _uplink_envelope(round_, start, result)
    if round_.secure:
        uplink = runtime.method.uplink_in_round(round_.number)
        started = named({m: {r: roles[r] for r in uplink} for m, roles in start.init.items()},
                        downlink.head)
        trained = named(envelope.factors, envelope.head)
        return _masked(round_, trained, started, result.epsilon)
    data = encode(envelope, round_.cfg["wire_dtype"])
    metrics = {"bytes-up": float(len(data))}
    if round_.dp is None:
        metrics.update({"train-loss": result.train_loss, "train-seconds": result.seconds})
    else:
        metrics.update(released_metrics(result.epsilon, round_.dp,
                                        declared_size=round_.release.declared))
    return _send(round_, envelope, data, metrics)


def _local_training(round_: _Round, start: ClientStart,
                    head: dict[str, torch.Tensor]) -> LocalResult:
    """The round's local steps from ``start`` (DP-SGD under DP, within the budget); the
    factors the method keeps on the node are kept."""
    runtime, dp, number = round_.runtime, round_.dp, round_.number
    model = runtime.host.start(start, head)
    strategy = dict(round_.cfg["strategy"], lr=round_lr(round_.cfg, number))
    if dp is None:
        generator = torch.Generator().manual_seed(round_.seed + 1)
        result = train_plain(model, round_.dataset, strategy, runtime.task, runtime.device,
                             generator)
    else:
        dp.admit(dp.settings.steps)
        try:
            result = train_private(model, round_.dataset, strategy, runtime.task,
                                   runtime.device, dp.settings, dp.ledger, number, dp.budget,
                                   dp.run)
        except BudgetExhausted as exc:
            raise PolicyRefusal("budget-exhausted", str(exc)) from exc
    keep_trained(round_.context, runtime, start.trainable, round_.node.key_dir,
                 str(round_.cfg.get("run_name", "")))
    # The node's own log keeps what it does not release (under DP: loss and timing).
    _log.info("%s round %d: train loss %.4f, %.1f s", round_.node.name, number,
              result.train_loss, result.seconds)
    return result


def _uplink_envelope(round_: _Round, start: ClientStart, result: LocalResult) -> Envelope:
    """The trained adapter this round sends up, with what this node releases about it."""
    runtime, dp, release = round_.runtime, round_.dp, round_.release
    privacy = None if dp is None else released_privacy(result.epsilon, dp,
                                                       declared_size=release.declared)
    return Envelope(
        method=runtime.method.name, round=round_.number, direction="up",
        factors=runtime.host.factors(runtime.method.uplink_in_round(round_.number)),
        head=runtime.host.head_state(), num_examples=release.count, scaling=start.scaling,
        rank=start.rank, fingerprint=runtime.fingerprint, node=round_.node.name,
        privacy=privacy,
    )


def _send(round_: _Round, envelope: Envelope, data: bytes,
          metrics: dict[str, float]) -> Message:
    """Reply with the encoded envelope ``data`` and ``metrics``; under DP the reply is kept
    for a repeated request (replay.py)."""
    reply = round_.release.reply(round_.msg, envelope, data, metrics)
    if round_.cache is not None:
        round_.cache.store(data, dict(round_.release.base, **metrics))
    return reply


def _init_round(round_: _Round) -> Message:
    """The method's init round: a (DP) gradient estimate of every target weight, sent as
    the method's init payload (the estimate itself, or e.g. a linear sketch of it)."""
    runtime, dp, release = round_.runtime, round_.dp, round_.release
    unsupported = sorted(set(runtime.method.init_round_roles) - set(_INIT_ROLES))
    if unsupported:
        raise NotImplementedError(f"{runtime.method.name}: the client cannot produce init-round "
                                  f"roles {unsupported} (it can: {list(_INIT_ROLES)})")
    settings = _init_settings(round_, runtime.method.init_round_steps())
    model = runtime.host.base.train()
    grads = gradient_estimate(model, runtime.host.linears, round_.dataset,
                              runtime.cfg["strategy"], runtime.task, runtime.device, settings,
                              None if dp is None else dp.ledger, round_.number,
                              None if dp is None else dp.run)
    # Post-processing of the (DP) estimate: it costs no privacy.
    factors = runtime.method.client_init_payload(grads, runtime.spec)
    del grads  # the payload may be far smaller (a sketch): drop the full estimates early
    envelope = Envelope(method=runtime.method.name, round=round_.number, direction="up",
                        factors=factors,
                        num_examples=release.count, scaling=runtime.spec.scaling,
                        rank=runtime.spec.rank, fingerprint=runtime.fingerprint,
                        node=round_.node.name)
    epsilon = None if dp is None else dp.ledger.epsilon_spent
    if round_.secure:
        zeros = {m: {r: torch.zeros_like(g) for r, g in roles.items()}
                 for m, roles in envelope.factors.items()}
        return _masked(round_, named(envelope.factors, {}), named(zeros, {}), epsilon)
    data = encode(envelope, runtime.cfg["wire_dtype"])
    metrics = {"bytes-up": float(len(data))}
    if dp is not None:
        metrics.update(released_metrics(epsilon, dp, declared_size=release.declared))
    return _send(round_, envelope, data, metrics)


def _init_settings(round_: _Round, steps: int) -> DPSettings:
    """The init round's sampling (and, under DP, noise) settings; under DP its steps are
    admitted and checked against the budget first."""
    dp = round_.dp
    if dp is None:
        rate = local_sample_rate(round_.runtime.cfg["strategy"], len(round_.dataset),
                                 private=False)
        return DPSettings(noise_multiplier=0.0, max_grad_norm=1e12, sample_rate=rate,
                          steps=steps)
    dp.admit(steps)
    settings = DPSettings(**{**dp.settings.__dict__, "steps": steps})
    try:
        dp.ledger.check_budget(settings.noise_multiplier, settings.sample_rate, steps, dp.budget)
    except BudgetExhausted as exc:
        raise PolicyRefusal("budget-exhausted", str(exc)) from exc
    return settings


def _secure(msg: Message) -> bool:
    """The server runs this round under secure aggregation (it sent this node its shares)."""
    return msgs.SECAGG in msg.content.config_records


def _masked(round_: _Round, trained: dict[str, torch.Tensor], started: dict[str, torch.Tensor],
            epsilon: float | None) -> Message:
    """Reply with the masked contribution and the released metrics, nothing else; under
    DP the reply is kept for the request (replay.py: a round's masks cover one vector)."""
    msg, dp, release = round_.msg, round_.dp, round_.release
    _, vector = contribution(trained, started, msg.content.config_records[msgs.CONFIG])
    metrics: dict[str, float] = {}
    if dp is not None and epsilon is not None:
        metrics.update(released_metrics(epsilon, dp, declared_size=release.declared))
    reply = secure.masked_reply(release.reply(msg, None, None, metrics), msg, round_.context,
                                vector)
    if round_.request is not None:
        remember_masked(round_.context, round_.number, round_.request, reply)
    return reply


@_guarded
def evaluate_global(msg: Message, context: Context, cfg: dict[str, Any], config: ConfigRecord,
                    node: NodeIdentity, policy: NodePolicy, private: bool) -> Message:
    """Evaluate the global model (with any factors this node keeps) on this node's data.

    The accuracy of a model on private data is itself a statistic of that data, outside
    the DP guarantee: a private node answers only if its owner's policy sets
    ``allow-evaluation``, and otherwise refuses with the code policy-forbids-evaluation.
    """
    if private and not policy.allow_evaluation:
        raise PolicyRefusal("policy-forbids-evaluation")
    runtime = get_runtime(node.cfg, node.device)
    node.bind(runtime)
    dataset = node.dataset(runtime)
    downlink = decode(msgs.envelope_bytes(msg.content))
    factors = with_kept_factors(context, runtime, downlink.factors)
    start = runtime.method.client_start(factors, runtime.spec, rank=node.rank)
    model = runtime.host.start(start, downlink.head)
    result = evaluate(model, dataset, runtime.task, device=runtime.device)
    metrics = {"eval-loss": result["loss"], "eval-accuracy": result["accuracy"],
               "num-examples": float(len(dataset)), "partition-id": float(node.partition)}
    if private:
        check_release(metrics, None, None, declared_size=False, evaluation=True)
    return _reply(msg, None, metrics)
