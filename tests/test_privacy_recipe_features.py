"""DP training features the recipes rely on: physical batching (BatchMemoryManager) and
secure randomness, on real Opacus rounds."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedlora.privacy import DPSettings, run_private_round
from fedlora.privacy.csprng import SeededRandomness

from .test_privacy_training import ledger_for, make_tiny, sgd, tiny_data, tiny_forward


def _round(tmp_path: Path, node: str, physical: int | None, *, secure: bool = False,
           mode: str = "hooks", seeded: bool = True,
           ) -> tuple[dict[str, torch.Tensor], float, list, int]:
    model = make_tiny()
    loader = tiny_data(60, 12)  # logical batch 12, q = 0.2
    ledger = ledger_for(tmp_path, node=node)
    settings = DPSettings(noise_multiplier=1.1, max_grad_norm=0.5, sample_rate=0.2, steps=6,
                          accountant="rdp", grad_sample_mode=mode,
                          max_physical_batch_size=physical, secure_mode=secure)
    steps: list[int] = []
    stats = run_private_round(model, sgd(model), loader, tiny_forward, settings, ledger,
                              randomness=SeededRandomness(7) if seeded else None, round=1,
                              on_step=lambda s, loss: steps.append(s))
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return weights, stats.epsilon, ledger.history, stats.examples_seen


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_physical_batches_spend_the_same_epsilon_and_train_the_same(tmp_path: Path,
                                                                     mode: str) -> None:
    plain, eps_plain, history_plain, seen_plain = _round(tmp_path, "plain", None, mode=mode)
    split, eps_split, history_split, seen_split = _round(tmp_path, "split", 5, mode=mode)
    # Same logical batches (same sampling seed), same noise draws: the same step.
    assert history_split == history_plain == [(1.1, 0.2, 6)]
    assert eps_split == eps_plain
    assert seen_split == seen_plain > 0
    for name in plain:
        torch.testing.assert_close(split[name], plain[name], rtol=1e-5, atol=1e-6)


def test_physical_batch_of_one_counts_logical_steps(tmp_path: Path) -> None:
    model = make_tiny()
    ledger = ledger_for(tmp_path)
    settings = DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.2, steps=4,
                          accountant="rdp", max_physical_batch_size=1)
    calls: list[int] = []
    stats = run_private_round(model, sgd(model), tiny_data(60, 12), tiny_forward, settings,
                              ledger, randomness=SeededRandomness(1),
                              on_step=lambda s, loss: calls.append(s))
    assert calls == [1, 2, 3, 4] and stats.steps == 4 and ledger.steps == 4


def test_secure_mode_spends_the_same_and_is_not_reproducible(tmp_path: Path) -> None:
    plain, eps_plain, _, _ = _round(tmp_path, "plain", None)
    again, _, _, _ = _round(tmp_path, "again", None)
    first, eps_first, history, _ = _round(tmp_path, "secure-1", None, secure=True, seeded=False)
    second, _, _, _ = _round(tmp_path, "secure-2", None, secure=True, seeded=False)
    fresh, _, _, _ = _round(tmp_path, "fresh", None, seeded=False)
    assert eps_first == eps_plain and history == [(1.1, 0.2, 6)]
    # Only the test stand-in (SeededRandomness) reproduces; every production release draws
    # a fresh keystream, secure_mode or not.
    assert all(torch.equal(plain[k], again[k]) for k in plain)
    assert not torch.equal(first["hidden.weight"], second["hidden.weight"])
    assert not torch.equal(first["hidden.weight"], plain["hidden.weight"])
    assert not torch.equal(fresh["hidden.weight"], plain["hidden.weight"])


def test_bad_physical_batch_setting() -> None:
    with pytest.raises(ValueError, match="max_physical_batch_size"):
        DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.1, steps=1,
                   max_physical_batch_size=0)
