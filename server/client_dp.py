"""The server's side of client-level DP (privacy/client_level.py has the math).

The server samples the cohort (Poisson at q = m / N, or a fixed-size cohort accounted at
q = 1), clips each update's difference from the round's reference to C (it is the trusted
party; with secure aggregation the clients clip and add the noise themselves), adds the
Gaussian noise to the sum, divides by the expected cohort m, and charges one step of
(z, q) to its own ledger before anything is released. A round the budget cannot pay for
is never started. A round that releases nothing because too few clients took part (secure
aggregation below its threshold) is charged all the same: whether it is skipped depends on
who took part, so the skip itself is a release of the mechanism.
"""

from __future__ import annotations

import logging
import random
import secrets
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch

from fedlora.aggregation import ClientUpdate, GlobalState, Method
from fedlora.privacy import PrivacyLedger
from fedlora.privacy.client_level import (
    ClientLevelConfig,
    add_gaussian,
    centred_indicator,
    clip_to_norm,
    difference,
    distributed_dp_threat_model,
    next_clip,
    plan,
    to_unit_norm,
    unclipped_fraction,
)
from fedlora.privacy.common import secure_generator
from fedlora.task.secure_sum import UNCLIPPED, named, split

_log = logging.getLogger(__name__)
LEDGER_NODE = "server-client-level"
T = TypeVar("T")


class ClientLevelDP:
    """Cohort sampling, clipping, noise and the server's privacy ledger."""

    def __init__(self, config: ClientLevelConfig, ledger_dir: str | Path, federation: str):
        self.config = config
        self.plan = plan(config)
        self.ledger = PrivacyLedger.open(ledger_dir, federation=federation, node=LEDGER_NODE,
                                         mechanism=config.accountant,
                                         target_epsilon=config.epsilon, delta=config.delta)
        # Resumed: adaptive clipping goes on from the clip of the last released round.
        # (The init release, round 0, has no clip of its own.)
        rounds = [r for r in self.ledger.rounds if (r.get("round") or 0) >= 1]
        last = rounds[-1].get("max_grad_norm") if rounds else None
        self.clip = float(last) if config.adaptive and last else config.clip
        self._generator = secure_generator()
        self._rng = secrets.SystemRandom()

    # -- before a round ---------------------------------------------------------------------
    def check_budget(self) -> float:
        """Epsilon after one more round; raises BudgetExhausted if it would pass the budget."""
        return self.ledger.check_budget(self.plan.noise_multiplier, self.plan.sample_rate, 1)

    def sample(self, ordered: Sequence[T], seeded: random.Random) -> list[T]:
        """Poisson: each client independently with probability q, from OS entropy (a seeded
        draw would let anyone replay who took part). Otherwise a fixed-size cohort."""
        if self.config.poisson:
            q = self.plan.sample_rate
            return [node for node in ordered if self._rng.random() < q]
        return sorted(seeded.sample(list(ordered), self.config.cohort), key=ordered.index)

    # -- the release ------------------------------------------------------------------------
    def clipped_sum(self, contributions: Sequence[Mapping[str, torch.Tensor]],
                    reference: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], float, list[float]]:
        """(sum of clipped differences, sum_k (b_k - 1/2), their norms).

        The count is centred: one client moves it by 1/2, the sensitivity the combined
        multiplier of adaptive clipping assumes."""
        total = {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in reference.items()}
        centred, norms = 0.0, []
        for tensors in contributions:
            clipped, norm = clip_to_norm(difference(tensors, reference), self.clip)
            norms.append(norm)
            centred += centred_indicator(norm, self.clip)
            for k, v in clipped.items():
                total[k] += v
        return total, centred, norms

    def release(self, total: Mapping[str, torch.Tensor], centred: float | None,
                round: int, *, noised: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The mean update (sum + noise) / m, charged to the ledger first.

        ``centred`` is sum_k (b_k - 1/2) (adaptive clipping): exact here, the server adds
        N(0, sigma_b^2); with ``noised`` the clients already added their noise shares and
        divided by m (distributed DP under secure aggregation) and ``centred`` is the
        noised centred count.
        """
        self.check_budget()
        m = self.config.cohort
        clip = self.clip
        if noised:
            mean = {k: v.double() for k, v in total.items() if k != UNCLIPPED}
            noised_centred = centred
        else:
            std = self.plan.sum_noise_std(clip)
            mean = {k: v / m for k, v in add_gaussian(total, std, self._generator).items()}
            noised_centred = None
            if self.config.adaptive and centred is not None:
                noise = float(torch.randn((), generator=self._generator, dtype=torch.float64))
                noised_centred = centred + self.plan.count_noise * noise
        if self.config.adaptive and noised_centred is not None:
            self.clip = next_clip(clip, noised_centred, self.config)
        epsilon = self.ledger.record(self.plan.noise_multiplier, self.plan.sample_rate, 1,
                                     round=round, max_grad_norm=clip)
        report = {"client_level_epsilon": epsilon, "client_level_clip": clip,
                  "client_level_noise_multiplier": self.plan.update_noise_multiplier}
        if noised_centred is not None:
            report["client_level_unclipped_fraction"] = unclipped_fraction(noised_centred, m)
        return mean, report

    def release_init(self, contributions: Sequence[Mapping[str, torch.Tensor]],
                     shapes: Mapping[str, torch.Size]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The init round's release: (sum of unit-norm contributions + N(0, z^2 I)) / m,
        charged to the ledger first as round 0 (one step of (z, q)). ``shapes``: every
        coordinate the mean has, so an empty or partial cohort releases noise there too."""
        if not self.config.extra_releases:
            raise RuntimeError("client-level DP was planned without an init release "
                               "(extra_releases=0)")
        self.check_budget()
        total = {k: torch.zeros(shape, dtype=torch.float64) for k, shape in shapes.items()}
        for tensors in contributions:
            if set(tensors) != set(total):
                raise ValueError(f"init contribution names {sorted(tensors)} differ from "
                                 f"{sorted(total)}")
            for k, v in to_unit_norm(tensors).items():
                total[k] += v
        std = self.plan.noise_multiplier  # sensitivity 1: no count rides on this release
        m = self.config.cohort
        mean = {k: v / m for k, v in add_gaussian(total, std, self._generator).items()}
        epsilon = self.ledger.record(self.plan.noise_multiplier, self.plan.sample_rate, 1,
                                     round=0, max_grad_norm=1.0)
        return mean, {"client_level_epsilon": epsilon,
                      "client_level_noise_multiplier": self.plan.noise_multiplier}

    def charge_unreleased(self, round: int) -> dict[str, Any]:
        """Charge a round that released nothing (too few survivors) as the round it would
        have been: the skip depends on who took part. The clip is kept."""
        epsilon = self.ledger.record(self.plan.noise_multiplier, self.plan.sample_rate, 1,
                                     round=round, max_grad_norm=self.clip)
        return {"client_level_epsilon": epsilon, "client_level_clip": self.clip,
                "client_level_noise_multiplier": self.plan.update_noise_multiplier,
                "client_level_charged_unreleased": True}

    def aggregate(self, method: Method, state: GlobalState, updates: Sequence[ClientUpdate],
                  round: int) -> tuple[GlobalState, dict[str, Any]]:
        """Trusted server: clip each update's difference from where the clients started,
        add noise to the sum, divide by the expected cohort, aggregate the mean."""
        reference = named(method.uplink_reference(state, round), state.head)
        contributions = [named(u.factors, u.head) for u in updates]
        total, centred, _ = self.clipped_sum(contributions, reference)
        mean, report = self.release(total, centred, round)
        factors, head = split({k: reference[k].double() + v for k, v in mean.items()})
        return method.aggregate_mean(state, cast_like(factors, state), cast_head(head, state)), report

    def threat_model(self) -> dict[str, Any] | None:
        """Distributed DP's assumptions (None: trusted server)."""
        t = self.config.min_survivors
        if t is None:
            return None
        return distributed_dp_threat_model(t, self.config.colluding, self.config.cohort)

    def summary(self) -> dict[str, Any]:
        threat = self.threat_model()
        extra = {} if threat is None else {"client_level_threat_model": threat}
        return {
            "client_level_epsilon": self.ledger.epsilon_spent,
            "client_level_delta": self.config.delta,
            "client_level_epsilon_target": self.config.epsilon,
            "client_level_noise_multiplier": self.plan.noise_multiplier,
            "client_level_sample_rate": self.plan.sample_rate,
            "client_level_ledger": str(self.ledger.path),
            **extra,
        }


def cast_like(factors: dict[str, dict[str, torch.Tensor]], state: GlobalState | None
              ) -> dict[str, dict[str, torch.Tensor]]:
    """float64 sums back to the dtype of the state's factors (float32 before any state)."""
    dtype = torch.float32 if state is None else next(
        t.dtype for roles in state.factors.values() for t in roles.values())
    return {m: {r: t.to(dtype) for r, t in roles.items()} for m, roles in factors.items()}


def cast_head(head: dict[str, torch.Tensor], state: GlobalState) -> dict[str, torch.Tensor]:
    return {k: v.to(state.head[k].dtype) for k, v in head.items()}
