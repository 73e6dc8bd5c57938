"""Reliability through the real simulation runtime: resume after SIGKILL, malformed updates.

- A 4-round run killed (SIGKILL, whole process group) right after round 2's checkpoint and
  continued with ``fedlora resume`` ends like the uninterrupted run: bit-exact without DP;
  with DP every client's epsilon equals the uninterrupted spend (nothing counted twice).
- Clients that send each kind of malformed update (the test plug-in's fault injection,
  fedlora_test_plugin/faults.py) are rejected with their reason, listed in the round's
  metrics, and the round aggregates the valid updates.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from fedlora_test_plugin import faulty_cli
from fedlora_test_plugin.faults import EXPECTED_REJECTION

from fedlora.privacy import epsilon_for_history

from .conftest import (
    ROOT,
    assert_nothing_left,
    fedlora_cmd,
    for_test_run,
    kill_all,
    marked_env,
    new_token,
    read_metrics,
    run_fedlora,
)

pytestmark = pytest.mark.integration
BASE = ["model=tiny_bert", "data=synthetic", "strategy=ffa", "strategy.lr=0.02",
        "federation.rounds=4", "federation.num_clients=3", "federation.clients_per_round=3"]


def _kill_after_checkpoint(run_dir: Path, args: list[str], round_: int) -> None:
    """Start `fedlora simulate`, SIGKILL its process group once round_'s checkpoint exists."""
    token = new_token()
    proc = subprocess.Popen(fedlora_cmd() + for_test_run(["simulate", *args,
                                                            f"hydra.run.dir={run_dir}"]),
                            cwd=ROOT, env=marked_env(token), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
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
        kill_all(token)
        assert_nothing_left(token)
    assert not (run_dir / "checkpoints" / f"round-{round_ + 2:06d}").exists()


def _final(run_dir: Path) -> tuple[list[dict], dict]:
    return read_metrics(run_dir), json.loads((run_dir / "summary.json").read_text())


def test_resume_after_sigkill_is_bit_exact_without_dp(tmp_path):
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


def test_resume_with_dp_counts_every_round_once(tmp_path):
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
    # Private nodes release no epsilon (it depends on N_k); the simulation's report reads
    # the simulated nodes' ledgers.
    assert all("epsilon" not in c for c in rows[-1]["clients"])
    spent = max(json.loads(p.read_text())["epsilon_spent"] for p in ledgers)
    assert summary["epsilon_max"] == pytest.approx(spent, rel=1e-9)


def test_malformed_updates_are_rejected_with_their_reason(tmp_path):
    kinds = list(EXPECTED_REJECTION) + ["crash"]
    clients = len(kinds) + 2
    faults = ",".join(f"{k}:{kind}" for k, kind in enumerate(kinds))
    run = tmp_path / "faults"
    run_fedlora(["simulate", "model=tiny_bert", "data=synthetic", "data.num_train=1600",
                 "strategy=fedavg", "federation.rounds=1", f"federation.num_clients={clients}",
                 f"federation.clients_per_round={clients}", "federation.dirichlet_alpha=100",
                 "federation.max_update_norm=1000", f"faults={{{faults}}}",
                 f"hydra.run.dir={run}"], cli=faulty_cli.__name__)
    (row,) = read_metrics(run)  # one round: every kind is sent in it
    rejected = {r["node"]: r["reason"] for r in row["rejected"]}
    for k, kind in enumerate(EXPECTED_REJECTION):
        assert rejected[f"partition-{k}"].startswith(EXPECTED_REJECTION[kind]), (kind, rejected)
    assert len(rejected) == len(EXPECTED_REJECTION)
    lost = {r["node"]: r["reason"] for r in row["lost"]}
    assert list(lost) == [f"partition-{len(EXPECTED_REJECTION)}"]  # the crashed client
    # The two healthy clients were aggregated.
    assert sorted(c["node"] for c in row["clients"]) == [
        f"partition-{clients - 2}", f"partition-{clients - 1}"]
    assert not row["skipped"] and row["accuracy"] is not None
