"""fedlora's apps on a real local deployment: SuperLink + SuperNodes over gRPC with TLS and
SuperNode authentication (`fedlora deploy local`), on loopback.
"""

from __future__ import annotations

import json

import pytest

from .conftest import read_metrics, run_fedlora

pytestmark = pytest.mark.integration
TINY = ["model=tiny_bert", "data=synthetic"]


def test_four_nodes_secure_aggregation_and_node_ledgers_across_runs(tmp_path):
    """Run 1: the four stages of secure aggregation as real messages over TLS + node auth,
    with DP-SGD on the nodes, whose ledgers live on the nodes (nothing on the server).

    Run 1 is calibrated to spend the whole budget in its rounds, so when the nodes are
    started again for run 2 of the same federation they refuse to train ("budget
    exhausted") instead of spending past it.
    """
    ledgers = tmp_path / "node-ledgers"
    args = ["deploy", "local", "--nodes", "4", "--ledger-root", str(ledgers), *TINY,
            "strategy=ffa", "privacy=dp", "privacy.epsilon=3", "run_name=edge-fed"]
    first = tmp_path / "run1"
    proc = run_fedlora([*args, "secure_aggregation=true", "federation.rounds=2",
                        f"hydra.run.dir={first}"])
    assert "TLS + node auth" in proc.stdout + proc.stderr
    rows = read_metrics(first)
    assert [r["round"] for r in rows] == [1, 2]
    assert all(len(r["clients"]) == 4 for r in rows)
    assert all(r["secure_aggregation"]["survivors"] == 4 and r["adapter_bytes_up"] == 0
               for r in rows)
    assert (first / "summary.json").is_file()
    assert (first / "adapter" / "adapter_config.json").is_file()
    files = sorted(ledgers.glob("partition-*/privacy/*.privacy.json"))
    assert len(files) == 4
    assert not (first / "privacy").exists()  # nothing on the server side
    spent = {p: json.loads(p.read_text())["epsilon_spent"] for p in files}
    assert all(0 < e <= 3.0 for e in spent.values())
    assert all(0 < c["epsilon"] <= 3.0 for r in rows for c in r["clients"])

    second = tmp_path / "run2"
    run_fedlora([*args, "federation.rounds=1", "federation.seed=1",
                 f"hydra.run.dir={second}"])
    (row,) = read_metrics(second)
    assert row["skipped"] and not row["clients"]
    assert sorted(r["node"] for r in row["refused"]) == [f"partition-{k}" for k in range(4)]
    assert all("budget exhausted" in r["reason"] for r in row["refused"])
    for path in files:
        ledger = json.loads(path.read_text())
        assert ledger["epsilon_spent"] == spent[path]  # kept, and nothing more spent
        assert len(ledger["rounds"]) == 2
