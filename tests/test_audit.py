"""The one-run privacy audit: the bound's math, the canary release, and `fedlora audit`."""

from __future__ import annotations

import json
import math
import subprocess

import numpy as np
import pytest
from scipy import stats

from fedlora.privacy.audit_bound import (
    count_correct,
    epsilon_ceiling,
    epsilon_from_counts,
    epsilon_lower_bound,
    guess_counts,
    one_run_p_value,
)

from .conftest import ROOT, fedlora_cmd

# -- the bound ---------------------------------------------------------------------------


@pytest.mark.parametrize("guesses", [10, 100, 1000])
@pytest.mark.parametrize("beta", [0.05, 0.01])
def test_all_correct_without_delta_is_the_closed_form(guesses: int, beta: float) -> None:
    # P[Binomial(r, p) >= r] = p^r <= beta  <=>  p >= beta^(1/r); epsilon = logit(p).
    p = beta ** (1.0 / guesses)
    expected = math.log(p / (1.0 - p))
    got = epsilon_from_counts(guesses, guesses, guesses, delta=0.0, significance=beta)
    assert got == pytest.approx(expected, abs=1e-6)


def test_half_correct_gives_no_bound() -> None:
    assert epsilon_from_counts(1000, 1000, 500, delta=1e-5, significance=0.05) == 0.0
    assert epsilon_from_counts(1000, 200, 100, delta=0.0, significance=0.05) == 0.0


def test_p_value_by_hand_with_delta() -> None:
    # r = 2 guesses, v = 2 right, m = 10 canaries: f(2) = p^2, and
    # alpha = max(P[X = 1] / 1, (P[X = 1] + P[X = 0]) / 2).
    eps, delta, m = 1.0, 1e-3, 10
    p = math.exp(eps) / (1 + math.exp(eps))
    pmf1, pmf0 = 2 * p * (1 - p), (1 - p) ** 2
    alpha = max(pmf1, (pmf1 + pmf0) / 2)
    expected = p**2 + 2 * m * delta * alpha
    assert one_run_p_value(eps, delta, m, 2, 2) == pytest.approx(expected, rel=1e-12)
    assert one_run_p_value(eps, 0.0, m, 2, 2) == pytest.approx(p**2, rel=1e-12)
    assert one_run_p_value(eps, delta, m, 2, 0) == 1.0


def test_p_value_matches_a_direct_sum() -> None:
    eps, delta, m, r, v = 2.0, 1e-5, 1000, 300, 260
    p = 1 / (1 + math.exp(-eps))
    f = lambda x: stats.binom.sf(x - 1, r, p)  # noqa: E731 - P[X >= x]
    alpha = max((f(v - i) - f(v)) / i for i in range(1, v + 1))
    assert one_run_p_value(eps, delta, m, r, v) == pytest.approx(f(v) + 2 * m * delta * alpha,
                                                                 rel=1e-9)


def test_bound_is_the_edge_of_rejection_and_delta_only_lowers_it() -> None:
    m, r, v, beta = 1000, 400, 340, 0.05
    eps0 = epsilon_from_counts(m, r, v, delta=0.0, significance=beta)
    eps = epsilon_from_counts(m, r, v, delta=1e-5, significance=beta)
    assert 0 < eps <= eps0
    assert one_run_p_value(eps - 1e-3, 1e-5, m, r, v) <= beta
    assert one_run_p_value(eps + 1e-3, 1e-5, m, r, v) > beta
    # Stronger confidence, weaker bound.
    assert epsilon_from_counts(m, r, v, delta=1e-5, significance=0.001) < eps


def test_guesses_from_scores_and_the_bonferroni_split() -> None:
    rng = np.random.default_rng(0)
    included = rng.random(1000) < 0.5
    # Perfect separation: every guess right at every k.
    scores = included.astype(float) + 0.01 * rng.random(1000)
    best = epsilon_lower_bound(scores, included, delta=1e-5)
    ks = guess_counts(1000)
    assert best.correct == best.guesses and best.ks_tried == len(ks)
    # The split makes it no larger than the single best k at the full significance ...
    single = max(epsilon_from_counts(1000, 2 * k, count_correct(scores, included, k),
                                     delta=1e-5, significance=0.05) for k in ks)
    assert best.epsilon <= single
    # ... and equal to the best k at the split significance.
    assert best.epsilon == pytest.approx(max(
        epsilon_from_counts(1000, 2 * k, count_correct(scores, included, k), delta=1e-5,
                            significance=0.05 / len(ks)) for k in ks))
    assert best.epsilon <= epsilon_ceiling(1000, delta=1e-5)
    # Scores independent of membership: no bound (at 95%, almost surely).
    assert epsilon_lower_bound(rng.random(1000), included, delta=1e-5).epsilon < 0.5


def test_ties_are_broken_by_index_not_membership() -> None:
    included = np.array([True, False, True, False])
    scores = np.zeros(4)
    # Stable order 0, 1, 2, 3: bottom {0} guessed out (wrong), top {3} guessed in (wrong).
    assert count_correct(scores, included, 1) == 0
    assert count_correct(np.array([3.0, 0.0, 2.0, 1.0]), included, 2) == 4


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="confidence"):
        epsilon_lower_bound([1.0, 2.0], [True, False], delta=1e-5, confidence=1.0)
    with pytest.raises(ValueError, match="one length"):
        epsilon_lower_bound([1.0, 2.0], [True], delta=1e-5)
    with pytest.raises(ValueError, match="k must be"):
        epsilon_lower_bound([1.0, 2.0, 3.0, 4.0], [True] * 4, delta=1e-5, ks=[3])
    with pytest.raises(ValueError, match="correct <= guesses"):
        one_run_p_value(1.0, 0.0, 10, 5, 6)


# -- the canary release ----------------------------------------------------------------


def test_canary_layout_keeps_the_sample_rate_exact() -> None:
    from fedlora.privacy.audit import canary_layout

    slots, batch = canary_layout(16 / 76, 1000)
    assert slots >= 1000 and slots % 19 == 0 and batch / slots == 16 / 76  # 16/76 = 4/19
    assert canary_layout(0.25, 10) == (12, 3)


@pytest.mark.integration
def test_self_test_catches_every_broken_mechanism() -> None:
    """The correct release stays below its claim at epsilon 2; each broken one is caught."""
    from fedlora.privacy import DPSettings, calibrate_noise_multiplier
    from fedlora.privacy.audit import MECHANISMS, run_audit

    q, steps, rounds, delta = 0.2, 10, 2, 1e-5
    sigma = calibrate_noise_multiplier(2.0, delta, q, steps * rounds, "rdp")
    settings = DPSettings(noise_multiplier=sigma, max_grad_norm=0.5, sample_rate=q,
                          steps=steps, accountant="rdp")
    results = {m: run_audit(settings, rounds=rounds, delta=delta, budget=2.0,
                            canaries=1000, mechanism=m, seed=7) for m in MECHANISMS}
    correct = results["correct"]
    assert correct.claimed_epsilon <= 2.0
    assert correct.epsilon_lower_bound <= correct.claimed_epsilon, correct
    assert not correct.caught
    for name in MECHANISMS[1:]:
        r = results[name]
        assert r.caught and r.epsilon_lower_bound > r.claimed_epsilon, r
    # Reusing the noise is charged as two releases, and still caught.
    assert results["reused_noise"].steps == 2 * steps * rounds
    assert results["reused_noise"].claimed_epsilon > correct.claimed_epsilon
    assert correct.canaries_in == results["no_noise"].canaries_in  # same seed, same canaries


# -- the command -------------------------------------------------------------------------

JOB = ["model=tiny_bert", "data=synthetic", "privacy=dp"]


@pytest.mark.integration
def test_cli_json_holds_the_keys_and_the_bound_stays_below_the_claim() -> None:
    done = subprocess.run([*fedlora_cmd(), "audit", *JOB, "privacy.epsilon=2", "--json"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    for key in ("claimed_epsilon", "epsilon_lower_bound", "delta", "canaries", "confidence",
                "noise_multiplier", "sample_rate", "steps", "max_grad_norm"):
        assert key in out, key
    assert out["canaries"] == 1000 and out["confidence"] == 0.95 and out["delta"] == 1e-5
    assert 0 < out["claimed_epsilon"] <= 2.0
    assert out["epsilon_lower_bound"] <= out["claimed_epsilon"]
    assert out["steps"] == out["steps_per_round"] * out["rounds"]
    assert "round" in done.stderr  # progress goes to stderr, JSON alone to stdout


@pytest.mark.parametrize(("args", "knob"), [
    ([*JOB, "no.such.knob=1"], "no.such.knob"),
    ([*JOB, "privacy.epsilon=0"], "privacy.epsilon"),
    ([*JOB, "privacy.epsilon=-1"], "privacy.epsilon"),
    (["model=tiny_bert", "data=synthetic", "privacy=none"], "privacy.enabled"),
    ([*JOB, "--canaries", "1"], "--canaries"),
    ([*JOB, "--confidence", "1.5"], "--confidence"),
])
def test_bad_input_names_the_knob_and_exits_2(args: list[str], knob: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    from fedlora.deploy.audit import main

    assert main(args) == 2
    err = capsys.readouterr().err
    assert knob in err


def test_self_test_overrides_replace_its_defaults() -> None:
    from fedlora.deploy.audit import SELF_TEST_DEFAULTS, merge_overrides

    merged = merge_overrides(SELF_TEST_DEFAULTS, ["privacy.epsilon=3", "+x.y=1"])
    assert "privacy.epsilon=2" not in merged and merged[-2:] == ["privacy.epsilon=3", "+x.y=1"]
    assert "model=tiny_bert" in merged
