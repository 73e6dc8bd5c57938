"""Run outputs: metrics.jsonl (one object per round), summary.json, plots, summary table."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedlora.privacy.ledger_file import is_lifetime_key
from fedlora.task.files import atomic_write

from .client_dp import LEDGER_NODE as CLIENT_LEVEL_NODE


def _simulated_ledger_dir(cfg: dict[str, Any]) -> Path | None:
    ledger_dir = cfg.get("ledger_dir")
    return Path(ledger_dir) if ledger_dir and Path(ledger_dir).is_dir() else None


def _read_node_ledger(path: Path) -> dict[str, Any] | None:
    """A simulated node's lifetime ledger at ``path``; {} for another ledger (the server's
    client-level one, a job ledger); None when it cannot be read this instant (a ledger
    being replaced: the next read gets it)."""
    try:
        ledger = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if (isinstance(ledger, dict) and is_lifetime_key(ledger.get("federation", ""))
            and ledger.get("node") != CLIENT_LEVEL_NODE):
        return ledger
    return {}


def simulated_node_ledgers(cfg: dict[str, Any]) -> list[tuple[Path, dict[str, Any]]]:
    """In simulation only (the job names the nodes' ledger directory; a deployment never
    does): (path, content) of the simulated nodes' lifetime ledgers, sorted by path. The
    server's client-level ledger in the same directory is another guarantee: left out.
    Private nodes release no epsilon (it depends on N_k); the simulation's owner reads its
    own nodes' ledgers."""
    ledger_dir = _simulated_ledger_dir(cfg)
    if ledger_dir is None:
        return []
    ledgers = []
    for path in sorted(ledger_dir.glob("*.privacy.json")):
        if ledger := _read_node_ledger(path):
            ledgers.append((path, ledger))
    return ledgers


# Per ledger directory: each ledger file's (inode, size, mtime) when last read and the
# epsilon it recorded (None: not a node ledger, or no epsilon). A ledger is replaced, never
# rewritten in place (privacy/ledger_file.py), so an unchanged stamp is unchanged content.
_SPEND_SEEN: dict[Path, dict[Path, tuple[tuple[int, int, int], float | None]]] = {}


def simulated_spend(cfg: dict[str, Any]) -> float | None:
    """The largest epsilon the simulated nodes' ledgers record (None outside simulation).

    Asked every round: only ledgers whose file changed since the last call are read again
    (a round's cohort), the others cost a stat, not a parse."""
    if not cfg.get("privacy", {}).get("enabled"):
        return None
    ledger_dir = _simulated_ledger_dir(cfg)
    if ledger_dir is None:
        return None
    before = _SPEND_SEEN.get(ledger_dir, {})
    seen: dict[Path, tuple[tuple[int, int, int], float | None]] = {}
    for path in ledger_dir.glob("*.privacy.json"):
        try:
            stat = path.stat()
        except OSError:
            continue  # replaced or removed this instant
        stamp = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
        known = before.get(path)
        if known is None or known[0] != stamp:
            ledger = _read_node_ledger(path)
            if ledger is None:
                continue  # unreadable this instant: read again next time
            known = (stamp, float(ledger["epsilon_spent"]) if "epsilon_spent" in ledger
                     else None)
        seen[path] = known
    _SPEND_SEEN[ledger_dir] = seen
    spent = [epsilon for _, epsilon in seen.values() if epsilon is not None]
    return max(spent) if spent else None


def write_json_atomic(path: Path, payload: Any) -> None:
    atomic_write(path, json.dumps(payload, indent=1, sort_keys=True).encode("utf-8"))


class MetricsLog:
    """metrics.jsonl, appended and fsynced per round; truncated to a round on resume."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.rows: list[dict[str, Any]] = []
        if self.path.exists():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    try:
                        self.rows.append(json.loads(line))
                    except json.JSONDecodeError:
                        break  # a torn last line from a crash: drop it

    def truncate(self, last_round: int) -> None:
        self.rows = [r for r in self.rows if int(r["round"]) <= last_round]
        text = "".join(json.dumps(row, sort_keys=True) + "\n" for row in self.rows)
        atomic_write(self.path, text.encode("utf-8"))

    def append(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row, sort_keys=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())


def summarize(rows: Sequence[dict[str, Any]], method: str, extra: dict[str, Any]) -> dict[str, Any]:
    evaluated = [r for r in rows if r.get("accuracy") is not None]
    summary = {
        "method": method,
        "rounds": len(rows),
        "final_accuracy": evaluated[-1]["accuracy"] if evaluated else None,
        "best_accuracy": max((r["accuracy"] for r in evaluated), default=None),
        "final_loss": evaluated[-1]["loss"] if evaluated else None,
        "bytes_up_total": sum(r["bytes_up"] for r in rows),
        "bytes_down_total": sum(r["bytes_down"] for r in rows),
        "adapter_bytes_up_total": sum(r.get("adapter_bytes_up", 0) for r in rows),
        "adapter_bytes_down_total": sum(r.get("adapter_bytes_down", 0) for r in rows),
        "wall_seconds": sum(r["wall_seconds"] for r in rows),
        "rejected_total": sum(len(r.get("rejected", [])) for r in rows),
        "skipped_rounds": [r["round"] for r in rows if r.get("skipped")],
    }
    if evaluated and evaluated[-1].get("val_accuracy") is not None:
        summary["final_val_accuracy"] = evaluated[-1]["val_accuracy"]
    if evaluated and "perplexity" in evaluated[-1]:
        summary["final_perplexity"] = evaluated[-1]["perplexity"]
    epsilons: dict[str, float] = {}
    for row in rows:
        for client in row.get("clients", []):
            if client.get("epsilon") is not None:
                epsilons[client["node"]] = max(epsilons.get(client["node"], 0.0), client["epsilon"])
    if epsilons:
        summary["epsilon_max"] = max(epsilons.values())
        summary["epsilon_per_client"] = dict(sorted(epsilons.items()))
    summary.update(extra)
    return summary


def plot(rows: Sequence[dict[str, Any]], run_dir: Path) -> list[Path]:
    """accuracy.png, bytes.png and (with DP) epsilon.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    rounds = [r["round"] for r in rows]

    def save(fig, name):
        path = Path(run_dir) / name
        from matplotlib.ticker import MaxNLocator

        for ax in fig.axes:  # rounds are whole numbers
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)

    fig, ax = plt.subplots(figsize=(5, 3.5))
    evaluated = [r for r in rows if r.get("accuracy") is not None]
    ax.plot([r["round"] for r in evaluated], [r["accuracy"] for r in evaluated], marker="o")
    ax.set(xlabel="round", ylabel="accuracy (held-out)", title="Global model accuracy")
    ax.grid(alpha=0.3)
    save(fig, "accuracy.png")

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.bar([x - 0.2 for x in rounds], [r["bytes_up"] for r in rows], width=0.4, label="up")
    ax.bar([x + 0.2 for x in rounds], [r["bytes_down"] for r in rows], width=0.4, label="down")
    ax.set(xlabel="round", ylabel="bytes", title="Communication per round")
    ax.legend()
    save(fig, "bytes.png")

    if any(r.get("epsilon_max") is not None for r in rows):
        fig, ax = plt.subplots(figsize=(5, 3.5))
        nodes = sorted({c["node"] for r in rows for c in r.get("clients", [])})
        for node in nodes:
            points = [(r["round"], c["epsilon"]) for r in rows for c in r.get("clients", [])
                      if c["node"] == node and c.get("epsilon") is not None]
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], marker=".", label=node)
        ax.set(xlabel="round", ylabel="epsilon spent", title="Privacy spent per client")
        if len(nodes) <= 10:
            ax.legend(fontsize=7)
        save(fig, "epsilon.png")
    return written


def summary_table(summary: dict[str, Any]) -> str:
    keys = ["method", "rounds", "final_accuracy", "best_accuracy", "bytes_up_total",
            "bytes_down_total", "wall_seconds", "epsilon_max", "epsilon_replay_max",
            "client_level_epsilon", "rejected_total"]
    lines = []
    for key in keys:
        if key in summary and summary[key] is not None:
            value = summary[key]
            text = f"{value:.4f}" if isinstance(value, float) else str(value)
            lines.append(f"  {key:<20} {text}")
    return "\n".join(lines)
