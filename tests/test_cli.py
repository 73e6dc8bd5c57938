"""The `fedlora` command's quick subcommands (no federation started)."""

from __future__ import annotations

import json

from .conftest import run_fedlora


def test_methods_lists_every_method_with_its_bytes():
    proc = run_fedlora(["methods", "--json", "--d-out", "64", "--d-in", "32", "--rank", "4"])
    rows = {r["method"]: r for r in json.loads(proc.stdout)}
    assert {"fedavg", "ffa", "flora", "fedsvd", "fedsb"} <= set(rows)
    assert rows["ffa"]["bytes_up"] == 4 * 64 * 4 and rows["ffa"]["trains"] == "B"
    assert rows["fedavg"]["bytes_up"] == 4 * 4 * (64 + 32) and not rows["fedavg"]["exact"]
    assert rows["fedsvd"]["bytes_down"] == 4 * 4 * (64 + 32)
    assert rows["fedsb"]["bytes_up"] == 4 * 4 * 4 and rows["fedsb"]["trains"] == "R"


def test_unknown_command_and_bad_run_dir_fail_clearly(tmp_path):
    proc = run_fedlora(["frobnicate"], check=False)
    assert proc.returncode == 2 and "unknown command 'frobnicate'" in proc.stderr
    proc = run_fedlora(["resume", str(tmp_path)], check=False)
    assert proc.returncode == 2 and "not a fedlora run directory" in proc.stderr
    proc = run_fedlora(["privacy", str(tmp_path)], check=False)
    assert proc.returncode == 1 and "no privacy ledger" in proc.stderr


def test_impossible_data_split_is_a_config_error(tmp_path):
    run = tmp_path / "split"
    proc = run_fedlora(["simulate", "model=tiny_bert", "data=synthetic",
                        "federation.num_clients=100", "federation.clients_per_round=100",
                        "federation.min_client_examples=32", f"hydra.run.dir={run}"], check=False)
    assert proc.returncode == 2
    assert "1200 training examples cannot give 100 clients 32 examples each" in proc.stderr
    assert "federation.num_clients or federation.min_client_examples" in proc.stderr
    assert "Traceback" not in proc.stderr and not (run / "metrics.jsonl").exists()
