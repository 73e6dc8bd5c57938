"""Fed-SB on LoRA-SB: B and A fixed, clients train only the r x r matrix R; exact.

Model per module: W = W0 + s B R A, s = alpha / r; B (d_out x r) and A (r x d_in) are fixed
for the whole run, R (r x r) is the only trained adapter tensor.

- Init round (LoRA-SB init, federated): each client sends a full-weight gradient estimate
  G_k (role "G", d_out x d_in) of every target module, measured on a few batches without
  stepping (under DP it is a DP-SGD step the ledger accounts for). The server averages
  Gbar = sum_k p_k G_k, forms dW = -lr * sign(Gbar) (the first step of sign descent), takes
  a truncated SVD dW ~ U_r S_r V_r^T (exact SVD for small modules, torch.svd_lowrank with
  q = r + oversample and a fixed seed for large ones) and sets B = U_r, A = V_r^T,
  R0 = diag(S_r) / s, so s B R0 A is the rank-r truncation of dW. W0 is unchanged. Unlike
  the reference code, nothing is computed on pooled client data.
  :meth:`FedSB.init_state` without gradients is a fallback: B, A random with orthonormal
  columns/rows and R = 0 (a random subspace, delta 0).
- Client trains: R only (B, A frozen), starting from the global R.
- Up: R_k: r^2 floats per module.
- Server: R = sum_k p_k R_k; B, A unchanged.
- Down: R (r^2 floats per module); B and A too on a client's first contact
  (+ r (d_in + d_out)), which the client caches for the rest of the run.
- Client applies: keeps its cached B, A (or loads them on first contact) and loads R.
- Exact: the model is linear in R when B and A are shared, so
  s B (sum_k p_k R_k) A = sum_k p_k (s B R_k A).
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
    average_heads,
    generator,
    option,
    orthonormal_rows,
    require_downlink,
    spec_from_meta,
    stable_seed,
    weighted_sum,
)

# "auto" uses the exact SVD up to this many rows/columns (a 1024 x 1024 SVD is well under
# a second; a 4096 x 4096 one takes ~10 s, where svd_lowrank takes milliseconds).
EXACT_SVD_MAX_DIM = 1024


class FedSB(Method):
    name = "fedsb"
    summary = "Fed-SB (LoRA-SB): fixed B, A from a federated gradient-SVD init; average r x r R; exact"
    client_trains = ("R",)
    uplink_roles = ("R",)
    downlink_roles = ("R",)
    exact = True
    sum_aggregated = True
    server_step_roles = ("R",)
    adapter_layer = "lora_sb"
    init_round_roles = ("G",)
    node_keeps = ("A", "B")

    @dataclass
    class Options:
        init_batches: int = option(2, "batches of full-weight gradient estimate per client in "
                                   "the init round (under DP: that many accounted steps)")
        init_lr: float = option(1e-3, "step size of the init direction dW = -init_lr sign(G)")
        init_svd: str = option("auto", "truncated SVD of dW: exact, lowrank "
                               "(torch.svd_lowrank) or auto")
        oversample: int = option(8, "lowrank SVD: extra columns beyond the rank")
        niter: int = option(4, "lowrank SVD: subspace iterations")

    def init_round_steps(self) -> int:
        return int(self.options["init_batches"])

    def init_from_updates(
        self, spec: AdapterSpec, updates: Sequence[ClientUpdate],
        head: dict[str, torch.Tensor] | None = None,
    ) -> GlobalState:
        return self.init_from_gradients(spec, updates, lr=float(self.options["init_lr"]),
                                        head=head)

    def _check_options(self) -> None:
        super()._check_options()
        o = self.options
        b, lr = o["init_batches"], o["init_lr"]
        if isinstance(b, bool) or not isinstance(b, int) or b < 1:
            raise ValueError(f"fedsb: init_batches must be an integer >= 1, got {b!r}")
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
            raise ValueError(f"fedsb: init_lr must be a number > 0, got {lr!r}")
        if o["init_svd"] not in ("auto", "exact", "lowrank"):
            raise ValueError(f"fedsb: init_svd must be auto, exact or lowrank, got {o['init_svd']!r}")
        for key in ("oversample", "niter"):
            v = o[key]
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"fedsb: {key} must be an integer >= 0, got {v!r}")

    # -- init -------------------------------------------------------------------------------
    def init_state(
        self, spec: AdapterSpec, head: dict[str, torch.Tensor] | None = None
    ) -> GlobalState:
        r = spec.rank
        factors = {
            m: {
                "B": orthonormal_rows(r, d_out, generator("fedlora.fedsb.B", spec.seed, m)).T.contiguous(),
                "A": orthonormal_rows(r, d_in, generator("fedlora.fedsb.A", spec.seed, m)),
                "R": torch.zeros(r, r),
            }
            for m, (d_out, d_in) in spec.shapes.items()
        }
        return self._first_state(spec, factors, head, init="random")

    def init_from_gradients(
        self,
        spec: AdapterSpec,
        updates: Sequence[ClientUpdate],
        *,
        lr: float,
        head: dict[str, torch.Tensor] | None = None,
    ) -> GlobalState:
        """LoRA-SB init from the clients' gradient estimates (``factors[module]["G"]``).

        Returns a round-0 state with s B R0 A = rank-r truncation of -lr * sign(sum p_k G_k).
        Heads: ``head`` (default none), overridden by the p_k-average of any heads sent.
        """
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
            raise ValueError(f"fedsb: init lr must be a finite number > 0, got {lr!r}")
        p = self.weights(updates)
        for u in updates:
            missing = sorted(set(spec.shapes) - set(u.factors))
            extra = sorted(set(u.factors) - set(spec.shapes))
            if missing or extra:
                raise ValueError(f"fedsb init: unknown modules {extra}, missing modules {missing}")
            for m, shape in spec.shapes.items():
                if set(u.factors[m]) != {"G"} or tuple(u.factors[m]["G"].shape) != shape:
                    raise ValueError(
                        f"fedsb init, module {m!r}: expected only a G of shape {shape}, got "
                        f"{ {k: tuple(v.shape) for k, v in u.factors[m].items()} }"
                    )
        factors: Factors = {}
        for m, (d_out, d_in) in spec.shapes.items():
            g_bar = weighted_sum([u.factors[m]["G"] for u in updates], p)
            dw = -float(lr) * torch.sign(g_bar)
            u_r, s_r, v_r = self._truncated_svd(dw, spec.rank, stable_seed("fedlora.fedsb", spec.seed, m))
            k = s_r.numel()
            b = torch.zeros(d_out, spec.rank, dtype=torch.float64)
            a = torch.zeros(spec.rank, d_in, dtype=torch.float64)
            r0 = torch.zeros(spec.rank, spec.rank, dtype=torch.float64)
            b[:, :k], a[:k] = u_r, v_r.T
            r0.diagonal()[:k] = s_r / spec.scaling
            factors[m] = {"B": as_factor(b), "A": as_factor(a), "R": as_factor(r0)}
        return GlobalState(
            round=0,
            factors=factors,
            head=average_heads(head or {}, updates, p),
            meta=self._meta(spec, init="gradients", init_lr=float(lr)),
        )

    def _truncated_svd(
        self, dw: torch.Tensor, rank: int, seed: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Top-``rank`` (U, S, V) of dw in float64, V not transposed."""
        small = min(dw.shape)
        k = min(rank, small)
        mode = self.options["init_svd"]
        if mode == "exact" or (mode == "auto" and small <= EXACT_SVD_MAX_DIM):
            u, s, vh = torch.linalg.svd(dw.double(), full_matrices=False)
            return u[:, :k], s[:k], vh[:k].T
        q = min(rank + self.options["oversample"], small)
        # svd_lowrank draws from the global RNG: fork it so the result is a function of
        # (seed, module) and the caller's RNG stream is left untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            u, s, v = torch.svd_lowrank(dw.float(), q=q, niter=self.options["niter"])
        return u[:, :k].double(), s[:k].double(), v[:, :k].double()

    # -- rounds ----------------------------------------------------------------------------
    def aggregate(self, state: GlobalState, updates: Sequence[ClientUpdate]) -> GlobalState:
        p = self._check_updates(state, updates)
        factors = {
            m: {
                "B": state.factors[m]["B"],
                "A": state.factors[m]["A"],
                "R": as_factor(weighted_sum([u.factors[m]["R"] for u in updates], p)),
            }
            for m in state.meta["shapes"]
        }
        return self._next(state, factors, updates, p)

    def downlink(self, state: GlobalState, *, first_contact: bool = False,
                 rank: int | None = None) -> Factors:
        roles = ("R", "B", "A") if first_contact else ("R",)
        return {m: {k: f[k] for k in roles} for m, f in state.factors.items()}

    def client_start(
        self, downlink: Factors, spec: AdapterSpec, *, rank: int | None = None, seed: int = 0,
        round: int = 1,
    ) -> ClientStart:
        """init holds R, plus B and A when the downlink carries them (first contact);
        otherwise the client keeps the B and A it cached at first contact."""
        r = self._fixed_rank(spec, rank)
        require_downlink(downlink, spec, ("R",))
        init = {
            m: {k: downlink[m][k].detach().clone() for k in ("R", "B", "A") if k in downlink[m]}
            for m in spec.shapes
        }
        return ClientStart(
            init=init, trainable=self.client_trains, base_delta={}, rank=r, scaling=spec.scaling
        )

    def delta(self, state: GlobalState, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        f = state.factors[module]
        return spec_from_meta(state.meta).scaling * (f["B"] @ f["R"]), f["A"]

    def client_delta(
        self, state: GlobalState, update: ClientUpdate, module: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        f = state.factors[module]
        return update.scaling * (f["B"] @ update.factors[module]["R"].to(f["B"].dtype)), f["A"]

    def uplink_floats(self, d_out: int, d_in: int, rank: int, *, round: int = 1) -> int:
        return rank * rank

    def downlink_floats(
        self, d_out: int, d_in: int, rank: int, *, num_clients: int = 1, round: int = 1,
        first_contact: bool = False,
    ) -> int:
        return rank * rank + (rank * (d_in + d_out) if first_contact else 0)
