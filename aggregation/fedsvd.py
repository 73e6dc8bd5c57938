"""FedSVD: clients train B with A fixed; the server refactorizes Bbar A by a cheap SVD.

Model per module: W = W0 + s B A, s = alpha / r, one rank r for every client; A has
orthonormal rows (random at the start, then the right singular vectors of the last
refactorization).

- Client trains: B only, with the round's A frozen.
- Up: B_k (d_out x r): d_out r floats per module.
- Server: Bbar = sum_k p_k B_k, so Bbar A = sum_k p_k B_k A exactly (A is shared). Every
  ``period`` rounds (default 1: every round) it refactorizes M = Bbar A (rank <= r) without
  forming the dense d_out x d_in product: Bbar = Q1 R1 and A^T = Q2 R2 (thin QR),
  M = Q1 (R1 R2^T) Q2^T, SVD of the r x r core R1 R2^T = Uc S Vc^T, and rotate back:
  A <- (Q2 Vc)^T (orthonormal rows), B <- Q1 Uc S. In other rounds B = Bbar, A unchanged.
  Cost O((d_out + d_in) r^2) per module instead of a dense SVD's O(d^3): measured at
  4096 x 4096, r = 16, a few ms against ~10 s (bench/aggregation.py).
- Down: A and B: r (d_in + d_out) floats per module (A changes at every refactorization).
- Client applies: loads A and B, trains B with A frozen.
- Exact: aggregation is exact because A is shared, and the refactorization is an exact
  factorization of the same product (rank <= r, nothing truncated): s B A = sum_k p_k s B_k A.
  The SVD is post-processing of the aggregate: it costs no privacy.

If r > min(d_out, d_in) the product has at most min(d_out, d_in) singular directions; the
remaining rows of A are completed to an orthonormal set where d_in allows (zero otherwise)
and the matching columns of B are zero.
"""

from __future__ import annotations

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
    clone_factors,
    generator,
    one_intra_op_thread,
    option,
    orthonormal_rows,
    qr_svd,
    require_downlink,
    spec_from_meta,
    weighted_sum,
)


def refactorize(b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B', A') with B' A' = b @ a, A' with orthonormal rows, via QR + an r x r SVD.

    QRs in float32 (backward stable; A is re-orthonormalized from scratch every time, so
    no error accumulates over rounds), the r x r core in float64.
    """
    with one_intra_op_thread():  # small ops on thin factors (see the helper)
        return _refactorize(b, a)


def _refactorize(b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rank, d_in = a.shape
    u, s, vt = qr_svd(b, a, dtype=torch.promote_types(b.dtype, torch.float32))
    k = s.numel()
    if k == rank:
        return as_factor(u * s), as_factor(vt)
    b_new = torch.zeros(b.shape[0], rank, dtype=u.dtype)
    b_new[:, :k] = u * s
    a_new = torch.zeros(rank, d_in, dtype=u.dtype)
    a_new[:k] = vt
    if k < d_in:
        # Only when r > d_out: complete the rows of A to an orthonormal set (B's columns
        # for them are zero, so the product is unchanged).
        q, _ = torch.linalg.qr(vt.double().T, mode="complete")
        extra = min(rank, d_in) - k
        a_new[k : k + extra] = q[:, k : k + extra].T.to(u.dtype)
    return as_factor(b_new), as_factor(a_new)


class FedSVD(Method):
    name = "fedsvd"
    summary = "FedSVD: clients train B, server refactorizes Bbar A by QR + small SVD; exact"
    client_trains = ("B",)
    uplink_roles = ("B",)
    downlink_roles = ("A", "B")
    exact = True
    sum_aggregated = True

    @dataclass
    class Options:
        period: int = option(1, "refactorize Bbar A by SVD every `period` rounds (1: every round)")

    def _check_options(self) -> None:
        super()._check_options()
        period = self.opts.period
        if isinstance(period, bool) or not isinstance(period, int) or period < 1:
            raise ValueError(f"fedsvd: period must be an integer >= 1, got {period!r}")

    def init_state(
        self, spec: AdapterSpec, head: dict[str, torch.Tensor] | None = None
    ) -> GlobalState:
        factors = {
            m: {
                "A": orthonormal_rows(spec.rank, d_in, generator("fedlora.fedsvd", spec.seed, m)),
                "B": torch.zeros(d_out, spec.rank),
            }
            for m, (d_out, d_in) in spec.shapes.items()
        }
        return self._first_state(spec, factors, head)

    def refactorizes(self, round: int) -> bool:
        """Whether the aggregation that completes ``round`` (1-based) refactorizes."""
        return round % self.opts.period == 0

    def aggregate(self, state: GlobalState, updates: Sequence[ClientUpdate]) -> GlobalState:
        p = self._check_updates(state, updates)
        svd = self.refactorizes(state.round + 1)
        factors: Factors = {}
        for m in state.meta["shapes"]:
            b_bar = weighted_sum([u.factors[m]["B"] for u in updates], p)
            a = state.factors[m]["A"]
            if svd:
                b_new, a_new = refactorize(b_bar, a)
            else:
                b_new, a_new = as_factor(b_bar), a
            factors[m] = {"A": a_new, "B": b_new}
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
        return update.scaling * update.factors[module]["B"], state.factors[module]["A"]

    def uplink_floats(self, d_out: int, d_in: int, rank: int, *, round: int = 1) -> int:
        return d_out * rank

    def downlink_floats(
        self, d_out: int, d_in: int, rank: int, *, num_clients: int = 1, round: int = 1,
        first_contact: bool = False,
    ) -> int:
        return rank * (d_in + d_out)
