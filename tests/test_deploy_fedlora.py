"""fedlora's apps on a real local deployment: SuperLink + SuperNodes over gRPC with TLS and
SuperNode authentication (`fedlora deploy local`), on loopback.
"""

from __future__ import annotations

import json

import pytest

from .conftest import read_metrics, run_fedlora

pytestmark = pytest.mark.integration
TINY = ["model=tiny_bert", "data=synthetic"]


def test_deploy_local_four_nodes_secure_aggregation(tmp_path):
    """The four stages of secure aggregation as real messages over TLS + node auth."""
    run = tmp_path / "ffa"
    proc = run_fedlora(["deploy", "local", "--nodes", "4", *TINY, "strategy=ffa",
                        "secure_aggregation=true", "federation.rounds=2",
                        f"hydra.run.dir={run}"])
    assert "TLS + node auth" in proc.stdout + proc.stderr
    rows = read_metrics(run)
    assert [r["round"] for r in rows] == [1, 2]
    assert all(len(r["clients"]) == 4 for r in rows)
    assert all(r["secure_aggregation"]["survivors"] == 4 and r["adapter_bytes_up"] == 0
               for r in rows)
    assert (run / "summary.json").is_file() and (run / "adapter" / "adapter_config.json").is_file()


def test_node_side_ledgers_survive_a_second_run(tmp_path):
    """DP ledgers live on the nodes; a second run of the same federation sees the spend.

    Run 1 is calibrated to spend the whole budget in its rounds, so when the nodes are
    started again for run 2 of the same federation they refuse to train ("budget
    exhausted") instead of spending past it.
    """
    ledgers = tmp_path / "node-ledgers"
    args = ["deploy", "local", "--nodes", "3", "--ledger-root", str(ledgers), *TINY,
            "strategy=fedsvd", "privacy=dp", "privacy.epsilon=3", "run_name=edge-fed"]
    first = tmp_path / "run1"
    run_fedlora([*args, "federation.rounds=2", f"hydra.run.dir={first}"])
    files = sorted(ledgers.glob("partition-*/privacy/*.privacy.json"))
    assert len(files) == 3
    assert not (first / "privacy").exists()  # nothing on the server side
    spent = {p: json.loads(p.read_text())["epsilon_spent"] for p in files}
    assert all(0 < e <= 3.0 for e in spent.values())
    assert [r["round"] for r in read_metrics(first)] == [1, 2]

    second = tmp_path / "run2"
    run_fedlora([*args, "federation.rounds=1", "federation.seed=1",
                 f"hydra.run.dir={second}"])
    (row,) = read_metrics(second)
    assert row["skipped"] and not row["clients"]
    assert sorted(r["node"] for r in row["refused"]) == [f"partition-{k}" for k in range(3)]
    assert all("budget exhausted" in r["reason"] for r in row["refused"])
    for path in files:
        ledger = json.loads(path.read_text())
        assert ledger["epsilon_spent"] == spent[path]  # kept, and nothing more spent
        assert len(ledger["rounds"]) == 2
