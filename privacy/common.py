"""Glue shared by the private round and the gradient estimate: checks, Poisson sampling,
the per-sample loss, and scrubbing Opacus state off a model."""

from __future__ import annotations

import math
import secrets
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset

from .csprng import Randomness

IGNORE_INDEX = -100

# Attributes Opacus hangs on parameters and modules; a crash mid-step can leave them behind,
# and a leftover "autograd_grad_sample_hooks" makes the next make_private refuse the model.
_PARAM_ATTRS = ("grad_sample", "_forward_counter", "_current_grad_sample", "_norm_sample",
                "summed_grad")
_MODULE_ATTRS: tuple[tuple[str, Any], ...] = (
    ("activations", list), ("max_batch_len", int), ("ft_compute_sample_grad", object),
)


@contextmanager
def quiet_hooks() -> Iterator[None]:
    """Hide PyTorch's note that a full backward hook fires on module outputs when no input
    needs a gradient (the first adapted layer after a frozen embedding): Opacus only needs
    the output gradients, so it is expected, and it would repeat on every layer."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients")
        yield


def check_loader(data_loader: DataLoader, sample_rate: float) -> tuple[int, int]:
    """(N, b) of a plain map-style loader whose b / N is ``sample_rate``."""
    if not isinstance(data_loader, DataLoader):
        raise TypeError(f"data_loader must be a torch DataLoader, got {type(data_loader).__name__}")
    if isinstance(data_loader.dataset, IterableDataset):
        raise ValueError("Poisson sampling needs a map-style dataset, not an IterableDataset")
    batch_size = data_loader.batch_size
    if batch_size is None:
        raise ValueError("data_loader needs batch_size set: the expected Poisson batch is b = q N")
    num_examples = len(data_loader.dataset)  # type: ignore[arg-type]
    if num_examples < 1:
        raise ValueError("data_loader's dataset is empty")
    if not math.isclose(batch_size / num_examples, sample_rate, rel_tol=1e-9, abs_tol=0.0):
        raise ValueError(
            f"settings.sample_rate={sample_rate!r} does not match the data loader: "
            f"batch_size / len(dataset) = {batch_size} / {num_examples} = "
            f"{batch_size / num_examples!r}; the ledger must record the rate really used"
        )
    return num_examples, batch_size


def poisson_loader(data_loader: DataLoader, sample_rate: float,
                   randomness: Randomness) -> DataLoader:
    """A Poisson-sampling view of ``data_loader`` at exactly ``sample_rate``, each
    example's inclusion drawn from ``randomness`` (a fresh CSPRNG per release).

    Opacus's own conversion uses q = 1 / len(loader) = 1 / ceil(N / b), which is not b / N
    unless b divides N, and it draws from torch's Mersenne Twister; we sample (and
    account) at q = b / N from the release's own keystream. Empty batches are legal.
    """
    from opacus.data_loader import dtype_safe, shape_safe, wrap_collate_with_empty
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    class _KeystreamPoissonSampler(UniformWithReplacementSampler):
        # A subclass, so Opacus's BatchMemoryManager recognises it as Poisson sampling.
        def __iter__(self) -> Iterator[list[int]]:
            for _ in range(self.steps):
                mask = randomness.uniform(self.num_samples) < self.sample_rate
                yield mask.nonzero(as_tuple=False).reshape(-1).tolist()

    dataset = data_loader.dataset
    first = dataset[0]  # type: ignore[index]
    collate = wrap_collate_with_empty(
        collate_fn=data_loader.collate_fn, batch_first=True, rand_on_empty=False,
        sample_empty_shapes=[(0, *shape_safe(x)) for x in first],
        dtypes=[dtype_safe(x) for x in first])
    sampler = _KeystreamPoissonSampler(num_samples=len(dataset),  # type: ignore[arg-type]
                                       sample_rate=sample_rate)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate,
                        num_workers=data_loader.num_workers, pin_memory=data_loader.pin_memory)
    loader.sample_rate = sample_rate  # type: ignore[attr-defined]
    return loader


def keystream_noise(randomness: Randomness, std: float, reference: Tensor,
                    secure_mode: bool = False) -> Tensor:
    """N(0, std^2) noise shaped like ``reference`` from the release's ``randomness``.

    ``secure_mode``: the mean of four draws scaled back to std (Opacus's defence against
    floating-point attacks on the sampler), at four times the draws.
    """
    if std == 0:
        return torch.zeros_like(reference)
    kwargs = {"device": reference.device, "dtype": reference.dtype}
    if not secure_mode:
        return randomness.normal(reference.shape, std, **kwargs)
    draws = randomness.normal((4, *reference.shape), std, **kwargs)
    return draws.sum(dim=0) / 2.0


def use_keystream_noise(dp_optimizer: Any, randomness: Randomness) -> None:
    """Make an Opacus DPOptimizer draw its noise from ``randomness``.

    Opacus's ``add_noise`` draws from torch's Mersenne Twister (its CSPRNG option needs
    torchcsprng, which has no build for torch 2.x); this replaces the draw and keeps the
    rest of the step (clip, accumulate, scale, account) as Opacus does it.
    """
    from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

    def add_noise() -> None:
        # The adjusted multiplier exists only under Opacus's adaptive clipping.
        multiplier = getattr(dp_optimizer, "_adjusted_noise_multiplier",
                             dp_optimizer.noise_multiplier)
        std = multiplier * dp_optimizer.max_grad_norm
        for p in dp_optimizer.params:
            summed = p.summed_grad
            _check_processed_flag(summed)  # each clipped sum is noised exactly once
            noise = keystream_noise(randomness, std, summed, dp_optimizer.secure_mode)
            p.grad = (summed + noise).view_as(p)
            _mark_as_processed(summed)

    dp_optimizer.add_noise = add_noise


def cycle(loader: DataLoader) -> Iterator[Any]:
    """Batches forever, re-iterating the loader when it runs out."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise RuntimeError("the data loader yielded no batches")


def secure_generator() -> torch.Generator:
    """A CPU generator seeded with 63 bits of fresh OS entropy (secrets), known to no one."""
    return torch.Generator().manual_seed(secrets.randbits(63))


def per_sample_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy per example, shape (B,), with targets == -100 ignored.

    Classification: logits (B, C), targets (B,). Token-level (causal LM): logits (B, T, C),
    targets (B, T); each sequence's loss is the mean over its own non-ignored tokens. A
    token mean over the whole batch would tie every example's gradient to the others'
    token counts and break the per-example sensitivity that clipping relies on. This is
    the reduction Opacus's ghost-clipping criterion uses too.
    """
    if logits.shape[:-1] != targets.shape:
        raise ValueError(
            f"forward must return logits (B, ..., C) and targets (B, ...); got logits "
            f"{tuple(logits.shape)} and targets {tuple(targets.shape)}"
        )
    batch, classes = targets.shape[0], logits.shape[-1]
    tokens = math.prod(targets.shape[1:])
    flat_targets = targets.reshape(-1)
    per_token = F.cross_entropy(
        logits.reshape(-1, classes).float(), flat_targets, ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view(batch, tokens)
    valid = (flat_targets != IGNORE_INDEX).view(batch, tokens).sum(dim=1).clamp(min=1)
    return per_token.sum(dim=1) / valid


def check_trainable(model: nn.Module) -> list[nn.Parameter]:
    """The trainable parameters, after checking Opacus can give per-sample gradients."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if hasattr(model, "_module") and type(model).__module__.startswith("opacus"):
        raise ValueError("pass the plain nn.Module, not an Opacus GradSampleModule")
    owners = [
        (name, m) for name, m in model.named_modules()
        if any(p.requires_grad for p in m.parameters(recurse=False))
    ]
    if not owners:
        raise ValueError("the model has no trainable parameters")
    if not model.training or any(not m.training for _, m in owners):
        raise ValueError(
            "the model must be in train() mode: Opacus captures per-sample gradients "
            "only in training mode (call model.train())"
        )
    from opacus.grad_sample import GradSampleHooks

    # A module without a registered grad sampler goes through functorch, which replays
    # its forward from positional inputs only; for a composite module (one with
    # parameterised children, often called with keyword arguments) that is unreliable.
    composite = [
        f"{name or '<root>'} ({type(m).__name__})" for name, m in owners
        if type(m) not in GradSampleHooks.GRAD_SAMPLERS
        and any(any(True for _ in c.parameters()) for c in m.children())
    ]
    if composite:
        raise ValueError(
            "trainable parameters must sit in layers Opacus supports (nn.Linear, "
            "nn.Embedding, nn.LayerNorm, ...) or in leaf modules; these composite modules "
            f"own trainable parameters directly: {', '.join(composite)}"
        )
    return [p for p in model.parameters() if p.requires_grad]


def scrub_opacus(model: nn.Module) -> None:
    """Remove every trace Opacus may have left on ``model``: hooks and attributes."""
    for module in model.modules():
        handles = module.__dict__.pop("autograd_grad_sample_hooks", None)
        for handle in handles or ():
            handle.remove()
        for attr, kind in _MODULE_ATTRS:
            if attr in module.__dict__ and isinstance(module.__dict__[attr], kind):
                del module.__dict__[attr]
    for p in model.parameters():
        for attr in _PARAM_ATTRS:
            if hasattr(p, attr):
                delattr(p, attr)


def first_device(params: list[nn.Parameter]) -> torch.device:
    return params[0].device if params else torch.device("cpu")


def batch_rows(batch: Any) -> int:
    """The number of examples in a batch (a tensor, a tuple/list or a dict of tensors)."""
    if isinstance(batch, dict):
        batch = next(iter(batch.values()))
    if isinstance(batch, (tuple, list)):
        batch = batch[0]
    return int(batch.shape[0])
