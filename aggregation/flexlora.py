"""FlexLoRA: heterogeneous-rank LoRAs merged into one low-rank global delta, cut per client.

Model per module: the global model is W = W0 + M, with M a low-rank d_out x d_in delta kept
FACTORED (never formed densely). Client k trains at its own rank r_k (config or memory
budget) with s_k = alpha / r_k: its model is W0 + s_k B_k A_k, and its factors already hold
its starting point (the server's truncated M), so s_k B_k A_k is its whole delta.

- Client trains: A_k (r_k x d_in) and B_k (d_out x r_k), both, from the downlink's factors.
- Up: A_k and B_k: r_k (d_in + d_out) floats per module.
- Server: M = sum_k p_k s_k B_k A_k, with rank <= sum_k r_k. Stack B_s = [B_1 ... B_K]
  (d_out x sum r_k) and A_s = [p_1 s_1 A_1; ...; p_K s_K A_K] (p_k and s_k on exactly one
  factor), thin QR of B_s and A_s^T, SVD of the small core (base.qr_svd): M = U S V^T.
  Singular values below ``rtol`` * s_max are dropped, nothing else. The new M REPLACES the
  previous one: the clients' factors started from it, so it is already inside them.
- Down to client k: the top-r_k truncation of M, split evenly over the two factors so that
  s_k B A = U_r S_r V_r^T: B = U_r sqrt(S_r) / sqrt(s_k), A = sqrt(S_r) V_r^T / sqrt(s_k).
  Where M has rank k < r_k (round 1: M = 0) the remaining rows of A are a Kaiming-uniform
  draw (shared_a(seed, module), so round 1 is plain LoRA's init) and the matching columns of
  B are zero: the product is unchanged, and the LoRA can still learn (B = A = 0 would have
  zero gradient). r_k (d_in + d_out) floats per module, padding included.
- Client applies: loads A and B (nothing merged into W0), trains both at rank r_k.
- Exact? No. The server's M is exactly sum_k p_k (client k's delta), but client k starts
  the next round from trunc_{r_k}(M), not M: the tail of the spectrum beyond r_k is lost
  to it. aggregation_error reports, per module, the loss of the smallest client rank of
  the round, ||M - trunc_{r_min}(M)||_F = sqrt(sum_{i > r_min} S_i^2), from the kept
  singular values (no dense matrix). This is a downlink error, not the ||sum_k p_k
  delta_k - delta||_F of Method.aggregation_error (which is ~0 here).

State layout: factors[module] = {"U": U sqrt(S) (d_out x k), "V": sqrt(S) V^T (k x d_in)},
so W - W0 = U V with singular values S_i = ||U[:, i]|| ||V[i]|| in descending order;
k = 0 before round 1. server_step_roles is empty: the basis moves every round.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .base import (
    AdapterSpec,
    ClientStart,
    ClientUpdate,
    Factors,
    GlobalState,
    Method,
    as_factor,
    is_int,
    option,
    qr_svd,
    require_downlink,
    shared_a,
    spec_from_meta,
)


def singular_values(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """S of the balanced factors U = Ul sqrt(S), V = sqrt(S) Vt (float64, descending)."""
    return u.double().norm(dim=0) * v.double().norm(dim=1)


class FlexLoRA(Method):
    name = "flexlora"
    summary = ("FlexLoRA: merge heterogeneous-rank LoRAs by SVD, each client gets its "
               "top-r_k cut; inexact")
    client_trains = ("A", "B")
    uplink_roles = ("A", "B")
    downlink_roles = ("B", "A")
    exact = False
    per_client_rank = True
    server_step_roles = ()

    @dataclass
    class Options:
        ranks: list[int] = option([4, 8, 16], "rank of client k: ranks[partition % len(ranks)], "
                                  "unless its node config sets lora-rank")
        rtol: float = option(1e-6, "singular values of the merged delta below rtol * s_max "
                             "are dropped (0: keep all)")

    def client_rank(self, spec: AdapterSpec, partition: int, declared: int | None = None) -> int:
        if declared is not None:
            return int(declared)  # the node's own rank (its memory budget)
        ranks = self.opts.ranks
        return int(ranks[partition % len(ranks)])

    def _check_options(self) -> None:
        super()._check_options()
        ranks = self.opts.ranks
        if not isinstance(ranks, list) or not ranks or not all(is_int(r) and r >= 1 for r in ranks):
            raise ValueError(
                f"flexlora: ranks must be a non-empty list of integers >= 1, got {ranks!r}"
            )
        self._check_unit_interval("rtol")

    # -- server side -------------------------------------------------------------------
    def init_state(
        self, spec: AdapterSpec, head: dict[str, torch.Tensor] | None = None
    ) -> GlobalState:
        factors = {
            m: {"U": torch.zeros(d_out, 0), "V": torch.zeros(0, d_in)}
            for m, (d_out, d_in) in spec.shapes.items()
        }
        return self._first_state(spec, factors, head)

    def aggregate(self, state: GlobalState, updates: Sequence[ClientUpdate]) -> GlobalState:
        p = self._check_updates(state, updates, fixed_rank=False)
        factors: Factors = {}
        for m, (_, d_in) in state.meta["shapes"].items():
            ranks = [u.factors[m]["A"].shape[0] for u in updates]
            b_s = torch.cat([u.factors[m]["B"].float() for u in updates], 1)
            a_s = torch.empty(sum(ranks), d_in)
            row = 0
            for pk, u, r in zip(p, updates, ranks, strict=True):
                torch.mul(u.factors[m]["A"].float(), pk * u.scaling, out=a_s[row : row + r])
                row += r
            factors[m] = self._factorize(b_s, a_s)
        return self._next(state, factors, updates, p)

    def _factorize(self, b: torch.Tensor, a: torch.Tensor) -> dict[str, torch.Tensor]:
        """Balanced SVD factors of b @ a (QR both sides, small core SVD), tiny S dropped."""
        ul, s, vt = qr_svd(b, a)
        if s.numel() == 0 or float(s[0]) == 0.0:
            return {"U": torch.zeros(b.shape[0], 0), "V": torch.zeros(0, a.shape[1])}
        keep = int((s > self.opts.rtol * s[0]).sum())
        root = s[:keep].sqrt()
        return {"U": as_factor(ul[:, :keep] * root), "V": as_factor(root[:, None] * vt[:keep])}

    def downlink(self, state: GlobalState, *, first_contact: bool = False,
                 rank: int | None = None) -> Factors:
        spec = spec_from_meta(state.meta)
        r = self._rank(spec, rank)
        # s_k B A = U_r V_r: the client's scaling 1 / s_k is split evenly over B and A.
        root = 1.0 / math.sqrt(spec.alpha / r)
        out: Factors = {}
        for m, (d_out, d_in) in spec.shapes.items():
            u, v = state.factors[m]["U"], state.factors[m]["V"]
            k = min(r, u.shape[1])
            b = torch.zeros(d_out, r)
            b[:, :k] = u[:, :k] * root
            a = torch.empty(r, d_in)
            a[:k] = v[:k] * root
            if k < r:
                # Rank-deficient M: fresh Kaiming rows of A (B's columns stay zero), so the
                # product is unchanged and the new directions get gradient.
                a[k:] = shared_a(spec.seed, m, r, d_in)[k:]
            out[m] = {"B": b, "A": a}
        return out

    # -- client side -------------------------------------------------------------------
    def client_start(
        self, downlink: Factors, spec: AdapterSpec, *, rank: int | None = None, seed: int = 0,
        round: int = 1,
    ) -> ClientStart:
        r = self._rank(spec, rank)
        require_downlink(downlink, spec, self.downlink_roles)
        init: Factors = {}
        for m, (d_out, d_in) in spec.shapes.items():
            b, a = downlink[m]["B"], downlink[m]["A"]
            if tuple(b.shape) != (d_out, r) or tuple(a.shape) != (r, d_in):
                raise ValueError(
                    f"flexlora downlink for {m!r}: B {tuple(b.shape)} and A {tuple(a.shape)} "
                    f"are not the rank-{r} factors of a {d_out} x {d_in} delta "
                    f"(was it cut for this client's rank?)"
                )
            init[m] = {"A": a.detach().clone(), "B": b.detach().clone()}
        return ClientStart(
            init=init, trainable=self.client_trains, base_delta={}, rank=r, scaling=spec.alpha / r
        )

    def _rank(self, spec: AdapterSpec, rank: int | None) -> int:
        r = spec.rank if rank is None else rank
        if not is_int(r) or r < 1:
            raise ValueError(f"flexlora: client rank must be an integer >= 1, got {rank!r}")
        return int(r)

    # -- math for tests, metrics and export ----------------------------------------------
    def delta(self, state: GlobalState, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        f = state.factors[module]
        return f["U"], f["V"]

    def client_delta(
        self, state: GlobalState, update: ClientUpdate, module: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        g = update.factors[module]
        return update.scaling * g["B"].float(), g["A"].float()

    def aggregation_error(
        self, state: GlobalState, updates: Sequence[ClientUpdate], new_state: GlobalState
    ) -> dict[str, float] | None:
        """Per module ||M - trunc_{r_min}(M)||_F, r_min the smallest client rank of the round.

        What the smallest client loses when it is sent the new M (the downlink's truncation
        error, computed from M's kept singular values); the aggregation itself holds
        sum_k p_k s_k B_k A_k exactly (up to the rtol drop).
        """
        out: dict[str, float] = {}
        for m in new_state.meta["shapes"]:
            r_min = min(u.factors[m]["A"].shape[0] for u in updates)
            s = singular_values(new_state.factors[m]["U"], new_state.factors[m]["V"])
            out[m] = float(s[r_min:].square().sum().sqrt())
        return out

    def uplink_floats(self, d_out: int, d_in: int, rank: int, *, round: int = 1) -> int:
        return rank * (d_in + d_out)

    def downlink_floats(
        self, d_out: int, d_in: int, rank: int, *, num_clients: int = 1, round: int = 1,
        first_contact: bool = False,
    ) -> int:
        # Always the client's own rank: a rank-deficient M is padded, never sent short.
        return rank * (d_in + d_out)
