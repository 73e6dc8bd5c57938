"""FFA-LoRA: A random, shared and frozen; clients train only B; averaging B is exact.

Model per module: W = W0 + s B A, s = alpha / r, one rank r for every client.

- A: Kaiming-uniform like PEFT, drawn by :func:`shared_a` from a CPU generator seeded with a
  sha256 of (spec.seed, module). Every client regenerates the same bits in every round and
  every process, so A costs zero bytes on the wire and never drifts between clients.
- Client trains: B only (A frozen), starting from the global B (B = 0 before round 1).
- Up: B_k (d_out x r): d_out r floats per module.
- Server: B = sum_k p_k B_k; A unchanged.
- Down: B: d_out r floats per module.
- Client applies: A = shared_a(seed, module), B = the downlink's B; trains B.
- Exact: the model is linear in B when A is shared, so
  s B A = s (sum_k p_k B_k) A = sum_k p_k (s B_k A) = sum_k p_k (client k's delta).

The FFA-LoRA paper tunes a larger learning rate than for LoRA (its grid is about 10x).
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
    require_downlink,
    shared_a,
    spec_from_meta,
    weighted_sum,
)


class FFA(Method):
    name = "ffa"
    summary = "FFA-LoRA: shared frozen random A (zero bytes), clients train B; exact"
    client_trains = ("B",)
    uplink_roles = ("B",)
    downlink_roles = ("B",)
    exact = True
    sum_aggregated = True
    server_step_roles = ("B",)

    def init_state(
        self, spec: AdapterSpec, head: dict[str, torch.Tensor] | None = None
    ) -> GlobalState:
        factors = {
            m: {"A": shared_a(spec.seed, m, spec.rank, d_in), "B": torch.zeros(d_out, spec.rank)}
            for m, (d_out, d_in) in spec.shapes.items()
        }
        return self._first_state(spec, factors, head)

    def aggregate(self, state: GlobalState, updates: Sequence[ClientUpdate]) -> GlobalState:
        p = self._check_updates(state, updates)
        factors = {
            # A is never modified, so the new state may share it with the old one.
            m: {
                "A": state.factors[m]["A"],
                "B": as_factor(weighted_sum([u.factors[m]["B"] for u in updates], p)),
            }
            for m in state.meta["shapes"]
        }
        return self._next(state, factors, updates, p)

    def downlink(self, state: GlobalState, *, first_contact: bool = False,
                 rank: int | None = None) -> Factors:
        return {m: {"B": f["B"]} for m, f in state.factors.items()}

    def client_start(
        self, downlink: Factors, spec: AdapterSpec, *, rank: int | None = None, seed: int = 0,
        round: int = 1,
    ) -> ClientStart:
        r = self._fixed_rank(spec, rank)
        require_downlink(downlink, spec, ("B",))
        init = {
            m: {"A": shared_a(spec.seed, m, r, d_in), "B": downlink[m]["B"].detach().clone()}
            for m, (_, d_in) in spec.shapes.items()
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
        return update.scaling * update.factors[module]["B"], state.factors[module]["A"]

    def uplink_floats(self, d_out: int, d_in: int, rank: int, *, round: int = 1) -> int:
        return d_out * rank

    def downlink_floats(
        self, d_out: int, d_in: int, rank: int, *, num_clients: int = 1, round: int = 1,
        first_contact: bool = False,
    ) -> int:
        return d_out * rank
