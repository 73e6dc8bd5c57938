"""Typed training knobs of a job: the client learning-rate schedule across rounds and the
server optimizer's settings (server/optimizer.py applies it). Both are public job config:
they cost no privacy.

The schedule runs over the federation's planned rounds.

Under DP a rate that learns fast early oscillates late (every step carries the same noise,
so the noise a step injects scales with the rate). A schedule lets the early rounds move
fast and the late rounds average the noise down. Round t of T (1-based) trains at
``lr * factor(t)``:

- ``constant``: factor 1.
- ``cosine``:   warmup, then min + (1 - min) * (1 + cos(pi * u)) / 2, u from 0 to 1 over
  the rounds after warmup (the last round trains at ``min_factor``).
- ``linear``:   warmup, then 1 - (1 - min) * u.
- ``step``:     gamma ** floor((t - 1) / step_rounds).

``warmup_rounds`` (cosine, linear) ramps the factor linearly from 1/(w+1) up to 1 over the
first w rounds. The schedule is public (part of the job config): it costs no privacy.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any


def _from_config(cls: type, section: str, cfg: Mapping[str, Any] | None) -> Any:
    """A config dataclass from a mapping; unknown keys are an error naming the known ones."""
    cfg = dict(cfg or {})
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise ValueError(f"{section}: unknown key(s) {unknown}; known: {sorted(known)}")
    return cls(**cfg)


SCHEDULES: tuple[str, ...] = ("constant", "cosine", "linear", "step")


@dataclass(frozen=True)
class LRSchedule:
    kind: str = "constant"
    min_factor: float = 0.1  # cosine/linear: the last round's rate, as a fraction of lr
    warmup_rounds: int = 0  # cosine/linear: rounds of linear warmup before the decay
    gamma: float = 0.5  # step: multiply the rate by gamma ...
    step_rounds: int = 5  # ... every step_rounds rounds

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise ValueError(f"lr_schedule.kind must be one of {SCHEDULES}, got {self.kind!r}")
        if not 0 <= self.min_factor <= 1:
            raise ValueError(f"lr_schedule.min_factor must be in [0, 1], got {self.min_factor}")
        if not 0 < self.gamma <= 1:
            raise ValueError(f"lr_schedule.gamma must be in (0, 1], got {self.gamma}")
        if int(self.step_rounds) < 1:
            raise ValueError(f"lr_schedule.step_rounds must be >= 1, got {self.step_rounds}")
        if int(self.warmup_rounds) < 0:
            raise ValueError(f"lr_schedule.warmup_rounds must be >= 0, got {self.warmup_rounds}")

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None) -> LRSchedule:
        """From the job's ``strategy.lr_schedule`` (None or {} means constant)."""
        return _from_config(cls, "lr_schedule", cfg)

    def factor(self, round_: int, rounds: int) -> float:
        """The multiplier of the base rate in round ``round_`` of ``rounds`` (1-based)."""
        if rounds < 1 or not 1 <= round_:
            raise ValueError(f"round {round_} of {rounds}: rounds are 1-based and rounds >= 1")
        t = min(round_, rounds)  # rounds past the plan (a resumed, extended run) stay at the end
        if self.kind == "constant":
            return 1.0
        if self.kind == "step":
            return float(self.gamma ** ((t - 1) // int(self.step_rounds)))
        warmup = int(self.warmup_rounds)
        if t <= warmup:
            return t / (warmup + 1)
        decay_rounds = rounds - warmup
        u = 0.0 if decay_rounds <= 1 else (t - warmup - 1) / (decay_rounds - 1)
        if self.kind == "cosine":
            return self.min_factor + (1 - self.min_factor) * (1 + math.cos(math.pi * u)) / 2
        return 1.0 - (1.0 - self.min_factor) * u

    def lr(self, base_lr: float, round_: int, rounds: int) -> float:
        return float(base_lr) * self.factor(round_, rounds)


SERVER_OPTIMIZERS: tuple[str, ...] = ("none", "momentum", "adam")


@dataclass(frozen=True)
class ServerOptimizerConfig:
    name: str = "none"
    lr: float = 1.0  # server learning rate eta
    momentum: float = 0.9  # momentum (FedAvgM)
    beta1: float = 0.9  # adam (FedAdam)
    beta2: float = 0.99  # adam (FedAdam)
    tau: float = 1e-3  # adam (FedAdam): adaptivity floor

    def __post_init__(self) -> None:
        if self.name not in SERVER_OPTIMIZERS:
            raise ValueError(f"server_optimizer.name must be one of {SERVER_OPTIMIZERS}, got {self.name!r}")
        if not float(self.lr) > 0:
            raise ValueError(f"server_optimizer.lr must be > 0, got {self.lr}")
        for key in ("momentum", "beta1", "beta2"):
            if not 0 <= float(getattr(self, key)) < 1:
                raise ValueError(f"server_optimizer.{key} must be in [0, 1), got "
                                 f"{getattr(self, key)}")
        if not float(self.tau) > 0:
            raise ValueError(f"server_optimizer.tau must be > 0, got {self.tau}")

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None) -> ServerOptimizerConfig:
        """From the job's ``strategy.server_optimizer`` (None or {} means none)."""
        return _from_config(cls, "server_optimizer", cfg)

    @property
    def active(self) -> bool:
        return self.name != "none"


def round_lr(cfg: Mapping[str, Any], round_: int) -> float:
    """The client learning rate of round ``round_`` for a job config."""
    strategy = cfg["strategy"]
    schedule = LRSchedule.from_config(strategy.get("lr_schedule"))
    return schedule.lr(float(strategy["lr"]), round_, int(cfg["federation"]["rounds"]))


def local_batch_size(strategy: Mapping[str, Any], num_examples: int) -> int:
    """This client's (expected) batch: ``strategy.sample_rate`` x N_k when set, so every
    client samples at about one rate q (under DP: the same amplification and noise
    multiplier for all, batches proportional to size), else ``strategy.batch_size``."""
    rate = strategy.get("sample_rate")
    if rate is None:
        return int(strategy["batch_size"])
    return max(1, min(num_examples, round(float(rate) * num_examples)))


def local_sample_rate(strategy: Mapping[str, Any], num_examples: int) -> float:
    """q_k = b_k / N_k: the rate this client's loader samples at (and its ledger records)."""
    return local_batch_size(strategy, num_examples) / num_examples
