"""What client and server share for client-level DP and secure aggregation: the settings
read from the job config, and the flat layout of one client's contribution.

A contribution is what a client adds to the round's sum, in the method's uplink space:
(trained - start) for every uplink role of every module and for the head, scaled by the
weight the server assigns (p_k; or 1/m under client-level DP, with the client's clip and
noise share applied), flattened in one fixed order both sides derive from the names alone.
The server turns the (unmasked) sum back into factors with :func:`unflatten` and adds it
to the reference the clients started from.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedlora.aggregation import HEAD_PREFIX, SEP, Factors
from fedlora.privacy.client_level import (
    ClientLevelConfig,
    ClientLevelPlan,
    check_discrete_noise,
    rounded_norm_bound,
)

# The extra coordinate that carries b_k / m (adaptive clipping's unclipped indicator).
UNCLIPPED = "__unclipped__"


def client_level_config(cfg: Mapping[str, Any]) -> ClientLevelConfig | None:
    """The client-level DP settings of a job (None when it is off)."""
    section = (cfg.get("privacy") or {}).get("client_level") or {}
    if not section.get("enabled"):
        return None
    fed = cfg["federation"]
    return ClientLevelConfig(
        epsilon=float(section["epsilon"]), delta=float(section["delta"]),
        clip=float(section["clip"]), rounds=int(fed["rounds"]),
        num_clients=int(fed["num_clients"]), cohort=int(fed["clients_per_round"]),
        poisson=section.get("sampling", "poisson") == "poisson",
        accountant=str(section.get("accountant", "rdp")), adaptive=bool(section.get("adaptive")),
        target_quantile=float(section.get("target_quantile", 0.5)),
        clip_lr=float(section.get("clip_lr", 0.2)),
        count_noise=None if section.get("count_noise") is None else float(section["count_noise"]),
        min_survivors=secagg_threshold(cfg) if cfg.get("secure_aggregation") else None,
        max_colluding=_optional_int(section.get("max_colluding"),
                                    "privacy.client_level.max_colluding"),
        extra_releases=_init_releases(cfg),
    )


def _init_releases(cfg: Mapping[str, Any]) -> int:
    """1 when the job's method has an init round (released through the mechanism too)."""
    from fedlora.aggregation import available_methods, get_method

    name = (cfg.get("strategy") or {}).get("name")
    return int(name in available_methods() and bool(get_method(name).init_round_roles))


def _optional_int(value: Any, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer >= 0 or null, got {value!r}")
    return value


def distributed_instructions(config: ClientLevelConfig, dp_plan: ClientLevelPlan, clip: float,
                             size: int, step: float) -> dict[str, Any]:
    """What each client of a distributed-DP round needs (client/contribution.py applies it).

    Contribution x = [Delta / m, kappa (b - 1/2) / m] (the count only with adaptive
    clipping), ||x|| <= N = sqrt(C^2 + kappa^2 / 4) / m; on the grid of step g it is rounded
    to norm <= R = rounded_norm_bound(N / g, d) and gets N_Z(0, sigma^2) with
    sigma = z R / sqrt(t - c) (grid steps). ``size``: coordinates of the update alone."""
    t = config.min_survivors
    if t is None:
        raise ValueError("distributed DP needs secure aggregation (min_survivors)")
    m = config.cohort
    out: dict[str, Any] = {"secagg-clip": clip, "secagg-grid-step": step}
    norm, dim = clip / m, size
    if config.adaptive:
        kappa = dp_plan.count_scale(clip)
        norm, dim = math.hypot(clip, kappa / 2.0) / m, size + 1
        out.update({"secagg-unclipped": True, "secagg-count-scale": kappa})
    bound = rounded_norm_bound(norm / step, dim)
    sigma = dp_plan.client_noise_std(bound, t, config.colluding)
    check_discrete_noise(sigma)
    out.update({"secagg-norm-bound": bound, "secagg-noise-std": sigma})
    return out


def secagg_threshold(cfg: Mapping[str, Any]) -> int:
    """t: the configured threshold, or ceil(2/3 of the cohort) and at least 2."""
    configured = (cfg.get("secagg") or {}).get("threshold")
    if configured is not None:
        return int(configured)
    return max(2, math.ceil(2 * int(cfg["federation"]["clients_per_round"]) / 3))


@dataclass(frozen=True)
class Layout:
    """Names and shapes of a contribution's pieces, in the order they are flattened."""

    entries: tuple[tuple[str, tuple[int, ...]], ...]

    @classmethod
    def of(cls, factors: Factors, head: Mapping[str, torch.Tensor], *,
           unclipped: bool = False) -> Layout:
        return cls.of_named(named(factors, head), unclipped=unclipped)

    @classmethod
    def of_named(cls, tensors: Mapping[str, torch.Tensor], *, unclipped: bool = False) -> Layout:
        """Sorted flat names (both sides sort the same names the same way), the unclipped
        indicator last."""
        entries = [(name, tuple(tensors[name].shape)) for name in sorted(tensors)
                   if name != UNCLIPPED]
        if unclipped:
            entries.append((UNCLIPPED, ()))
        return cls(tuple(entries))

    @property
    def size(self) -> int:
        return sum(math.prod(shape) for _, shape in self.entries)

    def flatten(self, tensors: Mapping[str, torch.Tensor]) -> np.ndarray:
        """One float64 vector from flat names (as :func:`named` makes them)."""
        missing = [name for name, _ in self.entries if name not in tensors]
        if missing:
            raise ValueError(f"contribution lacks {missing}")
        parts = []
        for name, shape in self.entries:
            t = tensors[name].detach().to(torch.float64)
            if tuple(t.shape) != shape:
                raise ValueError(f"{name}: shape {tuple(t.shape)}, layout says {shape}")
            parts.append(t.reshape(-1).numpy())
        return np.concatenate(parts) if parts else np.zeros(0)

    def unflatten(self, vector: np.ndarray) -> dict[str, torch.Tensor]:
        if vector.shape != (self.size,):
            raise ValueError(f"sum has {vector.shape} entries, layout needs ({self.size},)")
        out, offset = {}, 0
        for name, shape in self.entries:
            n = math.prod(shape)
            out[name] = torch.from_numpy(vector[offset:offset + n].reshape(shape).copy())
            offset += n
        return out


def named(factors: Factors, head: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Flat names "module::role" and "head::name" (as GlobalState.tensors)."""
    out = {f"{m}{SEP}{r}": t for m, roles in factors.items() for r, t in roles.items()}
    out.update({f"{HEAD_PREFIX}{SEP}{k}": t for k, t in head.items()})
    return out


def split(tensors: Mapping[str, torch.Tensor]) -> tuple[Factors, dict[str, torch.Tensor]]:
    """Inverse of :func:`named` (the UNCLIPPED entry, if any, is left out)."""
    factors: Factors = {}
    head: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if name == UNCLIPPED:
            continue
        first, rest = name.split(SEP, 1)
        if first == HEAD_PREFIX:
            head[rest] = t
        else:
            factors.setdefault(first, {})[rest] = t
    return factors, head
