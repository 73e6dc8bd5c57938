"""Distributed DP under collusion: with at least t survivors of which at most c collude
with the server, the honest clients' noise shares alone must carry the accounted noise.
The server here knows the colluders' contributions (noise included) and subtracts them
from the real secure sum."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord

from fedlora.client.contribution import contribution
from fedlora.privacy.client_level import ClientLevelConfig, plan
from fedlora.task.config import ConfigError, compose_job, validate
from fedlora.task.secagg import SecAggClient, SecAggParams, SecAggServer
from fedlora.task.secure_sum import client_level_config, distributed_instructions

T, C_COLLUDE, DIM = 4, 3, 4000


def _secure_sum(vectors: dict[int, np.ndarray], params: SecAggParams) -> np.ndarray:
    ids = sorted(vectors)
    server = SecAggServer(params, ids, noised=True)
    clients = {i: SecAggClient(params, i) for i in ids}
    public = server.collect_public_keys({i: c.public_keys() for i, c in clients.items()})
    routed = server.route({i: c.share_keys(public) for i, c in clients.items()})
    masked = {i: clients[i].masked_input(vectors[i], routed[i]) for i in ids}
    survivors, dropped = server.unmask_request(masked)
    shares = {i: clients[i].unmask_shares(survivors, dropped) for i in survivors}
    return server.unmask(masked, shares)


@pytest.mark.parametrize("adaptive", [False, True])
def test_distributed_noise_survives_colluders(adaptive: bool) -> None:
    cfg = ClientLevelConfig(epsilon=8.0, delta=1e-5, clip=1.0, rounds=10, num_clients=T,
                            cohort=T, poisson=False, adaptive=adaptive, count_noise=2.0,
                            min_survivors=T, max_colluding=C_COLLUDE)
    p = plan(cfg)
    # A wide ring: the sum of four noise shares must not wrap (wrapping is post-processing,
    # but it would spoil this measurement).
    params = SecAggParams(num_clients=T, threshold=T, clip_range=16.0, bits=30)
    record = ConfigRecord({"secagg-scale": 1.0 / T,
                           **distributed_instructions(cfg, p, cfg.clip, DIM, params.step)})
    start = {"w": torch.zeros(DIM, dtype=torch.float64)}
    rng = np.random.default_rng(0)
    vectors = {}
    for i in range(1, T + 1):
        # Client 1 is honest and sends a zero update: what the server is left with after
        # removing the colluders is its noise share alone.
        update = {"w": torch.zeros(DIM) if i == 1 else torch.from_numpy(rng.normal(size=DIM))}
        _, vectors[i] = contribution(update, start, record)
        assert vectors[i].dtype == np.int64  # on the ring's grid: no rounding of the noise
    total = _secure_sum(vectors, params)
    known = sum(vectors[i].astype(np.float64) for i in range(2, T + 1)) * params.step
    residual = total - known
    # The noise the accountant is charged for, on the sum (here the mean, scaled by 1/m):
    # z times the rounded sensitivity, which is at least z C / m.
    bound = float(record["secagg-norm-bound"]) * params.step
    assert bound >= cfg.clip / T
    required = p.noise_multiplier * bound
    assert float(np.std(residual)) >= 0.95 * required
    assert float(np.std(residual)) == pytest.approx(required, rel=0.05)


def test_the_default_distributed_claim_states_the_collusion_assumption() -> None:
    from fedlora.privacy.client_level import distributed_dp_threat_model

    job = compose_job(["privacy=client_dp", "secure_aggregation=true"])
    cfg = client_level_config(job)
    assert cfg is not None and cfg.min_survivors is not None
    threat = distributed_dp_threat_model(cfg.min_survivors, cfg.colluding, cfg.cohort)
    assert threat["max_colluding"] == cfg.colluding == cfg.min_survivors // 3
    assert "honest-but-curious" in threat["server"] and "NOT covered" in threat["server"]
    assert "max_colluding" in threat["assumption"]
    # c >= t leaves no honest share: refused before any work, naming the knob.
    with pytest.raises(ConfigError, match="max_colluding"):
        validate(compose_job(["privacy=client_dp", "secure_aggregation=true",
                              f"privacy.client_level.max_colluding={cfg.min_survivors}"]))
