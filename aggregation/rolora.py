"""RoLoRA: alternating optimization. Each round the clients train one factor, the other frozen.

Model per module: W = W0 + s B A, s = alpha / r, one rank r for every client.

- Start: A = shared_a(seed, module) (Kaiming-uniform like PEFT, as FFA), B = 0.
- Schedule: odd rounds (1, 3, ...) train B with A frozen; even rounds (2, 4, ...) train A
  with B frozen. The paper words it the other way round (A first), but B = 0 at the start
  makes the gradient of A, s B^T (dL/dW), exactly zero, so an A-first round 1 would be
  wasted; training B first is the only order that learns from round 1.
- Client trains: the round's factor (ClientStart.trainable), starting from the global A, B.
- Up: the trained factor only: B_k (d_out r floats) in odd rounds, A_k (r d_in floats) in
  even rounds; on average half of fedavg's uplink (two rounds cost one fedavg round).
- Server: the trained factor becomes sum_k p_k (factor_k); the frozen one is unchanged (it
  was identical on every client).
- Down: A and B every round, r (d_in + d_out) floats per module: a client that skipped
  rounds (or missed which factor moved last) still starts from the exact global model.
- Client applies: loads A and B, trains the round's factor with the other frozen.
- Exact: the model is linear in the trained factor while the other is shared, so in a
  B round s (sum_k p_k B_k) A = sum_k p_k s B_k A, and in an A round
  s B (sum_k p_k A_k) = sum_k p_k s B A_k: the global delta is the weighted mean of the
  client deltas, every round.

server_step_roles is empty: the averaged role changes every round, so no single role has a
stable basis a server optimizer could keep momentum for. If round 1 is skipped entirely (no
valid update), B is still 0 in round 2, and that A round learns nothing but the head.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .base import (
    AdapterSpec,
    ClientStart,
    ClientUpdate,
    Factors,
    GlobalState,
    Method,
    as_factor,
    clone_factors,
    is_int,
    require_downlink,
    shared_a,
    spec_from_meta,
    weighted_sum,
)


def trained_role(round: int) -> str:
    """The factor clients train (and send up) in training round ``round`` (1-based)."""
    if not is_int(round) or round < 1:
        raise ValueError(f"rolora: round must be an integer >= 1, got {round!r}")
    # B first: with B = 0 the gradient of A is zero (see the module docstring).
    return "B" if round % 2 == 1 else "A"


class RoLoRA(Method):
    name = "rolora"
    summary = "RoLoRA: alternate rounds train B (odd) or A (even), the other frozen; exact"
    client_trains = ("A", "B")  # over the run; one of them per round (uplink_in_round)
    uplink_roles = ("A", "B")
    downlink_roles = ("A", "B")
    exact = True
    sum_aggregated = True
    server_step_roles = ()  # the averaged role alternates: no stable basis to step in

    def uplink_in_round(self, round: int) -> tuple[str, ...]:
        return (trained_role(round),)

    def init_state(
        self, spec: AdapterSpec, head: dict[str, torch.Tensor] | None = None
    ) -> GlobalState:
        factors = {
            m: {"A": shared_a(spec.seed, m, spec.rank, d_in), "B": torch.zeros(d_out, spec.rank)}
            for m, (d_out, d_in) in spec.shapes.items()
        }
        return self._first_state(spec, factors, head)

    def aggregate(self, state: GlobalState, updates: Sequence[ClientUpdate]) -> GlobalState:
        # _check_updates already insists on exactly uplink_in_round(state.round + 1).
        p = self._check_updates(state, updates)
        role = trained_role(state.round + 1)
        factors: Factors = {}
        for m in state.meta["shapes"]:
            # The frozen factor is never modified, so the new state may share it.
            new = dict(state.factors[m])
            new[role] = as_factor(weighted_sum([u.factors[m][role] for u in updates], p))
            factors[m] = new
        return self._next(state, factors, updates, p)

    def downlink(self, state: GlobalState, *, first_contact: bool = False,
                 rank: int | None = None) -> Factors:
        return {m: {"A": f["A"], "B": f["B"]} for m, f in state.factors.items()}

    def client_start(
        self, downlink: Factors, spec: AdapterSpec, *, rank: int | None = None, seed: int = 0,
        round: int = 1,
    ) -> ClientStart:
        r = self._fixed_rank(spec, rank)
        role = trained_role(round)
        require_downlink(downlink, spec, ("A", "B"))
        init = clone_factors({m: {k: downlink[m][k] for k in ("A", "B")} for m in spec.shapes})
        return ClientStart(init=init, trainable=(role,), base_delta={}, rank=r,
                           scaling=spec.scaling)

    def delta(self, state: GlobalState, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        f = state.factors[module]
        return spec_from_meta(state.meta).scaling * f["B"], f["A"]

    def client_delta(
        self, state: GlobalState, update: ClientUpdate, module: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # The update holds the round's trained factor; the frozen one is the state's.
        f = state.factors[module]
        g = update.factors[module]
        if trained_role(state.round + 1) == "B":
            return update.scaling * g["B"], f["A"]
        return update.scaling * f["B"], g["A"]

    def uplink_floats(self, d_out: int, d_in: int, rank: int, *, round: int = 1) -> int:
        return d_out * rank if trained_role(round) == "B" else rank * d_in

    def downlink_floats(
        self, d_out: int, d_in: int, rank: int, *, num_clients: int = 1, round: int = 1,
        first_contact: bool = False,
    ) -> int:
        return rank * (d_in + d_out)
