"""Fed-SB on LoRA-SB: B and A fixed, clients train only the r x r matrix R; exact.

Model per module: W = W0 + s B R A, s = alpha / r; B (d_out x r) and A (r x d_in) are fixed
for the whole run, R (r x r) is the only trained adapter tensor.

- Init round (LoRA-SB init, federated). Each client estimates the full-weight gradient G_k
  of every target module on a few batches without stepping (under DP it is a DP-SGD step
  the ledger accounts for). What goes up, and the init, depend on option ``init_sketch``:
  - Sketch (default): the client sends a linear sketch of its estimate, Y_k = G_k Omega
    (role "Y", d_out x k) and W_k = Psi G_k (role "W", l x d_in), with public Gaussian test
    matrices Omega (d_in x k) and Psi (l x d_out) regenerated from (seed, module) on every
    side; k = 2 r and l = 2 k by default (capped at the module's size), so the uplink is
    k d_out + l d_in = 2 r d_out + 4 r d_in <= 4 r (d_in + d_out) floats per module
    instead of d_out d_in. The sketch is computed after the DP estimate (post-processing)
    and is linear, so sum_k p_k Y_k = Gbar Omega and sum_k p_k W_k = Psi Gbar (up to float
    rounding), also when only the sum is released (secure aggregation). The server
    recovers Gbar ~ Ghat = Q X of rank k from (Ybar, Wbar, Psi) (single-pass sketch, Tropp
    et al. 2017; exact when rank(Gbar) <= k). The sign is elementwise, not linear, so it
    cannot act on the sketch; what replaces sign(Gbar) depends on ``sketch_direction``:
    - "sign" (default): sign(Ghat), the sign of Gbar's dominant rank-k part (equal to
      sign(Gbar) when rank(Gbar) <= k; the tail's own signs are lost). The server forms
      Ghat one module at a time and runs the full-G path's SVD on dW = -lr sign(Ghat):
      the same server work as that path, with the sketch's uplink.
    - "gradient": no dense matrix anywhere: the normalized gradient step
      dW = -lr sqrt(d_out d_in) Ghat / ||Gbar||_F, whose Frobenius norm is that of the
      sign step; ||Gbar||_F^2 is estimated without bias from the sketches,
      (||Ybar||_F^2 + ||Wbar||_F^2) / (k + l). Its rank-r truncation comes from the SVD
      of the k x d_in matrix X: B = -Q Ux_r, A = Vx_r^T, R0 = c S_r / s with
      c = lr sqrt(d_out d_in) / ||Gbar||_F. This init follows the top-r subspace of the
      gradient, not of its sign matrix.
  - Full G (``init_sketch=false``): the client sends G_k itself (role "G", d_out x d_in);
    the server averages Gbar = sum_k p_k G_k, forms dW = -lr * sign(Gbar) (the first step
    of sign descent), takes a truncated SVD dW ~ U_r S_r V_r^T (exact SVD for small
    modules, torch.svd_lowrank with q = r + oversample and a fixed seed for large ones)
    and sets B = U_r, A = V_r^T, R0 = diag(S_r) / s.
  Either way s B R0 A is the rank-r truncation of dW and W0 is unchanged. Unlike the
  reference code, nothing is computed on pooled client data.
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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

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
    sketch,
    sketch_low_rank,
    sketch_recover,
    sketch_test_matrices,
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
    # The sketch roles (option init_sketch); an instance with init_sketch=false has ("G",).
    init_round_roles = ("Y", "W")
    node_keeps = ("A", "B")

    @dataclass
    class Options:
        init_batches: int = option(2, "batches of full-weight gradient estimate per client in "
                                   "the init round (under DP: that many accounted steps)")
        init_lr: float = option(1e-3, "step size of the init direction: dW = -init_lr "
                                "sign(G) (or of the sketch's Ghat), or -init_lr "
                                "sqrt(d_out d_in) Ghat / ||G||_F (sketch_direction=gradient)")
        init_svd: str = option("auto", "sign init: truncated SVD of dW: exact, lowrank "
                               "(torch.svd_lowrank) or auto")
        oversample: int = option(8, "sign init, lowrank SVD: extra columns beyond the rank")
        niter: int = option(4, "sign init, lowrank SVD: subspace iterations")
        init_sketch: bool = option(True, "init round: clients send a linear sketch (G Omega, "
                                   "Psi G) of their gradient estimates (see sketch_direction); "
                                   "false: the full d_out x d_in G and the sign init "
                                   "dW = -init_lr sign(G)")
        sketch_range: int = option(0, "sketch: columns k of G Omega (0: 2 rank), capped at "
                                   "min(d_out, d_in)")
        sketch_corange: int = option(0, "sketch: rows l of Psi G (0: 2 k), at least k, capped "
                                     "at d_out")
        sketch_direction: str = option("sign", "sketch: the init step from the recovered "
                                       "rank-k Ghat: sign (-init_lr sign(Ghat), as the full-G "
                                       "init) or gradient (the normalized gradient's top-r "
                                       "subspace, no dense d_out x d_in on the server)")

    def __init__(self, weighting: str = "examples", **options: Any) -> None:
        super().__init__(weighting, **options)
        self.init_round_roles = ("Y", "W") if self.opts.init_sketch else ("G",)

    def init_round_steps(self) -> int:
        return int(self.opts.init_batches)

    def init_from_updates(
        self, spec: AdapterSpec, updates: Sequence[ClientUpdate],
        head: dict[str, torch.Tensor] | None = None,
    ) -> GlobalState:
        init = self.init_from_sketches if self.opts.init_sketch else self.init_from_gradients
        return init(spec, updates, lr=float(self.opts.init_lr), head=head)

    # -- the sketched init round ---------------------------------------------------------
    def sketch_sizes(self, d_out: int, d_in: int, rank: int) -> tuple[int, int]:
        """(k, l): columns of Y = G Omega and rows of W = Psi G for one module."""
        k = min(self.opts.sketch_range or 2 * rank, d_out, d_in)
        l = min(max(self.opts.sketch_corange or 2 * k, k), d_out)  # noqa: E741
        return k, l

    def _test_matrices(self, spec: AdapterSpec, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        d_out, d_in = spec.shapes[module]
        k, l = self.sketch_sizes(d_out, d_in, spec.rank)  # noqa: E741
        return sketch_test_matrices(spec.seed, f"fedlora.fedsb.{module}", d_out, d_in, k, l)

    def client_init_payload(self, grads: Mapping[str, torch.Tensor], spec: AdapterSpec
                            ) -> Factors:
        """The sketch (Y, W) = (G Omega, Psi G) of each estimate, or G itself
        (init_sketch=false). Applied to the DP estimate: post-processing."""
        if not self.opts.init_sketch:
            return super().client_init_payload(grads, spec)
        out: Factors = {}
        for m, g in grads.items():
            y, w = sketch(g, *self._test_matrices(spec, m))
            out[m] = {"Y": y, "W": w}
        return out

    def init_round_shapes(self, spec: AdapterSpec) -> dict[str, dict[str, tuple[int, int]]]:
        if not self.opts.init_sketch:
            return super().init_round_shapes(spec)
        out = {}
        for m, (d_out, d_in) in spec.shapes.items():
            k, l = self.sketch_sizes(d_out, d_in, spec.rank)  # noqa: E741
            out[m] = {"Y": (d_out, k), "W": (l, d_in)}
        return out

    def init_uplink_floats(self, d_out: int, d_in: int, rank: int) -> int:
        if not self.opts.init_sketch:
            return d_out * d_in
        k, l = self.sketch_sizes(d_out, d_in, rank)  # noqa: E741
        return k * d_out + l * d_in

    def init_from_sketches(
        self,
        spec: AdapterSpec,
        updates: Sequence[ClientUpdate],
        *,
        lr: float,
        head: dict[str, torch.Tensor] | None = None,
    ) -> GlobalState:
        """LoRA-SB init from the clients' sketches (``factors[module]["Y"]`` and ``["W"]``).

        Returns a round-0 state with s B R0 A = the rank-r truncation of dW, the sign step
        -lr sign(Ghat) or the normalized gradient step -lr sqrt(d_out d_in) Ghat / ||Gbar||_F
        (option sketch_direction), where Ghat = Q X is recovered from sum p_k Y_k and
        sum p_k W_k (see the module docstring). A module whose sketches are all zero keeps
        the random orthonormal B, A of :meth:`init_state` and R0 = 0.
        """
        _check_lr(lr)
        p = self.weights(updates)
        shapes = self.init_round_shapes(spec)
        self._check_init_updates(spec, updates, shapes)
        r = spec.rank
        factors: Factors = {}
        for m, (d_out, d_in) in spec.shapes.items():
            y = weighted_sum([u.factors[m]["Y"].double() for u in updates], p)
            w = weighted_sum([u.factors[m]["W"].double() for u in updates], p)
            _, psi = self._test_matrices(spec, m)
            k, l = y.shape[1], w.shape[0]  # noqa: E741
            # E ||G Omega||_F^2 = k ||G||_F^2 and E ||Psi G||_F^2 = l ||G||_F^2 (unit normals).
            norm2 = float((y.square().sum() + w.square().sum()) / (k + l))
            if norm2 <= 0.0:
                factors[m] = _random_factors(spec, m)
                continue
            if self.opts.sketch_direction == "sign":
                q, x = sketch_recover(y, w, psi)
                # One dense d_out x d_in at a time, as the full-G path holds Gbar.
                factors[m] = self._sign_init(q.float() @ x.float(), spec, m, lr)
                continue
            u_r, s_r, v_r = sketch_low_rank(y, w, psi, r)
            if s_r.numel() == 0 or float(s_r[0]) == 0.0:
                factors[m] = _random_factors(spec, m)
                continue
            c = float(lr) * math.sqrt(d_out * d_in / norm2)
            # dW = -c Ghat_r = (-U_r) (c S_r) V_r^T: the minus goes on B.
            factors[m] = _lora_sb(-u_r, c * s_r, v_r, spec)
        return GlobalState(
            round=0,
            factors=factors,
            head=average_heads(head or {}, updates, p),
            meta=self._meta(spec, init="sketch", init_lr=float(lr)),
        )

    def _sign_init(self, g: torch.Tensor, spec: AdapterSpec, module: str, lr: float
                   ) -> dict[str, torch.Tensor]:
        """B, A, R0 with s B R0 A = the rank-r truncation of dW = -lr sign(g)."""
        dw = -float(lr) * torch.sign(g)
        u_r, s_r, v_r = self._truncated_svd(dw, spec.rank,
                                            stable_seed("fedlora.fedsb", spec.seed, module))
        return _lora_sb(u_r, s_r, v_r, spec)

    def _check_init_updates(self, spec: AdapterSpec, updates: Sequence[ClientUpdate],
                            shapes: Mapping[str, Mapping[str, tuple[int, int]]]) -> None:
        for u in updates:
            missing = sorted(set(spec.shapes) - set(u.factors))
            extra = sorted(set(u.factors) - set(spec.shapes))
            if missing or extra:
                raise ValueError(f"fedsb init: unknown modules {extra}, missing modules {missing}")
            for m, want in shapes.items():
                got = {k: tuple(v.shape) for k, v in u.factors[m].items()}
                if got != dict(want):
                    expected = " and ".join(f"{k} of shape {v}" for k, v in want.items())
                    raise ValueError(f"fedsb init, module {m!r}: expected only {expected}, "
                                     f"got {got}")

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
        for key in ("oversample", "niter", "sketch_range", "sketch_corange"):
            v = o[key]
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"fedsb: {key} must be an integer >= 0, got {v!r}")
        if o["sketch_direction"] not in ("sign", "gradient"):
            raise ValueError(f"fedsb: sketch_direction must be sign or gradient, got "
                             f"{o['sketch_direction']!r}")
        if not isinstance(o["init_sketch"], bool):
            raise ValueError(f"fedsb: init_sketch must be true/false, got {o['init_sketch']!r}")
        if o["sketch_range"] and o["sketch_corange"] and o["sketch_corange"] < o["sketch_range"]:
            raise ValueError("fedsb: sketch_corange (l) must be at least sketch_range (k): "
                             "Psi Q must have at least as many rows as Q has columns")

    # -- init -------------------------------------------------------------------------------
    def init_state(
        self, spec: AdapterSpec, head: dict[str, torch.Tensor] | None = None
    ) -> GlobalState:
        factors = {m: _random_factors(spec, m) for m in spec.shapes}
        return self._first_state(spec, factors, head, init="random")

    def init_from_gradients(
        self,
        spec: AdapterSpec,
        updates: Sequence[ClientUpdate],
        *,
        lr: float,
        head: dict[str, torch.Tensor] | None = None,
    ) -> GlobalState:
        """LoRA-SB init from the clients' full gradient estimates (``factors[module]["G"]``).

        Returns a round-0 state with s B R0 A = rank-r truncation of -lr * sign(sum p_k G_k).
        Heads: ``head`` (default none), overridden by the p_k-average of any heads sent.
        """
        _check_lr(lr)
        p = self.weights(updates)
        self._check_init_updates(spec, updates, {m: {"G": shape} for m, shape in spec.shapes.items()})
        factors: Factors = {}
        for m in spec.shapes:
            g_bar = weighted_sum([u.factors[m]["G"] for u in updates], p)
            factors[m] = self._sign_init(g_bar, spec, m, lr)
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
        mode = self.opts.init_svd
        if mode == "exact" or (mode == "auto" and small <= EXACT_SVD_MAX_DIM):
            u, s, vh = torch.linalg.svd(dw.double(), full_matrices=False)
            return u[:, :k], s[:k], vh[:k].T
        q = min(rank + self.opts.oversample, small)
        # svd_lowrank draws from the global RNG: fork it so the result is a function of
        # (seed, module) and the caller's RNG stream is left untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            u, s, v = torch.svd_lowrank(dw.float(), q=q, niter=self.opts.niter)
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


def _check_lr(lr: object) -> None:
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"fedsb: init lr must be a finite number > 0, got {lr!r}")


def _random_factors(spec: AdapterSpec, module: str) -> dict[str, torch.Tensor]:
    """B, A random with orthonormal columns/rows (seeded by (seed, module)), R = 0."""
    (d_out, d_in), r = spec.shapes[module], spec.rank
    return {
        "B": orthonormal_rows(r, d_out, generator("fedlora.fedsb.B", spec.seed, module)).T.contiguous(),
        "A": orthonormal_rows(r, d_in, generator("fedlora.fedsb.A", spec.seed, module)),
        "R": torch.zeros(r, r),
    }


def _lora_sb(u: torch.Tensor, s: torch.Tensor, v: torch.Tensor, spec: AdapterSpec
             ) -> dict[str, torch.Tensor]:
    """B, A, R0 with s B R0 A = u diag(s) v^T (k = len(s) <= r leading columns; the rest 0)."""
    d_out, d_in = u.shape[0], v.shape[0]
    k = s.numel()
    b = torch.zeros(d_out, spec.rank, dtype=torch.float64)
    a = torch.zeros(spec.rank, d_in, dtype=torch.float64)
    r0 = torch.zeros(spec.rank, spec.rank, dtype=torch.float64)
    b[:, :k], a[:k] = u, v.T
    r0.diagonal()[:k] = s.double() / spec.scaling
    return {"B": as_factor(b), "A": as_factor(a), "R": as_factor(r0)}
