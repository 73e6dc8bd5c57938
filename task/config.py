"""Validation of a composed fedlora config: every wrong value fails here, before any work.

Errors are collected and raised together as one :class:`ConfigError` whose message names
each offending key, so a user fixes everything in one go.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedlora.privacy import ACCOUNTANTS, GRAD_SAMPLE_MODES
from fedlora.protos import WIRE_DTYPES

from .models import POOLINGS
from .partition import partition_problems, size_problems
from .secagg_ring import MAX_BITS, check_sum_fits
from .training import LRSchedule, ServerOptimizerConfig

MODEL_SOURCES = ("package", "path", "tiny_bert", "tiny_llama")
DATA_SOURCES = ("bbc_news", "csv", "jsonl", "disk", "synthetic")


class ConfigError(ValueError):
    """An invalid configuration value; the message lists every problem found."""


CLIENT_OPTIMIZERS = ("adamw", "sgd")


class _Checks:
    """Collects every problem of a config (so all are reported at once) with two helpers:
    ``need`` (a rule) and ``number`` (a typed, bounded number)."""

    def __init__(self, cfg: Mapping[str, Any]):
        self.cfg = cfg
        self.problems: list[str] = []

    def need(self, ok: bool, message: str) -> None:
        if not ok:
            self.problems.append(message)

    def number(self, section: str, key: str, low: float | None = None, *, above: bool = False,
               integer: bool = False) -> float | None:
        value = self.cfg.get(section, {}).get(key)
        if integer and (not isinstance(value, int) or isinstance(value, bool)):
            self.problems.append(f"{section}.{key} must be an integer, got {value!r}")
            return None
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            self.problems.append(f"{section}.{key} must be a number, got {value!r}")
            return None
        if low is not None and (value <= low if above else value < low):
            self.problems.append(
                f"{section}.{key} must be {'>' if above else '>='} {low}, got {value}")
        return value


def validate(cfg: Mapping[str, Any]) -> None:
    """Check a resolved config (plain dict). Raises ConfigError listing every problem."""
    for section in ("model", "data", "strategy", "privacy", "federation"):
        if not isinstance(cfg.get(section), Mapping):
            raise ConfigError(f"config section {section!r} is missing")
    checks = _Checks(cfg)
    for rules in (_strategy_rules, _model_rules, _data_rules, _federation_rules,
                  _privacy_rules, _runtime_rules):
        rules(checks, cfg)
    checks.problems.extend(_secure_sum_problems(cfg))
    checks.problems.extend(partition_problems(cfg))
    if checks.problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(checks.problems))


def _strategy_rules(checks: _Checks, cfg: Mapping[str, Any]) -> None:
    """The method, its rates and optimizers, and its typed options."""
    from fedlora.aggregation import available_methods, get_method

    need, number, problems = checks.need, checks.number, checks.problems
    strategy = cfg["strategy"]
    methods = available_methods()
    need(strategy.get("name") in methods,
         f"strategy.name {strategy.get('name')!r} is unknown; available: {', '.join(methods)}")
    number("strategy", "rank", 1, integer=True)
    number("strategy", "alpha", 0, above=True)
    number("strategy", "lr", 0, above=True)
    number("strategy", "local_steps", 1, integer=True)
    number("strategy", "batch_size", 1, integer=True)
    if strategy.get("sample_rate") is not None:
        rate = number("strategy", "sample_rate", 0, above=True)
        need(rate is None or rate <= 1, f"strategy.sample_rate must be <= 1, got {rate}")
    need(strategy.get("optimizer", "adamw") in CLIENT_OPTIMIZERS,
         f"strategy.optimizer must be one of {CLIENT_OPTIMIZERS}, got {strategy.get('optimizer')!r}")
    momentum = number("strategy", "momentum", 0) if "momentum" in strategy else 0.0
    need(momentum is None or momentum < 1, f"strategy.momentum must be < 1, got {momentum}")
    need(strategy.get("weighting") in ("examples", "uniform"),
         f"strategy.weighting must be 'examples' or 'uniform', got {strategy.get('weighting')!r}")
    try:
        LRSchedule.from_config(strategy.get("lr_schedule"))
    except (TypeError, ValueError) as exc:
        problems.append(f"strategy.{exc}")
    try:
        server_optimizer = ServerOptimizerConfig.from_config(strategy.get("server_optimizer"))
    except (TypeError, ValueError) as exc:
        problems.append(f"strategy.{exc}")
    else:
        if server_optimizer.active and strategy.get("name") in methods:
            roles = get_method(strategy["name"]).server_step_roles
            need(bool(roles),
                 f"strategy.server_optimizer.name={server_optimizer.name!r} needs a method whose "
                 f"global factors are averaged in a fixed basis; {strategy['name']!r} is not one "
                 f"(it refactorizes or stacks): use server_optimizer.name=none")
    options = strategy.get("options") or {}
    if strategy.get("name") in methods:
        try:  # the method's typed options validate themselves
            get_method(strategy["name"], weighting=strategy.get("weighting", "examples"),
                       **dict(options))
        except (TypeError, ValueError) as exc:
            problems.append(f"strategy.options: {exc}")



def _model_rules(checks: _Checks, cfg: Mapping[str, Any]) -> None:
    need, number = checks.need, checks.number
    model = cfg["model"]
    need(model.get("source") in MODEL_SOURCES,
         f"model.source must be one of {MODEL_SOURCES}, got {model.get('source')!r}")
    need(model.get("task") in ("classification", "causal_lm"),
         f"model.task must be 'classification' or 'causal_lm', got {model.get('task')!r}")
    if model.get("task") == "classification":
        need(model.get("pooling", "pooler") in POOLINGS,
             f"model.pooling must be one of {POOLINGS}, got {model.get('pooling')!r}")
    number("model", "max_length", 2, integer=True)
    need(bool(model.get("target_modules")), "model.target_modules must name at least one module")
    if model.get("source") == "path":
        path = model.get("path")
        need(path not in (None, "???") and (Path(str(path)) / "config.json").is_file(),
             f"model.path {path!r} is not a local Hugging Face model directory")



def _data_rules(checks: _Checks, cfg: Mapping[str, Any]) -> None:
    need, number, problems = checks.need, checks.number, checks.problems
    data = cfg["data"]
    need(data.get("source") in DATA_SOURCES,
         f"data.source must be one of {DATA_SOURCES}, got {data.get('source')!r}")
    if data.get("source") in ("csv", "jsonl", "disk"):
        path = data.get("path")
        if path in (None, "", "???"):
            problems.append(f"data={data.get('source')} needs data.path: the file to read "
                            f"(e.g. data.path=/data/train.{data.get('source')})")
        else:
            need(Path(str(path)).expanduser().exists(), f"data.path={path} does not exist")
    if data.get("source") != "synthetic":
        fraction = number("data", "test_fraction", 0, above=True)
        need(fraction is None or fraction < 1, f"data.test_fraction must be < 1, got {fraction}")



def _federation_rules(checks: _Checks, cfg: Mapping[str, Any]) -> None:
    """Sizes of the federation, and client evaluation under DP (outside the guarantee)."""
    need, number, problems = checks.need, checks.number, checks.problems
    privacy = cfg["privacy"]
    clients = number("federation", "num_clients", 1, integer=True)
    per_round = number("federation", "clients_per_round", 1, integer=True)
    minimum = number("federation", "min_clients", 1, integer=True)
    number("federation", "rounds", 1, integer=True)
    number("federation", "dirichlet_alpha", 0, above=True)
    number("federation", "round_timeout_s", 0, above=True)
    fraction = number("federation", "fraction_evaluate", 0)
    need(fraction is None or fraction <= 1, "federation.fraction_evaluate must be <= 1")
    need(not (fraction and privacy.get("enabled")
              and not privacy.get("client_evaluation", False)),
         "federation.fraction_evaluate > 0 under DP asks nodes for statistics of their private "
         "data outside the guarantee; set federation.fraction_evaluate=0, or "
         "privacy.client_evaluation=true to ask anyway (only nodes whose policy sets "
         "allow-evaluation=true answer)")
    if None not in (clients, per_round) and per_round > clients:
        problems.append(
            f"federation.clients_per_round ({per_round}) exceeds federation.num_clients ({clients})"
        )
    if None not in (minimum, per_round) and minimum > per_round:
        problems.append(
            f"federation.min_clients ({minimum}) exceeds federation.clients_per_round ({per_round})"
        )



def _privacy_rules(checks: _Checks, cfg: Mapping[str, Any]) -> None:
    need, number = checks.need, checks.number
    privacy = cfg["privacy"]
    if privacy.get("enabled"):
        number("privacy", "epsilon", 0, above=True)
        delta = number("privacy", "delta", 0, above=True)
        need(delta is None or delta < 1, f"privacy.delta must be < 1, got {delta}")
        number("privacy", "max_grad_norm", 0, above=True)
        need(privacy.get("accountant") in ACCOUNTANTS,
             f"privacy.accountant must be one of {ACCOUNTANTS}, got {privacy.get('accountant')!r}")
        need(privacy.get("grad_sample_mode") in GRAD_SAMPLE_MODES,
             f"privacy.grad_sample_mode must be one of {GRAD_SAMPLE_MODES}, got "
             f"{privacy.get('grad_sample_mode')!r}")



def _runtime_rules(checks: _Checks, cfg: Mapping[str, Any]) -> None:
    checks.need(cfg.get("wire_dtype") in WIRE_DTYPES,
                f"wire_dtype must be one of {WIRE_DTYPES}, got {cfg.get('wire_dtype')!r}")
    device = str(cfg.get("device"))
    checks.need(device in ("cpu", "auto") or device.startswith("cuda"),
                f"device must be cpu, cuda[:N] or auto, got {device!r}")


def _secure_sum_problems(cfg: Mapping[str, Any]) -> list[str]:
    """Client-level DP and secure aggregation: only for methods whose aggregate is a sum,
    with a cohort that can meet the threshold and a fixed denominator."""
    from fedlora.aggregation import available_methods, get_method

    from .secure_sum import client_level_config, secagg_threshold

    problems: list[str] = []
    client_level = (cfg["privacy"].get("client_level") or {})
    secure = cfg.get("secure_aggregation")
    if not isinstance(secure, bool):
        return [f"secure_aggregation must be true or false, got {secure!r}"]
    if not (client_level.get("enabled") or secure):
        return problems
    wanted = " and ".join(w for w, on in (("client-level DP", client_level.get("enabled")),
                                          ("secure aggregation", secure)) if on)
    name = cfg["strategy"].get("name")
    if name in available_methods():
        method = get_method(name)
        if not method.sum_aggregated:
            summed = [m for m in available_methods() if get_method(m).sum_aggregated]
            problems.append(
                f"{wanted} needs a method whose aggregate is a sum of what clients send; "
                f"{name!r} needs each client's update ({method.summary}). "
                f"Use one of: {', '.join(summed)}")
        elif client_level.get("enabled") and method.init_round_roles:
            problems.append(
                f"client-level DP does not yet cover {name!r}'s init round (it sends per-client "
                f"{list(method.init_round_roles)}): use sample-level DP (privacy=dp_eps8) with "
                f"secure_aggregation=true, or another method")
    fed = cfg["federation"]
    cohort = fed.get("clients_per_round")
    if secure:
        try:
            t = secagg_threshold(cfg)
        except (TypeError, ValueError):
            problems.append(f"secagg.threshold must be an integer, got {cfg['secagg'].get('threshold')!r}")
        else:
            if t < 2:
                problems.append(f"secagg.threshold must be >= 2 (one survivor's sum is its own "
                                f"update), got {t}")
            if isinstance(cohort, int) and t > cohort:
                problems.append(f"secagg.threshold ({t}) is above the cohort size "
                                f"(federation.clients_per_round = {cohort}): no round could "
                                f"ever release a sum")
        sec = cfg.get("secagg") or {}
        for key in ("bits", "init_bits"):
            bits = sec.get(key)
            if isinstance(bits, bool) or not isinstance(bits, int) or not 8 <= bits <= MAX_BITS:
                problems.append(f"secagg.{key} must be an integer in [8, {MAX_BITS}], got {bits!r}")
            elif isinstance(cohort, int) and cohort > 1:
                try:
                    check_sum_fits(bits, cohort)
                except ValueError as exc:
                    problems.append(f"secagg.{key} = {bits} with a cohort of {cohort}: {exc}")
        rng = sec.get("clip_range")
        if isinstance(rng, bool) or not isinstance(rng, (int, float)) or not rng > 0:
            problems.append(f"secagg.clip_range must be a number > 0, got {rng!r}")
    if client_level.get("enabled"):
        if not client_level.get("fixed_denominator", True):
            problems.append(
                "privacy.client_level.fixed_denominator must be true: dividing the noised sum "
                "by the number of updates that arrived or weighting by example counts lets one "
                "client move the mean by more than clip / cohort, which breaks the noise "
                "calibration (and leaks its count)")
        if client_level.get("sampling") not in ("poisson", "all"):
            problems.append(f"privacy.client_level.sampling must be poisson or all, got "
                            f"{client_level.get('sampling')!r}")
        clients = fed.get("num_clients")
        delta = client_level.get("delta")
        if isinstance(clients, int) and isinstance(delta, (int, float)) and delta >= 1 / clients:
            problems.append(f"privacy.client_level.delta ({delta:g}) must be < 1/num_clients "
                            f"({1 / clients:.3g})")
        try:
            client_level_config(cfg)
        except (KeyError, TypeError, ValueError) as exc:
            problems.append(f"privacy.client_level: {exc}")
    return problems


def validate_data(cfg: Mapping[str, Any], partition_sizes: list[int]) -> None:
    """Checks that need the data: sample-level DP's delta and batch rules per client."""
    problems = size_problems(cfg, partition_sizes)
    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))


def check_overrides(cfg: Mapping[str, Any], overrides: list[str] | tuple[str, ...]) -> None:
    """Refuse an override the composed job would silently ignore: ``strategy.batch_size``
    while a sampling rate is set (a small-budget recipe sets one; batches are then q x N_k)."""
    given = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
    rate = cfg["strategy"].get("sample_rate")
    if "strategy.batch_size" in given and rate is not None:
        raise ConfigError(
            f"strategy.batch_size has no effect while strategy.sample_rate={rate} is set "
            f"(recipe: {cfg.get('recipe_name') or 'none'}; batches are sample_rate x N_k); "
            "add strategy.sample_rate=null to use a fixed batch, or drop strategy.batch_size")


def compose_job(overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """conf/config.yaml composed with its defaults (recipes included) and ``overrides``,
    resolved to a plain dict: the one way fedlora builds a job config outside Hydra's CLI."""
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    with initialize_config_module(config_module="fedlora.conf", version_base=None):
        cfg = compose(config_name="config", overrides=list(overrides))
    job = OmegaConf.to_container(cfg, resolve=True)
    check_overrides(job, overrides)
    return job
