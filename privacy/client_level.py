"""Client-level (user-level) DP for federated averaging: DP-FedAvg (McMahan et al. 2018)
with optional adaptive clipping (Andrew et al. 2021), and its distributed form.

Guarantee: whatever ONE client contributes in every round it takes part in (all of its
data at once) changes the distribution of the released global models by at most
(epsilon, delta). It protects a client's whole dataset from everyone who sees the global
models (other clients, users of the final model); the server that adds the noise is
trusted to see individual updates, unless secure aggregation hides them (distributed DP).

Per round t, with clip C, noise multiplier z, expected cohort m = q N:

    Delta_k = (what client k sends) - (what it started from)       uplink roles and head
    Delta_k <- Delta_k * min(1, C / ||Delta_k||_2)                 one norm over all tensors
    mean    = (sum_k Delta_k + N(0, z_u^2 C^2 I)) / m

The denominator is fixed: weighting by example counts (or dividing by the number that
arrived) would let one client move the mean by more than C / m and leak its count.
Accounting: one step of the Poisson-subsampled Gaussian mechanism per round at (z, q),
with q = m / N when clients are Poisson-sampled (amplification), else q = 1 (every client
may take part in every round), in the same Opacus accountants as the sample-level ledger.

Adaptive clipping (Andrew et al., Alg. 1): client k also contributes b_k = [||Delta_k|| <= C];
the server releases bbar = (sum_k b_k + N(0, sigma_b^2)) / m and sets
C <- C * exp(-eta (bbar - gamma)), so C tracks the gamma-quantile of the update norms.
Two Gaussian releases per round compose into one of multiplier z when
z_u = (z^-2 - (2 sigma_b)^-2)^(-1/2) (their Theorem 1): the update noise grows a little.

Distributed DP: each of the cohort adds N(0, z_u^2 C^2 / t) to its own clipped Delta_k
before secure aggregation; any t or more survivors' sum carries variance >= z_u^2 C^2,
and a sum of fewer than t is never released.

Nothing here knows about Flower or the rest of fedlora.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .accounting import calibrate_noise_multiplier, check_accountant, check_delta, check_epsilon

Tensors = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class ClientLevelConfig:
    """What a client-level DP federation promises and how it is run."""

    epsilon: float
    delta: float
    clip: float  # C (the initial C with adaptive clipping)
    rounds: int  # planned rounds: z is calibrated once for all of them
    num_clients: int  # N
    cohort: int  # m: expected clients per round (the fixed denominator)
    poisson: bool = True  # Poisson client sampling at q = m / N (amplification)
    accountant: str = "rdp"
    adaptive: bool = False
    target_quantile: float = 0.5  # gamma
    clip_lr: float = 0.2  # eta
    count_noise: float | None = None  # sigma_b; None: m / 20 as in Andrew et al.
    min_survivors: int | None = None  # distributed DP: t (None: the server adds the noise)

    def __post_init__(self) -> None:
        check_epsilon(self.epsilon)
        check_delta(self.delta)
        check_accountant(self.accountant)
        if not (isinstance(self.clip, (int, float)) and math.isfinite(self.clip) and self.clip > 0):
            raise ValueError(f"client-level clip must be a positive number, got {self.clip!r}")
        for name in ("rounds", "num_clients", "cohort"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"client-level DP: {name} must be a positive integer, "
                                 f"got {value!r}")
        if self.cohort > self.num_clients:
            raise ValueError(f"client-level DP: cohort {self.cohort} exceeds the "
                             f"{self.num_clients} clients")
        if not 0 < self.target_quantile < 1:
            raise ValueError(f"target_quantile must be in (0, 1), got {self.target_quantile}")
        if not self.clip_lr > 0:
            raise ValueError(f"clip_lr must be > 0, got {self.clip_lr}")
        if self.count_noise is not None and not self.count_noise > 0:
            raise ValueError(f"count_noise must be > 0, got {self.count_noise}")
        if self.min_survivors is not None and not 1 <= self.min_survivors <= self.cohort:
            raise ValueError(f"min_survivors must be in [1, cohort={self.cohort}], "
                             f"got {self.min_survivors}")

    @property
    def sample_rate(self) -> float:
        return self.cohort / self.num_clients if self.poisson else 1.0


@dataclass(frozen=True)
class ClientLevelPlan:
    """The noise of a client-level DP federation, fixed before round 1."""

    noise_multiplier: float  # z: what the accountant is charged per round
    update_noise_multiplier: float  # z_u >= z: the noise on the sum (z with fixed clipping)
    count_noise: float | None  # sigma_b (adaptive clipping), else None
    sample_rate: float  # q
    cohort: int  # m

    def sum_noise_std(self, clip: float) -> float:
        """Std of the Gaussian noise on the sum of clipped updates (per coordinate)."""
        return self.update_noise_multiplier * clip

    def client_noise_std(self, clip: float, min_survivors: int) -> float:
        """Distributed DP: the std each client adds so that any ``min_survivors`` sum to
        at least :meth:`sum_noise_std`."""
        return self.sum_noise_std(clip) / math.sqrt(min_survivors)


def plan(cfg: ClientLevelConfig) -> ClientLevelPlan:
    """Calibrate z once for ``cfg.rounds`` rounds (and split it for adaptive clipping)."""
    z = calibrate_noise_multiplier(cfg.epsilon, cfg.delta, cfg.sample_rate, cfg.rounds,
                                   cfg.accountant)
    if not cfg.adaptive:
        return ClientLevelPlan(z, z, None, cfg.sample_rate, cfg.cohort)
    sigma_b = cfg.count_noise if cfg.count_noise is not None else cfg.cohort / 20.0
    rest = z ** -2 - (2.0 * sigma_b) ** -2
    if rest <= 0:
        raise ValueError(
            f"adaptive clipping: the count noise sigma_b={sigma_b:g} alone needs more than "
            f"the whole budget (z={z:.3f}); raise count_noise or the cohort")
    return ClientLevelPlan(z, rest ** -0.5, sigma_b, cfg.sample_rate, cfg.cohort)


def difference(trained: Tensors, start: Tensors) -> dict[str, torch.Tensor]:
    """Delta_k, tensor by tensor (same names and shapes required)."""
    if set(trained) != set(start):
        raise ValueError(f"update names {sorted(trained)} differ from the reference "
                         f"{sorted(start)}")
    out = {}
    for name, tensor in trained.items():
        if tensor.shape != start[name].shape:
            raise ValueError(f"{name}: shape {tuple(tensor.shape)} differs from the reference "
                             f"{tuple(start[name].shape)}")
        out[name] = tensor.detach().double() - start[name].detach().double()
    return out


def global_norm(tensors: Tensors) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors.values()))


def clip_to_norm(delta: Tensors, clip: float) -> tuple[dict[str, torch.Tensor], float]:
    """(Delta * min(1, C / ||Delta||), ||Delta||): one L2 norm across every tensor."""
    norm = global_norm(delta)
    factor = min(1.0, clip / norm) if norm > 0 else 1.0
    return {k: v * factor for k, v in delta.items()}, norm


def add_gaussian(tensors: Tensors, std: float, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Each coordinate plus N(0, std^2), in float64 (names in sorted order: reproducible)."""
    out = {}
    for name in sorted(tensors):
        t = tensors[name].double()
        out[name] = t + std * torch.randn(t.shape, generator=generator, dtype=torch.float64)
    return out


def next_clip(clip: float, noised_unclipped: float, cfg: ClientLevelConfig) -> float:
    """Andrew et al.'s geometric update from the noised count of unclipped updates."""
    fraction = noised_unclipped / cfg.cohort
    return clip * math.exp(-cfg.clip_lr * (fraction - cfg.target_quantile))
