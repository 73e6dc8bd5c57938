"""Fed-SB's LoRA-SB init under DP: a private estimate of full-weight gradients.

Each client estimates G = dL/dW of every target (frozen) nn.Linear weight on
``settings.steps`` Poisson batches. Per batch: per-example gradients of all target
weights, each example's joint norm clipped to C, summed, N(0, (sigma C)^2) noise added,
divided by the expected batch b = q N. The estimate is the mean over the batches. This is
a DP-SGD step whose optimizer is never stepped, so the ledger records (sigma, q, steps)
exactly like a training round.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from opacus.grad_sample import GradSampleHooks, GradSampleHooksFastGradientClipping
from torch import Tensor, nn
from torch.utils.data import DataLoader

from .common import (
    batch_rows,
    check_loader,
    cycle,
    keystream_noise,
    per_sample_loss,
    poisson_loader,
    quiet_hooks,
    scrub_opacus,
)
from .csprng import Csprng, Randomness
from .dpsgd import DPSettings
from .ledger import PrivacyLedger


def _check_weights(model: nn.Module, weights: Mapping[str, nn.Linear]) -> list[nn.Parameter]:
    if not weights:
        raise ValueError("weights is empty: name the nn.Linear modules to estimate")
    in_model = {id(p) for p in model.parameters()}
    params = []
    for name, linear in weights.items():
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"weights[{name!r}] must be an nn.Linear, got {type(linear).__name__}")
        if id(linear.weight) not in in_model:
            raise ValueError(f"weights[{name!r}] is not a module of the model")
        params.append(linear.weight)
    if len({id(p) for p in params}) != len(params):
        raise ValueError("weights names the same nn.Linear twice")
    return params


def run_private_gradient_estimate(
    model: nn.Module,
    weights: dict[str, nn.Linear],
    data_loader: DataLoader,
    forward: Callable[[nn.Module, Any], tuple[Tensor, Tensor]],
    settings: DPSettings,
    ledger: PrivacyLedger | None,
    *,
    round: int | None = None,
    run: str | None = None,
    randomness: Randomness | None = None,
) -> dict[str, Tensor]:
    """Estimate dL/dW for each ``weights[name].weight``; returns name -> (d_out, d_in).

    With a ledger: DP as described in the module docstring; the budget is checked first
    (:class:`BudgetExhausted`, nothing touched) and the steps are recorded after. Without
    a ledger and with ``noise_multiplier == 0`` it is the plain mean gradient over
    ``settings.steps`` batches of ``data_loader`` as given (per-example clipping at C
    still applies; pass a huge C for none). Without a ledger but with noise it runs the DP
    estimate and records nothing (the caller accounts). Every parameter's
    ``requires_grad``, the model's train/eval mode and its hooks are restored afterwards.
    """
    if not isinstance(settings, DPSettings):
        raise TypeError(f"settings must be DPSettings, got {type(settings).__name__}")
    settings.__post_init__()
    sigma, clip = settings.noise_multiplier, settings.max_grad_norm
    q, steps = settings.sample_rate, settings.steps
    private = ledger is not None or sigma > 0
    if private and not math.isfinite(clip):
        raise ValueError("max_grad_norm must be finite for a DP estimate (noise std is sigma * C)")
    if ledger is not None and settings.accountant != ledger.mechanism:
        raise ValueError(
            f"settings.accountant={settings.accountant!r} but the ledger accounts with "
            f"{ledger.mechanism!r}"
        )
    _, batch_size = check_loader(data_loader, q)
    targets = _check_weights(model, weights)
    if ledger is not None:
        ledger.check_budget(sigma, q, steps)

    all_params = list(model.parameters())
    saved_flags = [p.requires_grad for p in all_params]
    saved_grads = [p.grad for p in targets]
    was_training = model.training
    hooks = None
    try:
        # Exactly the target weights are trainable, so the hooks see only those layers.
        for p in all_params:
            p.requires_grad_(False)
        for p in targets:
            p.requires_grad_(True)
            p.grad = None
        model.train()
        ghost = settings.grad_sample_mode == "ghost"
        if ghost:
            hooks = GradSampleHooksFastGradientClipping(
                model, loss_reduction="sum", max_grad_norm=clip
            )
        else:
            hooks = GradSampleHooks(model, loss_reduction="sum")
        randomness = Csprng() if randomness is None else randomness
        loader = poisson_loader(data_loader, q, randomness) if private else data_loader
        totals = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in targets]
        batches = cycle(loader)
        for _ in range(steps):
            batch = next(batches)
            n = batch_rows(batch)
            if n == 0:  # an empty Poisson batch: a zero sum (some models cannot run 0 rows)
                sums = [torch.zeros(p.shape, dtype=torch.float32, device=p.device)
                        for p in targets]
            else:
                logits, labels = forward(model, batch)
                losses = per_sample_loss(logits, labels)
                with quiet_hooks():
                    if ghost:
                        sums = _ghost_clipped_sum(hooks, targets, losses)
                    else:
                        sums = _hooks_clipped_sum(hooks, targets, losses, clip)
            # Poisson batches are averaged over the expected size (the size itself is
            # private); plain batches over their own size.
            denominator = batch_size if private else max(n, 1)
            for total, summed in zip(totals, sums, strict=True):
                if sigma > 0:
                    # The release's keystream: plain, or attack-resistant in secure mode.
                    noise = keystream_noise(randomness, sigma * clip, summed,
                                            settings.secure_mode)
                    summed = summed + noise
                total += summed / denominator
            for p in targets:
                p.grad = None
        if ledger is not None:
            ledger.record(sigma, q, steps, round=round, max_grad_norm=clip, run=run)
    finally:
        if hooks is not None:
            hooks.cleanup()
        scrub_opacus(model)
        for p, flag in zip(all_params, saved_flags, strict=True):
            p.requires_grad_(flag)
        for p, grad in zip(targets, saved_grads, strict=True):
            p.grad = grad
        model.train(was_training)
    return {name: total / steps for name, total in zip(weights, totals, strict=True)}


def _hooks_clipped_sum(
    hooks: GradSampleHooks, targets: list[nn.Parameter], losses: Tensor, clip: float
) -> list[Tensor]:
    """Sum of per-example gradients, each example's joint norm clipped to ``clip``."""
    hooks.set_grad_sample_to_none()
    losses.sum().backward()  # loss_reduction="sum": grad_sample is the per-example gradient
    n = int(losses.shape[0])
    samples = []
    for p in targets:
        g = p.grad_sample
        if g is None:  # an empty Poisson batch may not reach the hooks at all
            g = torch.zeros((n, *p.shape), device=p.device, dtype=torch.float32)
        samples.append(g.float())
    hooks.set_grad_sample_to_none()
    if n == 0:
        return [torch.zeros(p.shape, device=p.device, dtype=torch.float32) for p in targets]
    norms = torch.stack([g.reshape(n, -1).norm(dim=1) for g in samples], dim=1).norm(dim=1)
    factor = (clip / (norms + 1e-6)).clamp(max=1.0)
    return [torch.einsum("i,i...->...", factor, g) for g in samples]


def _ghost_clipped_sum(
    hooks: GradSampleHooksFastGradientClipping, targets: list[nn.Parameter], losses: Tensor
) -> list[Tensor]:
    """The same sum by ghost clipping: per-example norms first, then one weighted pass."""
    # Even an empty batch goes through both passes: the backward pops the activations the
    # forward hooks stored, which would otherwise leak into the next batch.
    losses.sum().backward(retain_graph=True)  # the hooks store per-example norms
    factor = hooks.get_clipping_coef().to(losses.device)
    for p in targets:
        p.grad = None
    hooks.disable_hooks()
    try:
        (factor.detach() * losses).sum().backward()
    finally:
        hooks.enable_hooks()
    return [
        torch.zeros(p.shape, device=p.device, dtype=torch.float32) if p.grad is None
        else p.grad.detach().float()
        for p in targets
    ]
