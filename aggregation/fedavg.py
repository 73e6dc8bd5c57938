"""FedAvg on LoRA factors (FedIT baseline): every paper's reference point, and inexact.

Model per module: W = W0 + s B A, s = alpha / r, one rank r for every client.

- Client trains: A and B, starting from the global (A, B).
- Up: A_k (r x d_in) and B_k (d_out x r): r (d_in + d_out) floats per module.
- Server: A = sum_k p_k A_k, B = sum_k p_k B_k.
- Down: A and B: r (d_in + d_out) floats per module.
- Client applies: loads A and B as its starting factors, trains both.
- Exact? No. The clients' mean update is sum_k p_k s B_k A_k, but the server's model is
  s (sum_k p_k B_k)(sum_k p_k A_k): the cross terms p_j p_k B_j A_k (j != k) do not cancel.
  The error E = sum_k p_k s B_k A_k - s B A has rank <= (K + 1) r, so ||E||_F is computed
  from Gram matrices: with U = [p_1 s B_1, ..., p_K s B_K, -s B] (d_out x (K+1) r) and
  V = [A_1; ...; A_K; A] ((K+1) r x d_in), ||U V||_F^2 = trace(U^T U V V^T) = sum of the
  elementwise product of the two (K+1) r x (K+1) r Grams; d_out x d_in is never formed.

Initial state: A Kaiming-uniform like PEFT (regenerable from (seed, module)), B = 0, so the
global delta starts at zero as in plain LoRA.
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
    require_downlink,
    shared_a,
    spec_from_meta,
    weighted_sum,
)


class FedAvg(Method):
    name = "fedavg"
    summary = "FedIT baseline: average A and B separately (inexact: cross terms remain)"
    client_trains = ("A", "B")
    uplink_roles = ("A", "B")
    downlink_roles = ("A", "B")
    exact = False
    sum_aggregated = True
    server_step_roles = ("A", "B")

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
            m: {
                role: as_factor(weighted_sum([u.factors[m][role] for u in updates], p))
                for role in ("A", "B")
            }
            for m in state.meta["shapes"]
        }
        return self._next(state, factors, updates, p)

    def downlink(self, state: GlobalState, *, first_contact: bool = False,
                 rank: int | None = None) -> Factors:
        return {m: {"A": f["A"], "B": f["B"]} for m, f in state.factors.items()}

    def client_start(
        self, downlink: Factors, spec: AdapterSpec, *, rank: int | None = None, seed: int = 0,
        round: int = 1,
    ) -> ClientStart:
        r = self._fixed_rank(spec, rank)
        require_downlink(downlink, spec, ("A", "B"))
        init = clone_factors({m: {k: downlink[m][k] for k in ("A", "B")} for m in spec.shapes})
        return ClientStart(
            init=init, trainable=self.client_trains, base_delta={}, rank=r, scaling=spec.scaling
        )

    def delta(self, state: GlobalState, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        f = state.factors[module]
        return spec_from_meta(state.meta).scaling * f["B"], f["A"]

    def client_delta(
        self, state: GlobalState, update: ClientUpdate, module: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        f = update.factors[module]
        return update.scaling * f["B"], f["A"]

    def aggregation_error(
        self, state: GlobalState, updates: Sequence[ClientUpdate], new_state: GlobalState
    ) -> dict[str, float] | None:
        p = self.weights(updates)
        s = spec_from_meta(new_state.meta).scaling
        out: dict[str, float] = {}
        for m in new_state.meta["shapes"]:
            # float64: the error can be a small difference of large norms.
            us = [pk * u.scaling * u.factors[m]["B"].double() for pk, u in zip(p, updates, strict=True)]
            us.append(-s * new_state.factors[m]["B"].double())
            vs = [u.factors[m]["A"].double() for u in updates] + [new_state.factors[m]["A"].double()]
            uu, vv = torch.cat(us, dim=1), torch.cat(vs, dim=0)
            sq = float(((uu.T @ uu) * (vv @ vv.T)).sum())
            out[m] = max(sq, 0.0) ** 0.5
        return out

    def uplink_floats(self, d_out: int, d_in: int, rank: int, *, round: int = 1) -> int:
        return rank * (d_in + d_out)

    def downlink_floats(
        self, d_out: int, d_in: int, rank: int, *, num_clients: int = 1, round: int = 1,
        first_contact: bool = False,
    ) -> int:
        return rank * (d_in + d_out)
