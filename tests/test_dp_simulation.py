"""DP-SGD at every client, through the real simulation runtime and real Opacus.

For every method: one ledger per client under RUN_DIR/privacy, every reported epsilon is
at most the target and equals a fresh Opacus replay of that client's ledger, and the
report command prints the guarantee.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedlora.privacy import epsilon_for_history

from .conftest import read_metrics, run_fedlora

pytestmark = pytest.mark.integration
METHODS = ["fedavg", "ffa", "flora", "fedsvd", "fedsb"]
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
        assert row["epsilon_max"] <= EPSILON
        for client in row["clients"]:
            assert client["epsilon"] <= EPSILON
            assert client["delta"] == 1e-5 and client["max_grad_norm"] == 1.0
            assert client["noise_multiplier"] > 0 and 0 < client["sample_rate"] < 1
    # The last round's report is each client's full spend: the replay of its ledger.
    for client in rows[-1]["clients"]:
        assert client["epsilon"] == pytest.approx(final[client["node"]], rel=1e-9)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epsilon_max"] == pytest.approx(max(final.values()), rel=1e-9)
    assert summary["delta"] == 1e-5
    assert (run / "epsilon.png").is_file()


def test_privacy_report_command(dp_sweep):
    proc = run_fedlora(["privacy", str(dp_sweep["ffa"])])
    assert "partition-0" in proc.stdout and "guarantee" in proc.stdout
