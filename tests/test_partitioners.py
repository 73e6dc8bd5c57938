"""Partitioners (task/partition.py): the legacy Dirichlet split kept exactly, flwr-datasets'
partitioners selectable with federation.partitioner, floors from what the job needs, and
refusals that name the knob to change."""

from __future__ import annotations

import warnings

import pytest
import torch

from fedlora.task.config import ConfigError, compose_job, validate, validate_data
from fedlora.task.partition import (
    PARTITIONERS,
    PartitionError,
    legacy_dirichlet,
    required_min_examples,
    split,
)

LABELS = torch.arange(600) % 5


def _job(*overrides: str) -> dict:
    return compose_job(["privacy=none", *overrides])


def test_legacy_split_is_the_documented_one():
    # Pinned: fedlora's Dirichlet split of 600 examples (5 classes) among 10 clients,
    # alpha 0.5, seed 3, floor 8. A change here changes every published result.
    parts = legacy_dirichlet(LABELS, 600, 10, 0.5, seed=3, min_size=8)
    assert [len(p) for p in parts] == [30, 62, 49, 119, 43, 100, 52, 58, 9, 78]
    assert parts[0][:5] == [30, 79, 84, 89, 109]
    assert parts == legacy_dirichlet(LABELS, 600, 10, 0.5, seed=3, min_size=8)
    assert parts != legacy_dirichlet(LABELS, 600, 10, 0.5, seed=4, min_size=8)


def test_default_job_keeps_the_legacy_floor_of_32_when_the_data_allows():
    job = _job("federation.seed=5", "federation.num_clients=10")
    assert job["federation"]["partitioner"] == "dirichlet_legacy"
    labels = torch.arange(1781) % 5
    assert split(job, labels, 1781, 10) == legacy_dirichlet(labels, 1781, 10, 0.5, 5, 32)


@pytest.mark.parametrize("name", PARTITIONERS)
def test_every_partitioner_is_selectable_seeded_disjoint_and_complete(name):
    job = _job(f"federation.partitioner={name}", "federation.seed=7")
    validate(job)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flwr-datasets warns while it redraws
        parts = split(job, LABELS, 600, 10)
        again = split(job, LABELS, 600, 10)
        other = split(_job(f"federation.partitioner={name}", "federation.seed=8"), LABELS,
                      600, 10)
    assert parts == again
    flat = [i for p in parts for i in p]
    assert len(flat) == len(set(flat)) == 600 and min(len(p) for p in parts) >= 1
    if name not in ("shard",):  # label-sorted shards are the same for every seed
        assert parts != other


def test_pathological_gives_each_client_its_classes():
    job = _job("federation.partitioner=pathological",
               "federation.partition.num_classes_per_partition=1")
    parts = split(job, LABELS, 600, 10)
    assert all(len(set(LABELS[p].tolist())) == 1 for p in parts)


def test_size_partitioner_takes_the_listed_sizes():
    sizes = [10, 20, 30, 40, 50, 60, 70, 80, 90, 100]
    job = _job("federation.partitioner=size", f"federation.partition.sizes={sizes}")
    warnings.simplefilter("ignore")  # fewer than all examples is the point here
    assert [len(p) for p in split(job, LABELS, 600, 10)] == sizes


def test_floor_comes_from_the_job():
    # Sample-level DP with a fixed batch needs b <= N_k; DP with one rate, no DP, and
    # client-level DP need one example.
    assert required_min_examples(compose_job(["privacy=dp"]))[0] == 16
    assert required_min_examples(compose_job([]))[0] == 1  # dp_eps8's recipe sets a rate
    assert required_min_examples(_job())[0] == 1
    assert required_min_examples(compose_job(["privacy=client_dp"]))[0] == 1
    assert required_min_examples(_job("federation.min_client_examples=5"))[0] == 5


def test_a_thousand_clients_of_two_examples_are_split():
    labels = torch.arange(1781) % 5
    job = compose_job(["privacy=client_dp", "federation.num_clients=1000",
                       "federation.clients_per_round=100"])
    validate(job)
    parts = split(job, labels, 1781, 1000)
    assert min(len(p) for p in parts) >= 1 and sum(len(p) for p in parts) == 1781
    assert parts == split(job, labels, 1781, 1000)
    sizes = [len(p) for p in parts]
    validate_data(job, sizes)
    validate_data(compose_job(["federation.num_clients=1000"]), sizes)  # dp_eps8: a rate


@pytest.mark.parametrize(("examples", "clients"), [(600, 10), (2003, 1000), (10, 3), (7, 7)])
def test_iid_shards_are_what_flower_loads_partition_by_partition(examples, clients):
    # The iid split is cut from the seeded order instead of one select() per client (10,000
    # of them cost seconds per process): the same partitions as Flower's load_partition().
    import datasets
    import numpy as np
    from flwr_datasets.partitioner import IidPartitioner

    from fedlora.task.partition import _indices_of

    order = np.random.default_rng(examples).permutation(examples)
    part = IidPartitioner(clients)
    part.dataset = datasets.Dataset.from_dict({"label": [0] * examples, "idx": order.tolist()})
    expected = [sorted(part.load_partition(k)["idx"]) for k in range(clients)]
    assert _indices_of(part, order, clients) == expected
    job = _job("federation.partitioner=iid", "federation.seed=7")
    assert [len(p) for p in split(job, LABELS, 600, 7)] == [86] * 5 + [85] * 2


def test_refusals_name_the_knob():
    with pytest.raises(ConfigError, match="federation.partitioner must be one of"):
        validate(_job("federation.partitioner=nope"))
    with pytest.raises(ConfigError, match="federation.min_client_examples must be"):
        validate(_job("federation.min_client_examples=0"))
    with pytest.raises(ConfigError, match="federation.partition.sizes lists 3 clients"):
        validate(_job("federation.partition.sizes=[1,2,3]"))
    with pytest.raises(PartitionError, match="lower federation.num_clients or "
                                             "federation.min_client_examples"):
        split(_job("federation.min_client_examples=32"), LABELS, 600, 100)
    with pytest.raises(PartitionError, match="lower federation.num_clients or "
                                             "strategy.batch_size, or set strategy.sample_rate"):
        split(compose_job(["privacy=dp"]), LABELS, 600, 100)
    with pytest.raises(PartitionError, match="federation.dirichlet_alpha"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            split(_job("federation.partitioner=dirichlet", "federation.dirichlet_alpha=0.05",
                       "federation.min_client_examples=40"), LABELS, 600, 12)
    with pytest.raises(PartitionError, match="num_classes_per_partition"):
        split(_job("federation.partitioner=pathological",
                   "federation.partition.num_classes_per_partition=6"), LABELS, 600, 10)
    with pytest.raises(PartitionError, match="use iid, size or linear"):
        split(_job("federation.partitioner=shard"), None, 600, 10)
    with pytest.raises(PartitionError, match="federation.partition"):
        split(_job("federation.partitioner=linear", "federation.min_client_examples=20"),
              LABELS, 600, 10)  # linear gives the first client 1/55 of the data


def test_dp_rules_per_client():
    dp = compose_job(["privacy=dp", "privacy.delta=0.01"])
    with pytest.raises(ConfigError, match=r"largest client holds N_k = 150.*privacy.delta"):
        validate_data(dp, [20, 150])  # delta < 1/N_k binds the largest client
    with pytest.raises(ConfigError, match="strategy.batch_size"):
        validate_data(dp, [10, 50])  # DP-SGD: b <= N_k
    validate_data(_job(), [1, 2, 3])  # without DP a batch is at most the client's data
    validate_data(compose_job(["privacy=client_dp"]), [1, 2])
