"""FedSA-LoRA: share A, keep B on the client (personalized); one rank r for every client.

Model of client k per module: W_k = W0 + s B_k A, s = alpha / r. A (r x d_in) is shared
by the federation; B_k (d_out x r) is client k's own and never leaves it.

- Start: A = shared_a(seed, module) (Kaiming-uniform like PEFT), every B_k = 0.
- Client trains: A and B_k, starting from the global A and its own B_k (the B it trained
  last time it took part; 0 before that).
- Up: A_k only: r d_in floats per module.
- Server: A = sum_k p_k A_k (a plain weighted average in a fixed basis, so a server
  optimizer may step on it: server_step_roles = ("A",)). Heads are averaged with p_k.
- Down: A (r d_in floats); at a node's first contact also the initial B = 0
  (+ d_out r floats), so the node can start its own B. node_keeps = ("B",): the node
  stores that B, fills it into every later A-only downlink, and after each round stores the
  B it trained (client/kept.py: with_kept_factors, keep_trained).
- Client applies: A from the downlink, B its own (merged in by the node), trains both.

Personalized (``personalized = True``): there is no single global model. The server state
holds A and a zero B, so :meth:`FedSALoRA.delta` is the zero delta s * 0 * A: central
evaluation (and the PEFT export) measure the base model plus the averaged head only. The
meaningful figure is per client, W0 + s B_k A on the client's own data:
``federation.fraction_evaluate > 0`` reports it as client_accuracy.
:meth:`FedSALoRA.personal_delta` gives that model for a B_k known to the caller.

Exact? Declared False. The aggregate of the shared factor is the exact weighted mean
A = sum_k p_k A_k, but the clients' mean update sum_k p_k s B_k A_k is not what any model
carries afterwards: client k continues from s B_k A = s B_k A_k + s B_k (A - A_k), and the
term B_k (A - A_k) is the price of sharing A. It needs B_k, which the server never sees,
so no error figure is reported (aggregation_error is None) and :meth:`client_delta`
refuses an uplink update (A_k only); it accepts one that also carries the client's B_k
(a client-side caller or a test).
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


class FedSALoRA(Method):
    name = "fedsa"
    summary = "FedSA-LoRA: share A (averaged), keep B on each client (personalized)"
    client_trains = ("A", "B")
    uplink_roles = ("A",)
    downlink_roles = ("A",)  # plus the initial B = 0 at first contact
    # Not exact in the sense of the other methods: see the module docstring.
    exact = False
    sum_aggregated = True
    personalized = True
    node_keeps = ("B",)
    server_step_roles = ("A",)

    def init_state(
        self, spec: AdapterSpec, head: dict[str, torch.Tensor] | None = None
    ) -> GlobalState:
        # B = 0 stays 0 on the server: it is only what a new node starts its own B from.
        factors = {
            m: {"A": shared_a(spec.seed, m, spec.rank, d_in), "B": torch.zeros(d_out, spec.rank)}
            for m, (d_out, d_in) in spec.shapes.items()
        }
        return self._first_state(spec, factors, head)

    def aggregate(self, state: GlobalState, updates: Sequence[ClientUpdate]) -> GlobalState:
        # _check_updates insists on exactly ("A",): an update carrying B_k is rejected.
        p = self._check_updates(state, updates)
        factors = {
            m: {
                "A": as_factor(weighted_sum([u.factors[m]["A"] for u in updates], p)),
                "B": state.factors[m]["B"],  # never modified: the zero start for new nodes
            }
            for m in state.meta["shapes"]
        }
        return self._next(state, factors, updates, p)

    def downlink(self, state: GlobalState, *, first_contact: bool = False,
                 rank: int | None = None) -> Factors:
        roles = ("A", "B") if first_contact else ("A",)
        return {m: {k: f[k] for k in roles} for m, f in state.factors.items()}

    def client_start(
        self, downlink: Factors, spec: AdapterSpec, *, rank: int | None = None, seed: int = 0,
        round: int = 1,
    ) -> ClientStart:
        """A from the server, B the node's own: the node merges its kept B into the
        downlink (client/kept.py), so both roles must be there."""
        r = self._fixed_rank(spec, rank)
        require_downlink(downlink, spec, ("A", "B"))
        init = {
            m: {k: downlink[m][k].detach().clone() for k in ("A", "B")} for m in spec.shapes
        }
        return ClientStart(
            init=init, trainable=self.client_trains, base_delta={}, rank=r, scaling=spec.scaling
        )

    def delta(self, state: GlobalState, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The zero delta s * 0 * A: no global model (central evaluation = base + head)."""
        f = state.factors[module]
        return spec_from_meta(state.meta).scaling * f["B"], f["A"]

    def personal_delta(
        self, state: GlobalState, b: torch.Tensor, module: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(s B_k, A): the model client k starts its next round from (and evaluates)."""
        a = state.factors[module]["A"]
        return spec_from_meta(state.meta).scaling * b.to(a.dtype), a

    def client_delta(
        self, state: GlobalState, update: ClientUpdate, module: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(s B_k, A_k) for an update that also carries the client's B_k.

        An uplink update holds A_k only: B_k is not observable at the server, and a zero
        or global stand-in would misstate the client's model, so this raises ValueError.
        """
        f = update.factors[module]
        if "B" not in f:
            raise ValueError(
                f"{self.name}: client k's delta s B_k A_k needs B_k, which never leaves the "
                "client (the uplink carries A_k only)"
            )
        return update.scaling * f["B"], f["A"]

    def uplink_floats(self, d_out: int, d_in: int, rank: int, *, round: int = 1) -> int:
        return rank * d_in

    def downlink_floats(
        self, d_out: int, d_in: int, rank: int, *, num_clients: int = 1, round: int = 1,
        first_contact: bool = False,
    ) -> int:
        return rank * d_in + (d_out * rank if first_contact else 0)
