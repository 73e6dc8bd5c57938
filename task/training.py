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

from .knobs import check_knobs, knob


def _from_config(cls: type, section: str, cfg: Mapping[str, Any] | None) -> Any:
    """A config dataclass from a mapping; unknown keys are an error naming the known ones."""
    cfg = dict(cfg or {})
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise ValueError(f"{section}: unknown key(s) {unknown}; known: {sorted(known)}")
    return cls(**cfg)


SCHEDULES: tuple[str, ...] = ("constant", "cosine", "linear", "step")


@dataclass
class LRSchedule:
    kind: str = knob("constant", "client rate across rounds", choices=SCHEDULES)
    min_factor: float = knob(0.1, "cosine, linear: the last round's rate as a fraction of lr",
                             low=0, high=1)
    warmup_rounds: int = knob(0, "cosine, linear: rounds of linear warmup before the decay",
                              low=0)
    gamma: float = knob(0.5, "step: multiply the rate by gamma ...", low=0, high=1,
                        above=True)
    step_rounds: int = knob(5, "step: ... every step_rounds rounds", low=1)

    def __post_init__(self) -> None:
        check_knobs(self, "lr_schedule")

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
DECAYS: tuple[str, ...] = ("constant", "cosine", "linear")


@dataclass
class ServerOptimizerConfig:
    name: str = knob("none", "none, momentum (FedAvgM) or adam (FedAdam)",
                     choices=SERVER_OPTIMIZERS)
    lr: float = knob(1.0, "server learning rate eta", low=0, above=True)
    momentum: float = knob(0.9, "momentum (FedAvgM)", low=0, high=1, below=True)
    beta1: float = knob(0.9, "adam (FedAdam): first-moment decay", low=0, high=1, below=True)
    beta2: float = knob(0.99, "adam (FedAdam): second-moment decay", low=0, high=1,
                        below=True)
    tau: float = knob(1e-3, "adam (FedAdam): adaptivity floor", low=0, above=True)
    schedule: str = knob("constant", "server lr across rounds: constant, or cosine / linear "
                         "decay to min_factor x lr in the last round", choices=DECAYS)
    min_factor: float = knob(0.1, "cosine, linear: the last round's server lr as a fraction "
                             "of lr", low=0, high=1)

    def __post_init__(self) -> None:
        check_knobs(self, "server_optimizer")

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None) -> ServerOptimizerConfig:
        """From the job's ``strategy.server_optimizer`` (None or {} means none)."""
        return _from_config(cls, "server_optimizer", cfg)

    @property
    def active(self) -> bool:
        return self.name != "none"

    def lr_at(self, round_: int, rounds: int) -> float:
        """The server rate in round ``round_`` of ``rounds`` (1-based): lr times the decay."""
        return LRSchedule(kind=self.schedule, min_factor=self.min_factor).lr(self.lr, round_,
                                                                            rounds)


def round_lr(cfg: Mapping[str, Any], round_: int) -> float:
    """The client learning rate of round ``round_`` for a job config."""
    strategy = cfg["strategy"]
    schedule = LRSchedule.from_config(strategy.get("lr_schedule"))
    return schedule.lr(float(strategy["lr"]), round_, int(cfg["federation"]["rounds"]))


def local_batch_size(strategy: Mapping[str, Any], num_examples: int, *,
                     private: bool = True) -> int:
    """This client's (expected) batch: ``strategy.sample_rate`` x N_k when set, so every
    client samples at about one rate q (under DP: the same amplification and noise
    multiplier for all, batches proportional to size), else ``strategy.batch_size``.
    Without DP (``private=False``) a batch beyond the data is the whole data; under DP it
    is not capped, so a client smaller than its batch is refused (q > 1)."""
    rate = strategy.get("sample_rate")
    if rate is None:
        batch = int(strategy["batch_size"])
        return batch if private else min(batch, num_examples)
    return max(1, min(num_examples, round(float(rate) * num_examples)))


def local_sample_rate(strategy: Mapping[str, Any], num_examples: int, *,
                      private: bool = True) -> float:
    """q_k = b_k / N_k: the rate this client's loader samples at (and its ledger records)."""
    return local_batch_size(strategy, num_examples, private=private) / num_examples
