"""What a node is: its partition of the data, its rank, its device, its privacy settings.

Data owners set these in the node config: ``partition-id``/``num-partitions`` (or
``data-path`` for a node with its own data), ``device``, ``lora-rank`` (per-client-rank
methods), the privacy policy (``require-dp``, ``max-epsilon``, ``max-delta``,
``require-secure-aggregation``, ``allow-evaluation``: privacy/policy.py), ``ledger-dir``
and ``key-dir`` (where the node keeps its ledger, and apart from it its pinned policy and
the markers that reveal a lost ledger), ``max-physical-batch`` (DP: the most examples one
forward/backward pass may hold) and ``public-num-examples`` (a training-set size the data
owner declares public; under DP it is the only example count the node releases).

Nothing here is taken from the server's messages: a job cannot move a node's ledger,
key directory or policy. In simulation the launcher speaks for the simulated owners
(deploy/simulate.py sets their directories in the environment before Ray starts, and the
job's ``simulation.node_config`` gives per-partition node config).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context

from fedlora.privacy.policy import NodePolicy, resolve_policy
from fedlora.task.data import federation_partition
from fedlora.task.messages import node_name

from .runtime import ClientRuntime

# In the environment of simulated nodes only (deploy/simulate.py sets it before Ray starts).
SIMULATION_ENV = "FEDLORA_SIMULATED_NODES"


def simulated() -> bool:
    return os.environ.get(SIMULATION_ENV) == "1"


def _file_digest(path: Path) -> str:
    """The digest of a data file (or a directory's files), read once per process while the
    files keep their size and modification time: simulated nodes ask every round."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    stamp = tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    return _digest_of(path, stamp)


@functools.lru_cache(maxsize=64)
def _digest_of(path: Path, stamp: tuple[tuple[str, int, int], ...]) -> str:
    digest = hashlib.sha256()
    for name, _, _ in stamp:
        file = Path(name)
        digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
        with open(file, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def _optional_int(value: Any) -> int | None:
    return None if value in (None, "") else int(value)


class NodeIdentity:
    """This node's partition, rank, device and privacy settings for one job."""

    def __init__(self, cfg: dict[str, Any], config: ConfigRecord, context: Context):
        node_cfg = dict(context.node_config)
        if simulated():
            # The simulation's owner speaks for each simulated node (per partition).
            extra = ((cfg.get("simulation") or {}).get("node_config") or {})
            node_cfg.update(extra.get(str(node_cfg.get("partition-id", 0))) or {})
        self.node_config = node_cfg
        self.partition = int(node_cfg.get("partition-id", 0))
        self.partitions = int(node_cfg.get("num-partitions", cfg["federation"]["num_clients"]))
        self.name = node_name(self.partition)
        self.device = str(node_cfg.get("device", cfg.get("device", "cpu")))
        self.ledger_dir, self.key_dir = self._directories(node_cfg, config)
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

    def _directories(self, node_cfg: dict[str, Any],
                     config: ConfigRecord) -> tuple[Path | None, Path | None]:
        """(ledger dir, key dir) from the node config; the key directory defaults to a
        sibling of the ledger directory, never inside it. Only a simulated node takes its
        ledger directory from the job (the simulation's owner runs the server too); a
        deployed node never lets the server choose where its budget lives."""
        ledger = node_cfg.get("ledger-dir") or None
        keys = node_cfg.get("key-dir") or None
        if simulated() and not ledger and config.get("ledger-dir"):
            ledger = str(config["ledger-dir"])
            keys = keys or str(Path(ledger).parent / "node-keys" / f"partition-{self.partition}")
        if ledger and not keys:
            ledger_path = Path(ledger)
            keys = ledger_path.parent / f"{ledger_path.name}.keys"
        return (Path(ledger) if ledger else None), (Path(keys) if keys else None)

    def policy(self, privacy: dict[str, Any], secure: bool) -> NodePolicy:
        """The node's privacy policy (owner's node config, the rest pinned at first use)."""
        return resolve_policy(self.node_config, self.key_dir, privacy, secure)

    def data_fingerprint(self) -> str:
        """What the lifetime ledger is keyed by: the node's data source, not anything a job
        can vary (seeds, split, partition count, tokenization, run name). A node with its own
        data: the digest of its files; a partition of a shipped data set: the set and the
        partition id (the whole set is the pool any job draws that partition from)."""
        if self.own_data:
            source = {"files": _file_digest(Path(str(self.cfg["data"]["path"])))}
        else:
            data = self.cfg["data"]
            path = data.get("path")
            source = {"source": str(data.get("source") or data.get("name")),
                      "files": _file_digest(Path(path)) if path and Path(path).exists() else None,
                      "partition": self.partition}
        text = json.dumps(source, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def declared_size(self, num_examples: int) -> int | None:
        """The training-set size this node declares public, or None (under DP it then
        releases no count). The node config's ``public-num-examples`` wins; in simulation
        the job's ``simulation.public_sizes`` makes every simulated node declare its
        partition's size. A deployed node ignores that key: the job config is the server's,
        and releasing a size is the data owner's decision (node config)."""
        if self.public_num_examples is not None:
            return self.public_num_examples
        if simulated() and (self.cfg.get("simulation") or {}).get("public_sizes"):
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
