"""The fedlora ClientApp (Flower Message API).

The server sends each round one adapter envelope (protobuf, fedlora.protos) and the job
config; the client applies it as its method prescribes, trains ``local_steps`` steps
(DP-SGD when privacy is on), and replies with its own envelope and metrics. Data owners
set node config keys: ``partition-id``/``num-partitions`` (or ``data-path``),
``max-epsilon`` (a stricter budget wins), ``ledger-dir``, ``device``, ``lora-rank`` and
``max-physical-batch`` (DP: the most examples one forward/backward pass may hold; larger
logical batches are split, with the same steps, noise and epsilon).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import secrets
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedlora.aggregation import SEP
from fedlora.privacy import (
    BudgetExhausted,
    DPSettings,
    PrivacyLedger,
    calibrate_noise_multiplier,
    effective_epsilon,
    validate_delta,
)
from fedlora.protos import Envelope, decode, encode
from fedlora.task import messages as msgs
from fedlora.task.data import federation_partition
from fedlora.task.evaluate import evaluate
from fedlora.task.files import atomic_write
from fedlora.task.training import round_lr

from .faults import corrupt
from .runtime import ClientRuntime, get_runtime
from .train import gradient_estimate, train_plain, train_private

_log = logging.getLogger(__name__)
app = ClientApp()
_STATE_KEY = "fedlora-kept-factors"


def _job(msg: Message) -> tuple[dict[str, Any], ConfigRecord]:
    config = msg.content.config_records[msgs.CONFIG]
    return json.loads(str(config[msgs.JOB_CONFIG_KEY])), config


class _Node:
    """What this node is: its partition of the data, its rank, its privacy budget."""

    def __init__(self, cfg: dict[str, Any], config: ConfigRecord, context: Context):
        node_cfg = context.node_config
        self.partition = int(node_cfg.get("partition-id", 0))
        self.partitions = int(node_cfg.get("num-partitions", cfg["federation"]["num_clients"]))
        self.name = f"partition-{self.partition}"
        self.device = str(node_cfg.get("device", cfg.get("device", "cpu")))
        self.max_epsilon = node_cfg.get("max-epsilon")
        self.ledger_dir = node_cfg.get("ledger-dir") or config.get("ledger-dir")
        physical = node_cfg.get("max-physical-batch",
                                cfg["privacy"].get("max_physical_batch_size"))
        self.max_physical_batch = None if physical in (None, "") else int(physical)
        declared = node_cfg.get("lora-rank")
        self.declared_rank = None if declared in (None, "") else int(declared)
        self.rank = 0  # set by bind() once the method is known
        self.own_data = "data-path" in node_cfg
        if self.own_data:
            # A deployed node with its own data: all of it is this node's partition.
            data_cfg = dict(cfg["data"], path=str(node_cfg["data-path"]), test_fraction=0.1)
            cfg = dict(cfg, data=data_cfg)
            self.partitions, self.partition = 1, 0
        self.cfg = cfg

    def bind(self, runtime: ClientRuntime) -> _Node:
        """The rank this node trains at, as its method decides (shared or its own)."""
        self.rank = runtime.method.client_rank(runtime.spec, self.partition, self.declared_rank)
        return self


def _dataset(runtime: ClientRuntime, node: _Node):
    if node.own_data:
        return runtime.data.train
    return federation_partition(runtime.cfg, runtime.data, node.partition, node.partitions)


def _seed(cfg: dict[str, Any], round_: int, partition: int) -> int:
    text = f"{cfg['federation']['seed']}:{round_}:{partition}"
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:7], "little")


def _private_seed(ledger: PrivacyLedger, round_: int) -> int:
    """A seed for DP-SGD's noise and Poisson sampling that only this node knows.

    Noise seeded from the shared config seed would let the server regenerate and subtract
    it. The node keeps a random secret beside its ledger (mode 0600, never sent), so its
    noise is unpredictable to everyone else yet reproducible for the node itself.
    """
    path = ledger.path.with_suffix(".secret")
    if not path.exists():
        atomic_write(path, secrets.token_hex(32).encode(), mode=0o600)
    digest = hashlib.sha256(f"{path.read_text().strip()}:{round_}".encode()).digest()
    return int.from_bytes(digest[:7], "little")


class _ReplayCache:
    """The update a DP client already released for a round, kept beside its ledger.

    After a server crash the resumed round arrives again with the same downlink and job;
    sending the same bytes again reveals nothing new and spends no budget, so the ledger
    never counts a round twice. A different downlink or job (or no cached file) means
    training anew, which is recorded anew.
    """

    def __init__(self, ledger: PrivacyLedger, round_: int, downlink: bytes, job: dict[str, Any]):
        # Same downlink and same job (seeds, learning rate, ...) = the same training.
        digest = hashlib.sha256(downlink + json.dumps(job, sort_keys=True).encode())
        digest = digest.hexdigest()[:16]
        self.path = ledger.path.with_suffix(f".round-{round_}.{digest}.update")
        self.meta = self.path.with_suffix(".json")

    def load(self) -> tuple[bytes, dict[str, float]] | None:
        if self.path.is_file() and self.meta.is_file():
            return self.path.read_bytes(), json.loads(self.meta.read_text())
        return None

    def store(self, data: bytes, metrics: dict[str, float]) -> None:
        atomic_write(self.path, data, mode=0o600)
        atomic_write(self.meta, json.dumps(metrics).encode(), mode=0o600)


@functools.lru_cache(maxsize=256)
def _calibrated_sigma(epsilon: float, delta: float, sample_rate: float, steps: int,
                      accountant: str) -> float:
    """The federation-wide noise multiplier; deterministic, so computed once per process."""
    return calibrate_noise_multiplier(epsilon, delta, sample_rate, steps, accountant)


def _privacy(runtime: ClientRuntime, node: _Node, num_examples: int, extra_steps: int = 0):
    """(DPSettings, ledger, budget) for this node, or None without DP."""
    privacy = runtime.cfg["privacy"]
    if not privacy.get("enabled"):
        return None
    delta = float(privacy["delta"])
    validate_delta(delta, num_examples)
    budget = effective_epsilon(float(privacy["epsilon"]),
                               None if node.max_epsilon is None else float(node.max_epsilon))
    strategy, fed = runtime.cfg["strategy"], runtime.cfg["federation"]
    sample_rate = int(strategy["batch_size"]) / num_examples
    planned = int(strategy["local_steps"]) * int(fed["rounds"]) + extra_steps
    sigma = _calibrated_sigma(budget, delta, sample_rate, planned, privacy["accountant"])
    if not node.ledger_dir:
        raise ValueError("DP is on but no ledger directory is set (node config ledger-dir)")
    ledger = PrivacyLedger.open(
        node.ledger_dir, federation=str(runtime.cfg["run_name"]), node=node.name,
        mechanism=privacy["accountant"], target_epsilon=budget, delta=delta,
    )
    settings = DPSettings(noise_multiplier=sigma, max_grad_norm=float(privacy["max_grad_norm"]),
                          sample_rate=sample_rate, steps=int(strategy["local_steps"]),
                          accountant=privacy["accountant"],
                          grad_sample_mode=privacy.get("grad_sample_mode", "hooks"),
                          max_physical_batch_size=node.max_physical_batch,
                          secure_mode=bool(privacy.get("secure_mode", False)))
    return settings, ledger, budget


def _envelope_privacy(dp, epsilon: float | None) -> dict[str, float | int | str] | None:
    """The privacy spent, as the envelope's typed privacy message carries it."""
    if dp is None:
        return None
    settings, ledger, _ = dp
    return {"epsilon": float(ledger.epsilon_spent if epsilon is None else epsilon),
            "delta": ledger.delta, "noise_multiplier": settings.noise_multiplier,
            "max_grad_norm": settings.max_grad_norm, "sample_rate": settings.sample_rate,
            "steps": int(ledger.steps), "accountant": ledger.mechanism}


def _privacy_metrics(dp, epsilon: float | None) -> dict[str, float]:
    """The same figures as reply metrics (numbers only), plus the node's budget."""
    spent = _envelope_privacy(dp, epsilon)
    if spent is None:
        return {}
    metrics = {k.replace("_", "-"): float(v) for k, v in spent.items() if k != "accountant"}
    metrics["epsilon-budget"] = float(dp[2])
    return metrics


def _reply(msg: Message, envelope: bytes | None, metrics: dict[str, float],
           notes: dict[str, str] | None = None) -> Message:
    content = RecordDict({msgs.METRICS: MetricRecord(metrics)})
    if envelope is not None:
        content[msgs.ENVELOPE] = msgs.envelope_record(envelope)
    if notes:
        content[msgs.CONFIG] = ConfigRecord(notes)
    return Message(content=content, reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg, config = _job(msg)
    node = _Node(cfg, config, context)
    phase = str(config.get("phase", msgs.PHASE_TRAIN))
    runtime = get_runtime(node.cfg, node.device)
    node.bind(runtime)
    dataset = _dataset(runtime, node)
    base = {"partition-id": float(node.partition), "num-examples": float(len(dataset)),
            "rank": float(node.rank)}
    if phase == msgs.PHASE_DESCRIBE:
        return _reply(msg, None, base)
    round_ = int(config["server-round"])
    seed = _seed(cfg, round_, node.partition)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed + 1)
    dp = _privacy(runtime, node, len(dataset), runtime.method.init_round_steps())
    downlink_bytes = msgs.envelope_bytes(msg.content)
    downlink = decode(downlink_bytes)
    cache = None
    if dp is not None:
        ledger = dp[1]
        private_seed = _private_seed(ledger, round_)
        torch.manual_seed(private_seed)
        generator = torch.Generator().manual_seed(private_seed + 1)
        cache = _ReplayCache(ledger, round_, downlink_bytes, cfg)
        cached = cache.load() if ledger.has_round(round_) else None
        if cached is not None:
            _log.info("%s: round %d already trained; re-sending the same update", node.name,
                      round_)
            return _reply(msg, cached[0], cached[1])
    if phase == msgs.PHASE_INIT:
        try:
            return _init_round(msg, runtime, node, dataset, dp, round_, generator, base)
        except BudgetExhausted as exc:
            return _reply(msg, None, dict(base, refused=1.0),
                          {"reason": f"budget exhausted: {exc}"})

    factors = _with_kept_factors(context, runtime, downlink.factors)
    start = runtime.method.client_start(factors, runtime.spec, rank=node.rank,
                                        seed=seed % 2**31, round=round_)
    model = runtime.host.start(start, downlink.head)
    strategy = dict(cfg["strategy"], lr=round_lr(cfg, round_))
    try:
        if dp is None:
            result = train_plain(model, dataset, strategy, runtime.task, runtime.device,
                                 generator)
        else:
            settings, ledger, budget = dp
            result = train_private(model, dataset, strategy, runtime.task,
                                   runtime.device, generator, settings, ledger, round_, budget)
    except BudgetExhausted as exc:
        _log.warning("%s refuses round %d: %s", node.name, round_, exc)
        metrics = dict(base, refused=1.0, **_privacy_metrics(dp, None))
        return _reply(msg, None, metrics, {"reason": f"budget exhausted: {exc}"})
    _keep_trained(context, runtime, start.trainable)
    envelope = Envelope(
        method=runtime.method.name, round=round_, direction="up",
        factors=runtime.host.factors(runtime.method.uplink_in_round(round_)),
        head=runtime.host.head_state(), num_examples=len(dataset), scaling=start.scaling,
        rank=start.rank, fingerprint=runtime.fingerprint, node=node.name,
        privacy=_envelope_privacy(dp, result.epsilon),
    )
    data = encode(envelope, cfg["wire_dtype"])
    fault = (cfg.get("faults") or {}).get(str(node.partition))
    if fault is not None:
        # str(): Hydra reads the kinds nan and inf as floats.
        data = corrupt(data, envelope, str(fault), cfg["wire_dtype"])
    metrics = dict(base, **{"train-loss": result.train_loss, "train-seconds": result.seconds,
                            "bytes-up": float(len(data))}, **_privacy_metrics(dp, result.epsilon))
    if cache is not None:
        cache.store(data, metrics)
    return _reply(msg, data, metrics)


def _with_kept_factors(context: Context, runtime: ClientRuntime, factors):
    """The downlink completed with the roles the node keeps between rounds (node_keeps).

    They arrive at first contact (e.g. Fed-SB's fixed B and A) and stay in the node's state
    as arrays; later downlinks carry only what changes.
    """
    keeps = runtime.method.node_keeps
    if not keeps:
        return dict(factors)
    first = next(iter(factors.values()), {})
    if all(role in first for role in keeps):
        context.state[_STATE_KEY] = ArrayRecord(
            {f"{m}{SEP}{r}": t.detach().cpu().contiguous()
             for m, roles in factors.items() for r, t in roles.items() if r in keeps})
        return dict(factors)
    if _STATE_KEY not in context.state.array_records:
        raise RuntimeError(f"{runtime.method.name}: this node never received "
                           f"{'/'.join(keeps)} (its first contact was lost)")
    kept: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in context.state.array_records[_STATE_KEY].to_torch_state_dict().items():
        module, _, role = key.partition(SEP)
        kept.setdefault(module, {})[role] = tensor
    return {m: {**kept[m], **roles} for m, roles in factors.items()}


# What a client can send in an init round, by role: "G" is the (DP) mean gradient of each
# target weight over init_round_steps() batches (e.g. LoRA-SB's init).
_INIT_ROLES = ("G",)


def _keep_trained(context: Context, runtime: ClientRuntime, trained: tuple[str, ...]) -> None:
    """Kept roles that this round trained (a personalized factor) are kept as trained."""
    keeps = [r for r in runtime.method.node_keeps if r in trained]
    if not keeps:
        return
    stored = {}
    if _STATE_KEY in context.state.array_records:
        stored = context.state.array_records[_STATE_KEY].to_torch_state_dict()
    for module, roles in runtime.host.factors(tuple(keeps)).items():
        for role, tensor in roles.items():
            stored[f"{module}{SEP}{role}"] = tensor.contiguous()
    context.state[_STATE_KEY] = ArrayRecord(stored)


def _init_round(msg, runtime, node, dataset, dp, round_, generator, base) -> Message:
    """The method's init round: a (DP) gradient estimate of every target weight."""
    unsupported = sorted(set(runtime.method.init_round_roles) - set(_INIT_ROLES))
    if unsupported:
        raise NotImplementedError(f"{runtime.method.name}: the client cannot produce init-round "
                                  f"roles {unsupported} (it can: {list(_INIT_ROLES)})")
    strategy = runtime.cfg["strategy"]
    steps = runtime.method.init_round_steps()
    if dp is None:
        settings = DPSettings(noise_multiplier=0.0, max_grad_norm=1e12,
                              sample_rate=int(strategy["batch_size"]) / len(dataset), steps=steps)
        ledger = None
    else:
        settings, ledger, _ = dp
        settings = DPSettings(**{**settings.__dict__, "steps": steps})
        ledger.check_budget(settings.noise_multiplier, settings.sample_rate, steps)
    model = runtime.host.base.train()
    grads = gradient_estimate(model, runtime.host.linears, dataset, strategy, runtime.task,
                              runtime.device, generator, settings, ledger, round_)
    envelope = Envelope(method=runtime.method.name, round=round_, direction="up",
                        factors={m: {role: g for role in runtime.method.init_round_roles}
                                 for m, g in grads.items()},
                        num_examples=len(dataset), scaling=runtime.spec.scaling,
                        rank=runtime.spec.rank, fingerprint=runtime.fingerprint, node=node.name)
    data = encode(envelope, runtime.cfg["wire_dtype"])
    metrics = dict(base, **{"bytes-up": float(len(data))}, **_privacy_metrics(dp, None))
    return _reply(msg, data, metrics)


@app.evaluate()
def evaluate_global(msg: Message, context: Context) -> Message:
    """Evaluate the global model on this node's own training partition."""
    cfg, config = _job(msg)
    node = _Node(cfg, config, context)
    runtime = get_runtime(node.cfg, node.device)
    node.bind(runtime)
    dataset = _dataset(runtime, node)
    downlink = decode(msgs.envelope_bytes(msg.content))
    factors = _with_kept_factors(context, runtime, downlink.factors)
    start = runtime.method.client_start(factors, runtime.spec, rank=node.rank)
    model = runtime.host.start(start, downlink.head)
    result = evaluate(model, dataset, runtime.task, device=runtime.device)
    return _reply(msg, None, {"eval-loss": result["loss"], "eval-accuracy": result["accuracy"],
                              "num-examples": float(len(dataset)),
                              "partition-id": float(node.partition)})

