"""frozenb: FFA-LoRA's mirror image, a small exact method defined outside fedlora.

Model per module: W = W0 + s B A, s = alpha / r, one rank r for every client.

- B: d_out x r, Kaiming-uniform, drawn from (spec.seed, module) by every client and the
  server alike (``shared_a`` on d_out), so it costs zero bytes and never drifts.
- Client trains: A only (B frozen), starting from the global A (A = 0 before round 1, so
  the global delta starts at zero).
- Up: A_k (r x d_in): r d_in floats per module.
- Server: A = sum_k p_k A_k; B unchanged.
- Down: A: r d_in floats per module.
- Exact: the model is linear in A when B is shared, so
  s B A = s B (sum_k p_k A_k) = sum_k p_k (s B A_k) = sum_k p_k (client k's delta).

It uses only fedlora's public Method interface and is registered through the
``fedlora.methods`` entry point (this package's pyproject), so the contract suite checks
that a third-party method gets the same guarantees as a built-in one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedlora.aggregation import (
    AdapterSpec,
    ClientStart,
    ClientUpdate,
    Factors,
    GlobalState,
    Method,
    as_factor,
    require_downlink,
    shared_a,
    spec_from_meta,
    weighted_sum,
)


def shared_b(seed: int, module: str, rank: int, d_out: int) -> torch.Tensor:
    """The frozen B of ``module`` (d_out x r): the same bits on every node and round."""
    return shared_a(seed, f"{module}#B", rank, d_out).T.contiguous()


class FrozenB(Method):
    name = "frozenb"
    summary = "test plug-in: shared frozen random B (zero bytes), clients train A; exact"
    client_trains = ("A",)
    uplink_roles = ("A",)
    downlink_roles = ("A",)
    exact = True
    sum_aggregated = True
    server_step_roles = ("A",)

    def init_state(
        self, spec: AdapterSpec, head: dict[str, torch.Tensor] | None = None
    ) -> GlobalState:
        factors = {
            m: {"A": torch.zeros(spec.rank, d_in), "B": shared_b(spec.seed, m, spec.rank, d_out)}
            for m, (d_out, d_in) in spec.shapes.items()
        }
        return self._first_state(spec, factors, head)

    def aggregate(self, state: GlobalState, updates: Sequence[ClientUpdate]) -> GlobalState:
        p = self._check_updates(state, updates)
        factors = {
            # B is never modified, so the new state may share it with the old one.
            m: {"A": as_factor(weighted_sum([u.factors[m]["A"] for u in updates], p)),
                "B": state.factors[m]["B"]}
            for m in state.meta["shapes"]
        }
        return self._next(state, factors, updates, p)

    def downlink(self, state: GlobalState, *, first_contact: bool = False,
                 rank: int | None = None) -> Factors:
        return {m: {"A": f["A"]} for m, f in state.factors.items()}

    def client_start(
        self, downlink: Factors, spec: AdapterSpec, *, rank: int | None = None, seed: int = 0,
        round: int = 1,
    ) -> ClientStart:
        r = self._fixed_rank(spec, rank)
        require_downlink(downlink, spec, ("A",))
        init = {
            m: {"A": downlink[m]["A"].detach().clone(), "B": shared_b(spec.seed, m, r, d_out)}
            for m, (d_out, _) in spec.shapes.items()
        }
        return ClientStart(
            init=init, trainable=self.client_trains, base_delta={}, rank=r, scaling=spec.scaling
        )

    def delta(self, state: GlobalState, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        f = state.factors[module]
        return spec_from_meta(state.meta).scaling * f["B"], f["A"]

    def client_delta(
        self, state: GlobalState, update: ClientUpdate, module: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return update.scaling * state.factors[module]["B"], update.factors[module]["A"]

    def uplink_floats(self, d_out: int, d_in: int, rank: int, *, round: int = 1) -> int:
        return rank * d_in

    def downlink_floats(
        self, d_out: int, d_in: int, rank: int, *, num_clients: int = 1, round: int = 1,
        first_contact: bool = False,
    ) -> int:
        return rank * d_in
