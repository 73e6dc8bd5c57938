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
from .faults import corrupt
from .kept import keep_trained, with_kept_factors
from .node import NodeIdentity, round_seed
from .replay import ReplayCache, remember_masked, request_digest, secure_again
from .runtime import ClientRuntime, get_runtime
from .train import gradient_estimate, train_plain, train_private

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


@_guarded
def train(msg: Message, context: Context, cfg: dict[str, Any], config: ConfigRecord,
          node: NodeIdentity, policy: NodePolicy, private: bool) -> Message:
    phase = str(config.get("phase", msgs.PHASE_TRAIN))
    runtime = get_runtime(node.cfg, node.device)
    node.bind(runtime)
    try:
        dataset = node.dataset(runtime)
    except PartitionError as exc:  # its text names sizes: a code leaves, the text is logged
        raise PolicyRefusal("invalid-partition", str(exc)) from exc
    release = _Release(node, len(dataset), private)
    if phase == msgs.PHASE_DESCRIBE:
        return release.reply(msg, None, None, {})
    policy.admit(cfg["privacy"], _secure(msg))
    round_ = int(config["server-round"])
    # The public seed: fresh LoRA draws and plain shuffling. DP sampling and noise never
    # come from it (a fresh keystream per release, privacy/csprng.py).
    seed = round_seed(cfg, round_, node.partition)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed + 1)
    dp = dp_setup(node.cfg, node, policy, len(dataset), runtime.method.init_round_steps())
    downlink_bytes = msgs.envelope_bytes(msg.content)
    downlink = decode(downlink_bytes)
    cache, request = None, None
    if dp is not None:
        request = request_digest(msg, downlink_bytes, cfg)
        if _secure(msg):
            again = secure_again(msg, context, round_, request)
            if again is not None:
                return again
        else:
            cache = ReplayCache(dp.ledger, round_, request)
            cached = cache.load()
            if cached is not None:
                _log.info("%s: round %d already answered; re-sending the same bytes", node.name,
                          round_)
                return _reply(msg, cached[0], cached[1])
    if phase == msgs.PHASE_INIT:
        return _init_round(msg, context, runtime, node, dataset, dp, round_, release, cache,
                           request)

    factors = with_kept_factors(context, runtime, downlink.factors)
    start = runtime.method.client_start(factors, runtime.spec, rank=node.rank,
                                        seed=seed % 2**31, round=round_)
    model = runtime.host.start(start, downlink.head)
    strategy = dict(cfg["strategy"], lr=round_lr(cfg, round_))
    if dp is None:
        result = train_plain(model, dataset, strategy, runtime.task, runtime.device,
                             generator)
    else:
        dp.admit(dp.settings.steps)
        try:
            result = train_private(model, dataset, strategy, runtime.task, runtime.device,
                                   dp.settings, dp.ledger, round_, dp.budget, dp.run)
        except BudgetExhausted as exc:
            raise PolicyRefusal("budget-exhausted", str(exc)) from exc
    keep_trained(context, runtime, start.trainable)
    # The node's own log keeps what it does not release (under DP: loss and timing).
    _log.info("%s round %d: train loss %.4f, %.1f s", node.name, round_, result.train_loss,
              result.seconds)
    envelope = Envelope(
        method=runtime.method.name, round=round_, direction="up",
        factors=runtime.host.factors(runtime.method.uplink_in_round(round_)),
        head=runtime.host.head_state(), num_examples=release.count, scaling=start.scaling,
        rank=start.rank, fingerprint=runtime.fingerprint, node=node.name,
        privacy=None if dp is None else released_privacy(result.epsilon, dp,
                                                         declared_size=release.declared),
    )
    fault = (cfg.get("faults") or {}).get(str(node.partition))
    if _secure(msg):
        if fault == "crash":  # after the shares were dealt: the others' masks must cancel
            raise RuntimeError("fault injection: the client crashed while masking")
        trained = named(envelope.factors, envelope.head)
        uplink = runtime.method.uplink_in_round(round_)
        started = named({m: {r: roles[r] for r in uplink} for m, roles in start.init.items()},
                        downlink.head)
        return _masked(msg, context, release, trained, started, config, result.epsilon, dp,
                       request)
    data = encode(envelope, cfg["wire_dtype"])
    if fault is not None:
        # str(): Hydra reads the kinds nan and inf as floats.
        data = corrupt(data, envelope, str(fault), cfg["wire_dtype"])
    metrics = {"bytes-up": float(len(data))}
    if dp is None:
        metrics.update({"train-loss": result.train_loss, "train-seconds": result.seconds})
    else:
        metrics.update(released_metrics(result.epsilon, dp, declared_size=release.declared))
    reply = release.reply(msg, envelope, data, metrics)
    if cache is not None:
        cache.store(data, dict(release.base, **metrics))
    return reply


def _init_round(msg: Message, context: Context, runtime: ClientRuntime, node: NodeIdentity,
                dataset, dp: DPSetup | None, round_: int, release: _Release,
                cache: ReplayCache | None, request: str | None) -> Message:
    """The method's init round: a (DP) gradient estimate of every target weight, sent as
    the method's init payload (the estimate itself, or e.g. a linear sketch of it)."""
    unsupported = sorted(set(runtime.method.init_round_roles) - set(_INIT_ROLES))
    if unsupported:
        raise NotImplementedError(f"{runtime.method.name}: the client cannot produce init-round "
                                  f"roles {unsupported} (it can: {list(_INIT_ROLES)})")
    strategy = runtime.cfg["strategy"]
    steps = runtime.method.init_round_steps()
    if dp is None:
        settings = DPSettings(noise_multiplier=0.0, max_grad_norm=1e12,
                              sample_rate=local_sample_rate(strategy, len(dataset)), steps=steps)
        ledger = None
    else:
        dp.admit(steps)
        settings = DPSettings(**{**dp.settings.__dict__, "steps": steps})
        ledger = dp.ledger
        try:
            ledger.check_budget(settings.noise_multiplier, settings.sample_rate, steps, dp.budget)
        except BudgetExhausted as exc:
            raise PolicyRefusal("budget-exhausted", str(exc)) from exc
    model = runtime.host.base.train()
    grads = gradient_estimate(model, runtime.host.linears, dataset, strategy, runtime.task,
                              runtime.device, settings, ledger, round_,
                              None if dp is None else dp.run)
    # Post-processing of the (DP) estimate: it costs no privacy.
    factors = runtime.method.client_init_payload(grads, runtime.spec)
    del grads  # the payload may be far smaller (a sketch): drop the full estimates early
    envelope = Envelope(method=runtime.method.name, round=round_, direction="up",
                        factors=factors,
                        num_examples=release.count, scaling=runtime.spec.scaling,
                        rank=runtime.spec.rank, fingerprint=runtime.fingerprint, node=node.name)
    if _secure(msg):
        zeros = {m: {r: torch.zeros_like(g) for r, g in roles.items()}
                 for m, roles in envelope.factors.items()}
        return _masked(msg, context, release, named(envelope.factors, {}), named(zeros, {}),
                       msg.content.config_records[msgs.CONFIG],
                       None if dp is None else dp.ledger.epsilon_spent, dp, request)
    data = encode(envelope, runtime.cfg["wire_dtype"])
    metrics = {"bytes-up": float(len(data))}
    if dp is not None:
        metrics.update(released_metrics(dp.ledger.epsilon_spent, dp,
                                        declared_size=release.declared))
    reply = release.reply(msg, envelope, data, metrics)
    if cache is not None:
        cache.store(data, dict(release.base, **metrics))
    return reply


def _secure(msg: Message) -> bool:
    """The server runs this round under secure aggregation (it sent this node its shares)."""
    return msgs.SECAGG in msg.content.config_records


def _masked(msg: Message, context: Context, release: _Release, trained, started,
            config: ConfigRecord, epsilon: float | None, dp: DPSetup | None,
            request: str | None) -> Message:
    """Reply with the masked contribution and the released metrics, nothing else; under
    DP the reply is kept for ``request`` (replay.py: a round's masks cover one vector)."""
    _, vector = contribution(trained, started, config)
    metrics: dict[str, float] = {}
    if dp is not None and epsilon is not None:
        metrics.update(released_metrics(epsilon, dp, declared_size=release.declared))
    reply = secure.masked_reply(release.reply(msg, None, None, metrics), msg, context, vector)
    if request is not None:
        remember_masked(context, int(config["server-round"]), request, reply)
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
