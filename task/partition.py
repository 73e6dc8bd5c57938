"""How the training split is divided among the clients (``federation.partitioner``).

``dirichlet_legacy`` (the default) is fedlora's own seeded Dirichlet label split, kept
because every published result and tuned recipe was measured on it and flwr-datasets'
``DirichletPartitioner`` draws from another random stream (one numpy generator, floor
cuts, no per-class torch shuffle): the same seed gives a different split. Given the same
``(labels, num_clients, dirichlet_alpha, seed, floor)`` it returns exactly what fedlora
has always returned. Its floor, unless ``federation.min_client_examples`` sets one, is
the larger of the job's need and ``min(32, N / num_clients)``: 32 was its fixed floor, so
every split a job could get before is unchanged, and federations too large for 32 examples
per client (1,000 clients of about two articles) now get a split instead of a refusal.

The others are flwr-datasets' partitioners (``iid``, ``dirichlet``, ``pathological``,
``shard``, ``size``, ``linear``, ``inner_dirichlet``), applied to the in-memory split
through a ``datasets.Dataset`` of (label, index) rows. Those without a seed of their own
(iid, size, linear) take the rows shuffled with ``federation.seed``.

The smallest client a job needs (``federation.min_client_examples: null``) comes from the
job: with sample-level DP-SGD and a fixed batch, ``strategy.batch_size`` (Poisson
sampling at q = b / N_k needs b <= N_k); otherwise one example. Client-level DP sets no
floor: it protects a client's whole update, whatever its size. DP's delta rule
(delta < 1/N_k) bounds the largest client, not the smallest (:func:`size_problems`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

LEGACY = "dirichlet_legacy"
FLOWER = ("iid", "dirichlet", "pathological", "shard", "size", "linear", "inner_dirichlet")
PARTITIONERS = (LEGACY, *FLOWER)
LABELLED = ("dirichlet", "pathological", "shard", "inner_dirichlet")
CLASS_MODES = ("random", "deterministic", "first-deterministic")
LEGACY_DRAWS = 1000  # the legacy split's redraw budget (part of what makes it reproducible)
LEGACY_FLOOR = 32  # the legacy split's historical floor, kept wherever the data allows it


class PartitionError(ValueError):
    """A split the job cannot have; the message names the knob to change."""


def _options(fed: Mapping[str, Any]) -> dict[str, Any]:
    return dict(fed.get("partition") or {})


def required_min_examples(cfg: Mapping[str, Any]) -> tuple[int, str]:
    """(floor, why): the fewest examples a client may hold for this job."""
    explicit = cfg["federation"].get("min_client_examples")
    if explicit is not None:
        return int(explicit), "federation.min_client_examples"
    strategy = cfg["strategy"]
    if cfg["privacy"].get("enabled") and strategy.get("sample_rate") is None:
        return int(strategy["batch_size"]), "sample-level DP samples batches of strategy.batch_size"
    return 1, "a client trains on at least one example"


def partition_problems(cfg: Mapping[str, Any]) -> list[str]:
    """Config checks that need no data (called from task/config.py's validate)."""
    fed = cfg.get("federation") or {}
    problems: list[str] = []
    name = fed.get("partitioner", LEGACY)
    if name not in PARTITIONERS:
        problems.append(f"federation.partitioner must be one of {', '.join(PARTITIONERS)}, "
                        f"got {name!r}")
    floor = fed.get("min_client_examples")
    if floor is not None and (isinstance(floor, bool) or not isinstance(floor, int) or floor < 1):
        problems.append(f"federation.min_client_examples must be null (what the job needs) or "
                        f"an integer >= 1, got {floor!r}")
    opts = _options(fed)
    for key in ("num_classes_per_partition", "num_shards_per_partition", "shard_size"):
        value = opts.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 1):
            problems.append(f"federation.partition.{key} must be an integer >= 1, got {value!r}")
    if opts.get("class_assignment_mode", "random") not in CLASS_MODES:
        problems.append(f"federation.partition.class_assignment_mode must be one of "
                        f"{CLASS_MODES}, got {opts.get('class_assignment_mode')!r}")
    sizes = opts.get("sizes")
    clients = fed.get("num_clients")
    if sizes is not None:
        if not isinstance(sizes, Sequence) or not all(
                isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in sizes):
            problems.append(f"federation.partition.sizes must be a list of integers >= 0, "
                            f"got {sizes!r}")
        elif isinstance(clients, int) and len(sizes) != clients:
            problems.append(f"federation.partition.sizes lists {len(sizes)} clients; "
                            f"federation.num_clients is {clients}")
    return problems


def size_problems(cfg: Mapping[str, Any], sizes: Sequence[int]) -> list[str]:
    """Checks of a drawn split against the job: sample-level DP's batch and delta rules."""
    problems: list[str] = []
    smallest, largest = min(sizes), max(sizes)
    if smallest < 1:
        problems.append("a client holds no examples; lower federation.num_clients or pick "
                        "another federation.partitioner")
    privacy, strategy = cfg["privacy"], cfg["strategy"]
    if not privacy.get("enabled"):
        return problems  # without DP-SGD a batch larger than the client is just the client
    delta = float(privacy["delta"])
    if delta * largest >= 1:
        problems.append(
            f"privacy.delta ({delta:g}) must be < 1/N_k for every client; the largest client "
            f"holds N_k = {largest} examples (1/N_k = {1.0 / largest:.3g}): lower privacy.delta "
            f"or raise federation.num_clients")
    batch = int(strategy["batch_size"])
    if strategy.get("sample_rate") is None and batch > smallest:
        problems.append(
            f"strategy.batch_size ({batch}) exceeds the smallest client's {smallest} examples "
            f"(DP-SGD samples at q = b / N_k <= 1): lower strategy.batch_size, set "
            f"strategy.sample_rate, or leave federation.min_client_examples null so the split "
            f"gives every client b examples")
    return problems


def _too_few(num_examples: int, clients: int, floor: int, why: str) -> PartitionError:
    knobs = ("federation.num_clients or strategy.batch_size, or set strategy.sample_rate"
             if "batch_size" in why else
             "federation.num_clients or federation.min_client_examples")
    return PartitionError(f"{num_examples} training examples cannot give {clients} clients "
                          f"{floor} examples each ({why}); lower {knobs}")


def split(cfg: Mapping[str, Any], labels: torch.Tensor | None, num_examples: int,
          num_clients: int) -> list[list[int]]:
    """Every client's training indices (sorted) under the job's federation settings."""
    fed = cfg["federation"]
    name = fed.get("partitioner", LEGACY)
    floor, why = required_min_examples(cfg)
    seed, alpha = int(fed["seed"]), float(fed["dirichlet_alpha"])
    if num_clients < 1:
        raise PartitionError("federation.num_clients must be >= 1")
    if num_examples < num_clients * floor:
        raise _too_few(num_examples, num_clients, floor, why)
    if name == LEGACY:
        if fed.get("min_client_examples") is None:  # keep every earlier split (see above)
            floor = max(floor, min(LEGACY_FLOOR, num_examples // num_clients))
        return legacy_dirichlet(labels, num_examples, num_clients, alpha, seed, floor)
    if name in LABELLED and labels is None:
        raise PartitionError(f"federation.partitioner={name} splits by class label and this "
                             f"data has none (causal LM): use iid, size or linear")
    parts = _flower_split(name, fed, labels, num_examples, num_clients, floor, seed, alpha)
    if min(len(p) for p in parts) < floor:
        raise PartitionError(
            f"federation.partitioner={name} gave a client fewer than {floor} examples ({why}); "
            f"change its options (federation.partition.*), lower federation.num_clients or "
            f"federation.min_client_examples, or use federation.partitioner=iid")
    return parts


def _even_sizes(num_examples: int, clients: int) -> list[int]:
    base, extra = divmod(num_examples, clients)
    return [base + (k < extra) for k in range(clients)]


def _flower_split(name: str, fed: Mapping[str, Any], labels: torch.Tensor | None,
                  num_examples: int, clients: int, floor: int, seed: int,
                  alpha: float) -> list[list[int]]:
    import datasets
    from flwr_datasets import partitioner as fp

    opts = _options(fed)
    order = np.arange(num_examples)
    if name in ("iid", "size", "linear"):  # no seed of their own: a seeded order instead
        order = np.random.default_rng(seed).permutation(num_examples)
    label_col = labels.numpy()[order] if labels is not None else np.zeros(num_examples, int)
    ds = datasets.Dataset.from_dict({"label": label_col.tolist(), "idx": order.tolist()})
    sizes = opts.get("sizes") or _even_sizes(num_examples, clients)
    if name in ("size", "inner_dirichlet") and sum(sizes) > num_examples:
        raise PartitionError(f"federation.partition.sizes ask for {sum(sizes)} examples; the "
                             f"training split holds {num_examples}")
    if name == "iid":
        part = fp.IidPartitioner(clients)
    elif name == "size":
        part = fp.SizePartitioner(list(sizes))
    elif name == "linear":
        part = fp.LinearPartitioner(clients)
    elif name == "dirichlet":
        part = fp.DirichletPartitioner(clients, "label", alpha, min_partition_size=floor,
                                       self_balancing=bool(opts.get("self_balancing", False)),
                                       seed=seed)
    elif name == "pathological":
        classes = int(labels.max()) + 1 if labels is not None else 1
        per = int(opts.get("num_classes_per_partition") or 2)
        if per > classes:
            raise PartitionError(f"federation.partition.num_classes_per_partition ({per}) "
                                 f"exceeds the data's {classes} classes")
        part = fp.PathologicalPartitioner(
            clients, "label", per, class_assignment_mode=opts.get("class_assignment_mode",
                                                                  "random"), seed=seed)
    elif name == "shard":
        shards, shard_size = opts.get("num_shards_per_partition"), opts.get("shard_size")
        if shards is None and shard_size is None:
            shards = 2  # McMahan et al.'s pathological non-IID: two label-sorted shards each
        part = fp.ShardPartitioner(clients, "label", num_shards_per_partition=shards,
                                   shard_size=shard_size, seed=seed)
    else:  # inner_dirichlet
        part = fp.InnerDirichletPartitioner(list(sizes), "label", alpha, seed=seed)
    part.dataset = ds
    try:
        return _indices_of(part, order, clients)
    except PartitionError:
        raise
    except ValueError as exc:
        knobs = {"dirichlet": "raise federation.dirichlet_alpha, lower federation.num_clients "
                              "or federation.min_client_examples, or set "
                              "federation.partition.self_balancing=true",
                 "shard": "change federation.partition.shard_size or "
                          "federation.partition.num_shards_per_partition, or lower "
                          "federation.num_clients"}.get(
            name, "change federation.partition.* or lower federation.num_clients")
        raise PartitionError(f"federation.partitioner={name}: {exc} ({knobs})") from exc


def _indices_of(part: Any, idx: np.ndarray, clients: int) -> list[list[int]]:
    """All clients' row indices. One load_partition() makes the whole assignment; the
    partitioners that keep it in a table are read from it (10,000 select() calls would
    cost seconds per process), iid shards are cut from the rows' order, the others are
    read partition by partition."""
    first = sorted(part.load_partition(0)["idx"])
    table = getattr(part, "_partition_id_to_indices", None)
    if isinstance(table, dict) and len(table) == clients:
        return [sorted(idx[np.asarray(table[k], dtype=np.int64)].tolist())
                for k in range(clients)]
    from flwr_datasets.partitioner import IidPartitioner

    if isinstance(part, IidPartitioner):
        parts = _contiguous_shards(idx, clients)
        # What load_partition(k) selects (dataset.shard(clients, k, contiguous=True)),
        # checked at both ends: any other rule reads every partition instead.
        if parts[0] == first and parts[-1] == sorted(part.load_partition(clients - 1)["idx"]):
            return parts
    return [sorted(part.load_partition(k)["idx"]) for k in range(clients)]


def _contiguous_shards(idx: np.ndarray, clients: int) -> list[list[int]]:
    """``idx`` cut into ``clients`` contiguous runs in order, the first ``len % clients``
    one longer (datasets' ``shard(contiguous=True)``), each sorted."""
    bounds = np.cumsum([0, *_even_sizes(len(idx), clients)])
    return [sorted(idx[bounds[k]:bounds[k + 1]].tolist()) for k in range(clients)]


def legacy_dirichlet(labels: torch.Tensor | None, num_examples: int, num_clients: int,
                     alpha: float, seed: int, min_size: int = 8) -> list[list[int]]:
    """fedlora's seeded non-IID split: per class, client shares drawn from Dirichlet(alpha).

    Redraws up to 1000 times until every client holds at least ``min_size`` examples
    (unlabelled data is split IID). When no draw does (many tiny clients: with about two
    examples per client a Dirichlet label split almost always leaves one empty), the first
    draw is topped up: each client short of ``min_size`` takes examples, one at a time,
    from the then largest client (seeded). Splits that a redraw satisfies are unchanged.
    """
    if num_clients < 1:
        raise PartitionError("federation.num_clients must be >= 1")
    if num_examples < num_clients * min_size:
        raise _too_few(num_examples, num_clients, min_size, "federation.min_client_examples")
    generator = torch.Generator().manual_seed(seed)
    if labels is None or alpha <= 0:
        order = torch.randperm(num_examples, generator=generator).tolist()
        return [order[k::num_clients] for k in range(num_clients)]
    concentration = torch.full((num_clients,), float(alpha))
    classes = labels.unique().tolist()
    members_of = {c: (labels == c).nonzero().flatten() for c in classes}
    first: list[list[int]] | None = None
    for _ in range(LEGACY_DRAWS):
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        for label in classes:
            members = members_of[label]
            members = members[torch.randperm(len(members), generator=generator)]
            shares = _dirichlet(concentration, generator)
            cuts = (torch.cumsum(shares, 0) * len(members)).round().long().tolist()[:-1]
            for k, chunk in enumerate(torch.tensor_split(members, cuts)):
                parts[k] += chunk.tolist()
        if min(len(p) for p in parts) >= min_size:
            return [sorted(p) for p in parts]
        first = first or parts
        if _hopeless(parts, min_size):
            break
    assert first is not None
    return [sorted(p) for p in _top_up(first, min_size, seed)]


def _hopeless(parts: list[list[int]], min_size: int) -> bool:
    # With 200+ clients of which a tenth fall short, a draw where none does has odds below
    # 0.9^200 (~1e-9): redrawing 1000 times would cost minutes and (almost surely) find
    # nothing, so the earlier loop's outcome is kept but for that probability.
    short = sum(len(p) < min_size for p in parts)
    return len(parts) >= 200 and short * 10 >= len(parts)


def _top_up(parts: list[list[int]], min_size: int, seed: int) -> list[list[int]]:
    import heapq

    rng = np.random.default_rng(seed)
    parts = [list(p) for p in parts]
    donors = [(-len(p), k) for k, p in enumerate(parts)]  # a max-heap of sizes
    heapq.heapify(donors)
    for k in range(len(parts)):
        while len(parts[k]) < min_size:
            size, donor = heapq.heappop(donors)
            if -size != len(parts[donor]):  # stale entry: push its current size back
                heapq.heappush(donors, (-len(parts[donor]), donor))
                continue
            parts[k].append(parts[donor].pop(int(rng.integers(len(parts[donor])))))
            heapq.heappush(donors, (-len(parts[donor]), donor))
    return parts


def _dirichlet(concentration: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    # torch's Dirichlet takes no generator; numpy's, seeded from ours, keeps the split stable.
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
    draw = np.random.default_rng(seed).dirichlet(concentration.numpy().astype(float))
    return torch.tensor(draw)


def split_key(cfg: Mapping[str, Any]) -> str:
    """What a split depends on in a job config (a per-process cache key)."""
    import json

    fed = cfg["federation"]
    keys = ("partitioner", "dirichlet_alpha", "seed", "partition")
    return json.dumps([{k: fed.get(k) for k in keys}, required_min_examples(cfg)[0]],
                      sort_keys=True, default=str)
