"""The contract on a real model (tiny_bert): PEFT export and the DP ledger, per method.

What a user relies on: the PEFT adapter directory the server exports loads with PEFT into
the same model the server evaluates (identical logits), and a private client round records
a ledger whose accountant replay is exactly the epsilon the round reported. The 2-round
simulation of every registered method is tests/test_simulation.py's sweep (it runs
``available_methods()``, so the contract suite does not pay for a second one).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import TensorDataset

from fedlora.aggregation import AdapterSpec, Method
from fedlora.privacy import DPSettings, PrivacyLedger

from .helpers import train

pytestmark = pytest.mark.integration

TINY = {"source": "tiny_bert", "task": "classification", "max_length": 16, "hidden_size": 32,
        "num_layers": 2, "num_heads": 2, "vocab_size": 128, "init_seed": 0, "pooling": "pooler"}
STRATEGY = {"lr": 0.01, "batch_size": 8, "local_steps": 3}


@pytest.fixture(scope="module")
def evaluator() -> Any:
    """The server's evaluator of a tiny_bert job (its export path and merged global model)."""
    from fedlora.server.evaluation import CentralEvaluator
    from fedlora.task.config import compose_job

    return CentralEvaluator(compose_job(["model=tiny_bert", "data=synthetic", "privacy=none"]))


def test_peft_export_reproduces_the_global_model(method: Method, evaluator: Any,
                                                 tmp_path: Path) -> None:
    from peft import PeftModel

    from fedlora.task.models import build_model

    base_spec = evaluator.spec()
    spec = AdapterSpec(dict(base_spec.shapes), rank=4, alpha=8, seed=base_spec.seed)
    state = method.init_state(spec, evaluator.initial_head)
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        head = {k: v + 0.05 * torch.randn(v.shape, generator=gen)
                for k, v in evaluator.initial_head.items()}
        updates = [train(method, state, spec, gen, n=4 + k, rank=(2, 4)[k], seed=k,
                         head=head, step=0.05) for k in range(2)]
        state = method.aggregate(state, updates)
    evaluator.export(method, state, tmp_path / "adapter")
    ids, mask, _ = evaluator.data.test.tensors
    batch = {"input_ids": ids[:16], "attention_mask": mask[:16]}
    with torch.no_grad():
        expected = evaluator.load_global(method, state)(**batch).logits
        base = build_model(evaluator.cfg["model"], evaluator.data.num_labels)
        got = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()(**batch).logits
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
    if not method.personalized:  # a personalized method's global delta is zero by design
        assert any(float(method.delta(state, m)[0].abs().sum()) > 0 for m in spec.shapes)


def _data() -> TensorDataset:
    gen = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randint(0, 128, (64, 16), generator=gen),
                         torch.ones(64, 16, dtype=torch.long),
                         torch.randint(0, 4, (64,), generator=gen))


def test_private_round_ledger_replays_to_the_reported_epsilon(method: Method,
                                                              tmp_path: Path) -> None:
    """One DP-SGD client round (client/train.py train_private -> run_private_round) on the
    method's adapter: the ledger on disk replays (a fresh Opacus accountant) to the epsilon
    the round reported, which is what the ledger file and its round log record."""
    from opacus.accountants import create_accountant

    from fedlora.client.train import train_private
    from fedlora.task.adapters import AdapterHost
    from fedlora.task.models import build_model, head_parameter_names, target_module_names

    model = build_model(TINY, 4)
    host = AdapterHost(model, target_module_names(model, ["query", "value"]),
                       head_parameter_names(model, ["classifier"]), method.adapter_layer)
    spec = AdapterSpec(shapes=host.shapes(), rank=4, alpha=8)
    state = method.init_state(spec, host.head_state())
    rank = spec.rank if method.per_client_rank else None
    start = method.client_start(method.downlink(state, first_contact=True, rank=rank), spec,
                                rank=rank, seed=1, round=1)
    host.start(start, state.head)
    ledger = PrivacyLedger.open(tmp_path, federation="contract", node="0", mechanism="prv",
                                target_epsilon=50.0, delta=1e-3)
    settings = DPSettings(noise_multiplier=0.8, max_grad_norm=1.0, sample_rate=8 / 64, steps=3)
    result = train_private(host.model, _data(), STRATEGY, "classification", torch.device("cpu"),
                           settings, ledger, 1, 50.0)
    assert result.steps == 3 and 0 < result.epsilon < 50
    data = json.loads(ledger.path.read_text())
    # A fresh Opacus accountant, outside fedlora (whose replay is cached), on the file alone.
    accountant = create_accountant(mechanism=data["mechanism"])
    accountant.history = [tuple(e) for e in data["history"]]
    replayed = float(accountant.get_epsilon(delta=data["delta"]))
    assert math.isclose(replayed, result.epsilon, rel_tol=1e-9)
    assert math.isclose(data["epsilon_spent"], replayed, rel_tol=1e-9)
    assert math.isclose(data["rounds"][-1]["epsilon_after"], replayed, rel_tol=1e-9)
    assert sum(steps for _, _, steps in data["history"]) == 3
    assert math.isclose(PrivacyLedger.load(ledger.path).epsilon_spent, replayed, rel_tol=1e-9)
