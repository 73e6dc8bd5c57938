"""Reliability through the real simulation runtime: resume after SIGKILL, malformed updates.

- A 4-round run killed (SIGKILL, whole process group) right after round 2's checkpoint and
  continued with ``fedlora resume`` ends like the uninterrupted run: bit-exact without DP;
  with DP every client's epsilon equals the uninterrupted spend (nothing counted twice).
- Clients that send each kind of malformed update are rejected with their reason, listed
  in the round's metrics, and the round aggregates the valid updates.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from fedlora.privacy import epsilon_for_history

from .conftest import ROOT, fedlora_cmd, read_metrics, run_fedlora, stray_processes

pytestmark = pytest.mark.integration
BASE = ["model=tiny_bert", "data=synthetic", "strategy=ffa", "strategy.lr=0.02",
        "federation.rounds=4", "federation.num_clients=3", "federation.clients_per_round=3"]


def _kill_after_checkpoint(run_dir: Path, args: list[str], round_: int) -> None:
    """Start `fedlora simulate`, SIGKILL its process group once round_'s checkpoint exists."""
    since = time.time()
    proc = subprocess.Popen(fedlora_cmd() + ["simulate", *args, f"hydra.run.dir={run_dir}"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    checkpoint = run_dir / "checkpoints" / f"round-{round_:06d}"
    try:
        deadline = time.time() + 400
        while not checkpoint.is_dir():
            assert proc.poll() is None, f"run ended early:\n{proc.stderr.read()[-3000:]}"
            assert time.time() < deadline, "no checkpoint in time"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        # Ray's processes live in their own sessions: stop whatever this run left.
        for line in stray_processes(since):
            try:
                psutil.Process(int(line.split(":")[0])).kill()
            except psutil.NoSuchProcess:
                pass
    assert not (run_dir / "checkpoints" / f"round-{round_ + 2:06d}").exists()


def _final(run_dir: Path) -> tuple[list[dict], dict]:
    return read_metrics(run_dir), json.loads((run_dir / "summary.json").read_text())


def test_resume_after_sigkill_is_bit_exact_without_dp(tmp_path, no_strays):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    run_fedlora(["simulate", *BASE, f"hydra.run.dir={whole}"])
    _kill_after_checkpoint(killed, BASE, 2)
    assert len(read_metrics(killed)) in (2, 3)
    run_fedlora(["resume", str(killed)])
    rows_a, summary_a = _final(whole)
    rows_b, summary_b = _final(killed)
    assert [r["round"] for r in rows_b] == [1, 2, 3, 4]
    # Deterministic clients and partition-ordered aggregation: the same numbers exactly.
    assert [r["accuracy"] for r in rows_b] == [r["accuracy"] for r in rows_a]
    assert [r["loss"] for r in rows_b] == [r["loss"] for r in rows_a]
    assert summary_b["final_accuracy"] == summary_a["final_accuracy"]


def test_resume_with_dp_counts_every_round_once(tmp_path, no_strays):
    killed = tmp_path / "dp"
    args = [*BASE, "privacy=dp", "privacy.epsilon=4"]
    _kill_after_checkpoint(killed, args, 2)
    run_fedlora(["resume", str(killed)])
    rows, summary = _final(killed)
    assert [r["round"] for r in rows] == [1, 2, 3, 4]
    ledgers = sorted((killed / "privacy").glob("*.privacy.json"))
    assert len(ledgers) == 3
    for path in ledgers:
        ledger = json.loads(path.read_text())
        recorded = [entry["round"] for entry in ledger["rounds"]]
        assert recorded == [1, 2, 3, 4], recorded  # none twice, none forgotten
        sigma, q, _ = ledger["history"][0]
        steps = sum(s for _, _, s in ledger["history"])
        # What the uninterrupted run spends: 4 rounds of the same (sigma, q, tau).
        uninterrupted = epsilon_for_history([(sigma, q, steps)], ledger["delta"], "prv")
        assert steps == 4 * 10
        assert ledger["epsilon_spent"] == pytest.approx(uninterrupted, rel=1e-9)
        assert ledger["epsilon_spent"] <= 4.0
    last = {c["node"]: c["epsilon"] for c in rows[-1]["clients"]}
    assert summary["epsilon_per_client"] == pytest.approx(last, rel=1e-9)


FAULT_REASONS = {
    "nan": "non_finite", "inf": "non_finite", "wrong_shape": "wrong_shape",
    "wrong_rank": "wrong_rank", "unknown_module": "unknown_module", "wrong_role": "wrong_role",
    "wrong_method": "wrong_method", "stale_round": "stale_round",
    "unsupported_dtype": "unsupported_dtype", "truncated": "truncated",
    "oversized": "oversized", "norm": "norm_bound", "duplicate_module": "duplicate_module",
    "schema_version": "schema_version",
}


def test_malformed_updates_are_rejected_with_their_reason(tmp_path, no_strays):
    kinds = list(FAULT_REASONS) + ["crash"]
    clients = len(kinds) + 2
    faults = ",".join(f"{k}:{kind}" for k, kind in enumerate(kinds))
    run = tmp_path / "faults"
    run_fedlora(["simulate", "model=tiny_bert", "data=synthetic", "data.num_train=1600",
                 "strategy=fedavg", "federation.rounds=2", f"federation.num_clients={clients}",
                 f"federation.clients_per_round={clients}", "federation.dirichlet_alpha=100",
                 "federation.max_update_norm=1000", f"faults={{{faults}}}",
                 f"hydra.run.dir={run}"])
    for row in read_metrics(run):
        rejected = {r["node"]: r["reason"] for r in row["rejected"]}
        for k, kind in enumerate(FAULT_REASONS):
            assert rejected[f"partition-{k}"].startswith(FAULT_REASONS[kind]), (kind, rejected)
        assert len(rejected) == len(FAULT_REASONS)
        lost = {r["node"]: r["reason"] for r in row["lost"]}
        assert list(lost) == [f"partition-{len(FAULT_REASONS)}"]  # the crashed client
        # The two healthy clients were aggregated.
        assert sorted(c["node"] for c in row["clients"]) == [
            f"partition-{clients - 2}", f"partition-{clients - 1}"]
        assert not row["skipped"] and row["accuracy"] is not None
