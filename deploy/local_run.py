"""`fedlora deploy local`: the fedlora apps on a real local SuperLink and N SuperNodes.

The run config is validated and written to RUN_DIR/config.yaml exactly as for
``fedlora simulate``; the ServerApp reads it (run config ``config-path``), clients get
their part with every message. Each SuperNode has its own key, partition, privacy ledger
directory (LEDGER_ROOT/partition-K/privacy, on the node side; LEDGER_ROOT defaults to
RUN_DIR/deploy/nodes) and port. The run
directory ends up with the same files as a simulation.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from fedlora.task.messages import node_name

from .simulate import prepare_run, write_config

# A minimal Flower App: components resolve to the installed fedlora package, so the
# app bundle (FAB) carries no code and works for editable and regular installs alike.
APP_PYPROJECT = """\
[build-system]
requires = ["setuptools"]
build-backend = "setuptools.build_meta"

[project]
name = "fedlora-app"
version = "0.1.0"
description = "fedlora ServerApp and ClientApp"
dependencies = []

[tool.flwr.app]
publisher = "fedlora"

[tool.flwr.app.components]
serverapp = "fedlora.server.app:app"
clientapp = "fedlora.client.app:app"

[tool.flwr.app.config]
config-path = ""
resume = false
"""


def write_app(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "pyproject.toml").write_text(APP_PYPROJECT, encoding="utf-8")
    return directory


def node_ledger_dir(root: Path, partition: int) -> Path:
    return root / node_name(partition) / "privacy"


def _compose(overrides: list[str]) -> tuple[dict[str, Any], Path]:
    from fedlora.task.config import compose_job

    run_dir = None
    kept = []
    for item in overrides:
        if item.startswith("hydra.run.dir="):
            run_dir = Path(item.split("=", 1)[1])
        else:
            kept.append(item)
    job = compose_job(kept)
    if run_dir is None:
        run_dir = Path("outputs") / "deploy" / time.strftime("%Y-%m-%d_%H-%M-%S")
    return job, run_dir


def run_deployment(job: dict[str, Any], *, resume: bool = False, timeout_s: float | None = None
                   ) -> int:
    """Start SuperLink + SuperNodes, ``flwr run`` the apps, stop everything. Exit code."""
    from .local import FederationError, run_local_federation

    run_dir = Path(job["run_dir"]).resolve()
    deployment = job["deployment"]
    nodes = int(deployment["nodes"])
    ledger_root = Path(deployment.get("ledger_root") or run_dir / "deploy" / "nodes")
    node_configs = [{"partition-id": k, "num-partitions": nodes,
                     "ledger-dir": str(node_ledger_dir(ledger_root.resolve(), k))}
                    for k in range(nodes)]
    app_dir = write_app(run_dir / "deploy" / "app-source")
    try:
        code = run_local_federation(
            app_dir, nodes=nodes,
            run_config={"config-path": str(run_dir / "config.yaml"), "resume": resume},
            node_configs=node_configs, work_dir=run_dir / "deploy",
            insecure=bool(deployment.get("insecure")), timeout_s=timeout_s,
        )
    except FederationError as exc:
        print(f"fedlora: deployment failed: {exc}", file=sys.stderr)
        return 1
    if code == 0 and not (run_dir / "summary.json").is_file():
        print("fedlora: flwr run ended but the ServerApp wrote no summary.json", file=sys.stderr)
        return 1
    return code


def deploy_local(argv: list[str]) -> int:
    from fedlora.task.config import ConfigError

    parser = argparse.ArgumentParser(
        prog="fedlora deploy local",
        description="Run a federation on a local SuperLink and N SuperNodes (gRPC, TLS, "
                    "SuperNode authentication). Extra arguments are Hydra overrides.")
    parser.add_argument("--nodes", type=int, required=True, help="number of SuperNodes")
    parser.add_argument("--insecure", action="store_true",
                        help="no TLS and no node authentication (debugging only)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds for the whole run")
    parser.add_argument("--ledger-root", type=Path, default=None,
                        help="node-side privacy ledgers live in LEDGER_ROOT/partition-K/privacy "
                             "(default RUN_DIR/deploy/nodes); reuse it to continue a federation")
    args, overrides = parser.parse_known_args(argv)
    if args.nodes < 1:
        parser.error("--nodes must be >= 1")
    job, run_dir = _compose(overrides)
    if (job.get("simulation") or {}).get("public_sizes"):
        print("fedlora: simulation.public_sizes is for simulation; in a deployment each data "
              "owner declares its size with node config public-num-examples", file=sys.stderr)
        return 2
    # One SuperNode per client; a node holds one partition.
    job["federation"]["num_clients"] = args.nodes
    job["federation"]["clients_per_round"] = min(int(job["federation"]["clients_per_round"]),
                                                args.nodes)
    job["federation"]["min_clients"] = min(int(job["federation"]["min_clients"]), args.nodes)
    try:
        job = prepare_run(job, run_dir.resolve())
    except ConfigError as exc:
        print(f"fedlora: {exc}", file=sys.stderr)
        return 2
    job["ledger_dir"] = None  # ledgers live on the nodes (node config ledger-dir)
    job["deployment"] = {"nodes": args.nodes, "insecure": args.insecure,
                         "ledger_root": str(args.ledger_root.resolve()) if args.ledger_root else None}
    write_config(job, Path(job["run_dir"]) / "config.yaml")
    return run_deployment(job, timeout_s=args.timeout)


def resume_local(job: dict[str, Any]) -> int:
    return run_deployment(job, resume=True)
