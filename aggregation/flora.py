"""FLoRA: fresh LoRA per client per round, stacked exactly at the server; ranks may differ.

Model per module: W = W0 + D + s_k B_k A_k on client k, where D = B_acc A_acc is the merged
delta of all completed rounds (d_out x m and m x d_in), s_k = alpha / r_k (or, with option
alpha_per_rank, alpha_k proportional to r_k as the reference code's alpha_k = 2 r_k, so
s_k = alpha / r for every rank), and the rank r_k is chosen per client (config or memory
budget): heterogeneous ranks are the point.

- Client trains: a fresh A_k (Kaiming-uniform like PEFT, deterministic in the client's seed)
  and B_k = 0 of rank r_k, on top of W0 + D merged into its frozen weight.
- Up: A_k (r_k x d_in) and B_k (d_out x r_k): r_k (d_in + d_out) floats per module.
- Server stacks: B_s = [B_1 ... B_K] (d_out x sum r_k), A_s = [p_1 s_1 A_1; ...; p_K s_K A_K]
  (sum r_k x d_in), so B_s A_s = sum_k p_k s_k B_k A_k. The client weight p_k and the
  client's own scaling s_k go on exactly one factor (A); putting p_k on both would give
  p_k^2. Then it accumulates: B_acc <- [B_acc, B_s], A_acc <- [A_acc; A_s].
- Compression (option ``compress``, and mandatory once the stacked rank m would exceed
  min(d_out, d_in)): the thin SVD of B_acc A_acc by QR of both factors and an SVD of the
  m x m core (see base.qr_svd); singular values below ``rtol`` * s_max are dropped, nothing
  else, so the result equals D to float tolerance (the product's rank is at most
  min(d_out, d_in), so the cap itself loses nothing). Then B_acc = U S, A_acc = V^T.
- Down: the accumulated (B_acc, A_acc): m (d_in + d_out) floats per module. Sending the
  whole accumulated delta rather than only the round's stack means a client that skipped
  rounds still gets exactly the server's merged weights.
- Client applies: base_delta = (B_acc, A_acc), merged into its frozen weight
  W = W0 + B_acc A_acc, then a fresh LoRA of its own rank r_k on top.
- Exact: sum_k p_k (D + s_k B_k A_k) = D + B_s A_s because sum_k p_k = 1.

State layout: factors[module] = {"B": B_acc, "A": A_acc} with W - W0 = B_acc A_acc exactly
(scalings and weights folded in); m = 0 before the first round (tensors with a 0 dimension).
The server round writes nothing new: B_acc and A_acc are :class:`Stacked` matrices that
hold the previous accumulation and this round's client tensors by reference, with p_k s_k
kept as the scalar of A_k's block and applied where the factor is used (the codec writes
the blocks straight into the downlink; delta, checkpoints and export read a dense copy).
A round thus costs O(K) small objects per module instead of a copy of every client's
factors. Compression (or a resumed checkpoint) turns them back into plain tensors.
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
    Stacked,
    as_factor,
    dense,
    is_int,
    option,
    qr_svd,
    require_downlink,
    shared_a,
)


class FLoRA(Method):
    name = "flora"
    summary = "FLoRA: stack heterogeneous-rank client LoRAs into the merged weights; exact"
    client_trains = ("A", "B")
    uplink_roles = ("A", "B")
    downlink_roles = ("B", "A")
    exact = True
    merges_into_base = True
    per_client_rank = True

    @dataclass
    class Options:
        ranks: list[int] = option([4, 8, 16], "rank of client k: ranks[partition % len(ranks)], "
                                  "unless its node config sets lora-rank")
        compress: bool = option(False, "always refactorize the accumulated delta (QR + SVD) "
                                "instead of only when the stack outgrows min(d_out, d_in)")
        rtol: float = option(1e-6, "singular values below rtol * s_max are dropped when "
                             "refactorizing (0: keep all)")
        alpha_per_rank: bool = option(False, "alpha_k proportional to r_k (alpha_k = alpha "
                                      "r_k / r, the reference code's alpha_k = 2 r_k): every "
                                      "client scales by s = alpha / r whatever its rank; "
                                      "false: s_k = alpha / r_k (smaller ranks scale up)")

    def client_rank(self, spec: AdapterSpec, partition: int, declared: int | None = None) -> int:
        if declared is not None:
            return int(declared)  # the node's own rank (its memory budget)
        ranks = self.opts.ranks
        return int(ranks[partition % len(ranks)])

    def _check_options(self) -> None:
        super()._check_options()
        ranks = self.opts.ranks
        if not isinstance(ranks, list) or not ranks or not all(is_int(r) and r >= 1 for r in ranks):
            raise ValueError(f"flora: ranks must be a non-empty list of integers >= 1, got {ranks!r}")
        if not isinstance(self.opts.alpha_per_rank, bool):
            raise ValueError(f"flora: alpha_per_rank must be true/false, got "
                             f"{self.opts.alpha_per_rank!r}")
        if not isinstance(self.opts.compress, bool):
            raise ValueError(f"flora: compress must be true/false, got {self.opts.compress!r}")
        self._check_unit_interval("rtol")

    def init_state(
        self, spec: AdapterSpec, head: dict[str, torch.Tensor] | None = None
    ) -> GlobalState:
        factors = {
            m: {"B": torch.zeros(d_out, 0), "A": torch.zeros(0, d_in)}
            for m, (d_out, d_in) in spec.shapes.items()
        }
        return self._first_state(spec, factors, head)

    def aggregate(self, state: GlobalState, updates: Sequence[ClientUpdate]) -> GlobalState:
        p = self._check_updates(state, updates, fixed_rank=False)
        # p_k s_k goes on A_k (see the docstring); the same float for every module.
        scales = [pk * u.scaling for pk, u in zip(p, updates, strict=True)]
        ones = [1.0] * (len(updates) + 1)
        factors: Factors = {}
        for m, (d_out, d_in) in state.meta["shapes"].items():
            acc = state.factors[m]
            # By reference: B_acc <- [B_acc, B_1 ... B_K], A_acc <- [A_acc; p_1 s_1 A_1; ...].
            b_new = Stacked.of([acc["B"], *(u.factors[m]["B"] for u in updates)], ones, axis=1)
            a_new = Stacked.of([acc["A"], *(u.factors[m]["A"] for u in updates)],
                               [1.0, *scales], axis=0)
            if self.opts.compress or b_new.shape[1] > min(d_out, d_in):
                factors[m] = dict(zip(("B", "A"), self._compress(b_new, a_new), strict=True))
            else:
                factors[m] = {"B": b_new, "A": a_new}
        return self._next(state, factors, updates, p)

    def _compress(self, b: torch.Tensor | Stacked, a: torch.Tensor | Stacked
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """Smallest exact form of b @ a: drop only singular values below rtol * s_max."""
        b, a = dense(b), dense(a)
        u, s, vt = qr_svd(b, a)
        if s.numel() == 0 or float(s[0]) == 0.0:
            return torch.zeros(b.shape[0], 0), torch.zeros(0, a.shape[1])
        keep = int((s > self.opts.rtol * s[0]).sum())
        return as_factor(u[:, :keep] * s[:keep]), as_factor(vt[:keep])

    def downlink(self, state: GlobalState, *, first_contact: bool = False,
                 rank: int | None = None) -> Factors:
        return {m: {"B": f["B"], "A": f["A"]} for m, f in state.factors.items()}

    def client_start(
        self, downlink: Factors, spec: AdapterSpec, *, rank: int | None = None, seed: int = 0,
        round: int = 1,
    ) -> ClientStart:
        r = spec.rank if rank is None else rank
        if not is_int(r) or r < 1:
            raise ValueError(f"flora: client rank must be an integer >= 1, got {rank!r}")
        r = int(r)
        require_downlink(downlink, spec, ("B", "A"))
        init: Factors = {}
        base_delta: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for m, (d_out, d_in) in spec.shapes.items():
            b_acc, a_acc = downlink[m]["B"], downlink[m]["A"]
            if b_acc.shape[0] != d_out or a_acc.shape[1] != d_in or b_acc.shape[1] != a_acc.shape[0]:
                raise ValueError(
                    f"flora downlink for {m!r}: B {tuple(b_acc.shape)} and A {tuple(a_acc.shape)} "
                    f"do not form a {d_out} x {d_in} delta"
                )
            base_delta[m] = (b_acc.detach().clone(), a_acc.detach().clone())
            # Fresh LoRA every round: random A_k, B_k = 0, so the client starts exactly at
            # the merged weights.
            init[m] = {"A": shared_a(seed, m, r, d_in), "B": torch.zeros(d_out, r)}
        # s_k travels with the update (ClientUpdate.scaling) and is folded into the stack.
        scaling = spec.scaling if self.opts.alpha_per_rank else spec.alpha / r
        return ClientStart(
            init=init, trainable=self.client_trains, base_delta=base_delta, rank=r,
            scaling=scaling,
        )

    def delta(self, state: GlobalState, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        f = state.factors[module]
        return f["B"], f["A"]

    def client_delta(
        self, state: GlobalState, update: ClientUpdate, module: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        f, g = state.factors[module], update.factors[module]
        return (
            torch.cat([f["B"].float(), update.scaling * g["B"].float()], 1),
            torch.cat([f["A"].float(), g["A"].float()], 0),
        )

    def uplink_floats(self, d_out: int, d_in: int, rank: int, *, round: int = 1) -> int:
        return rank * (d_in + d_out)

    def downlink_floats(
        self, d_out: int, d_in: int, rank: int, *, num_clients: int = 1, round: int = 1,
        first_contact: bool = False,
    ) -> int:
        # ``round`` = completed rounds folded into the accumulated delta; assumes every
        # client uses ``rank`` and no compression below the min(d_out, d_in) cap.
        m = min(round * num_clients * rank, min(d_out, d_in))
        return m * (d_in + d_out)

