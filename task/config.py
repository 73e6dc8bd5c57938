"""Validation of a composed fedlora config: every wrong value fails here, before any work.

Errors are collected and raised together as one :class:`ConfigError` whose message names
each offending key, so a user fixes everything in one go.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .partition import partition_problems, size_problems
from .schema import schema_problems
from .secagg_ring import MAX_BITS, check_sum_fits
from .training import LRSchedule, ServerOptimizerConfig


class ConfigError(ValueError):
    """An invalid configuration value; the message lists every problem found."""

    def __init__(self, problems: str | list[str]) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__(problems if isinstance(problems, str) else
                         "invalid configuration:\n  - " + "\n  - ".join(self.problems))


def validate(cfg: Mapping[str, Any]) -> None:
    """Check a resolved config (plain dict). Raises ConfigError listing every problem.

    Types, bounds and choices come from the schema (task/schema.py); the rules below are
    the ones that span several keys or need the method registry or the file system."""
    for section in ("model", "data", "strategy", "privacy", "federation"):
        if not isinstance(cfg.get(section), Mapping):
            raise ConfigError(f"config section {section!r} is missing")
    problems = schema_problems(cfg)
    for rules in (_method_rules, _training_rules, _model_rules, _data_rules,
                  _federation_rules, _privacy_rules, _device_rules):
        problems.extend(rules(cfg))
    problems.extend(_secure_sum_problems(cfg))
    problems.extend(partition_problems(cfg))
    if problems:
        raise ConfigError(problems)


def _method_rules(cfg: Mapping[str, Any]) -> list[str]:
    """The method exists, its typed options hold, and a server optimizer suits it."""
    from fedlora.aggregation import available_methods, get_method

    strategy = cfg["strategy"]
    name, methods = strategy.get("name"), available_methods()
    if name not in methods:
        return [f"strategy.name {name!r} is unknown; available: {', '.join(methods)}"]
    problems = []
    try:  # the method's typed options validate themselves
        get_method(name, weighting=strategy.get("weighting", "examples"),
                   **dict(strategy.get("options") or {}))
    except (TypeError, ValueError) as exc:
        problems.append(f"strategy.options: {exc}")
    try:
        server_optimizer = ServerOptimizerConfig.from_config(strategy.get("server_optimizer"))
    except (TypeError, ValueError):
        return problems  # reported by _training_rules
    if server_optimizer.active and not get_method(name).server_step_roles:
        problems.append(
            f"strategy.server_optimizer.name={server_optimizer.name!r} needs a method whose "
            f"global factors are averaged in a fixed basis; {name!r} is not one (it "
            f"refactorizes or stacks): use server_optimizer.name=none")
    return problems


def _training_rules(cfg: Mapping[str, Any]) -> list[str]:
    """The learning-rate schedule and the server optimizer check their own fields."""
    problems = []
    for key, make in (("lr_schedule", LRSchedule.from_config),
                      ("server_optimizer", ServerOptimizerConfig.from_config)):
        try:
            make(cfg["strategy"].get(key))
        except (TypeError, ValueError) as exc:
            problems.append(f"strategy.{exc}")
    return problems


def _model_rules(cfg: Mapping[str, Any]) -> list[str]:
    model, problems = cfg["model"], []
    if not model.get("target_modules"):
        problems.append("model.target_modules must name at least one module")
    path = model.get("path")
    if model.get("source") == "path" and not (
            path not in (None, "???") and (Path(str(path)) / "config.json").is_file()):
        problems.append(f"model.source=path needs model.path, a local Hugging Face model "
                        f"directory (with config.json); got {path!r}")
    return problems


def _data_rules(cfg: Mapping[str, Any]) -> list[str]:
    data = cfg["data"]
    if data.get("source") not in ("csv", "jsonl", "disk"):
        return []
    path = data.get("path")
    if path in (None, "", "???"):
        return [f"data={data.get('source')} needs data.path: the file to read "
                f"(e.g. data.path=/data/train.{data.get('source')})"]
    if not Path(str(path)).expanduser().exists():
        return [f"data.path={path} does not exist"]
    return []


def _federation_rules(cfg: Mapping[str, Any]) -> list[str]:
    """Cohort sizes agree, and client evaluation under DP (outside the guarantee) is asked
    for explicitly."""
    fed, privacy, problems = cfg["federation"], cfg["privacy"], []
    clients, per_round = fed.get("num_clients"), fed.get("clients_per_round")
    minimum = fed.get("min_clients")
    if _ints(clients, per_round) and per_round > clients:
        problems.append(f"federation.clients_per_round ({per_round}) exceeds "
                        f"federation.num_clients ({clients})")
    if _ints(minimum, per_round) and minimum > per_round:
        problems.append(f"federation.min_clients ({minimum}) exceeds "
                        f"federation.clients_per_round ({per_round})")
    if (fed.get("fraction_evaluate") and privacy.get("enabled")
            and not privacy.get("client_evaluation", False)):
        problems.append(
            "federation.fraction_evaluate > 0 under DP asks nodes for statistics of their "
            "private data outside the guarantee; set federation.fraction_evaluate=0, or "
            "privacy.client_evaluation=true to ask anyway (only nodes whose policy sets "
            "allow-evaluation=true answer)")
    return problems


def _privacy_rules(cfg: Mapping[str, Any]) -> list[str]:
    """Sample-level DP names its whole mechanism (a preset such as privacy=dp_eps8 does)."""
    privacy = cfg["privacy"]
    if not privacy.get("enabled"):
        return []
    return [f"privacy.enabled=true needs privacy.{key} (or choose a preset: privacy=dp_eps8)"
            for key in ("epsilon", "delta", "max_grad_norm", "accountant")
            if privacy.get(key) is None]


def _device_rules(cfg: Mapping[str, Any]) -> list[str]:
    device = str(cfg.get("device"))
    if device in ("cpu", "auto") or device.startswith("cuda"):
        return []
    return [f"device must be cpu, cuda[:N] or auto, got {device!r}"]


def _ints(*values: Any) -> bool:
    return all(isinstance(v, int) and not isinstance(v, bool) for v in values)


def _secure_sum_problems(cfg: Mapping[str, Any]) -> list[str]:
    """Client-level DP and secure aggregation: only for methods whose aggregate is a sum,
    with a cohort that can meet the threshold and a fixed denominator."""
    client_level = cfg["privacy"].get("client_level") or {}
    secure = cfg.get("secure_aggregation")
    if not isinstance(secure, bool):
        return [f"secure_aggregation must be true or false, got {secure!r}"]
    problems = _summable_method_rule(cfg, bool(client_level.get("enabled")), secure)
    if secure:
        problems += _secagg_rules(cfg)
    if client_level.get("enabled"):
        problems += _client_level_rules(cfg, client_level)
    return problems


def _summable_method_rule(cfg: Mapping[str, Any], client_level: bool, secure: bool,
                          ) -> list[str]:
    """Both need a method whose aggregate is a sum of what clients send (and distributed
    DP does not cover an init round's per-client matrices yet)."""
    from fedlora.aggregation import available_methods, get_method

    name = cfg["strategy"].get("name")
    if not (client_level or secure) or name not in available_methods():
        return []
    wanted = " and ".join(w for w, on in (("client-level DP", client_level),
                                          ("secure aggregation", secure)) if on)
    method = get_method(name)
    if not method.sum_aggregated:
        summed = [m for m in available_methods() if get_method(m).sum_aggregated]
        return [f"{wanted} needs a method whose aggregate is a sum of what clients send; "
                f"{name!r} needs each client's update ({method.summary}). "
                f"Use one of: {', '.join(summed)}"]
    if client_level and secure and method.init_round_roles:
        return [f"distributed DP (client-level DP with secure_aggregation=true) does not yet "
                f"cover {name!r}'s init round (it sends per-client "
                f"{list(method.init_round_roles)}): set secure_aggregation=false (the server "
                f"then adds the noise, init round included), or use sample-level DP "
                f"(privacy=dp_eps8) with secure aggregation"]
    return []


def _secagg_rules(cfg: Mapping[str, Any]) -> list[str]:
    """The threshold fits the cohort, and the ring holds the cohort's sum."""
    from .secure_sum import secagg_threshold

    problems = []
    cohort = cfg["federation"].get("clients_per_round")
    try:
        t = secagg_threshold(cfg)
    except (TypeError, ValueError):
        problems.append(f"secagg.threshold must be an integer, got "
                        f"{cfg['secagg'].get('threshold')!r}")
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
    return problems


def _client_level_rules(cfg: Mapping[str, Any], client_level: Mapping[str, Any]) -> list[str]:
    """A fixed denominator, a known sampling, delta below 1/clients, a calibration that
    exists."""
    from .secure_sum import client_level_config

    problems = []
    if not client_level.get("fixed_denominator", True):
        problems.append(
            "privacy.client_level.fixed_denominator must be true: dividing the noised sum "
            "by the number of updates that arrived or weighting by example counts lets one "
            "client move the mean by more than clip / cohort, which breaks the noise "
            "calibration (and leaks its count)")
    clients = cfg["federation"].get("num_clients")
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
    refuse_bad_overrides(overrides)
    job = _compose(overrides)
    check_overrides(job, overrides)
    return job


def _compose(overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    with initialize_config_module(config_module="fedlora.conf", version_base=None):
        cfg = compose(config_name="config", overrides=list(overrides))
    return OmegaConf.to_container(cfg, resolve=True)


def refuse_bad_overrides(overrides: list[str] | tuple[str, ...]) -> None:
    """Raise ConfigError when an override has the wrong type or names no key (Hydra would
    stop at the first), listing every such problem and what validate finds in the job the
    other overrides compose to (bar rules about the keys that were wrong)."""
    from .schema import bad_overrides

    bad = bad_overrides(overrides)
    if not bad:
        return
    problems = [p for found in bad.values() for p in found]
    keys = {text.split("=", 1)[0].lstrip("+~") for text in bad}
    try:
        validate(_compose([o for o in overrides if o not in bad]))
    except ConfigError as exc:
        problems += [p for p in exc.problems if not any(k in p for k in keys)]
    except Exception:  # noqa: BLE001 - the rest fails in Hydra: it says why once fixed
        pass
    raise ConfigError(problems)
