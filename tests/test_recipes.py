"""DP recipes: one file per (method, budget), applied by `privacy=dp_epsN`, overridable; and
`fedlora tune`, which writes them from real runs."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest
import torch
import yaml
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from fedlora.deploy.tune import (
    best_point,
    config_digest,
    grid,
    recipe_yaml,
    sample_points,
    trial_key,
)
from fedlora.server.loop import privacy_line
from fedlora.task.config import ConfigError, compose_job, validate

from .conftest import read_metrics, run_fedlora

METHODS = ("fedavg", "ffa", "flora", "fedsvd", "fedsb")
BUDGETS = ("dp_eps8", "dp_eps3", "dp_eps1")
RECIPES = Path(__file__).resolve().parents[1] / "conf" / "recipe"


def composed(*overrides: str) -> dict:
    with initialize_config_module(config_module="fedlora.conf", version_base=None):
        return OmegaConf.to_container(compose("config", overrides=list(overrides)), resolve=True)


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("method", METHODS)
def test_every_method_and_budget_resolves_to_its_recipe(method: str, budget: str) -> None:
    cfg = composed(f"strategy={method}", f"privacy={budget}")
    assert cfg["recipe_name"] == f"{method}_{budget}"
    assert cfg["privacy"]["enabled"] and cfg["privacy"]["epsilon"] == float(budget[6:])
    recipe = yaml.safe_load((RECIPES / f"{method}_{budget}.yaml").read_text())
    for section in ("strategy", "federation", "privacy", "model"):
        for key, value in (recipe.get(section) or {}).items():
            got = cfg[section][key]
            if isinstance(value, dict):
                assert {k: got[k] for k in value} == value
            else:
                assert got == value, (section, key)
    validate(cfg)
    # Every value stays overridable from the command line.
    override = composed(f"strategy={method}", f"privacy={budget}", "strategy.lr=0.0123",
                        "federation.rounds=3")
    assert override["strategy"]["lr"] == 0.0123 and override["federation"]["rounds"] == 3


def test_the_default_job_is_private_with_its_recipe_and_none_turns_it_off() -> None:
    default = composed()
    assert default["recipe_name"] == "ffa_dp_eps8" and default["privacy"]["enabled"]
    assert default["privacy"]["epsilon"] == 8.0 and default["privacy"]["delta"] == 1e-5
    assert default == composed("strategy=ffa", "privacy=dp_eps8")
    assert composed("strategy=fedsb")["recipe_name"] == "fedsb_dp_eps8"
    validate(default)
    plain = composed("privacy=none")
    assert plain["recipe_name"] is None and not plain["privacy"]["enabled"]
    assert plain["model"]["max_length"] == 64 and plain["strategy"]["sample_rate"] is None
    # What the run prints when it starts says which of the two it is, and which recipe.
    assert privacy_line(default) == ("sample-level DP-SGD on every client, epsilon 8, delta "
                                     "1e-05 (prv); recipe ffa_dp_eps8")
    assert privacy_line(composed("strategy=rolora")).endswith(
        "recipe none (the method's own training settings)")
    assert privacy_line(plain) == "none (no DP)"
    custom = composed("privacy=dp", "privacy.epsilon=5")
    assert custom["recipe_name"] is None and custom["privacy"]["epsilon"] == 5


def test_search_helpers() -> None:
    axes = ["strategy.lr=0.1,0.2", "federation.rounds=5,10,20"]
    assert len(grid(axes)) == 6
    a, b = sample_points(axes, 4, seed=3), sample_points(axes, 4, seed=3)
    assert a == b and len({trial_key(p) for p in a}) == 4  # same budget, distinct points
    with pytest.raises(ValueError, match="key=v1"):
        grid(["strategy.lr"])
    # Ranked on the validation split; the test split's accuracy never decides.
    rows = [{"key": trial_key(["x=1", "p=1", "federation.seed=0"]), "final_val_accuracy": 0.5,
             "final_accuracy": 0.99},
            {"key": trial_key(["x=1", "p=1", "federation.seed=1"]), "final_val_accuracy": 0.7,
             "final_accuracy": 0.99},
            {"key": trial_key(["x=1", "p=2", "federation.seed=0"]), "final_val_accuracy": 0.65,
             "final_accuracy": 0.1}]
    point, score, count = best_point(rows, [["p=1"], ["p=2"]], ["x=1"], [0, 1])
    assert point == ["p=2"] and score == 0.65 and count == 1
    text = recipe_yaml("ffa_dp_eps8", ["strategy.lr=0.05", "strategy.lr_schedule.kind=cosine",
                                       "federation.rounds=12"], ["why"])
    assert text.startswith("# @package _global_\n# why\n")
    assert yaml.safe_load(text) == {"recipe_name": "ffa_dp_eps8", "federation": {"rounds": 12},
                                    "strategy": {"lr": 0.05,
                                                 "lr_schedule": {"kind": "cosine"}}}


def test_tune_runs_real_trials_resumes_and_writes_a_recipe(tmp_path: Path) -> None:
    args = ["tune", "--strategy", "ffa", "--privacy", "dp_eps8", "--trials", "1",
            "--space", "strategy.lr=0.05", "--results", str(tmp_path / "results.jsonl"),
            "--runs-dir", str(tmp_path / "runs"), "--write-recipe", "--recipe-dir",
            str(tmp_path / "recipes"), "--", "model=tiny_bert", "data=synthetic",
            "federation.rounds=1", "federation.num_clients=3", "federation.clients_per_round=3"]
    first = run_fedlora(args)
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["epsilon_max"] <= 8.0
    assert "data.validation_fraction=0.1" in rows[0]["overrides"]
    assert 0 <= rows[0]["final_val_accuracy"] <= 1  # what the choice is made on
    assert rows[0]["config_digest"] == config_digest(rows[0]["overrides"])
    run_dir = Path(rows[0]["run_dir"])
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert cfg["recipe_name"] == "ffa_dp_eps8" and cfg["strategy"]["lr"] == 0.05
    assert read_metrics(run_dir)[-1]["lr"] == 0.05  # one round: cosine starts at lr
    recipe = yaml.safe_load((tmp_path / "recipes" / "ffa_dp_eps8.yaml").read_text())
    assert recipe["strategy"]["lr"] == 0.05 and "best" not in first.stdout.splitlines()[0]
    again = run_fedlora(args)  # resumable: the finished trial is not run again
    assert "1 trials, 1 already in" in again.stdout
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 1
    with pytest.raises(AssertionError, match="not a recipe knob"):
        run_fedlora(["tune", "--strategy", "ffa", "--privacy", "dp_eps8", "--space",
                     "federation.num_clients=20"])


def bench_module(name: str) -> ModuleType:
    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_tuning_rule_is_the_same_for_every_method() -> None:
    recipes = bench_module("recipes")
    grid = [(lr, {"final_accuracy": acc}) for lr, acc in zip(recipes.GRID, (0.5, 0.9, 0.8), strict=True)]
    assert recipes.refinement_lr(grid) == "0.17"  # sqrt(0.1 x 0.3): between best and next
    edge = [(lr, {"final_accuracy": acc}) for lr, acc in zip(recipes.GRID, (0.5, 0.7, 0.8), strict=True)]
    assert recipes.refinement_lr(edge) == "0.95"  # best at the edge: sqrt(10) further out
    assert recipes.refinement_lr(grid[:2]) is None
    rows = {recipes._key("ffa", "dp_eps3", lr): {"final_accuracy": acc}
            for lr, acc in (("0.1", 0.8), ("0.3", 0.85), ("0.03", 0.7), ("0.95", 0.9))}
    rows[recipes._key("ffa", "dp_eps8", "0.2")] = {"final_accuracy": 0.95}  # another budget
    rows[recipes._key("ffa", "dp_eps3", "0.2")] = {"final_accuracy": 0.99}  # off the rule
    found = recipes.trials(rows, "ffa", "dp_eps3")
    assert [lr for lr, _ in found] == ["0.03", "0.1", "0.3", "0.95"]
    assert recipes.best(found)[0] == "0.95"
    todo = {" ".join(t) for t in recipes.plan(rows)}
    assert len(todo) == 3 * 3 * 5 - 3  # every grid point but ffa's at epsilon 3 (done)
    del rows[recipes._key("ffa", "dp_eps3", "0.95")]
    lrs = [t[-1] for t in recipes.plan(rows) if "strategy=ffa" in t and "privacy=dp_eps3" in t]
    assert lrs == ["strategy.lr=0.95"]  # the grid done: its refinement is what is left
    # Every recipe carries the protocol, and it reaches the job.
    for budget in BUDGETS:
        cfg = composed("strategy=fedsb", f"privacy={budget}")
        assert cfg["strategy"]["sample_rate"] == 0.36 and cfg["strategy"]["local_steps"] == 5
    assert composed("privacy=dp")["strategy"]["sample_rate"] is None


def test_table_sets_aside_cells_from_an_older_recipe_and_reuses_only_same_jobs(
        tmp_path: Path) -> None:
    quality = bench_module("quality")
    fixed = ["model.max_length=32"]
    cells = [["strategy=ffa", "privacy=dp_eps3", f"federation.seed={s}"] for s in (0, 1, 2)]
    key = [trial_key([*fixed, *c]) for c in cells]
    results = tmp_path / "quality.jsonl"
    rows = [{"key": key[0], "overrides": [*fixed, *cells[0]], "final_accuracy": 0.8,
             "config_digest": config_digest([*fixed, *cells[0]])},
            {"key": key[1], "overrides": [*fixed, *cells[1]], "final_accuracy": 0.7,
             "config_digest": "an older recipe"},
            {"key": "not a cell", "overrides": [], "final_accuracy": 0.1}]
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert quality.set_aside_stale(cells, fixed, results) == 1
    kept = [json.loads(line) for line in results.read_text().splitlines()]
    assert [r["key"] for r in kept] == [key[0], "not a cell"]
    aside = [json.loads(line) for line in (tmp_path / "quality-stale.jsonl").read_text()
             .splitlines()]
    assert aside == [rows[1]]  # kept, not lost
    assert quality.set_aside_stale(cells, fixed, results) == 0
    # Reuse: a tuning trial with the cell's digest fills it; one without a digest (what it
    # ran is unknown) never does, even when its overrides compose to the cell's job today.
    lr = composed("strategy=ffa", "privacy=dp_eps3")["strategy"]["lr"]  # the recipe's
    trial = [*fixed, *cells[1], f"strategy.lr={lr}"]  # so this trial ran cell 1's job
    tuning = tmp_path / "tuning.jsonl"
    tuning.write_text(json.dumps({"key": "old", "overrides": [*fixed, *cells[2]],
                                  "final_accuracy": 0.2}) + "\n" +
                      json.dumps({"key": "t", "overrides": trial, "final_accuracy": 0.75,
                                  "config_digest": config_digest(trial)}) + "\n")
    # The plan (--plan) is what a sweep would run: cell 0 finished, cell 1 comes from the
    # trial, cell 2 must run; it writes nothing.
    before = results.read_text()
    assert quality.missing(cells, fixed, results, [tuning]) == [cells[2]]
    assert results.read_text() == before
    assert quality.reuse_equivalent(cells, fixed, results, [tuning]) == 1
    filled = [json.loads(line) for line in results.read_text().splitlines()][-1]
    assert filled["key"] == key[1] and filled["reused_from"] == "t"
    assert key[2] not in {json.loads(line)["key"] for line in results.read_text().splitlines()}


def test_a_batch_size_the_recipes_rate_would_ignore_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="strategy.sample_rate=null"):
        compose_job(["privacy=dp_eps3", "strategy.batch_size=32"])
    fixed = compose_job(["privacy=dp_eps3", "strategy.batch_size=32", "strategy.sample_rate=null"])
    assert fixed["strategy"]["batch_size"] == 32 and fixed["strategy"]["sample_rate"] is None
    assert compose_job(["privacy=dp", "strategy.batch_size=32"])["strategy"]["batch_size"] == 32
    run = tmp_path / "refused"
    proc = run_fedlora(["simulate", "model=tiny_bert", "data=synthetic", "privacy=dp_eps1",
                        "strategy.batch_size=8", f"hydra.run.dir={run}"], check=False)
    assert proc.returncode == 2 and "has no effect while strategy.sample_rate=0.36" in proc.stderr
    assert not (run / "metrics.jsonl").exists()


def test_an_invalid_trial_fails_alone_before_running(tmp_path: Path, capsys) -> None:
    from fedlora.deploy.tune import run_trials

    results = tmp_path / "results.jsonl"
    run_trials([["privacy=dp_eps3", "strategy.batch_size=8"], ["strategy.no_such_knob=1"]],
               results, tmp_path / "runs")
    out = capsys.readouterr().out
    assert out.count("FAILED before running: invalid config") == 2
    assert not results.exists() and not (tmp_path / "runs").exists()


def test_validation_split_is_carved_from_training_data_only() -> None:
    from fedlora.task.data import load_data

    base = compose_job(["model=tiny_bert", "data=synthetic"])
    tuned = compose_job(["model=tiny_bert", "data=synthetic", "data.validation_fraction=0.1"])
    plain = load_data(base["data"], base["model"], vocab_size=512)
    carved = load_data(tuned["data"], tuned["model"], vocab_size=512)
    assert plain.validation is None
    assert len(carved.validation) == 120 and len(carved.train) == 1080
    # The test split is untouched; validation examples are training examples clients lose.
    assert torch.equal(carved.test.tensors[0], plain.test.tensors[0])
    assert torch.equal(carved.validation.tensors[0], plain.train.tensors[0][1080:])
    assert len(carved.train_labels) == 1080
