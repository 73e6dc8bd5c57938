"""The learning-rate schedule across rounds and the server optimizers (FedAvgM, FedAdam)."""

from __future__ import annotations

import math

import pytest
import torch

from fedlora.aggregation import AdapterSpec, ClientUpdate, get_method
from fedlora.server.checkpoint import latest_checkpoint, load_optimizer_state, save_checkpoint
from fedlora.server.optimizer import ServerOptimizer
from fedlora.task.training import LRSchedule, ServerOptimizerConfig, round_lr

SPEC = AdapterSpec(shapes={"q": (6, 5), "v": (4, 5)}, rank=2, alpha=4.0, seed=3)


def test_schedule_values_per_round() -> None:
    rounds = 5
    cosine = LRSchedule(kind="cosine", min_factor=0.1)
    assert [round(cosine.factor(t, rounds), 6) for t in range(1, 6)] == [
        1.0, round(0.1 + 0.9 * (1 + math.cos(math.pi / 4)) / 2, 6), 0.55,
        round(0.1 + 0.9 * (1 + math.cos(3 * math.pi / 4)) / 2, 6), 0.1]
    linear = LRSchedule(kind="linear", min_factor=0.2)
    assert [linear.factor(t, 5) for t in range(1, 6)] == pytest.approx([1, 0.8, 0.6, 0.4, 0.2])
    step = LRSchedule(kind="step", gamma=0.5, step_rounds=2)
    assert [step.factor(t, 6) for t in range(1, 7)] == [1, 1, 0.5, 0.5, 0.25, 0.25]
    warm = LRSchedule(kind="cosine", min_factor=0.0, warmup_rounds=2)
    assert [warm.factor(t, 5) for t in range(1, 6)] == pytest.approx([1 / 3, 2 / 3, 1, 0.5, 0])
    assert LRSchedule().factor(4, 5) == 1.0
    assert cosine.factor(9, 5) == pytest.approx(0.1)  # past the plan: stays at the end
    cfg = {"strategy": {"lr": 0.2, "lr_schedule": {"kind": "step", "gamma": 0.1,
                                                   "step_rounds": 1}},
           "federation": {"rounds": 3}}
    assert [round_lr(cfg, t) for t in (1, 2, 3)] == pytest.approx([0.2, 0.02, 0.002])


def test_schedule_and_optimizer_config_errors() -> None:
    with pytest.raises(ValueError, match="kind must be one of"):
        LRSchedule.from_config({"kind": "cosinus"})
    with pytest.raises(ValueError, match="unknown key"):
        LRSchedule.from_config({"kind": "cosine", "min_lr": 0.1})
    with pytest.raises(ValueError, match="momentum must be in"):
        ServerOptimizerConfig.from_config({"name": "momentum", "momentum": 1.0})
    with pytest.raises(ValueError, match="needs a method"):
        ServerOptimizer(ServerOptimizerConfig(name="adam"), get_method("flora").server_step_roles)


def _round(method_name: str, seed: int):
    method = get_method(method_name)
    state = method.init_state(SPEC, {"w": torch.zeros(3)})
    gen = torch.Generator().manual_seed(seed)
    updates = []
    for k, n in enumerate((10, 30)):
        factors: dict = {m: {} for m in SPEC.shapes}
        for m, (d_out, d_in) in SPEC.shapes.items():
            shapes = {"A": (2, d_in), "B": (d_out, 2), "R": (2, 2)}
            for role in method.uplink_roles:
                factors[m][role] = torch.randn(*shapes[role], generator=gen)
        updates.append(ClientUpdate(factors=factors, num_examples=n, scaling=SPEC.scaling,
                                    head={"w": torch.randn(3, generator=gen)}, node=f"n{k}"))
    return method, state, updates


@pytest.mark.parametrize("method_name", ["ffa", "fedavg", "fedsb"])
def test_server_momentum_and_adam_equal_the_hand_computed_update(method_name: str) -> None:
    method, state, updates = _round(method_name, 0)
    roles = method.server_step_roles
    momentum = ServerOptimizer(ServerOptimizerConfig(name="momentum", lr=0.7, momentum=0.5), roles)
    adam = ServerOptimizer(ServerOptimizerConfig(name="adam", lr=0.01, beta1=0.9, beta2=0.99,
                                                 tau=1e-3), roles)
    x0 = state
    v = {}
    m_adam, v_adam = {}, {}
    x_m, x_a = x0, x0
    for t in range(3):
        _, _, updates = _round(method_name, t + 1)
        avg_m = method.aggregate(x_m, updates)
        avg_a = method.aggregate(x_a, updates)
        new_m = momentum.step(x_m, avg_m)
        new_a = adam.step(x_a, avg_a)
        p = [0.25, 0.75]  # n = 10, 30
        for module in SPEC.shapes:
            for role in roles:
                # The method's aggregate is the exact weighted average (before the step).
                want_avg = (p[0] * updates[0].factors[module][role]
                            + p[1] * updates[1].factors[module][role])
                torch.testing.assert_close(avg_m.factors[module][role], want_avg)
                key = (module, role)
                d = want_avg - x_m.factors[module][role]
                v[key] = 0.5 * v.get(key, 0) + d
                torch.testing.assert_close(new_m.factors[module][role],
                                           x_m.factors[module][role] + 0.7 * v[key])
                d = want_avg - x_a.factors[module][role]
                m_adam[key] = 0.9 * m_adam.get(key, 0) + 0.1 * d
                v_adam[key] = 0.99 * v_adam.get(key, 0) + 0.01 * d * d
                torch.testing.assert_close(
                    new_a.factors[module][role],
                    x_a.factors[module][role] + 0.01 * m_adam[key] / (v_adam[key].sqrt() + 1e-3))
            for role in set(new_m.factors[module]) - set(roles):  # fixed roles untouched
                assert torch.equal(new_m.factors[module][role], avg_m.factors[module][role])
        head_avg = 0.25 * updates[0].head["w"] + 0.75 * updates[1].head["w"]
        v["head"] = 0.5 * v.get("head", 0) + head_avg - x_m.head["w"]
        torch.testing.assert_close(new_m.head["w"], x_m.head["w"] + 0.7 * v["head"])
        x_m, x_a = new_m, new_a


def test_no_server_optimizer_is_plain_averaging(tmp_path) -> None:
    method, state, updates = _round("ffa", 0)
    plain = ServerOptimizer(ServerOptimizerConfig(), method.server_step_roles)
    averaged = method.aggregate(state, updates)
    assert plain.step(state, averaged) is averaged
    # Moments survive a checkpoint round trip (resume continues the same trajectory).
    momentum = ServerOptimizer(ServerOptimizerConfig(name="momentum"), method.server_step_roles)
    stepped = momentum.step(state, averaged)
    save_checkpoint(tmp_path, stepped, {}, optimizer_state=momentum.state_tensors())
    restored = ServerOptimizer(ServerOptimizerConfig(name="momentum"), method.server_step_roles)
    restored.load_state_tensors(load_optimizer_state(latest_checkpoint(tmp_path)))
    assert restored.moments.keys() == momentum.moments.keys()
    assert all(torch.equal(restored.moments[k], momentum.moments[k]) for k in momentum.moments)


def test_client_optimizer_is_adamw_or_sgd_and_the_new_knob_keeps_stored_results() -> None:
    from fedlora.client.train import make_optimizer
    from fedlora.deploy.tune import config_digest
    from fedlora.task.config import ConfigError, compose_job, validate

    weight = torch.nn.Parameter(torch.ones(3))
    adam = make_optimizer([weight], {"lr": 0.1})
    assert isinstance(adam, torch.optim.AdamW) and adam.defaults["lr"] == 0.1
    sgd = make_optimizer([weight], {"lr": 0.5, "optimizer": "sgd", "momentum": 0.9})
    assert isinstance(sgd, torch.optim.SGD)
    assert (sgd.defaults["lr"], sgd.defaults["momentum"]) == (0.5, 0.9)
    weight.grad = torch.tensor([1.0, -2.0, 0.5])
    sgd.step()  # plain SGD step (first momentum step: the buffer is the gradient)
    assert weight.detach().tolist() == pytest.approx([0.5, 2.0, 0.75])
    with pytest.raises(ConfigError, match="strategy.optimizer must be one of"):
        validate(compose_job(["strategy.optimizer=lion"]))
    with pytest.raises(ConfigError, match=r"strategy.momentum must be in \[0, 1\)"):
        validate(compose_job(["strategy.optimizer=sgd", "strategy.momentum=1"]))
    # Results stored before the knob existed ran AdamW: at adamw the digest is unchanged
    # (they stay current); sgd is another job.
    base = ["privacy=dp_eps8"]
    assert config_digest([*base, "strategy.optimizer=adamw"]) == config_digest(base)
    assert config_digest([*base, "strategy.optimizer=sgd"]) != config_digest(base)


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_server_lr_schedule_decays_the_step_to_min_factor_over_the_planned_rounds(
        schedule: str) -> None:
    method, state, _ = _round("ffa", 0)
    config = ServerOptimizerConfig(name="momentum", lr=0.8, momentum=0.5, schedule=schedule,
                                   min_factor=0.25)
    rates = [config.lr_at(t, 3) for t in (1, 2, 3)]
    assert rates[0] == pytest.approx(0.8) and rates[2] == pytest.approx(0.2)
    assert rates[1] == pytest.approx(0.5)  # half way, for both decays
    optimizer = ServerOptimizer(config, method.server_step_roles, rounds=3)
    x, v = state, {}
    for t in range(3):
        _, _, updates = _round("ffa", t + 1)
        averaged = method.aggregate(x, updates)
        stepped = optimizer.step(x, averaged)
        for module in SPEC.shapes:
            d = averaged.factors[module]["B"] - x.factors[module]["B"]
            v[module] = 0.5 * v.get(module, 0) + d
            torch.testing.assert_close(stepped.factors[module]["B"],
                                       x.factors[module]["B"] + rates[t] * v[module])
        x = stepped
    with pytest.raises(ValueError, match="schedule"):
        ServerOptimizerConfig.from_config({"name": "momentum", "schedule": "exponential"})
