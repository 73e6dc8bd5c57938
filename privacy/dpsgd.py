"""One client's private round: DP-SGD with Opacus, accounted in the client's ledger.

The recipe (DESIGN.md section 5): refuse before anything is touched if the round would
exceed the budget; a fresh ``PrivacyEngine`` whose accountant starts from the ledger's
history; ``make_private`` with Poisson sampling; exactly ``steps`` optimizer steps; the
steps recorded in the ledger (atomically); Opacus removed from the model, always.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from opacus import PrivacyEngine
from opacus.utils.batch_memory_manager import BatchMemoryManager
from torch import Tensor, nn
from torch.utils.data import DataLoader

from .accounting import check_epsilon, merge_history
from .common import (
    IGNORE_INDEX,
    batch_rows,
    check_loader,
    check_trainable,
    cycle,
    per_sample_loss,
    poisson_loader,
    quiet_hooks,
    scrub_opacus,
    use_keystream_noise,
)
from .csprng import Csprng, Randomness
from .ledger import PrivacyLedger
from .settings import DPSettings

Forward = Callable[[nn.Module, Any], tuple[Tensor, Tensor]]


@dataclass
class RoundStats:
    steps: int
    examples_seen: int
    mean_loss: float  # per example over the round; NaN if every Poisson batch was empty
    epsilon: float  # spent after the round (ledger replay)
    seconds: float


def _check_settings(settings: DPSettings, ledger: PrivacyLedger) -> None:
    if not isinstance(settings, DPSettings):
        raise TypeError(f"settings must be DPSettings, got {type(settings).__name__}")
    settings.__post_init__()  # fields may have been changed after construction
    if settings.accountant != ledger.mechanism:
        raise ValueError(
            f"settings.accountant={settings.accountant!r} but the ledger accounts with "
            f"{ledger.mechanism!r}: calibrate and report with the same accountant"
        )


def _snapshot(params: list[nn.Parameter], optimizer: torch.optim.Optimizer):
    return [p.detach().clone() for p in params], copy.deepcopy(optimizer.state_dict())


def _restore(params: list[nn.Parameter], optimizer: torch.optim.Optimizer, snapshot) -> None:
    saved_params, saved_state = snapshot
    with torch.no_grad():
        for p, saved in zip(params, saved_params, strict=True):
            p.copy_(saved)
    optimizer.load_state_dict(saved_state)


def _engine(accountant: str) -> PrivacyEngine:
    with warnings.catch_warnings():
        # Opacus warns that its own RNG is not cryptographically secure. It is not used
        # here: sampling and noise come from the release's keystream (poisson_loader,
        # use_keystream_noise), so the warning does not apply.
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        return PrivacyEngine(accountant=accountant)


def run_private_round(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data_loader: DataLoader,
    forward: Forward,
    settings: DPSettings,
    ledger: PrivacyLedger,
    *,
    round: int | None = None,
    run: str | None = None,
    randomness: Randomness | None = None,
    epsilon_budget: float | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> RoundStats:
    """Run exactly ``settings.steps`` DP-SGD steps on ``model`` and record them.

    ``forward(model, batch)`` returns ``(logits, targets)``; the loss is cross-entropy with
    ``ignore_index=-100``, one value per example (per sequence for token-level targets).
    ``data_loader`` is a plain loader with ``batch_size / len(dataset) == sample_rate``;
    its batches are replaced by Poisson samples at that rate (empty batches are legal).
    ``randomness`` drives the sampling and the noise; None (always, in production) draws
    a fresh :class:`~.csprng.Csprng`, so no two calls share noise. ``epsilon_budget`` tightens the
    ledger's target (the stricter wins). ``on_step(step, batch_mean_loss)`` is called
    after each step (1-based; the loss is NaN for an empty batch).

    Raises :class:`BudgetExhausted` before anything is touched if the round would spend
    more than the budget. On any exception the trainable weights and the optimizer state
    are restored and nothing is recorded, so no unaccounted update can leave the client.
    The model comes back free of Opacus hooks and wrappers (same state_dict keys) and can
    be made private again next round.
    """
    _check_settings(settings, ledger)
    sigma, clip = settings.noise_multiplier, settings.max_grad_norm
    q, steps = settings.sample_rate, settings.steps
    if not math.isfinite(clip):
        raise ValueError("max_grad_norm must be finite for DP-SGD (noise std is sigma * C)")
    if round is not None and (isinstance(round, bool) or not isinstance(round, int)):
        raise ValueError(f"round must be an int or None, got {round!r}")
    _, batch_size = check_loader(data_loader, q)
    params = check_trainable(model)
    budget = ledger.target_epsilon
    if epsilon_budget is not None:
        budget = min(budget, check_epsilon(epsilon_budget, "epsilon_budget"))
    ledger.check_budget(sigma, q, steps, budget)

    ghost = settings.grad_sample_mode == "ghost"
    randomness = Csprng() if randomness is None else randomness
    engine = _engine(ledger.mechanism)
    engine.accountant.history = ledger.history  # the engine starts where the client stands
    expected_history = merge_history([*ledger.history, (sigma, q, steps)])
    snapshot = _snapshot(params, optimizer)
    hooks = None
    start = time.perf_counter()
    try:
        extra = {"criterion": nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX)} if ghost else {}
        private = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=data_loader,
            noise_multiplier=sigma,
            max_grad_norm=clip,
            poisson_sampling=True,
            grad_sample_mode=settings.grad_sample_mode,
            # Hooks on the model itself instead of a GradSampleModule wrapper: the caller's
            # module, its forward and its state_dict keys stay as they are ("_module." free).
            wrap_model=False,
            **extra,
        )
        if ghost:
            hooks, dp_optimizer, criterion, _ = private
        else:
            hooks, dp_optimizer, _ = private
            criterion = None
        # Noise and samples from the release's keystream; secure_mode selects the
        # four-draw sampler that resists floating-point attacks.
        dp_optimizer.secure_mode = settings.secure_mode
        use_keystream_noise(dp_optimizer, randomness)
        # Sample and account at exactly q = b / N (see poisson_loader), so the noise is
        # averaged over the expected batch b = q N and Opacus's accountant steps at q.
        loader = poisson_loader(data_loader, q, randomness)
        dp_optimizer.expected_batch_size = batch_size
        dp_optimizer.attach_step_hook(engine.accountant.get_optimizer_hook_fn(sample_rate=q))
        physical = settings.max_physical_batch_size
        if physical is not None and physical < batch_size:
            # Logical Poisson batches split into physical chunks; the optimizer only steps
            # (and the accountant only counts) at the end of each logical batch.
            manager = BatchMemoryManager(data_loader=loader, max_physical_batch_size=physical,
                                         optimizer=dp_optimizer)
            loader = manager.__enter__()

        with quiet_hooks():
            total_loss, seen = _steps(model, dp_optimizer, criterion, cycle(loader), forward,
                                      steps, on_step)

        # Opacus's accountant saw every step; it must agree with what we record.
        if engine.accountant.history != expected_history:
            raise RuntimeError(
                f"Opacus accounted {engine.accountant.history} but the round expected "
                f"{expected_history}; not recording an inconsistent round"
            )
        epsilon = ledger.record(sigma, q, steps, round=round, max_grad_norm=clip, run=run)
    except BaseException:
        _restore(params, optimizer, snapshot)
        raise
    finally:
        if hooks is not None:
            hooks.cleanup()
        scrub_opacus(model)
        for p in params:
            p.grad = None  # already applied; nothing gradient-shaped lingers
    return RoundStats(
        steps=steps,
        examples_seen=seen,
        mean_loss=total_loss / seen if seen else math.nan,
        epsilon=epsilon,
        seconds=time.perf_counter() - start,
    )


def _zero_gradients(params: list[nn.Parameter], ghost: bool) -> None:
    """What a backward over zero examples leaves: per-example gradients with no rows
    (Opacus's hooks path), or a zero clipped sum (its ghost-clipping path)."""
    for p in params:
        if ghost:
            p.grad = torch.zeros_like(p)
        else:
            p.grad_sample = p.new_zeros((0, *p.shape))


def _steps(
    model: nn.Module,
    dp_optimizer: Any,
    criterion: Any,
    batches: Iterator[Any],
    forward: Forward,
    steps: int,
    on_step: Callable[[int, float], None] | None,
) -> tuple[float, int]:
    """Exactly ``steps`` logical DP-SGD steps; returns (summed per-example loss, examples seen).

    With physical batching a logical step spans several chunks: the optimizer reports each
    chunk but the last as skipped (clipped and accumulated, not noised nor stepped).
    """
    total_loss, seen, step, logical_loss, logical_n = 0.0, 0, 0, 0.0, 0
    while step < steps:
        batch = next(batches)
        dp_optimizer.zero_grad(set_to_none=True)
        n = batch_rows(batch)
        if n == 0:
            # An empty Poisson batch is a DP-SGD step like any other (a zero sum, the full
            # noise), but some models (causal LMs' attention) cannot run zero rows: the
            # optimizer gets zero per-example gradients instead of a forward.
            _zero_gradients(dp_optimizer.params, ghost=criterion is not None)
            losses = torch.zeros(0)
        elif criterion is not None:
            logits, targets = forward(model, batch)
            classes = logits.shape[-1]
            loss = criterion(
                logits.reshape(-1, classes).float(), targets.reshape(-1),
                shape=(n, math.prod(targets.shape[1:])),
            )
            losses = loss.loss_per_sample.detach()
            del logits  # backward needs the loss's graph, not the (B, T, vocab) logits
            loss.backward()  # two passes: per-example norms, then the clipped sum
        else:
            logits, targets = forward(model, batch)
            losses = per_sample_loss(logits, targets)
            del logits
            # Mean over the batch, as Opacus's loss_reduction="mean" expects.
            (losses.sum() / n).backward()
            losses = losses.detach()
        dp_optimizer.step()
        logical_loss += float(losses.sum())
        logical_n += n
        if dp_optimizer._is_last_step_skipped:
            continue  # a chunk of a logical batch: no step yet
        step += 1
        total_loss += logical_loss
        seen += logical_n
        if on_step is not None:
            on_step(step, logical_loss / logical_n if logical_n else math.nan)
        logical_loss, logical_n = 0.0, 0
    return total_loss, seen
