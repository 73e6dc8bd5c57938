"""fedlora's apps on a real local deployment: SuperLink + SuperNodes over gRPC with TLS and
SuperNode authentication (`fedlora deploy local`), on loopback.
"""

from __future__ import annotations

import json

import pytest

from .conftest import read_metrics, run_fedlora, tutorial_command

pytestmark = pytest.mark.integration
NODES = 3


def test_secure_aggregation_over_tls_with_ledgers_on_the_nodes(tmp_path):
    """The four stages of secure aggregation as real messages over TLS + node auth, with
    DP-SGD on the nodes, whose ledgers live on the nodes (nothing on the server). Three
    nodes and one round: Flower starts a ClientApp process per message, so each node-round
    costs several process starts; the simulation tests cover more rounds, and what a node
    does with a ledger it finds again (refuse when spent or lost) is the same code
    (tests/test_dp_simulation.py)."""
    ledgers = tmp_path / "node-ledgers"
    run = tmp_path / "run"
    # The local-deployment tutorial's own command, with this test's directories.
    command = tutorial_command("local-deployment.md", "fedlora deploy local")
    assert command[:3] == ["deploy", "local", "--nodes"] and int(command[3]) == NODES
    proc = run_fedlora([*command, "--ledger-root", str(ledgers), "run_name=edge-fed",
                        f"hydra.run.dir={run}"])
    assert "TLS + node auth" in proc.stdout + proc.stderr
    (row,) = read_metrics(run)
    assert row["round"] == 1 and len(row["clients"]) == NODES
    assert row["secure_aggregation"]["survivors"] == NODES and row["adapter_bytes_up"] == 0
    assert (run / "summary.json").is_file()
    assert (run / "adapter" / "adapter_config.json").is_file()
    files = sorted(ledgers.glob("partition-*/privacy/*.privacy.json"))
    assert [p.parent.parent.name for p in files] == [f"partition-{k}" for k in range(NODES)]
    assert not (run / "privacy").exists()  # nothing on the server side
    for path in files:
        ledger = json.loads(path.read_text())
        assert [r["round"] for r in ledger["rounds"]] == [1]
        assert 0 < ledger["epsilon_spent"] <= 3.0
    # The nodes release no epsilon (a function of their private sizes); their ledgers,
    # checked above, hold it. Each node pinned its policy in its own key directory.
    assert all("epsilon" not in c for c in row["clients"])
    assert len(sorted(ledgers.glob("partition-*/privacy.keys/policy.json"))) == NODES
