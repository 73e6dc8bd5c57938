"""Validate a decoded adapter envelope against what the receiver expects.

:func:`validate` is the content half of :func:`fedlora.protos.decode`'s gate (the wire half,
size, parse, trailer, schema, method, round, direction and fingerprint, stays in the codec):
heads, modules, roles, shapes, ranks, scaling, finite values and the norm bound. A failure
raises :class:`UpdateRejected` with a machine-readable :class:`RejectReason`, so the server
logs and drops one update instead of crashing the aggregation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from enum import StrEnum
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .envelope import Envelope, Expectation


class RejectReason(StrEnum):
    WRONG_METHOD = "wrong_method"
    STALE_ROUND = "stale_round"
    FUTURE_ROUND = "future_round"
    UNKNOWN_MODULE = "unknown_module"
    MISSING_MODULE = "missing_module"
    WRONG_ROLE = "wrong_role"
    WRONG_SHAPE = "wrong_shape"
    WRONG_RANK = "wrong_rank"
    NON_FINITE = "non_finite"
    UNSUPPORTED_DTYPE = "unsupported_dtype"
    TRUNCATED = "truncated"
    OVERSIZED = "oversized"
    DUPLICATE_MODULE = "duplicate_module"
    SCHEMA_VERSION = "schema_version"
    NORM_BOUND = "norm_bound"
    WRONG_FINGERPRINT = "wrong_fingerprint"
    MALFORMED = "malformed"


class UpdateRejected(ValueError):
    """A payload failed validation; ``reason`` is machine-readable, ``detail`` for logs."""

    def __init__(self, reason: RejectReason, detail: str) -> None:
        # args = (reason, detail) keeps the exception picklable (e.g. across Ray workers).
        super().__init__(reason, detail)
        self.reason = RejectReason(reason)
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.reason.value}: {self.detail}"


def reject(reason: RejectReason, detail: str) -> UpdateRejected:
    return UpdateRejected(reason, detail)


def validate(env: Envelope, expect: Expectation) -> None:
    """The content checks of :func:`decode` (modules, roles, shapes, ranks, values)."""
    _check_names(set(env.head), set(expect.head_shapes), "head parameter")
    for name, t in env.head.items():
        want = tuple(expect.head_shapes[name])
        if tuple(t.shape) != want:
            raise reject(RejectReason.WRONG_SHAPE, f"head {name!r}: shape {tuple(t.shape)}, expected {want}")
    _check_names(set(env.factors), set(expect.shapes), "module")
    ranks: dict[str, int] = {}
    for module, roles in env.factors.items():
        if set(roles) != set(expect.roles):
            raise reject(
                RejectReason.WRONG_ROLE,
                f"module {module!r}: roles {sorted(roles)}, expected {sorted(expect.roles)}",
            )
        r = _module_rank(module, roles, tuple(expect.shapes[module]))
        if r is not None:
            ranks[module] = r
    _check_ranks(env, expect, ranks)
    if not math.isfinite(env.scaling):
        raise reject(RejectReason.NON_FINITE, f"scaling {env.scaling}")
    if env.scaling < 0:
        raise reject(RejectReason.MALFORMED, f"negative scaling {env.scaling}")
    tensors = [(f"{m} {k}", t) for m, roles in env.factors.items() for k, t in roles.items()]
    for label, t in tensors + [(f"head {n}", t) for n, t in env.head.items()]:
        if not bool(torch.isfinite(t).all()):
            raise reject(RejectReason.NON_FINITE, f"{label}: NaN or Inf values")
    if expect.max_norm is not None:
        for label, t in tensors:
            norm = float(torch.linalg.vector_norm(t))
            if norm > expect.max_norm:
                raise reject(
                    RejectReason.NORM_BOUND,
                    f"{label}: Frobenius norm {norm:.6g} > bound {expect.max_norm:.6g}",
                )


def _check_names(got: set[str], want: set[str], what: str) -> None:
    unknown, missing = sorted(got - want), sorted(want - got)
    if unknown:
        raise reject(RejectReason.UNKNOWN_MODULE, f"unexpected {what}(s) {unknown[:5]}")
    if missing:
        raise reject(RejectReason.MISSING_MODULE, f"missing {what}(s) {missing[:5]}")


def _module_rank(module: str, roles: Mapping[str, torch.Tensor], shape: tuple[int, int]) -> int | None:
    """Check the rank-free dimensions of each role, return the module's rank (None: no
    factor role, e.g. an init round's G or sketches Y, W)."""
    d_out, d_in = shape
    found: dict[str, int] = {}
    for role, t in roles.items():
        s = tuple(t.shape)
        where = f"module {module!r} role {role}: shape {s}"
        if len(s) != 2:
            raise reject(RejectReason.WRONG_SHAPE, f"{where} is not 2-D")
        if role == "G" and s != (d_out, d_in):
            raise reject(RejectReason.WRONG_SHAPE, f"{where}, expected {(d_out, d_in)}")
        # Sketch widths are the method's (it checks them exactly); the module's sides here.
        if role == "Y" and s[0] != d_out:
            raise reject(RejectReason.WRONG_SHAPE, f"{where}, expected ({d_out}, k)")
        if role == "W" and s[1] != d_in:
            raise reject(RejectReason.WRONG_SHAPE, f"{where}, expected (l, {d_in})")
        if role == "A":
            if s[1] != d_in:
                raise reject(RejectReason.WRONG_SHAPE, f"{where}, expected (r, {d_in})")
            found[role] = s[0]
        if role == "B":
            if s[0] != d_out:
                raise reject(RejectReason.WRONG_SHAPE, f"{where}, expected ({d_out}, r)")
            found[role] = s[1]
        if role == "R":
            if s[0] != s[1]:
                raise reject(RejectReason.WRONG_SHAPE, f"{where}, expected (r, r)")
            found[role] = s[0]
    if len(set(found.values())) > 1:
        raise reject(RejectReason.WRONG_RANK, f"module {module!r}: factor ranks disagree {found}")
    return next(iter(found.values()), None)


def _check_ranks(env: Envelope, expect: Expectation, ranks: Mapping[str, int]) -> None:
    if expect.rank is not None:
        for module, r in ranks.items():
            if r != expect.rank:
                raise reject(RejectReason.WRONG_RANK, f"module {module!r}: rank {r}, expected {expect.rank}")
        if env.rank not in (0, expect.rank):
            raise reject(RejectReason.WRONG_RANK, f"declared rank {env.rank}, expected {expect.rank}")
    elif expect.max_rank is not None:
        distinct = set(ranks.values())
        if len(distinct) > 1:
            raise reject(RejectReason.WRONG_RANK, f"rank differs across modules: {sorted(distinct)}")
        for r in distinct:
            if not expect.min_rank <= r <= expect.max_rank:
                raise reject(
                    RejectReason.WRONG_RANK,
                    f"rank {r} outside [{expect.min_rank}, {expect.max_rank}]",
                )
            if env.rank not in (0, r):
                raise reject(RejectReason.WRONG_RANK, f"declared rank {env.rank}, tensors have {r}")
