"""What one client's DP-SGD runs with, checked on construction.

Kept apart from the engine (dpsgd.py) so that validating a config never imports torch or
Opacus: the CLI and a ClientApp that only refuses a round stay fast to start.
"""

from __future__ import annotations

from dataclasses import dataclass

from .accounting import check_accountant, check_noise_multiplier, check_sample_rate, check_steps

GRAD_SAMPLE_MODES: tuple[str, ...] = ("hooks", "ghost")


@dataclass
class DPSettings:
    """What one client runs with: sigma and C, its sample rate q = b / N_k, tau steps.

    ``grad_sample_mode``: "hooks" (per-sample gradients) or "ghost" (Opacus fast gradient
    clipping: per-sample norms only, less memory on long sequences).
    ``max_physical_batch_size``: split each Poisson (logical) batch into chunks of at most
    this many examples (Opacus's BatchMemoryManager): the same steps, noise and epsilon as
    unsplit, with the memory of the small chunk. None: no split.
    ``secure_mode``: draw noise and Poisson samples from a generator seeded with fresh OS
    entropy each round (not reproducible, not derivable from any stored secret) and use
    Opacus's floating-point-attack-resistant Gaussian sampler (four draws per coordinate).
    """

    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    steps: int
    accountant: str = "prv"
    grad_sample_mode: str = "hooks"
    max_physical_batch_size: int | None = None
    secure_mode: bool = False

    def __post_init__(self) -> None:
        self.noise_multiplier = check_noise_multiplier(self.noise_multiplier)
        if not isinstance(self.max_grad_norm, (int, float)) or not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0, got {self.max_grad_norm!r}")
        self.max_grad_norm = float(self.max_grad_norm)
        self.sample_rate = check_sample_rate(self.sample_rate)
        self.steps = check_steps(self.steps)
        check_accountant(self.accountant)
        if self.grad_sample_mode not in GRAD_SAMPLE_MODES:
            raise ValueError(
                f"grad_sample_mode must be one of {GRAD_SAMPLE_MODES}, got {self.grad_sample_mode!r}"
            )
        physical = self.max_physical_batch_size
        if physical is not None and (isinstance(physical, bool) or not isinstance(physical, int)
                                     or physical < 1):
            raise ValueError(f"max_physical_batch_size must be an integer >= 1 or None, "
                             f"got {physical!r}")
        if not isinstance(self.secure_mode, bool):
            raise ValueError(f"secure_mode must be a bool, got {self.secure_mode!r}")
