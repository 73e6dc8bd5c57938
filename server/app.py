"""The fedlora ServerApp (Flower Message API) and the end-of-run outputs.

``flwr run .`` uses the module-level ``app`` and reads the job config from the run config
key ``config-path`` (a resolved YAML; empty: conf/config.yaml with its defaults).
``fedlora simulate`` builds the same app around an already-validated config.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedlora.aggregation import get_method
from fedlora.task.release import client_level_statement, privacy_statement

from .evaluation import CentralEvaluator
from .loop import FederationLoop
from .progress import Progress
from .report import plot, simulated_node_ledgers, summarize, summary_table, write_json_atomic

_log = logging.getLogger(__name__)


def load_job_config(path: str | Path | None) -> dict[str, Any]:
    """A resolved job config: from a YAML file, or conf/ composed with its defaults."""
    from omegaconf import OmegaConf

    from fedlora.task.config import compose_job

    if path:
        cfg = OmegaConf.to_container(OmegaConf.load(str(path)), resolve=True)
    else:
        cfg = compose_job()
    if not cfg.get("run_dir"):
        cfg["run_dir"] = str(Path("runs") / time.strftime("%Y-%m-%d_%H-%M-%S"))
    from fedlora.task.config import validate

    validate(cfg)
    return cfg


def _local_ledger_replay(cfg: dict[str, Any]) -> float | None:
    """In simulation the nodes' ledgers sit on this machine: the exact replay (max over the
    simulated nodes' lifetime ledgers; private nodes release no epsilon unless they declare
    their size). None where ledgers live on the nodes."""
    from fedlora.privacy import LedgerError, PrivacyLedger

    spent = []
    for path, _ in simulated_node_ledgers(cfg):
        try:
            spent.append(PrivacyLedger.load(path).epsilon_spent)  # a fresh replay
        except LedgerError:
            continue
    return max(spent, default=None)


def run_server(grid: Grid, cfg: dict[str, Any], *, resume: bool = False) -> dict[str, Any]:
    """Run the federation on a Grid and write the run directory's outputs."""
    run_dir = Path(cfg["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    strategy_cfg = cfg["strategy"]
    method = get_method(strategy_cfg["name"], weighting=strategy_cfg["weighting"],
                        **dict(strategy_cfg.get("options") or {}))
    evaluator = CentralEvaluator(cfg)
    loop = FederationLoop(cfg, method, evaluator, run_dir,
                               progress=Progress(int(cfg["federation"]["rounds"])))
    state = loop.run(grid, resume=resume)
    ranks = evaluator.export(method, state, run_dir / "adapter")
    extra: dict[str, Any] = {
        "adapter_ranks": ranks,
        # Every export is the global delta U V itself (B = U, A = V): no truncation error.
        "export_error": 0.0,
        "init_bytes_up": loop.init_bytes_up,
        "num_clients": int(cfg["federation"]["num_clients"]),
    }
    if cfg["privacy"].get("enabled"):
        extra["delta"] = float(cfg["privacy"]["delta"])
        extra["epsilon_target"] = float(cfg["privacy"]["epsilon"])
        extra["privacy_statement"] = privacy_statement(cfg)
        replay = _local_ledger_replay(cfg)
        if replay is not None:
            extra["epsilon_replay_max"] = replay
            extra.setdefault("epsilon_max", replay)
    extra.update(loop.aggregation.summary())
    if loop.client_dp is not None:
        extra["client_level_statement"] = client_level_statement(cfg)
    summary = summarize(loop.metrics.rows, method.name, extra)
    write_json_atomic(run_dir / "summary.json", summary)
    plot(loop.metrics.rows, run_dir)
    loop.progress.line("finished; run directory " + str(run_dir) + "\n" + summary_table(summary))
    return summary


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = load_job_config(str(context.run_config.get("config-path", "")))
    run_server(grid, cfg, resume=bool(context.run_config.get("resume", False)))
