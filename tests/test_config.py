"""Config validation: every wrong value fails before any work, with one clear message."""

from __future__ import annotations

import copy

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from fedlora.aggregation import available_methods
from fedlora.task.config import ConfigError, validate, validate_data


def _cfg(*overrides: str) -> dict:
    with initialize_config_module(config_module="fedlora.conf", version_base=None):
        return OmegaConf.to_container(compose("config", overrides=list(overrides)), resolve=True)


def test_default_config_is_valid():
    validate(_cfg())
    for strategy in available_methods():  # the built-ins and every plug-in
        validate(_cfg(f"strategy={strategy}", "privacy=dp"))


@pytest.mark.parametrize(
    ("path", "value", "needle"),
    [
        (("strategy", "rank"), 0, "strategy.rank must be >= 1"),
        (("strategy", "rank"), -3, "strategy.rank must be >= 1"),
        (("strategy", "name"), "fedprox", "strategy.name 'fedprox' is unknown"),
        (("privacy", "epsilon"), 0.0, "privacy.epsilon must be > 0"),
        (("privacy", "epsilon"), -1.0, "privacy.epsilon must be > 0"),
        (("privacy", "delta"), 1.5, "privacy.delta must be in (0, 1)"),
        (("privacy", "accountant"), "gdp", "privacy.accountant must be one of"),
        (("model", "source"), "hub", "model.source must be one of"),
        (("model", "pooling"), "cls", "model.pooling must be one of"),
        (("federation", "clients_per_round"), 11, "clients_per_round (11) exceeds"),
        (("federation", "rounds"), 0, "federation.rounds must be >= 1"),
        (("federation", "dirichlet_alpha"), 0.0, "dirichlet_alpha must be > 0"),
        (("wire_dtype",), "int8", "wire_dtype must be one of"),
    ],
)
def test_invalid_values_fail_with_a_clear_message(path, value, needle):
    cfg = _cfg("privacy=dp")
    target = cfg
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    assert needle in str(info.value)


def test_all_problems_are_listed_together():
    cfg = _cfg("privacy=dp")
    cfg["strategy"]["rank"] = 0
    cfg["privacy"]["epsilon"] = -1
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    assert "strategy.rank" in str(info.value) and "privacy.epsilon" in str(info.value)


def test_delta_must_be_below_one_over_smallest_client():
    cfg = _cfg("privacy=dp", "privacy.delta=0.05")
    with pytest.raises(ConfigError, match=r"privacy.delta \(0.05\) must be < 1/N_k"):
        validate_data(cfg, [100, 40, 60])
    ok = copy.deepcopy(cfg)
    ok["privacy"]["delta"] = 1e-3
    validate_data(ok, [100, 40, 60])


def test_batch_larger_than_a_client_is_rejected():
    cfg = _cfg("privacy=dp", "strategy.batch_size=64")
    with pytest.raises(ConfigError, match="batch_size"):
        validate_data(cfg, [100, 30])
