"""Server optimizers on the aggregated update (Reddi et al. 2021, "Adaptive Federated
Optimization"; Hsu et al. 2019 for server momentum).

For a method whose global factor x is the weighted average of what clients send, in a
basis that stays put between rounds (it declares those roles in
``Method.server_step_roles``: FFA-LoRA's B, Fed-SB's R, FedIT's A and B), the round's average
minus the previous global value is a pseudo-gradient:

    delta_t = sum_k p_k x_k - x_{t-1}

and the server may step on it instead of taking the average as is (heads too):

- ``momentum``:  v_t = momentum * v_{t-1} + delta_t;           x_t = x_{t-1} + lr * v_t
- ``adam``:  m_t = beta1 * m_{t-1} + (1 - beta1) * delta_t
                v_t = beta2 * v_{t-1} + (1 - beta2) * delta_t^2
                x_t = x_{t-1} + lr * m_t / (sqrt(v_t) + tau)     (no bias correction, as
                in the paper; tau bounds the per-coordinate step by about lr)

``schedule`` (cosine or linear) decays lr over the run's rounds to ``min_factor`` x lr:
under client-level DP the noise on every round's mean is the same, so a smaller late step
averages more rounds' noise away. ``none`` (or momentum with lr 1 and momentum 0) is plain
averaging. Under DP this is post-processing of the clients' private outputs: it costs no
privacy. The method's own aggregate (and its exactness) is unchanged; the step is applied
after it.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fedlora.aggregation import HEAD_PREFIX, SEP, GlobalState
from fedlora.task.training import ServerOptimizerConfig


class ServerOptimizer:
    """Steps the declared roles (and heads) of a new global state; keeps m and v per tensor."""

    def __init__(self, config: ServerOptimizerConfig, roles: tuple[str, ...], rounds: int = 1):
        if config.active and not roles:
            raise ValueError(
                f"server_optimizer {config.name!r} needs a method whose global factors are a "
                "weighted average in a fixed basis (Method.server_step_roles); this one has none"
            )
        self.config = config
        self.roles = tuple(roles)
        self.rounds = int(rounds)  # the run's planned rounds, for the lr schedule
        self.moments: dict[str, torch.Tensor] = {}  # "m::<name>" and "v::<name>"

    def _names(self, state: GlobalState) -> list[str]:
        names = [f"{module}{SEP}{role}" for module, roles in state.factors.items()
                 for role in roles if role in self.roles]
        return names + [f"{HEAD_PREFIX}{SEP}{name}" for name in state.head]

    def step(self, previous: GlobalState, averaged: GlobalState) -> GlobalState:
        """The stepped state; ``averaged`` is the method's aggregate of this round."""
        if not self.config.active:
            return averaged
        before, after = previous.tensors(), averaged.tensors()
        out = dict(after)
        c = self.config
        lr = c.lr_at(averaged.round, self.rounds)
        for name in self._names(averaged):
            if name not in before:  # nothing to step from (e.g. a head first seen now)
                continue
            x0 = before[name].to(torch.float32)
            delta = after[name].to(torch.float32) - x0
            if c.name == "momentum":
                v = self.moments.get(f"v{SEP}{name}", torch.zeros_like(delta))
                v = c.momentum * v + delta
                self.moments[f"v{SEP}{name}"] = v
                stepped = x0 + lr * v
            else:
                m = self.moments.get(f"m{SEP}{name}", torch.zeros_like(delta))
                v = self.moments.get(f"v{SEP}{name}", torch.zeros_like(delta))
                m = c.beta1 * m + (1 - c.beta1) * delta
                v = c.beta2 * v + (1 - c.beta2) * delta * delta
                self.moments[f"m{SEP}{name}"], self.moments[f"v{SEP}{name}"] = m, v
                stepped = x0 + lr * m / (v.sqrt() + c.tau)
            out[name] = stepped.to(after[name].dtype)
        return GlobalState.from_tensors(averaged.round, out, averaged.meta)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The moments, for the round checkpoint (safetensors)."""
        return {k: v.contiguous() for k, v in self.moments.items()}

    def load_state_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self.moments = {k: v.to(torch.float32) for k, v in tensors.items()}
