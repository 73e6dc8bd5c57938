"""One sample rate for every client (batch proportional to N_k) and declared public sizes:
the rate the ledger records is the one the loader really samples at, and a node releases a
size only where its data owner (node config) or, in simulation only, the job declared it."""

from __future__ import annotations

import pytest
from flwr.app import ConfigRecord, Context, RecordDict

from fedlora.client.dp import dp_setup
from fedlora.client.node import SIMULATION_ENV, NodeIdentity
from fedlora.task.config import ConfigError, compose_job, validate, validate_data
from fedlora.task.training import local_batch_size


def _node(cfg: dict, node_config: dict) -> NodeIdentity:
    context = Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(),
                      run_config={})
    return NodeIdentity(cfg, ConfigRecord({}), context)


def test_batch_is_the_rate_times_the_client_size() -> None:
    fixed = {"batch_size": 16, "sample_rate": None}
    assert [local_batch_size(fixed, n) for n in (32, 178, 900)] == [16, 16, 16]
    rate = {"batch_size": 16, "sample_rate": 0.09}
    assert [local_batch_size(rate, n) for n in (32, 178, 900)] == [3, 16, 81]
    assert local_batch_size({"batch_size": 16, "sample_rate": 0.001}, 40) == 1  # never empty
    assert local_batch_size({"batch_size": 16, "sample_rate": 1.0}, 40) == 40


def test_ledger_rate_is_the_rate_the_loader_samples_at(tmp_path) -> None:
    cfg = compose_job(["privacy=dp", "privacy.accountant=rdp", "strategy.sample_rate=0.09",
                       "run_name=fed"])
    for n in (37, 901):
        node = _node(cfg, {"ledger-dir": str(tmp_path)})
        setup = dp_setup(cfg, node, node.policy(cfg["privacy"], False), n)
        assert setup.settings.sample_rate == local_batch_size(cfg["strategy"], n) / n
        assert setup.settings.sample_rate == pytest.approx(0.09, abs=0.5 / n)


def test_sample_rate_config_errors() -> None:
    for bad in (0, 1.5):  # out of bounds: refused by validate, before any work
        with pytest.raises(ConfigError, match=r"sample_rate must be in \(0, 1\]"):
            validate(compose_job([f"strategy.sample_rate={bad}"]))
    with pytest.raises(ConfigError, match="sample_rate must be a number"):
        compose_job(["strategy.sample_rate=x"])  # the wrong type: refused as it is composed
    with pytest.raises(ConfigError, match="has no effect while strategy.sample_rate=0.5"):
        compose_job(["strategy.sample_rate=0.5", "strategy.batch_size=64"])  # one would be moot
    cfg = compose_job(["strategy.sample_rate=0.5"])
    cfg["strategy"]["batch_size"] = 64
    validate_data(cfg, [40, 300])  # batch_size does not apply with one rate: no complaint
    with pytest.raises(ConfigError, match="exceeds the smallest client"):
        validate_data(compose_job(["privacy=dp", "strategy.batch_size=64"]), [40, 300])


def test_sizes_are_declared_by_the_node_or_in_simulation_only(monkeypatch) -> None:
    cfg = compose_job(["privacy=dp", "simulation.public_sizes=true"])
    monkeypatch.delenv(SIMULATION_ENV, raising=False)
    assert _node(cfg, {}).declared_size(178) is None  # a deployed node: the job cannot decide
    assert _node(cfg, {"public-num-examples": 200}).declared_size(178) == 200
    monkeypatch.setenv(SIMULATION_ENV, "1")
    assert _node(cfg, {}).declared_size(178) == 178
    assert _node(cfg, {"public-num-examples": 200}).declared_size(178) == 200
    off = compose_job(["privacy=dp"])
    assert _node(off, {}).declared_size(178) is None


def test_deploy_local_refuses_public_sizes_before_any_work(tmp_path, capsys) -> None:
    from fedlora.deploy.local_run import deploy_local

    run = tmp_path / "run"
    assert deploy_local(["--nodes", "2", "model=tiny_bert", "data=synthetic",
                         "simulation.public_sizes=true", f"hydra.run.dir={run}"]) == 2
    assert "public-num-examples" in capsys.readouterr().err
    assert not run.exists()
