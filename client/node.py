"""What a node is: its partition of the data, its rank, its device, its privacy settings.

Data owners set these in the node config: ``partition-id``/``num-partitions`` (or
``data-path`` for a node with its own data), ``device``, ``lora-rank`` (per-client-rank
methods), ``max-epsilon`` (a stricter budget wins), ``ledger-dir``,
``max-physical-batch`` (DP: the most examples one forward/backward pass may hold) and
``public-num-examples`` (a training-set size the data owner declares public; under DP it
is the only example count the node releases).
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

from flwr.app import ConfigRecord, Context

from fedlora.task.data import federation_partition
from fedlora.task.messages import node_name

from .runtime import ClientRuntime

# In the environment of simulated nodes only (deploy/simulate.py sets it before Ray starts).
SIMULATION_ENV = "FEDLORA_SIMULATED_NODES"


def _optional_int(value: Any) -> int | None:
    return None if value in (None, "") else int(value)


class NodeIdentity:
    """This node's partition, rank, device and privacy settings for one job."""

    def __init__(self, cfg: dict[str, Any], config: ConfigRecord, context: Context):
        node_cfg = context.node_config
        self.partition = int(node_cfg.get("partition-id", 0))
        self.partitions = int(node_cfg.get("num-partitions", cfg["federation"]["num_clients"]))
        self.name = node_name(self.partition)
        self.device = str(node_cfg.get("device", cfg.get("device", "cpu")))
        self.max_epsilon = node_cfg.get("max-epsilon")
        self.ledger_dir = node_cfg.get("ledger-dir") or config.get("ledger-dir")
        self.max_physical_batch = _optional_int(
            node_cfg.get("max-physical-batch", cfg["privacy"].get("max_physical_batch_size")))
        self.public_num_examples = _optional_int(node_cfg.get("public-num-examples"))
        self.declared_rank = _optional_int(node_cfg.get("lora-rank"))
        self.rank = 0  # set by bind() once the method is known
        self.own_data = "data-path" in node_cfg
        if self.own_data:
            # A deployed node with its own data: all of it is this node's partition.
            data_cfg = dict(cfg["data"], path=str(node_cfg["data-path"]), test_fraction=0.1)
            cfg = dict(cfg, data=data_cfg)
            self.partitions, self.partition = 1, 0
        self.cfg = cfg

    def declared_size(self, num_examples: int) -> int | None:
        """The training-set size this node declares public, or None (under DP it then
        releases no count). The node config's ``public-num-examples`` wins; in simulation
        the job's ``simulation.public_sizes`` makes every simulated node declare its
        partition's size. A deployed node ignores that key: the job config is the server's,
        and releasing a size is the data owner's decision (node config)."""
        if self.public_num_examples is not None:
            return self.public_num_examples
        simulated = os.environ.get(SIMULATION_ENV) == "1"  # set by deploy/simulate.py only
        if simulated and (self.cfg.get("simulation") or {}).get("public_sizes"):
            return num_examples
        return None

    def bind(self, runtime: ClientRuntime) -> NodeIdentity:
        """The rank this node trains at, as its method decides (shared or its own)."""
        self.rank = runtime.method.client_rank(runtime.spec, self.partition, self.declared_rank)
        return self

    def dataset(self, runtime: ClientRuntime):
        if self.own_data:
            return runtime.data.train
        return federation_partition(runtime.cfg, runtime.data, self.partition, self.partitions)


def round_seed(cfg: dict[str, Any], round_: int, partition: int) -> int:
    """The public seed of (job, round, partition): fresh LoRA draws, plain shuffling."""
    text = f"{cfg['federation']['seed']}:{round_}:{partition}"
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:7], "little")
