"""The client's local round on real PEFT/Fed-SB adapters, plain and under Opacus DP-SGD.

Guards the known PEFT + Opacus failure where LoRA weights silently never change: for every
method, the roles the method trains (and the head) change after one round, the frozen
roles do not, and a second DP round on the same model works (hooks were removed).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

from fedlora.aggregation import AdapterSpec, available_methods, get_method
from fedlora.client.train import train_plain, train_private
from fedlora.privacy import DPSettings, PrivacyLedger
from fedlora.task.adapters import AdapterHost
from fedlora.task.models import build_model, head_parameter_names, target_module_names

TINY = {"source": "tiny_bert", "task": "classification", "max_length": 16, "hidden_size": 32,
        "num_layers": 2, "num_heads": 2, "vocab_size": 128, "init_seed": 0}
STRATEGY = {"lr": 0.01, "batch_size": 8, "local_steps": 3}
METHODS = available_methods()  # every registered method, plug-ins included


def _setup(name: str, pooling: str = "pooler"):
    model = build_model({**TINY, "pooling": pooling}, 4)
    targets = target_module_names(model, ["query", "value"])
    method = get_method(name)
    kind = method.adapter_layer
    host = AdapterHost(model, targets, head_parameter_names(model, ["classifier"]), kind)
    spec = AdapterSpec(shapes=host.shapes(), rank=4, alpha=8)
    state = method.init_state(spec, host.head_state())
    start = method.client_start(method.downlink(state, first_contact=True), spec, rank=4, seed=1)
    host.start(start, state.head)
    roles = ("A", "B", "R") if kind == "lora_sb" else ("A", "B")
    return host, method, start, roles, state


def _data() -> TensorDataset:
    gen = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randint(0, 128, (64, 16), generator=gen),
                         torch.ones(64, 16, dtype=torch.long),
                         torch.randint(0, 4, (64,), generator=gen))


def _assert_trained(host, before, head_before, start, roles):
    after = host.factors(roles)
    for module in after:
        for role in roles:
            changed = not torch.equal(before[module][role], after[module][role])
            assert changed == (role in start.trainable), (module, role)
    assert any(not torch.equal(head_before[k], v) for k, v in host.head_state().items())


@pytest.mark.parametrize("name", METHODS)
def test_plain_round_trains_exactly_the_method_roles(name):
    host, method, start, roles, _ = _setup(name)
    before, head_before = host.factors(roles), host.head_state()
    result = train_plain(host.model, _data(), STRATEGY, "classification", torch.device("cpu"),
                         torch.Generator().manual_seed(0))
    assert result.steps == 3 and result.examples_seen == 24
    _assert_trained(host, before, head_before, start, roles)


@pytest.mark.parametrize("pooling", ["pooler", "mean"])
@pytest.mark.parametrize("name", METHODS)
def test_dp_round_trains_exactly_the_method_roles_twice(name, pooling, tmp_path):
    host, method, start, roles, state = _setup(name, pooling)
    ledger = PrivacyLedger.open(tmp_path, federation="t", node="0", mechanism="prv",
                                target_epsilon=50.0, delta=1e-3)
    settings = DPSettings(noise_multiplier=0.8, max_grad_norm=1.0, sample_rate=8 / 64, steps=3)
    for round_ in (1, 2):
        host.start(start, state.head)
        before, head_before = host.factors(roles), host.head_state()
        result = train_private(host.model, _data(), STRATEGY, "classification",
                               torch.device("cpu"), settings, ledger, round_, 50.0)
        assert result.steps == 3 and 0 < result.epsilon < 50
        _assert_trained(host, before, head_before, start, roles)
        assert not any(k.startswith("_module.") for k in host.model.state_dict())
    assert [r["round"] for r in ledger.rounds] == [1, 2]


def test_mean_pooling_averages_the_real_tokens_only():
    pooled, plain = build_model({**TINY, "pooling": "mean"}, 4), build_model(TINY, 4)
    # The same adapted modules and head names as the model's own head: the wire is unchanged.
    assert target_module_names(pooled, ["query", "value"]) == \
        target_module_names(plain, ["query", "value"])
    assert head_parameter_names(pooled, ["classifier"]) == ["classifier.weight", "classifier.bias"]
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 128, (3, 10), generator=gen)
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[0, 4:] = 0
    mask[1, 7:] = 0
    logits = pooled(input_ids=ids, attention_mask=mask).logits
    states = pooled.bert(input_ids=ids, attention_mask=mask).last_hidden_state
    by_hand = torch.stack([states[i, : int(mask[i].sum())].mean(0) for i in range(3)])
    torch.testing.assert_close(logits, pooled.classifier(by_hand))
    other = ids.clone()
    other[mask == 0] = 5  # what sits under the padding does not change the prediction
    torch.testing.assert_close(pooled(input_ids=other, attention_mask=mask).logits, logits)
