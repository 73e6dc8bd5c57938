"""Linear algebra and seeding helpers shared by the methods (pure torch).

Seeds come from a stable hash (so every client regenerates the same tensors), weights p_k
from the updates' example counts, products are factorized without forming d_out x d_in.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence

import torch

from .state import WEIGHTINGS, ClientUpdate, is_int, one_intra_op_thread


def stable_seed(*parts: object) -> int:
    """A 63-bit seed from a stable hash (sha256) of ``parts``.

    Python's hash() is salted per process, so it cannot make clients agree on a tensor.
    """
    text = "\x1f".join(str(p) for p in parts)
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def generator(*parts: object) -> torch.Generator:
    """A CPU generator seeded from ``parts`` (CPU draws are identical on every machine)."""
    return torch.Generator(device="cpu").manual_seed(stable_seed(*parts))


def shared_a(seed: int, module: str, rank: int, d_in: int) -> torch.Tensor:
    """A (rank x d_in) LoRA A, Kaiming-uniform like PEFT, bit-identical wherever it is made.

    PEFT initializes lora_A with kaiming_uniform_(a=sqrt(5)), i.e. U(-1/sqrt(d_in),
    1/sqrt(d_in)). Drawn from a CPU generator seeded by (seed, module), so every client,
    every round and every process regenerates the same bits: FFA-LoRA sends zero bytes of A.
    """
    bound = 1.0 / math.sqrt(d_in)
    out = torch.empty(rank, d_in, dtype=torch.float32)
    return out.uniform_(-bound, bound, generator=generator("fedlora.lora_a", seed, module))


def orthonormal_rows(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    """A random rows x cols matrix with orthonormal rows (zero rows beyond ``cols``)."""
    k = min(rows, cols)
    g = torch.randn(cols, k, generator=gen, dtype=torch.float64)
    q, r = torch.linalg.qr(g)
    # Fix the sign ambiguity of QR so that the result is a deterministic function of gen.
    d = torch.diagonal(r)
    q = q * torch.where(d != 0, torch.sign(d), torch.ones_like(d))
    out = torch.zeros(rows, cols, dtype=torch.float64)
    out[:k] = q.T
    return out.float().contiguous()


def client_weights(updates: Sequence[ClientUpdate], weighting: str) -> list[float]:
    """p_k = n_k / sum_j n_j ("examples") or 1 / K ("uniform"); they sum to 1."""
    if not updates:
        raise ValueError("cannot aggregate an empty list of client updates")
    for u in updates:
        n = u.num_examples
        if not is_int(n) or n < 0:
            raise ValueError(f"num_examples must be an integer >= 0, got {n!r} (node {u.node!r})")
    if weighting == "uniform":
        return [1.0 / len(updates)] * len(updates)
    if weighting != "examples":
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    total = sum(int(u.num_examples) for u in updates)
    if total == 0:
        raise ValueError("weighting='examples' needs at least one update with num_examples > 0")
    return [int(u.num_examples) / total for u in updates]


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """Aggregate in at least float32 (bf16/fp16 wire tensors are upcast)."""
    return torch.promote_types(t.dtype, torch.float32)


def weighted_sum(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """sum_k w_k t_k into a fresh tensor (never writes into an input)."""
    with one_intra_op_thread():  # K small memory-bound ops per call (see the helper)
        out = tensors[0].to(compute_dtype(tensors[0])) * weights[0]
        for t, w in zip(tensors[1:], weights[1:], strict=True):
            out.add_(t.to(out.dtype), alpha=w)
    return out


def average_heads(
    base: Mapping[str, torch.Tensor], updates: Sequence[ClientUpdate], weights: Sequence[float]
) -> dict[str, torch.Tensor]:
    """Head parameters: sum_k p_k head_k; names nobody sent keep their previous value."""
    head = {k: v.detach().clone() for k, v in base.items()}
    names = set(updates[0].head)
    for u in updates[1:]:
        if set(u.head) != names:
            raise ValueError(
                f"clients sent different head parameters: {sorted(names)} vs {sorted(u.head)} "
                f"(node {u.node!r})"
            )
    for name in sorted(names):
        parts = [u.head[name] for u in updates]
        shape = parts[0].shape
        if any(p.shape != shape for p in parts) or (name in base and base[name].shape != shape):
            raise ValueError(f"head parameter {name!r}: shapes differ across clients/state")
        head[name] = weighted_sum(parts, weights)
    return head


def qr_svd(
    u: torch.Tensor, v: torch.Tensor, dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of the product M = u @ v (u: d_out x m, v: m x d_in) without forming M.

    u = Q1 R1 and v^T = Q2 R2 (thin QR), so M = Q1 (R1 R2^T) Q2^T; the small core
    R1 R2^T = Uc S Vc^T is SVD'd and rotated back: M = (Q1 Uc) S (Q2 Vc)^T. Cost
    O((d_out + d_in) m^2 + m^3) instead of O(d_out d_in min(d_out, d_in)).
    The QRs and rotations run in ``dtype``, the small core SVD always in float64.
    Returns (Ul, S, Vt) in ``dtype``, Ul: d_out x k, S: k, Vt: k x d_in,
    k = min(m, d_out, d_in), singular values descending.
    """
    with one_intra_op_thread():  # thin factors: small ops, see the helper
        q1, r1 = torch.linalg.qr(u.to(dtype))
        q2, r2 = torch.linalg.qr(v.to(dtype).T)
        uc, s, vct = torch.linalg.svd(r1.double() @ r2.double().T, full_matrices=False)
        return q1 @ uc.to(dtype), s.to(dtype), vct.to(dtype) @ q2.T


def as_factor(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float32).contiguous()


# ------------------------------------------------------------------ single-pass sketching


def sketch_test_matrices(
    seed: int, module: str, d_out: int, d_in: int, k: int, l: int  # noqa: E741
) -> tuple[torch.Tensor, torch.Tensor]:
    """Omega (d_in x k) and Psi (l x d_out), standard Gaussian float32, for ``module``.

    Public and bit-identical wherever they are made (CPU generators seeded by (seed,
    module)), so every client sketches with the same matrices and the server regenerates
    them: zero bytes on the wire.
    """
    omega = torch.randn(d_in, k, generator=generator("fedlora.sketch.omega", seed, module))
    psi = torch.randn(l, d_out, generator=generator("fedlora.sketch.psi", seed, module))
    return omega, psi


def sketch(g: torch.Tensor, omega: torch.Tensor, psi: torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(Y, W) = (G Omega, Psi G): linear in G, so the sketches of a sum add up."""
    g = g.detach()
    return g @ omega.to(g), psi.to(g) @ g


def sketch_recover(y: torch.Tensor, w: torch.Tensor, psi: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q, X) with G ~ Q X from the sketches Y = G Omega, W = Psi G (float64).

    The single-pass recovery of Tropp, Yurtsever, Udell and Cevher (2017): Q = orth(Y)
    (d_out x k) spans G's dominant range, X = (Psi Q)^+ W (k x d_in) solves Psi Q X ~ Psi G.
    Exact when G has rank <= k (k = Y's columns, with l >= k rows of W).
    """
    q, _ = torch.linalg.qr(y.double())
    x = torch.linalg.lstsq(psi.double() @ q, w.double(), driver="gelsd").solution
    return q, x


def sketch_low_rank(
    y: torch.Tensor, w: torch.Tensor, psi: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``rank`` (U, S, V) of G from its sketches (see :func:`sketch_recover`): the
    rank-``rank`` truncation of Q X is Q Ux_r S_r Vx_r^T from the SVD of the small k x d_in
    matrix X. Returns U (d_out x q), S (q, descending), V (d_in x q), q = min(rank, k).
    """
    q, x = sketch_recover(y, w, psi)
    ux, s, vt = torch.linalg.svd(x, full_matrices=False)
    k = min(rank, s.numel())
    return q @ ux[:, :k], s[:k], vt[:k].T
