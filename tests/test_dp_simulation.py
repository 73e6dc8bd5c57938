"""DP-SGD at every client, through the real simulation runtime and real Opacus.

For every method: one ledger per client under RUN_DIR/privacy, every reported epsilon is
at most the target and equals a fresh Opacus replay of that client's ledger, and the
report command prints the guarantee.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from fedlora.privacy import epsilon_for_history

from .conftest import read_metrics, run_fedlora

pytestmark = pytest.mark.integration
# The client's DP path is method-agnostic; these cover one trained factor in a fixed basis,
# adapters re-initialized every round, and an init round that is itself accounted.
METHODS = ["ffa", "flora", "fedsb"]
CLIENTS = 3
EPSILON = 2.0


@pytest.fixture(scope="module")
def dp_sweep(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("dp")
    run_fedlora(["simulate", "-m", "model=tiny_bert", "data=synthetic",
                 f"strategy={','.join(METHODS)}", "privacy=dp", f"privacy.epsilon={EPSILON}",
                 "federation.rounds=3", f"federation.num_clients={CLIENTS}",
                 f"federation.clients_per_round={CLIENTS}", f"hydra.sweep.dir={out}"])
    return {m: next(out.glob(f"*-{m}")) for m in METHODS}


@pytest.mark.parametrize("method", METHODS)
def test_reported_epsilon_is_within_budget_and_equals_the_ledger(dp_sweep, method):
    run = dp_sweep[method]
    ledgers = sorted((run / "privacy").glob("*.privacy.json"))
    assert len(ledgers) == CLIENTS
    final = {}
    for path in ledgers:
        ledger = json.loads(path.read_text())
        assert ledger["mechanism"] == "prv" and ledger["delta"] == 1e-5
        replay = epsilon_for_history([tuple(h) for h in ledger["history"]], ledger["delta"],
                                     ledger["mechanism"])
        assert replay == pytest.approx(ledger["epsilon_spent"], rel=1e-9)
        assert 0 < replay <= EPSILON
        final[ledger["node"]] = replay
    rows = read_metrics(run)
    assert len(rows) == 3
    for row in rows:
        assert row["epsilon_max"] <= EPSILON  # the simulation reads its nodes' ledgers
        for client in row["clients"]:
            # Released under DP: only public figures (task/release.py); epsilon is a
            # function of q = b / N_k and leaves only with a declared size.
            assert "epsilon" not in client
            assert client["delta"] == 1e-5 and client["max_grad_norm"] == 1.0
            assert client["examples"] is None and "train_loss" not in client
            assert "noise_multiplier" not in client and "sample_rate" not in client
    # The last round's figure is the largest full spend: the replay of the ledgers.
    assert rows[-1]["epsilon_max"] == pytest.approx(max(final.values()), rel=1e-9)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epsilon_max"] == pytest.approx(max(final.values()), rel=1e-9)
    assert summary["epsilon_replay_max"] == pytest.approx(max(final.values()), rel=1e-9)
    assert summary["delta"] == 1e-5
    statement = summary["privacy_statement"]
    assert "add/remove one training example" in statement["adjacency"]
    assert "training loss (node log only)" in statement["withheld"]
    assert (run / "epsilon.png").is_file()


def test_privacy_report_command(dp_sweep):
    proc = run_fedlora(["privacy", str(dp_sweep["ffa"])])
    assert "partition-0" in proc.stdout and "guarantee" in proc.stdout
    assert "adjacency: add/remove one training example" in proc.stdout
    assert "withheld: training loss" in proc.stdout


def test_lost_and_exhausted_ledgers_refuse_and_a_fresh_node_trains(dp_sweep, tmp_path):
    """A second run of the ffa federation above (its run_name, its node ledgers, the same
    epsilon) after node 0 lost its ledger and node 2 was replaced by a node that never
    trained: node 0 refuses (it must not restart from zero), node 1 refuses (its budget
    was spent in the first run), node 2 trains."""
    ledgers, keys = tmp_path / "ledgers", tmp_path / "node-keys"
    shutil.copytree(dp_sweep["ffa"] / "privacy", ledgers)
    shutil.copytree(dp_sweep["ffa"] / "node-keys", keys)  # apart from the ledgers
    (lost,) = ledgers.glob("*partition-0*.privacy.json")
    assert (keys / "partition-0" / f"{lost.name}.exists").is_file()
    lost.unlink()  # e.g. a container restarted without its ledger volume
    (fresh,) = ledgers.glob("*partition-2*.privacy.json")
    shutil.rmtree(keys / "partition-2")  # a new node: neither keys nor ledger
    fresh.unlink()
    (spent,) = ledgers.glob("*partition-1*.privacy.json")
    before = json.loads(spent.read_text())
    run_fedlora(["simulate", "model=tiny_bert", "data=synthetic", "strategy=ffa", "privacy=dp",
                 f"privacy.ledger_dir={ledgers}", "run_name=ffa-synthetic",
                 f"federation.num_clients={CLIENTS}", f"federation.clients_per_round={CLIENTS}",
                 "federation.min_clients=1", f"privacy.epsilon={EPSILON}", "federation.rounds=1",
                 f"hydra.run.dir={tmp_path / 'run2'}"])
    (row,) = read_metrics(tmp_path / "run2")
    refused = {r["node"]: r["reason"] for r in row["refused"]}
    assert sorted(refused) == ["partition-0", "partition-1"]
    assert refused == {"partition-0": "ledger-missing", "partition-1": "budget-exhausted"}
    assert [c["node"] for c in row["clients"]] == ["partition-2"] and not row["skipped"]
    assert not lost.exists()  # nothing restarted the budget from zero
    after = json.loads(spent.read_text())
    assert after["epsilon_spent"] == before["epsilon_spent"]  # kept, nothing more spent
    assert after["rounds"] == before["rounds"]
    assert 0 < json.loads(fresh.read_text())["epsilon_spent"] <= EPSILON
