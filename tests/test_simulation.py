"""Every method through Flower's real simulation runtime (Ray) on a tiny BERT.

One Hydra multirun (`fedlora simulate -m strategy=...`) runs the five methods; the tests
then check what a user relies on: the run directory's files, the bytes on the wire against
each method's formula, the aggregation error, and the PEFT export giving the global
model's logits.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from fedlora.aggregation import available_methods, get_method

from .conftest import read_metrics, run_fedlora

pytestmark = pytest.mark.integration
METHODS = available_methods()  # every registered method, the newest included
CLIENTS = 4
SHAPE = (32, 32)  # tiny_bert's query and value: d_out x d_in
MODULES = 4  # 2 layers x (query, value)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("sweep")
    proc = run_fedlora(["simulate", "-m", "model=tiny_bert", "data=synthetic",
                        f"strategy={','.join(METHODS)}", "federation.rounds=2",
                        f"federation.num_clients={CLIENTS}",
                        f"federation.clients_per_round={CLIENTS}", f"hydra.sweep.dir={out}"])
    # One Ray session served every job (run_fedlora checked it is stopped at the end).
    kept = re.findall(r"Ray node (\w+) kept for the multirun's next job", proc.stdout)
    assert len(kept) == len(METHODS) and len(set(kept)) == 1, kept
    runs = {}
    for method in METHODS:
        (found,) = out.glob(f"*-{method}")
        runs[method] = found
    return runs


@pytest.mark.parametrize("method", METHODS)
def test_run_directory_holds_every_output(sweep, method):
    run = sweep[method]
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "accuracy.png", "bytes.png",
                 "adapter/adapter_config.json", "adapter/adapter_model.safetensors"):
        assert (run / name).is_file(), name
    rows = read_metrics(run)
    assert [r["round"] for r in rows] == [1, 2]
    for row in rows:
        for key in ("accuracy", "loss", "bytes_up", "bytes_down", "aggregation_error",
                    "wall_seconds", "clients"):
            assert key in row, key
        assert 0.0 <= row["accuracy"] <= 1.0
        assert len(row["clients"]) == CLIENTS
        for client in row["clients"]:
            assert {"node", "examples", "bytes_up", "bytes_down", "train_loss"} <= set(client)
            assert client["examples"] >= 32
    summary = json.loads((run / "summary.json").read_text())
    assert summary["method"] == method and summary["rounds"] == 2
    assert summary["final_accuracy"] == rows[-1]["accuracy"]
    assert summary["best_accuracy"] == max(r["accuracy"] for r in rows)
    assert summary["bytes_up_total"] == sum(r["bytes_up"] for r in rows)
    assert summary["bytes_down_total"] == sum(r["bytes_down"] for r in rows)
    assert summary["wall_seconds"] > 0
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "round-000001", "round-000002"]


@pytest.mark.parametrize("method", METHODS)
def test_bytes_on_the_wire_match_the_formula(sweep, method):
    impl = get_method(method)
    rows = read_metrics(sweep[method])
    for row in rows:
        for client in row["clients"]:
            floats = MODULES * impl.uplink_floats(*SHAPE, client["rank"], round=row["round"])
            assert client["adapter_bytes_up"] == 4 * floats, client
            # The envelope adds the head and a small header, nothing else.
            head = 4 * (4 * 32 + 4)
            assert 0 < client["bytes_up"] - client["adapter_bytes_up"] - head < 1500
        assert row["bytes_up"] == sum(c["bytes_up"] for c in row["clients"])
        assert row["bytes_down"] == sum(c["bytes_down"] for c in row["clients"])
    rank = 16 if method == "fedsb" else 8
    down = 4 * MODULES * impl.downlink_floats(*SHAPE, rank)
    if method in ("fedavg", "ffa", "fedsvd"):
        assert all(r["adapter_bytes_down"] == CLIENTS * down for r in rows)
    if method == "fedsb":  # B and A go down once, then only R
        assert rows[0]["adapter_bytes_down"] == CLIENTS * (down + 4 * MODULES * 2 * 32 * rank)
        assert rows[1]["adapter_bytes_down"] == CLIENTS * down
    if method == "flora":  # nothing merged before round 1; then the exact accumulated delta
        assert rows[0]["adapter_bytes_down"] == 0
        assert rows[1]["adapter_bytes_down"] > 0


def test_only_inexact_methods_report_an_aggregation_error(sweep):
    for method in METHODS:
        impl = get_method(method)
        errors = [r["aggregation_error"] for r in read_metrics(sweep[method])]
        if impl.exact:
            assert errors == [None, None], method
        elif not impl.personalized:  # personalized: the server never sees the whole model
            assert all(e is not None and e > 0 for e in errors), method


@pytest.mark.parametrize("method", METHODS)
def test_peft_export_gives_the_global_model(sweep, method):
    from peft import PeftModel

    from fedlora.server.app import load_job_config
    from fedlora.server.checkpoint import latest_checkpoint, load_checkpoint
    from fedlora.server.evaluation import CentralEvaluator
    from fedlora.task.models import build_model

    run = sweep[method]
    cfg = load_job_config(run / "config.yaml")
    evaluator = CentralEvaluator(cfg)
    state, _ = load_checkpoint(latest_checkpoint(run))
    impl = get_method(method, **dict(cfg["strategy"].get("options") or {}))
    ids, mask, _ = evaluator.data.test.tensors
    with torch.no_grad():
        expected = evaluator.load_global(impl, state)(input_ids=ids[:32],
                                                      attention_mask=mask[:32]).logits
        base = build_model(cfg["model"], evaluator.data.num_labels)
        exported = PeftModel.from_pretrained(base, run / "adapter").eval()
        got = exported(input_ids=ids[:32], attention_mask=mask[:32]).logits
        untouched = build_model(cfg["model"], evaluator.data.num_labels)(
            input_ids=ids[:32], attention_mask=mask[:32]).logits
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()
    # The adapter does change the model (the test would pass trivially otherwise), except
    # for a personalized method, whose global delta is zero by design (base + head).
    if not impl.personalized:
        assert not torch.allclose(untouched, expected, atol=1e-4)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["export_error"] == 0.0


def test_causal_lm_run(tmp_path):
    run = tmp_path / "llama"
    run_fedlora(["simulate", "model=tiny_llama", "data=synthetic", "strategy=ffa",
                 "federation.rounds=2", "federation.num_clients=3",
                 "federation.clients_per_round=3", f"hydra.run.dir={run}"])
    rows = read_metrics(run)
    assert len(rows) == 2 and all(0 <= r["accuracy"] <= 1 for r in rows)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["final_perplexity"] > 1.0
    assert (run / "adapter" / "adapter_model.safetensors").is_file()


def test_invalid_config_fails_before_any_work(tmp_path):
    run = tmp_path / "bad"
    proc = run_fedlora(["simulate", "model=tiny_bert", "data=synthetic", "strategy.rank=0",
                        "federation.clients_per_round=20", f"hydra.run.dir={run}"], check=False)
    assert proc.returncode == 2
    assert "strategy.rank must be >= 1" in proc.stderr
    assert "clients_per_round (20) exceeds federation.num_clients (10)" in proc.stderr
    assert not (run / "metrics.jsonl").exists()
    assert not (run / "checkpoints").exists()
