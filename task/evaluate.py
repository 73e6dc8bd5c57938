"""The forward pass shared by training and evaluation, and held-out evaluation.

``forward`` returns (logits, targets) so one cross-entropy serves both tasks:
classification (one label per sequence) and causal LM (next token, padding = -100;
the logits keep every position, the targets are the labels shifted left).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset


def forward(model: nn.Module, batch, task: str) -> tuple[torch.Tensor, torch.Tensor]:
    input_ids, attention_mask, labels = batch
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    if task == "causal_lm":
        # Position t predicts token t + 1. The labels move left (the last position then
        # predicts nothing: -100) instead of the logits right: a slice of the (B, T,
        # vocab) logits would be copied by the loss's reshape, and its gradient again in
        # backward (at Qwen2.5's vocabulary, batch 8 x 128: 620 MB each).
        return logits, nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    return logits, labels


def loss_of(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100
    )


@torch.no_grad()
def evaluate(
    model: nn.Module, dataset: Dataset, task: str, *, batch_size: int = 64,
    device: torch.device | None = None,
) -> dict[str, float]:
    """Mean loss and accuracy (next-token accuracy for causal LM) over a dataset."""
    was_training = model.training
    model.eval()
    total_loss, correct, count = 0.0, 0, 0
    for batch in DataLoader(dataset, batch_size=batch_size):
        if device is not None:
            batch = [t.to(device) for t in batch]
        logits, targets = forward(model, batch, task)
        flat_logits = logits.reshape(-1, logits.shape[-1]).float()
        flat_targets = targets.reshape(-1)
        keep = flat_targets != -100
        total_loss += nn.functional.cross_entropy(
            flat_logits[keep], flat_targets[keep], reduction="sum"
        ).item()
        correct += (flat_logits[keep].argmax(-1) == flat_targets[keep]).sum().item()
        count += int(keep.sum())
    model.train(was_training)
    loss = total_loss / max(count, 1)
    result = {"loss": loss, "accuracy": correct / max(count, 1), "examples": float(len(dataset))}
    if task == "causal_lm":
        result["perplexity"] = math.exp(min(loss, 50.0))
    return result
