"""FedEx-LoRA: FedAvg on A and B plus the exact residual, folded into the frozen weights.

Model per module: W = W0 + D + s B A, s = alpha / r, one rank r for every client, where
D = U V (U: d_out x m, V: m x d_in) is the accumulated residual of all completed rounds
(m = 0 before round 1).

- Client trains: A and B, starting from the global (A, B), on top of W0 + U V merged into
  its frozen weight. Before round 1: A = shared_a(seed, module) (Kaiming-uniform like PEFT),
  B = 0, so the model starts at W0.
- Up: A_k (r x d_in) and B_k (d_out x r): r (d_in + d_out) floats per module.
- Server: A = sum_k p_k A_k, B = sum_k p_k B_k (as fedavg), and the exact residual
  E = sum_k p_k s B_k A_k - s B A, of rank <= (K + 1) r, kept FACTORED (never d_out x d_in):
  U_E = [B_1 ... B_K, B] (d_out x (K+1) r), V_E = [p_1 s A_1; ...; p_K s A_K; -s A]. The
  weight p_k and the scaling s go on exactly one factor (V). The residual accumulates:
  U <- [U, U_E], V <- [V; V_E].
- Compression (option ``compress``, and mandatory once m would exceed min(d_out, d_in)):
  the thin SVD of U V by QR of both factors and an SVD of the m x m core (base.qr_svd);
  singular values below ``rtol`` * s_max (or below float64 round-off of the stacked product,
  e.g. the K = 1 residual s B_1 A_1 - s B_1 A_1) are dropped, so U V is unchanged to float
  tolerance. Then U = Ul S, V = Vt, and m <= min(d_out, d_in) stays bounded.
- Down: A, B, U, V: r (d_in + d_out) + m (d_in + d_out) floats per module, with
  m = min(t (K + 1) r, min(d_out, d_in)) after t rounds of K clients without compression
  (compression only lowers m). Sending the whole accumulated residual means a client that
  skipped rounds still gets exactly the global model.
- Client applies: base_delta = (U, V), merged into its frozen weight W0 + U V (as flora);
  LoRA initialized from the downlink's A and B; trains A and B.
- Exact: client k's model is W0 + U V + s B_k A_k, so
  sum_k p_k (client k's model) = W0 + U V + sum_k p_k s B_k A_k = W0 + (U V + E) + s B A,
  which is the new global model (sum_k p_k = 1).

server_step_roles is empty: a server optimizer moving A or B away from the plain average
would break the identity E + s B A = sum_k p_k s B_k A_k. Note E = sum_k p_k s (B_k - B)
(A_k - A), whose rank is at most (K - 1) r; ``compress`` finds that smaller form.
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
    option,
    qr_svd,
    require_downlink,
    shared_a,
    spec_from_meta,
    weighted_sum,
)

# Singular values below this fraction of ||U||_F ||V||_F are float64 round-off of the
# stacked product, not signal (qr_svd's backward error is a small multiple of eps_64).
_ROUNDOFF = 1e-12


class FedExLoRA(Method):
    name = "fedex"
    summary = "FedEx-LoRA: average A and B, fold the exact residual into the base; exact"
    client_trains = ("A", "B")
    uplink_roles = ("A", "B")
    downlink_roles = ("A", "B", "U", "V")
    exact = True
    merges_into_base = True
    server_step_roles = ()

    @dataclass
    class Options:
        compress: bool = option(False, "always refactorize the accumulated residual (QR + SVD) "
                                "instead of only when its rank outgrows min(d_out, d_in)")
        rtol: float = option(1e-6, "singular values below rtol * s_max are dropped when "
                             "refactorizing (0: keep all but float64 round-off)")

    def _check_options(self) -> None:
        super()._check_options()
        if not isinstance(self.opts.compress, bool):
            raise ValueError(f"fedex: compress must be true/false, got {self.opts.compress!r}")
        self._check_unit_interval("rtol")

    # -- server side -------------------------------------------------------------------
    def init_state(
        self, spec: AdapterSpec, head: dict[str, torch.Tensor] | None = None
    ) -> GlobalState:
        factors = {
            m: {
                "A": shared_a(spec.seed, m, spec.rank, d_in),
                "B": torch.zeros(d_out, spec.rank),
                "U": torch.zeros(d_out, 0),
                "V": torch.zeros(0, d_in),
            }
            for m, (d_out, d_in) in spec.shapes.items()
        }
        return self._first_state(spec, factors, head)

    def aggregate(self, state: GlobalState, updates: Sequence[ClientUpdate]) -> GlobalState:
        p = self._check_updates(state, updates)
        s = spec_from_meta(state.meta).scaling
        factors: Factors = {}
        for m, (d_out, d_in) in state.meta["shapes"].items():
            a = as_factor(weighted_sum([u.factors[m]["A"] for u in updates], p))
            b = as_factor(weighted_sum([u.factors[m]["B"] for u in updates], p))
            u_old, v_old = state.factors[m]["U"], state.factors[m]["V"]
            # Residual against the A and B actually stored (rounded to float32), so that
            # U V + s B A is the mean of the client models for the state as kept.
            u_new = torch.cat(
                [u_old.float()] + [u.factors[m]["B"].float() for u in updates] + [b], 1
            )
            v_new = torch.empty(u_new.shape[1], d_in)
            v_new[: v_old.shape[0]] = v_old
            row = v_old.shape[0]
            for pk, u in zip(p, updates, strict=True):
                r = u.factors[m]["A"].shape[0]
                torch.mul(u.factors[m]["A"].float(), pk * u.scaling, out=v_new[row : row + r])
                row += r
            torch.mul(a, -s, out=v_new[row:])
            if self.opts.compress or u_new.shape[1] > min(d_out, d_in):
                u_new, v_new = self._compress(u_new, v_new)
            factors[m] = {"A": a, "B": b, "U": as_factor(u_new), "V": as_factor(v_new)}
        return self._next(state, factors, updates, p)

    def _compress(self, u: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Smallest exact form of u @ v: drop only singular values below the tolerance."""
        ul, sv, vt = qr_svd(u, v)
        floor = _ROUNDOFF * float(u.double().norm()) * float(v.double().norm())
        if sv.numel() == 0 or float(sv[0]) <= floor:
            return torch.zeros(u.shape[0], 0), torch.zeros(0, v.shape[1])
        keep = int((sv > max(self.opts.rtol * float(sv[0]), floor)).sum())
        return as_factor(ul[:, :keep] * sv[:keep]), as_factor(vt[:keep])

    def downlink(self, state: GlobalState, *, first_contact: bool = False,
                 rank: int | None = None) -> Factors:
        return {m: {k: f[k] for k in self.downlink_roles} for m, f in state.factors.items()}

    # -- client side -------------------------------------------------------------------
    def client_start(
        self, downlink: Factors, spec: AdapterSpec, *, rank: int | None = None, seed: int = 0,
        round: int = 1,
    ) -> ClientStart:
        r = self._fixed_rank(spec, rank)
        require_downlink(downlink, spec, self.downlink_roles)
        init: Factors = {}
        base_delta: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for m, (d_out, d_in) in spec.shapes.items():
            u, v = downlink[m]["U"], downlink[m]["V"]
            if u.dim() != 2 or v.dim() != 2 or u.shape[0] != d_out or v.shape[1] != d_in \
                    or u.shape[1] != v.shape[0]:
                raise ValueError(
                    f"fedex downlink for {m!r}: U {tuple(u.shape)} and V {tuple(v.shape)} "
                    f"do not form a {d_out} x {d_in} delta"
                )
            base_delta[m] = (u.detach().clone(), v.detach().clone())
            init[m] = {k: downlink[m][k].detach().clone() for k in ("A", "B")}
        return ClientStart(
            init=init, trainable=self.client_trains, base_delta=base_delta, rank=r,
            scaling=spec.scaling,
        )

    # -- math for tests, metrics and export ----------------------------------------------
    def delta(self, state: GlobalState, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        f = state.factors[module]
        s = spec_from_meta(state.meta).scaling
        return torch.cat([f["U"], s * f["B"]], 1), torch.cat([f["V"], f["A"]], 0)

    def client_delta(
        self, state: GlobalState, update: ClientUpdate, module: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        f, g = state.factors[module], update.factors[module]
        return (
            torch.cat([f["U"].float(), update.scaling * g["B"].float()], 1),
            torch.cat([f["V"].float(), g["A"].float()], 0),
        )

    def uplink_floats(self, d_out: int, d_in: int, rank: int, *, round: int = 1) -> int:
        return rank * (d_in + d_out)

    def downlink_floats(
        self, d_out: int, d_in: int, rank: int, *, num_clients: int = 1, round: int = 1,
        first_contact: bool = False,
    ) -> int:
        # ``round`` = completed rounds folded into the residual (the state's round). Without
        # compression each round appends (K + 1) r columns until the min(d_out, d_in) cap;
        # at the cap (or with compress=true) the real m can only be smaller.
        m = min(max(round, 0) * (num_clients + 1) * rank, min(d_out, d_in))
        return (rank + m) * (d_in + d_out)
