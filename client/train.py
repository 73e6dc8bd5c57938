"""The local round: exactly ``local_steps`` optimizer steps, plain or DP-SGD (privacy/).

The DP-SGD engine (Opacus, about half of a fresh process's import time) is imported
when a private round runs, not with this module: a deployed node starts a process per
message (client/app.py), and a plain round never needs it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fedlora.task.evaluate import forward, loss_of
from fedlora.task.training import local_batch_size

if TYPE_CHECKING:
    from fedlora.privacy import DPSettings, PrivacyLedger


@dataclass
class LocalResult:
    steps: int
    examples_seen: int
    train_loss: float
    seconds: float
    epsilon: float | None = None


def _to_device(batch, device: torch.device):
    return [t.to(device, non_blocking=True) for t in batch]


def make_optimizer(params: list[nn.Parameter], strategy: Mapping[str, Any]) -> torch.optim.Optimizer:
    """The client optimizer of ``strategy.optimizer`` (adamw or sgd), new every round."""
    lr, decay = float(strategy["lr"]), float(strategy.get("weight_decay", 0.0))
    if strategy.get("optimizer", "adamw") == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=float(strategy.get("momentum", 0.0)),
                               weight_decay=decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=decay)


def train_plain(
    model: nn.Module, dataset: Dataset, strategy: Mapping[str, Any], task: str,
    device: torch.device, generator: torch.Generator,
) -> LocalResult:
    """Non-private local training: shuffled mini-batches, cycling through the data."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, strategy)
    loader = DataLoader(dataset, batch_size=local_batch_size(strategy, len(dataset)), shuffle=True,
                        generator=generator)
    steps, seen, total, start = int(strategy["local_steps"]), 0, 0.0, time.perf_counter()
    done = 0
    while done < steps:
        for batch in loader:
            # No name holds the logits: backward needs only the loss's graph, so the
            # (B, T, vocab) logits of a causal LM are freed before it (620 MB at
            # Qwen2.5's vocabulary, batch 8 x 128), as in a loop that reads .loss.
            loss = loss_of(*forward(model, _to_device(batch, device), task))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item()
            seen += len(batch[0])
            done += 1
            if done == steps:
                break
    return LocalResult(steps, seen, total / steps, time.perf_counter() - start)


def dp_loader(dataset: Dataset, batch_size: int) -> DataLoader:
    """The loader Opacus turns into Poisson sampling with q = batch_size / N_k (batches
    move to the device in forward())."""
    return DataLoader(dataset, batch_size=batch_size)


def train_private(
    model: nn.Module, dataset: Dataset, strategy: Mapping[str, Any], task: str,
    device: torch.device, settings: DPSettings, ledger: PrivacyLedger, round: int,
    epsilon_budget: float, run: str | None = None,
) -> LocalResult:
    """DP-SGD local training through privacy.run_private_round (ledger updated inside).

    Sampling and noise come from a fresh keystream per call (never from a seed): training
    the same round again is a new release with independent noise, charged again."""
    from fedlora.privacy import run_private_round

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, strategy)
    loader = dp_loader(dataset, local_batch_size(strategy, len(dataset)))
    stats = run_private_round(
        model, optimizer, loader,
        lambda m, batch: forward(m, _to_device(batch, device), task),
        settings, ledger, round=round, run=run, epsilon_budget=epsilon_budget,
    )
    return LocalResult(stats.steps, stats.examples_seen, stats.mean_loss, stats.seconds,
                       stats.epsilon)


def gradient_estimate(
    model: nn.Module, weights: dict[str, nn.Linear], dataset: Dataset,
    strategy: Mapping[str, Any], task: str, device: torch.device,
    settings: DPSettings, ledger: PrivacyLedger | None, round: int, run: str | None = None,
) -> dict[str, torch.Tensor]:
    """The init round's (DP when a ledger is given) mean gradient of each target weight
    (e.g. Fed-SB's init); the method's client_init_payload turns it into what goes up."""
    from fedlora.privacy import run_private_gradient_estimate

    loader = dp_loader(dataset, local_batch_size(strategy, len(dataset),
                                                 private=ledger is not None))
    return run_private_gradient_estimate(
        model, weights, loader, lambda m, batch: forward(m, _to_device(batch, device), task),
        settings, ledger, round=round, run=run,
    )
