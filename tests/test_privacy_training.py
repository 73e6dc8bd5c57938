"""Private rounds and the private gradient estimate on small real models (privacy/)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedlora.privacy import (
    BudgetExhausted,
    DPSettings,
    PrivacyLedger,
    calibrate_noise_multiplier,
    run_private_gradient_estimate,
    run_private_round,
)
from fedlora.privacy.common import per_sample_loss
from fedlora.privacy.csprng import SeededRandomness

VOCAB, DIM, CLASSES, SEQ = 50, 8, 3, 6


class TinyNet(nn.Module):
    """Frozen embedding + two linears; token-level logits when ``tokens`` is set."""

    def __init__(self, tokens: bool = False) -> None:
        super().__init__()
        self.tokens = tokens
        self.emb = nn.Embedding(VOCAB, DIM)
        self.emb.weight.requires_grad_(False)
        self.hidden = nn.Linear(DIM, DIM)
        self.head = nn.Linear(DIM, CLASSES)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.hidden(self.emb(ids)))
        return self.head(h if self.tokens else h.mean(dim=1))


def tiny_forward(model: nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor]:
    ids, labels = batch
    return model(ids), labels


def tiny_data(n: int, batch_size: int, tokens: bool = False, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)
    if tokens:
        labels = torch.randint(0, CLASSES, (n, SEQ), generator=g)
        labels[:, :2] = -100  # e.g. prompt tokens, ignored
        labels[0] = -100  # a sequence with nothing to predict
    else:
        labels = torch.randint(0, CLASSES, (n,), generator=g)
    return DataLoader(TensorDataset(ids, labels), batch_size=batch_size)


def make_tiny(tokens: bool = False) -> nn.Module:
    torch.manual_seed(0)
    return TinyNet(tokens).train()


def ledger_for(tmp_path: Path, mechanism: str = "rdp", target: float = 50.0, node: str = "n0",
               delta: float = 1e-3) -> PrivacyLedger:
    return PrivacyLedger.open(tmp_path, federation="fed", node=node, mechanism=mechanism,
                              target_epsilon=target, delta=delta)


def sgd(model: nn.Module, lr: float = 0.1) -> torch.optim.Optimizer:
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_no_opacus_left(model: nn.Module, hooks_before: int) -> None:
    assert not hasattr(model, "autograd_grad_sample_hooks")
    hooks = sum(len(m._forward_hooks) + len(m._backward_hooks) for m in model.modules())
    assert hooks == hooks_before
    for m in model.modules():
        assert not hasattr(m, "activations") and not hasattr(m, "max_batch_len")
    for p in model.parameters():
        assert not hasattr(p, "grad_sample") and not hasattr(p, "_forward_counter")
        assert not hasattr(p, "summed_grad") and p.grad is None


def count_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._backward_hooks) for m in model.modules())


# -- tiny BERT + PEFT LoRA ------------------------------------------------------------

def make_bert_lora(device: str = "cpu") -> nn.Module:
    import peft
    import transformers
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=32, num_labels=3,
    )
    model = transformers.BertForSequenceClassification(config).to(device)
    # get_peft_model after the model is on its device (the PEFT + Opacus no-update trap).
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                           modules_to_save=["classifier"])
    return peft.get_peft_model(model, lora).train()


def bert_data(n: int = 40, batch_size: int = 8) -> DataLoader:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (n, 12), generator=g)
    mask = torch.ones(n, 12, dtype=torch.long)
    mask[::3, 8:] = 0
    labels = torch.randint(0, 3, (n,), generator=g)
    return DataLoader(TensorDataset(ids, mask, labels), batch_size=batch_size)


def bert_forward(model: nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor]:
    device = next(model.parameters()).device
    ids, mask, labels = (t.to(device) for t in batch)
    return model(input_ids=ids, attention_mask=mask).logits, labels


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_bert_lora_round_updates_lora_only_and_can_repeat(
    tmp_path: Path, mode: str, device: str
) -> None:
    model = make_bert_lora(device)
    loader = bert_data()
    keys = list(model.state_dict())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trainable) and any("classifier" in n for n in trainable)
    hooks_before = count_hooks(model)
    ledger = ledger_for(tmp_path)
    settings = DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=8 / 40, steps=2,
                          accountant="rdp", grad_sample_mode=mode)
    for round_ in (1, 2):  # a second round on the same module: hooks were removed
        before = dict(model.named_parameters())
        before = {n: p.detach().clone() for n, p in before.items()}
        stats = run_private_round(model, sgd(model), loader, bert_forward, settings, ledger,
                                  round=round_, randomness=SeededRandomness(round_))
        after = dict(model.named_parameters())
        for name, p in after.items():
            changed = not torch.equal(before[name], p.detach())
            assert changed == (name in trainable), name
        assert stats.steps == 2 and stats.epsilon == ledger.epsilon_spent
        assert_no_opacus_left(model, hooks_before)
        assert list(model.state_dict()) == keys
        assert not any(k.startswith("_module.") or "._module." in k for k in keys)
    assert ledger.history == [(1.0, 0.2, 4)]
    assert [r["round"] for r in ledger.rounds] == [1, 2]


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_tiny_llama_causal_lm_round(tmp_path: Path, mode: str) -> None:
    """Token-level targets through a real causal LM: shifted logits, ignored prompt."""
    import peft
    import transformers
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
    )
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                           task_type="CAUSAL_LM")
    model = peft.get_peft_model(transformers.LlamaForCausalLM(config), lora).train()
    ids = torch.randint(0, 64, (20, 10), generator=torch.Generator().manual_seed(2))
    labels = ids.clone()
    labels[:, :3] = -100
    loader = DataLoader(TensorDataset(ids, labels), batch_size=5)

    def forward(model: nn.Module, batch):
        ids, labels = batch
        return model(input_ids=ids).logits[:, :-1, :], labels[:, 1:]

    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    settings = DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.25, steps=2,
                          accountant="rdp", grad_sample_mode=mode)
    stats = run_private_round(model, sgd(model), loader, forward, settings, ledger_for(tmp_path),
                              randomness=SeededRandomness(0))
    assert stats.steps == 2 and stats.mean_loss == stats.mean_loss  # finite loss
    assert all(not torch.equal(p, dict(model.named_parameters())[n]) for n, p in before.items())


def test_tiny_round_exact_steps_and_frozen_embedding(tmp_path: Path) -> None:
    model = make_tiny()
    emb = model.emb.weight.detach().clone()
    trained = [model.hidden.weight.detach().clone(), model.head.weight.detach().clone()]
    # b = 3 does not divide N = 10: q must be exactly 0.3, not 1 / ceil(10 / 3).
    loader = tiny_data(10, 3)
    ledger = ledger_for(tmp_path)
    calls: list[tuple[int, float]] = []
    settings = DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.3, steps=7,
                          accountant="rdp")
    stats = run_private_round(model, sgd(model), loader, tiny_forward, settings, ledger,
                              round=3, on_step=lambda s, loss: calls.append((s, loss)))
    assert [s for s, _ in calls] == list(range(1, 8))  # re-iterated past one pass (3 batches)
    assert stats.steps == 7 and stats.examples_seen >= 0
    assert ledger.history == [(1.0, 0.3, 7)]
    assert torch.equal(model.emb.weight, emb)
    assert not torch.equal(model.hidden.weight, trained[0])
    assert not torch.equal(model.head.weight, trained[1])


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_empty_poisson_batches_and_token_targets(tmp_path: Path, mode: str) -> None:
    model = make_tiny(tokens=True)
    loader = tiny_data(50, 1, tokens=True)  # q = 0.02: most Poisson batches are empty
    ledger = ledger_for(tmp_path, target=500.0)
    settings = DPSettings(noise_multiplier=0.8, max_grad_norm=1.0, sample_rate=0.02, steps=12,
                          accountant="rdp", grad_sample_mode=mode)
    seen: list[float] = []
    stats = run_private_round(model, sgd(model), loader, tiny_forward, settings, ledger,
                              randomness=SeededRandomness(0),
                              on_step=lambda s, loss: seen.append(loss))
    assert stats.steps == 12 and len(seen) == 12
    assert any(loss != loss for loss in seen)  # NaN marks an empty batch
    assert ledger.steps == 12


def test_budget_refusal_touches_nothing(tmp_path: Path) -> None:
    model = make_tiny()
    loader = tiny_data(20, 4)
    ledger = ledger_for(tmp_path, target=1.0)
    ledger.record(0.8, 0.2, 10, round=1)  # already over 1.0
    file_before = ledger.path.read_bytes()
    weights = snapshot(model)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.1)
    settings = DPSettings(noise_multiplier=0.8, max_grad_norm=1.0, sample_rate=0.2, steps=5,
                          accountant="rdp")
    with pytest.raises(BudgetExhausted) as info:
        run_private_round(model, optimizer, loader, tiny_forward, settings, ledger, round=2)
    assert info.value.epsilon_after > info.value.budget == 1.0
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())
    assert ledger.path.read_bytes() == file_before and ledger.steps == 10
    assert optimizer.state_dict()["state"] == {}
    # A node-side budget below the ledger's target also refuses.
    roomy = ledger_for(tmp_path, node="n1", target=50.0)
    with pytest.raises(BudgetExhausted):
        run_private_round(model, optimizer, loader, tiny_forward, settings, roomy,
                          epsilon_budget=0.01)
    assert roomy.steps == 0


def test_failure_mid_round_restores_weights_and_records_nothing(tmp_path: Path) -> None:
    model = make_tiny()
    loader = tiny_data(20, 4)
    ledger = ledger_for(tmp_path)
    weights = snapshot(model)
    settings = DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.2, steps=4,
                          accountant="rdp")
    calls = {"n": 0}

    def flaky(model: nn.Module, batch):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("device lost")
        return tiny_forward(model, batch)

    hooks_before = count_hooks(model)
    with pytest.raises(RuntimeError, match="device lost"):
        run_private_round(model, sgd(model), loader, flaky, settings, ledger)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())
    assert ledger.steps == 0 and json.loads(ledger.path.read_text())["history"] == []
    assert_no_opacus_left(model, hooks_before)
    run_private_round(model, sgd(model), loader, tiny_forward, settings, ledger)  # works again
    assert ledger.steps == 4


def test_round_input_checks(tmp_path: Path) -> None:
    model = make_tiny()
    ledger = ledger_for(tmp_path)
    ok = DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.2, steps=1,
                    accountant="rdp")
    with pytest.raises(ValueError, match="sample_rate"):
        run_private_round(model, sgd(model), tiny_data(20, 5), tiny_forward, ok, ledger)
    with pytest.raises(ValueError, match="accountant"):
        prv = DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.2, steps=1)
        run_private_round(model, sgd(model), tiny_data(20, 4), tiny_forward, prv, ledger)
    model.eval()
    with pytest.raises(ValueError, match="train"):
        run_private_round(model, sgd(model), tiny_data(20, 4), tiny_forward, ok, ledger)
    with pytest.raises(ValueError):
        DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.2, steps=1,
                   grad_sample_mode="magic")
    assert ledger.steps == 0


def test_federation_wide_sigma_keeps_budget_per_round_calibration_does_not(tmp_path: Path) -> None:
    """T = 5 real rounds of tau = 4 steps, PRV: calibrate once for the federation (ends at
    or below the target) versus per round, as make_private_with_epsilon does every round
    (ends above it)."""
    target, delta, rounds, tau = 1.0, 1e-3, 5, 4
    loader = tiny_data(50, 10)  # q = 0.2
    q = 0.2
    once = calibrate_noise_multiplier(target, delta, q, tau * rounds, "prv")
    per_round = calibrate_noise_multiplier(target, delta, q, tau, "prv")
    assert per_round < once
    results = {}
    for name, sigma in (("federation", once), ("per_round", per_round)):
        model = make_tiny()
        ledger = PrivacyLedger.open(tmp_path, federation=name, node="n0", mechanism="prv",
                                    target_epsilon=target, delta=delta)
        settings = DPSettings(noise_multiplier=sigma, max_grad_norm=1.0, sample_rate=q,
                              steps=tau, accountant="prv")
        for r in range(1, rounds + 1):
            try:
                run_private_round(model, sgd(model), loader, tiny_forward, settings, ledger,
                                  round=r)
            except BudgetExhausted:
                # The ledger refuses the trap's rounds; account what they would have spent.
                ledger.record(sigma, q, tau, round=r)
        results[name] = ledger.epsilon_spent
    assert target - 0.05 <= results["federation"] <= target
    assert results["per_round"] > 1.5 * target


def test_per_sample_loss() -> None:
    logits = torch.randn(3, 4, 5)
    targets = torch.randint(0, 5, (3, 4))
    targets[1, :2] = -100
    targets[2] = -100
    got = per_sample_loss(logits, targets)
    for i in range(3):
        keep = targets[i] != -100
        want = F.cross_entropy(logits[i][keep], targets[i][keep]) if keep.any() else 0.0
        assert float(got[i]) == pytest.approx(float(want), abs=1e-6)
    flat = per_sample_loss(logits[:, 0], targets[:, 0].clamp(min=0))
    assert torch.allclose(flat, F.cross_entropy(logits[:, 0], targets[:, 0].clamp(min=0),
                                                reduction="none"))
    assert per_sample_loss(logits[:0], targets[:0]).shape == (0,)
    with pytest.raises(ValueError):
        per_sample_loss(logits, targets[:, :2])


# -- Fed-SB init: the private gradient estimate ---------------------------------------

def frozen_tiny(tokens: bool = False) -> TinyNet:
    model = make_tiny(tokens)
    for p in model.parameters():
        p.requires_grad_(False)
    model.head.bias.requires_grad_(True)  # something else trainable, to be left alone
    return model


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_gradient_estimate_without_noise_is_the_plain_mean(mode: str) -> None:
    model = frozen_tiny(tokens=True)
    loader = tiny_data(12, 6, tokens=True)  # two equal batches, in order
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    weights = {"hidden": model.hidden, "head": model.head}
    hooks_before = count_hooks(model)
    settings = DPSettings(noise_multiplier=0.0, max_grad_norm=1e12, sample_rate=0.5, steps=2,
                          grad_sample_mode=mode)
    got = run_private_gradient_estimate(model, weights, loader, tiny_forward, settings, None)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags  # restored
    assert count_hooks(model) == hooks_before and model.training
    assert not hasattr(model.hidden.weight, "grad_sample") and model.hidden.weight.grad is None
    for p in model.parameters():
        p.requires_grad_(True)
    ids, labels = loader.dataset.tensors
    halves = [per_sample_loss(*tiny_forward(model, (ids[i:i + 6], labels[i:i + 6]))).mean()
              for i in (0, 6)]
    want = torch.autograd.grad(sum(halves) / 2, [model.hidden.weight, model.head.weight])
    assert torch.allclose(got["hidden"], want[0], atol=1e-6)
    assert torch.allclose(got["head"], want[1], atol=1e-6)


def test_gradient_estimate_clips_and_both_modes_agree() -> None:
    clip = 1e-3
    results = {}
    for mode in ("hooks", "ghost"):
        model = frozen_tiny()
        weights = {"hidden": model.hidden, "head": model.head}
        settings = DPSettings(noise_multiplier=0.0, max_grad_norm=clip, sample_rate=0.5,
                              steps=2, grad_sample_mode=mode)
        results[mode] = run_private_gradient_estimate(model, weights, tiny_data(12, 6),
                                                      tiny_forward, settings, None)
    norm = torch.cat([g.flatten() for g in results["hooks"].values()]).norm()
    assert norm <= clip * (1 + 1e-5)  # a mean of vectors of norm <= C
    for name in results["hooks"]:
        assert torch.allclose(results["hooks"][name], results["ghost"][name], rtol=1e-4,
                              atol=1e-10)
    model = frozen_tiny()
    unclipped = run_private_gradient_estimate(
        model, {"hidden": model.hidden, "head": model.head}, tiny_data(12, 6), tiny_forward,
        DPSettings(noise_multiplier=0.0, max_grad_norm=1e12, sample_rate=0.5, steps=2), None,
    )
    assert torch.cat([g.flatten() for g in unclipped.values()]).norm() > 10 * clip


def test_private_gradient_estimate_records_steps(tmp_path: Path) -> None:
    model = frozen_tiny()
    model.eval()
    ledger = ledger_for(tmp_path)
    weights = {"hidden": model.hidden, "head": model.head}
    settings = DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.25, steps=3,
                          accountant="rdp")
    grads = run_private_gradient_estimate(model, weights, tiny_data(20, 5), tiny_forward,
                                          settings, ledger, round=0,
                                          randomness=SeededRandomness(0))
    assert grads["hidden"].shape == (DIM, DIM) and grads["head"].shape == (CLASSES, DIM)
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert ledger.history == [(1.0, 0.25, 3)] and ledger.has_round(0)
    assert not model.training  # mode restored
    assert not model.hidden.weight.requires_grad and model.head.bias.requires_grad
    # Exhausted budget: refused before anything runs.
    tight = ledger_for(tmp_path, node="tight", target=0.01)
    with pytest.raises(BudgetExhausted):
        run_private_gradient_estimate(model, weights, tiny_data(20, 5), tiny_forward, settings,
                                      tight)
    assert tight.steps == 0


def test_private_gradient_estimate_on_bert_base_layers(tmp_path: Path) -> None:
    model = make_bert_lora()
    weights = {n: m for n, m in model.named_modules() if n.endswith("value.base_layer")}
    assert len(weights) == 2
    lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    ledger = ledger_for(tmp_path)
    settings = DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.2, steps=2,
                          accountant="rdp")
    grads = run_private_gradient_estimate(model, weights, bert_data(), bert_forward, settings,
                                          ledger, round=0)
    assert {n: g.shape for n, g in grads.items()} == {n: (32, 32) for n in weights}
    assert ledger.steps == 2
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(lora_before)
    assert not any(m.weight.requires_grad for m in weights.values())
