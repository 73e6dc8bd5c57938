"""A short federation on the real default model and data: MiniLM on a BBC News subset."""

from __future__ import annotations

import json

import pytest
import yaml

from .conftest import read_metrics, run_fedlora, tutorial_command

pytestmark = pytest.mark.integration


def test_minilm_on_bbc_news_learns(tmp_path):
    run = tmp_path / "minilm"
    # The default-job tutorial's short run, as the tutorial shows it.
    command = tutorial_command("default-job.md", "fedlora simulate privacy=none")
    run_fedlora([*command, f"hydra.run.dir={run}"])
    rows = read_metrics(run)
    assert [r["round"] for r in rows] == [1, 2]
    assert all(len(r["clients"]) == 3 for r in rows)
    # Five topics: chance is 0.2. Two short rounds already lift the pretrained MiniLM well above.
    assert rows[-1]["accuracy"] > 0.35, rows[-1]["accuracy"]
    # Every client also evaluated the global model on its own data.
    assert all(0.0 <= r["client_accuracy"] <= 1.0 and r["client_loss"] > 0 for r in rows)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["method"] == "ffa" and summary["rounds"] == 2
    config = (run / "adapter" / "adapter_config.json").read_text()
    assert "query" in config and "value" in config
    # MiniLM's head reads the mean-pooled sentence embedding, and the adapter says so.
    assert json.loads((run / "adapter" / "fedlora.json").read_text())["pooling"] == "mean"
    # The exported adapter on build_model's base reproduces the global model's accuracy.
    from peft import PeftModel

    from fedlora.task.data import data_for
    from fedlora.task.evaluate import evaluate
    from fedlora.task.models import build_model

    cfg = yaml.safe_load((run / "config.yaml").read_text())
    data = data_for(cfg)
    model = PeftModel.from_pretrained(build_model(cfg["model"], data.num_labels),
                                      run / "adapter")
    reloaded = evaluate(model, data.test, "classification")["accuracy"]
    assert abs(reloaded - rows[-1]["accuracy"]) <= 1 / len(data.test), reloaded
