"""The typed job schema: `--cfg job` shows every key typed, and a wrong type is refused
with exit 2 before any work, every problem listed."""

from __future__ import annotations

import yaml

from fedlora.deploy.cli import _overrides_in, main
from fedlora.task.config import ConfigError, compose_job, validate
from fedlora.task.schema import JobConfig, bad_overrides, schema_fields


def test_cfg_job_prints_every_schema_key_typed(capsys, tmp_path) -> None:
    code = main(["simulate", "--cfg", "job", f"hydra.run.dir={tmp_path / 'run'}"])
    job = yaml.safe_load(capsys.readouterr().out)
    assert code == 0 and not (tmp_path / "run").exists()  # printed, nothing run
    for key, _ in schema_fields():
        node = job
        for part in key.split("."):
            assert part in node, f"{key} missing from --cfg job"
            node = node[part]
    # Types are the schema's, whatever the YAML wrote: alpha 16 is a float, the CPUs too.
    assert job["strategy"]["alpha"] == 16.0 and isinstance(job["strategy"]["alpha"], float)
    assert isinstance(job["simulation"]["num_cpus_per_client"], float)
    assert job["simulation"]["num_gpus_per_client"] == 0.0
    assert job["strategy"]["name"] == "ffa" and job["privacy"]["epsilon"] == 8.0


def test_wrong_types_exit_2_before_any_work_listing_every_problem(capsys, tmp_path) -> None:
    run = tmp_path / "run"
    code = main(["simulate", "federation.rounds=ten", "strategy.lr=fast",
                 "privacy.enabled=maybe", "model.max_length=1", "federation.roundz=3",
                 "federation.clients_per_round=20", f"hydra.run.dir={run}"])
    err = capsys.readouterr().err
    assert code == 2 and not run.exists()
    for line in ("federation.rounds must be an integer, got 'ten'",
                 "strategy.lr must be a number, got 'fast'",
                 "privacy.enabled must be true or false, got 'maybe'",
                 "model.max_length must be >= 2, got 1",
                 "federation.roundz is not a config key",
                 "federation.clients_per_round (20) exceeds federation.num_clients (10)"):
        assert line in err, err


def test_compose_refuses_wrong_types_with_every_problem() -> None:
    try:
        compose_job(["federation.num_clients=x", "secagg.bits=1.5", "wire_dtype=int4"])
    except ConfigError as exc:
        text = str(exc)
    else:
        raise AssertionError("composed a job with wrong types")
    assert "federation.num_clients must be an integer, got 'x'" in text
    assert "secagg.bits must be an integer, got 1.5" in text
    assert "wire_dtype must be one of" in text


def test_a_plain_job_of_wrong_types_is_refused_with_every_problem() -> None:
    """A job read from a YAML file (a deployment's config-path, a run to resume) meets the
    same schema as a composed one."""
    job = compose_job([])
    job["federation"]["rounds"] = "five"
    job["privacy"]["delta"] = "tiny"
    job["model"]["target_modules"] = "query"
    try:
        validate(job)
    except ConfigError as exc:
        text = str(exc)
    else:
        raise AssertionError("validated a job with wrong types")
    assert "federation.rounds must be an integer, got 'five'" in text
    assert "privacy.delta must be a number or null, got 'tiny'" in text
    assert "model.target_modules must be a list of strings, got 'query'" in text


def test_sweeps_are_checked_value_by_value_and_groups_left_to_hydra() -> None:
    assert bad_overrides(["strategy=fedsb", "privacy=none", "strategy.rank=4,8,x",
                          "hydra.run.dir=/tmp/x", "strategy.options.anything=1"]) == {
        "strategy.rank=4,8,x": ["strategy.rank must be an integer, got 'x'"]}


def test_hydra_flags_are_not_overrides() -> None:
    assert _overrides_in(["--cfg", "job", "-m", "a=1", "--info", "defaults", "b=2",
                          "-cn", "other", "--package", "_global_"]) == ["a=1", "b=2"]


def test_every_knob_default_meets_its_own_bounds() -> None:
    from fedlora.task.schema import bound_problem, schema_default

    for key, f in schema_fields(JobConfig):
        assert f.metadata.get("help"), f"{key} has no meaning"
        assert bound_problem(key, f, schema_default(f)) is None, key
