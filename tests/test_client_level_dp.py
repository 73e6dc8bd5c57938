"""Client-level DP (DP-FedAvg): calibration, clipping, the noise actually added, the
server ledger and its budget, config errors, and one real federation."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from fedlora.privacy import BudgetExhausted, epsilon_for_history
from fedlora.privacy.client_level import ClientLevelConfig, clip_to_norm, next_clip, plan
from fedlora.server.client_dp import ClientLevelDP
from fedlora.task.config import ConfigError, compose_job, validate

from .conftest import read_metrics, run_fedlora


def _config(**change) -> ClientLevelConfig:
    values = dict(epsilon=4.0, delta=1e-5, clip=0.5, rounds=20, num_clients=100, cohort=10)
    values.update(change)
    return ClientLevelConfig(**values)


def test_noise_is_calibrated_once_for_the_planned_rounds() -> None:
    cfg = _config()
    p = plan(cfg)
    assert p.sample_rate == pytest.approx(0.1)
    spent = epsilon_for_history([(p.noise_multiplier, 0.1, cfg.rounds)], cfg.delta, "rdp")
    assert spent <= cfg.epsilon and spent == pytest.approx(cfg.epsilon, rel=0.02)
    # Without Poisson sampling there is no amplification: much more noise for the same budget.
    assert plan(_config(poisson=False)).noise_multiplier > 2 * p.noise_multiplier


def test_adaptive_clipping_pays_for_its_count_with_more_update_noise() -> None:
    fixed, adaptive = plan(_config()), plan(_config(adaptive=True, cohort=50))
    z, z_u, sigma_b = adaptive.noise_multiplier, adaptive.update_noise_multiplier, adaptive.count_noise
    assert sigma_b == pytest.approx(50 / 20)
    # Andrew et al., Thm 1: the two releases compose into one Gaussian of multiplier z.
    assert (z_u ** -2 + (2 * sigma_b) ** -2) ** -0.5 == pytest.approx(z)
    assert z_u > z and fixed.update_noise_multiplier == fixed.noise_multiplier
    with pytest.raises(ValueError, match="count noise"):
        plan(_config(adaptive=True, count_noise=0.01))
    # The clip moves toward the target quantile of the norms; the count is centred: with
    # m = 10, sum (b - 1/2) = 4 means 9 of 10 unclipped, -4 means 1 of 10.
    cfg = _config(adaptive=True, target_quantile=0.5, clip_lr=0.2)
    assert next_clip(1.0, 4.0, cfg) < 1.0 < next_clip(1.0, -4.0, cfg)
    assert next_clip(1.0, 0.0, cfg) == pytest.approx(1.0)


def test_clip_bounds_the_whole_update_norm() -> None:
    delta = {"a": torch.full((3,), 3.0, dtype=torch.float64), "b": torch.full((4,), 4.0, dtype=torch.float64)}
    clipped, norm = clip_to_norm(delta, 1.0)
    assert norm == pytest.approx(math.sqrt(27 + 64))
    total = math.sqrt(sum(float(v.pow(2).sum()) for v in clipped.values()))
    assert total == pytest.approx(1.0)
    same, _ = clip_to_norm(delta, 100.0)
    assert torch.equal(same["a"], delta["a"])


def test_release_adds_the_calibrated_noise_and_charges_the_ledger(tmp_path) -> None:
    cfg = _config(rounds=3)
    dp = ClientLevelDP(cfg, tmp_path, "fed")
    zeros = {"x": torch.zeros(20000, dtype=torch.float64)}
    mean, report = dp.release(zeros, None, 1)
    expected = dp.plan.noise_multiplier * cfg.clip / cfg.cohort
    assert float(mean["x"].std()) == pytest.approx(expected, rel=0.03)
    assert report["client_level_epsilon"] == pytest.approx(dp.ledger.epsilon_spent)
    for r in (2, 3):
        dp.release(zeros, None, r)
    # The planned rounds spend the budget; the next round is refused before any work.
    assert dp.ledger.epsilon_spent <= cfg.epsilon
    with pytest.raises(BudgetExhausted):
        dp.check_budget()
    # A restarted server reads the same ledger and refuses too.
    with pytest.raises(BudgetExhausted):
        ClientLevelDP(cfg, tmp_path, "fed").check_budget()


def test_init_release_is_one_more_step_of_the_same_mechanism(tmp_path) -> None:
    """A hostile client cannot move the released init by more than 1/m, whatever it sends;
    the noise is z/m per coordinate; the init is charged as round 0 and the plan leaves
    exactly the planned rounds after it."""
    cfg = _config(rounds=3, extra_releases=1)
    assert plan(cfg).noise_multiplier > plan(_config(rounds=3)).noise_multiplier
    spent = epsilon_for_history([(plan(cfg).noise_multiplier, 0.1, 4)], cfg.delta, "rdp")
    assert spent <= cfg.epsilon and spent == pytest.approx(cfg.epsilon, rel=0.02)
    dp = ClientLevelDP(cfg, tmp_path, "fed")
    shapes = {"m::Y": torch.Size([100, 100]), "m::W": torch.Size([50, 100])}
    honest = {"m::Y": torch.full((100, 100), 0.01), "m::W": torch.zeros(50, 100)}
    huge = {"m::Y": torch.full((100, 100), 1e9), "m::W": torch.full((50, 100), -1e9)}
    mean, report = dp.release_init([honest, huge], shapes)
    m, z = cfg.cohort, dp.plan.noise_multiplier
    unit_y = 1.0 / 100  # the honest vector at unit norm: 1e4 equal coordinates
    unit_huge = (1.0 / math.sqrt(15000), -1.0 / math.sqrt(15000))
    residual_y = mean["m::Y"] - (unit_y + unit_huge[0]) / m
    residual_w = mean["m::W"] - unit_huge[1] / m
    noise = torch.cat([residual_y.flatten(), residual_w.flatten()])
    assert abs(float(noise.mean())) < 5 * z / m / math.sqrt(noise.numel())
    assert float(noise.std()) == pytest.approx(z / m, rel=0.03)
    assert dp.ledger.rounds[0]["round"] == 0 and dp.ledger.rounds[0]["steps"] == 1
    assert report["client_level_epsilon"] == pytest.approx(dp.ledger.epsilon_spent)
    # An empty cohort is released all the same (noise only), and charged.
    dp2 = ClientLevelDP(cfg, tmp_path / "2", "fed")
    empty, _ = dp2.release_init([], shapes)
    assert float(empty["m::W"].std()) == pytest.approx(z / m, rel=0.05)
    zeros = {"x": torch.zeros(10, dtype=torch.float64)}
    for r in (1, 2, 3):
        dp.release(zeros, None, r)
    assert dp.ledger.epsilon_spent <= cfg.epsilon
    with pytest.raises(BudgetExhausted):
        dp.check_budget()
    # A plan without the init release refuses to make one.
    with pytest.raises(RuntimeError, match="extra_releases"):
        ClientLevelDP(_config(), tmp_path / "3", "fed").release_init([honest], shapes)


def test_clipped_sum_uses_the_difference_from_the_reference(tmp_path) -> None:
    dp = ClientLevelDP(_config(clip=1.0), tmp_path, "fed")
    ref = {"w": torch.ones(4, dtype=torch.float64)}
    updates = [{"w": torch.ones(4) + 10.0}, {"w": torch.ones(4) + 0.1}]
    total, centred, norms = dp.clipped_sum(updates, ref)
    # One clipped, one not: the centred count is (-1/2) + (+1/2).
    assert norms == pytest.approx([20.0, 0.2]) and centred == 0.0
    assert float(total["w"].norm()) == pytest.approx(1.0 + 0.2)


@pytest.mark.parametrize("overrides, message", [
    (["strategy=flora", "privacy=client_dp"], "needs each client's update"),
    (["strategy=fedex", "secure_aggregation=true"], "needs each client's update"),
    (["strategy=flora", "secure_aggregation=true"], "needs each client's update"),
    (["strategy=ffa", "secure_aggregation=true", "secagg.threshold=11"],
     "above the cohort size"),
    (["strategy=ffa", "secure_aggregation=true", "secagg.threshold=1"], "must be >= 2"),
    (["strategy=fedsb", "secure_aggregation=true", "secagg.init_bits=45"],
     r"init_bits must be an integer in \[8, 44\]"),
    (["strategy=ffa", "secure_aggregation=true", "secagg.bits=44", "federation.num_clients=1000",
      "federation.clients_per_round=1000"], "over float64's 53"),
    (["privacy=client_dp", "privacy.client_level.fixed_denominator=false"],
     "fixed_denominator must be true"),
    (["privacy=client_dp", "federation.num_clients=10", "privacy.client_level.delta=0.2"],
     "1/num_clients"),
    (["strategy=fedsb", "privacy=client_dp", "secure_aggregation=true"],
     "does not yet cover 'fedsb'"),
])
def test_config_errors_before_any_work(overrides, message) -> None:
    with pytest.raises(ConfigError, match=message):
        validate(compose_job(overrides))


@pytest.mark.integration
def test_client_dp_federation_reports_an_epsilon_the_ledger_replays(tmp_path) -> None:
    """Client-level DP beside sample-level DP-SGD: both epsilons reported, each replayable."""
    run_dir = tmp_path / "run"
    run_fedlora(["simulate", "model=tiny_bert", "data=synthetic", "strategy=ffa",
                 "privacy=dp", "privacy.client_level.enabled=true", "federation.num_clients=8",
                 "federation.clients_per_round=4", "federation.rounds=2",
                 f"hydra.run.dir={run_dir}"])
    summary = json.loads((run_dir / "summary.json").read_text())
    eps = summary["client_level_epsilon"]
    assert 0 < eps <= 8.0
    ledger = json.loads(open(summary["client_level_ledger"]).read())
    replay = epsilon_for_history([tuple(h) for h in ledger["history"]], ledger["delta"],
                                 ledger["mechanism"])
    assert replay == pytest.approx(eps, rel=0.01)
    rows = read_metrics(run_dir)
    assert [r["round"] for r in rows] == [1, 2]
    assert rows[0]["client_level_epsilon"] < rows[1]["client_level_epsilon"] == pytest.approx(eps)
    assert "trusted server" in summary["client_level_statement"]["protects"]
    # The sample-level guarantee is reported beside it, from the nodes' own ledgers.
    assert 0 < summary["epsilon_max"] <= 8.0
    assert summary["epsilon_replay_max"] <= summary["epsilon_max"]
    # ... the nodes' ledgers only: the server's client-level ledger in the same directory
    # is the other guarantee and never mixed in.
    nodes = [json.loads(p.read_text()) for p in (run_dir / "privacy").glob("*.privacy.json")]
    sample_level = [n["epsilon_spent"] for n in nodes if n["node"].startswith("partition-")]
    assert len(sample_level) + 1 == len(nodes)
    assert summary["epsilon_replay_max"] == pytest.approx(max(sample_level), rel=1e-12)
    # (Poisson sampling can draw nobody, 0.5^8 per round: that round is still released
    # and charged above, and has no client to report a sample-level epsilon.)
    assert all(r["epsilon_max"] is not None for r in rows if r["clients"])


@pytest.mark.integration
def test_fedsb_init_round_is_released_under_client_level_dp(tmp_path) -> None:
    """Fed-SB's init round runs as one more release: charged as round 0 in the server's
    ledger, the rounds after it stay within the budget, and the run trains."""
    run_dir = tmp_path / "run"
    proc = run_fedlora(["simulate", "model=tiny_bert", "data=synthetic", "strategy=fedsb",
                 "privacy=client_dp", "federation.num_clients=8",
                 "federation.clients_per_round=4", "federation.rounds=2",
                 # Clients smaller than a batch (1,000 clients of BBC): the whole data.
                 "strategy.batch_size=512", f"hydra.run.dir={run_dir}"])
    summary = json.loads((run_dir / "summary.json").read_text())
    ledger = json.loads(open(summary["client_level_ledger"]).read())
    assert [r["round"] for r in ledger["rounds"]] == [0, 1, 2]
    init = re.search(r"init round \(client-level DP\): (\d+) sampled, (\d+) updates,",
                     proc.stdout + proc.stderr)
    assert init and int(init[1]) == int(init[2]), (proc.stdout + proc.stderr)[-3000:]
    replay = epsilon_for_history([tuple(h) for h in ledger["history"]], ledger["delta"],
                                 ledger["mechanism"])
    assert summary["client_level_epsilon"] == pytest.approx(replay, rel=0.01)
    assert 0 < replay <= 8.0
    rows = read_metrics(run_dir)
    assert [r["round"] for r in rows] == [1, 2] and rows[-1]["accuracy"] is not None
    assert "init round (client-level DP)" in proc.stdout + proc.stderr
