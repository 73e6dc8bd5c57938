"""Encode, decode and validate adapter envelopes (fedlora.v1.AdapterEnvelope).

Everything that crosses the network for an adapter goes through :func:`encode` and
:func:`decode`: protobuf only, no pickle. Tensors travel as raw little-endian C-order bytes
in a wire dtype (float32, float16 or bfloat16; quantizing after DP noise costs no privacy)
and come back as float32 torch tensors.

:func:`decode` with an :class:`Expectation` is the server's gate: a payload that does not
match what the method expects raises :class:`UpdateRejected` with a :class:`RejectReason`
(log it and drop the update) instead of crashing the aggregation. Checks, in order: size
bound (before parsing), parse/truncation, schema version, method, round, direction,
fingerprint, per-tensor role/dtype/byte length, duplicates, modules and heads, roles,
shapes, ranks, scaling, finite values, norm bound (Frobenius norm of each factor tensor).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np
import torch
from google.protobuf.message import DecodeError

from .fedlora.v1 import adapter_pb2 as pb

Factors = dict[str, dict[str, torch.Tensor]]

SCHEMA_VERSION = 1
WIRE_DTYPES: tuple[str, ...] = ("float32", "float16", "bfloat16")
DIRECTIONS: tuple[str, ...] = ("up", "down")
FACTOR_ROLES: tuple[str, ...] = ("A", "B", "R", "G", "U", "V")
PRIVACY_FIELDS: tuple[str, ...] = (
    "epsilon", "delta", "noise_multiplier", "max_grad_norm", "sample_rate", "steps", "accountant",
)

_ROLE_PB = {"A": pb.ROLE_A, "B": pb.ROLE_B, "R": pb.ROLE_R, "G": pb.ROLE_G, "HEAD": pb.ROLE_HEAD,
            "U": pb.ROLE_U, "V": pb.ROLE_V}
_PB_ROLE = {v: k for k, v in _ROLE_PB.items()}
_DIR_PB = {"up": pb.DIRECTION_UP, "down": pb.DIRECTION_DOWN}
_PB_DIR = {v: k for k, v in _DIR_PB.items()}
# wire dtype -> (enum, torch dtype, numpy little-endian dtype of the raw bytes)
_DTYPES: dict[str, tuple[int, torch.dtype, str]] = {
    "float32": (pb.WIRE_DTYPE_FLOAT32, torch.float32, "<f4"),
    "float16": (pb.WIRE_DTYPE_FLOAT16, torch.float16, "<f2"),
    # numpy has no bfloat16: the bits travel as int16 and are reinterpreted by torch.
    "bfloat16": (pb.WIRE_DTYPE_BFLOAT16, torch.bfloat16, "<i2"),
}
_PB_DTYPE = {v[0]: k for k, v in _DTYPES.items()}


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


@dataclass
class Envelope:
    method: str
    round: int
    direction: str  # "up" | "down"
    factors: Factors
    head: dict[str, torch.Tensor] = field(default_factory=dict)
    num_examples: int = 0
    scaling: float = 0.0
    rank: int = 0
    fingerprint: str = ""
    node: str = ""
    privacy: dict[str, float | int | str] | None = None
    extra: dict[str, str] = field(default_factory=dict)


@dataclass(kw_only=True)
class Expectation:
    """What the receiver expects; :func:`decode` rejects anything else."""

    method: str
    round: int
    direction: str = "up"
    shapes: dict[str, tuple[int, int]]  # module -> (d_out, d_in)
    roles: tuple[str, ...]  # exactly these roles for every module
    rank: int | None = None  # exact rank required (fedavg/ffa/fedsvd/fedsb)
    max_rank: int | None = None  # flora: any min_rank <= r_k <= max_rank, same on every module
    min_rank: int = 1  # with max_rank; 0 admits FLoRA's empty downlink before round 1
    head_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # required heads
    max_bytes: int = 256 * 2**20
    max_norm: float | None = None  # bound on the Frobenius norm of each factor tensor
    fingerprint: str | None = None
    dtypes: tuple[str, ...] = WIRE_DTYPES  # accepted wire dtypes


# ----------------------------------------------------------------------------- encode


def _tensor_bytes(t: torch.Tensor, wire_dtype: str) -> bytes:
    _, tdtype, npdtype = _DTYPES[wire_dtype]
    t = t.detach().to(device="cpu", dtype=tdtype).contiguous()
    if tdtype == torch.bfloat16:
        t = t.view(torch.int16)
    # astype to an explicit little-endian dtype: a no-op here, a byte swap on big-endian.
    return t.numpy().astype(npdtype, copy=False).tobytes()


def _tensor_msg(module: str, role: str, t: torch.Tensor, wire_dtype: str) -> pb.Tensor:
    return pb.Tensor(
        module=module, role=_ROLE_PB[role], shape=list(t.shape), dtype=_DTYPES[wire_dtype][0],
        data=_tensor_bytes(t, wire_dtype),
    )


def to_message(env: Envelope, wire_dtype: str = "float32") -> pb.AdapterEnvelope:
    """The protobuf message for ``env`` (tests may mutate it to inject faults)."""
    if wire_dtype not in _DTYPES:
        raise ValueError(f"wire_dtype must be one of {WIRE_DTYPES}, got {wire_dtype!r}")
    if env.direction not in _DIR_PB:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {env.direction!r}")
    for name, value in (("round", env.round), ("num_examples", env.num_examples), ("rank", env.rank)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"Envelope.{name} must be an integer >= 0, got {value!r}")
    tensors = []
    for module, roles in env.factors.items():
        if not module:
            raise ValueError("module names must be non-empty")
        for role, t in roles.items():
            if role not in FACTOR_ROLES:
                raise ValueError(f"{module}: unknown role {role!r}, expected one of {FACTOR_ROLES}")
            tensors.append(_tensor_msg(module, role, t, wire_dtype))
    for name, t in env.head.items():
        if not name:
            raise ValueError("head parameter names must be non-empty")
        tensors.append(_tensor_msg(name, "HEAD", t, wire_dtype))
    msg = pb.AdapterEnvelope(
        schema_version=SCHEMA_VERSION, method=env.method, round=env.round,
        direction=_DIR_PB[env.direction], fingerprint=env.fingerprint, node=env.node,
        tensors=tensors, num_examples=env.num_examples, scaling=float(env.scaling),
        rank=env.rank, extra=dict(env.extra), tensor_count=len(tensors),
    )
    if env.privacy is not None:
        unknown = sorted(set(env.privacy) - set(PRIVACY_FIELDS))
        if unknown:
            raise ValueError(f"unknown privacy fields {unknown}; known: {PRIVACY_FIELDS}")
        msg.privacy.SetInParent()  # present even when empty
        for key, value in env.privacy.items():
            setattr(msg.privacy, key, value)
    return msg


def encode(env: Envelope, wire_dtype: str = "float32") -> bytes:
    """Serialize ``env``; tensors are cast to ``wire_dtype``."""
    # deterministic: map entries (extra) in a fixed order, so equal envelopes give equal bytes.
    return to_message(env, wire_dtype).SerializeToString(deterministic=True)


# ----------------------------------------------------------------------------- decode


def _reject(reason: RejectReason, detail: str) -> UpdateRejected:
    return UpdateRejected(reason, detail)


def _parse(data: bytes, max_bytes: int | None) -> pb.AdapterEnvelope:
    if max_bytes is not None and len(data) > max_bytes:
        raise _reject(RejectReason.OVERSIZED, f"{len(data)} bytes > limit {max_bytes}")
    msg = pb.AdapterEnvelope()
    try:
        msg.ParseFromString(bytes(data))
    except DecodeError as e:
        raise _reject(RejectReason.TRUNCATED, f"protobuf parse failed: {e}") from None
    # A newer schema may lay fields out differently: report its version before anything else.
    # (0 means absent, e.g. a message cut before its first byte: the trailer check decides.)
    if msg.schema_version not in (0, SCHEMA_VERSION):
        raise _reject(
            RejectReason.SCHEMA_VERSION,
            f"schema version {msg.schema_version}, this decoder reads {SCHEMA_VERSION}",
        )
    if not msg.HasField("tensor_count"):
        raise _reject(RejectReason.TRUNCATED, "no trailer (tensor_count): message cut short")
    if msg.tensor_count > len(msg.tensors):
        raise _reject(
            RejectReason.TRUNCATED, f"{len(msg.tensors)} tensors, trailer says {msg.tensor_count}"
        )
    if msg.tensor_count < len(msg.tensors):
        raise _reject(
            RejectReason.MALFORMED, f"{len(msg.tensors)} tensors, trailer says {msg.tensor_count}"
        )
    if msg.schema_version != SCHEMA_VERSION:
        raise _reject(
            RejectReason.SCHEMA_VERSION,
            f"schema version {msg.schema_version}, this decoder reads {SCHEMA_VERSION}",
        )
    if msg.direction not in _PB_DIR:
        raise _reject(RejectReason.MALFORMED, f"direction {msg.direction} is not up or down")
    return msg


def _tensor(t: pb.Tensor, dtypes: Sequence[str]) -> tuple[str, torch.Tensor]:
    where = f"tensor {t.module!r}"
    if not t.module:
        raise _reject(RejectReason.MALFORMED, "tensor with an empty module name")
    if t.role not in _PB_ROLE:
        raise _reject(RejectReason.WRONG_ROLE, f"{where}: unknown role {t.role}")
    role = _PB_ROLE[t.role]
    where = f"tensor {t.module!r} role {role}"
    name = _PB_DTYPE.get(t.dtype)
    if name is None or name not in dtypes:
        raise _reject(
            RejectReason.UNSUPPORTED_DTYPE,
            f"{where}: wire dtype {name or t.dtype} not in {tuple(dtypes)}",
        )
    _, tdtype, npdtype = _DTYPES[name]
    shape = tuple(int(d) for d in t.shape)
    need = math.prod(shape) * np.dtype(npdtype).itemsize
    if len(t.data) < need:
        raise _reject(
            RejectReason.TRUNCATED, f"{where}: {len(t.data)} data bytes, shape {shape} needs {need}"
        )
    if len(t.data) > need:
        raise _reject(
            RejectReason.MALFORMED, f"{where}: {len(t.data)} data bytes, shape {shape} needs {need}"
        )
    arr = np.frombuffer(t.data, dtype=npdtype).astype(npdtype[1:], copy=True)  # native order
    out = torch.from_numpy(arr)
    if tdtype == torch.bfloat16:
        out = out.view(torch.bfloat16)
    return role, out.reshape(shape).to(torch.float32)


def _envelope(msg: pb.AdapterEnvelope, dtypes: Sequence[str]) -> Envelope:
    factors: Factors = {}
    head: dict[str, torch.Tensor] = {}
    for t in msg.tensors:
        role, tensor = _tensor(t, dtypes)
        target = head if role == "HEAD" else factors.setdefault(t.module, {})
        key = t.module if role == "HEAD" else role
        if key in target:
            raise _reject(RejectReason.DUPLICATE_MODULE, f"tensor {t.module!r} role {role} repeated")
        target[key] = tensor
    privacy = None
    if msg.HasField("privacy"):
        privacy = {k: getattr(msg.privacy, k) for k in PRIVACY_FIELDS if msg.privacy.HasField(k)}
    return Envelope(
        method=msg.method, round=msg.round, direction=_PB_DIR[msg.direction], factors=factors,
        head=head, num_examples=msg.num_examples, scaling=msg.scaling, rank=msg.rank,
        fingerprint=msg.fingerprint, node=msg.node, privacy=privacy, extra=dict(msg.extra),
    )


def decode(data: bytes, expect: Expectation | None = None) -> Envelope:
    """Parse an encoded envelope; with ``expect``, validate it (raises UpdateRejected).

    Without ``expect`` only structural checks run (parse, trailer, schema version,
    direction, roles, dtypes, byte lengths, duplicates). Tensors come back as float32.
    """
    msg = _parse(data, expect.max_bytes if expect is not None else None)
    if expect is None:
        return _envelope(msg, WIRE_DTYPES)
    if msg.method != expect.method:
        raise _reject(RejectReason.WRONG_METHOD, f"method {msg.method!r}, expected {expect.method!r}")
    if msg.round < expect.round:
        raise _reject(RejectReason.STALE_ROUND, f"round {msg.round}, expected {expect.round}")
    if msg.round > expect.round:
        raise _reject(RejectReason.FUTURE_ROUND, f"round {msg.round}, expected {expect.round}")
    if _PB_DIR[msg.direction] != expect.direction:
        raise _reject(
            RejectReason.MALFORMED,
            f"direction {_PB_DIR[msg.direction]!r}, expected {expect.direction!r}",
        )
    if expect.fingerprint is not None and msg.fingerprint != expect.fingerprint:
        raise _reject(
            RejectReason.WRONG_FINGERPRINT,
            f"base model {msg.fingerprint!r}, expected {expect.fingerprint!r}",
        )
    env = _envelope(msg, expect.dtypes)
    validate(env, expect)
    return env


def validate(env: Envelope, expect: Expectation) -> None:
    """The content checks of :func:`decode` (modules, roles, shapes, ranks, values)."""
    _check_names(set(env.head), set(expect.head_shapes), "head parameter")
    for name, t in env.head.items():
        want = tuple(expect.head_shapes[name])
        if tuple(t.shape) != want:
            raise _reject(RejectReason.WRONG_SHAPE, f"head {name!r}: shape {tuple(t.shape)}, expected {want}")
    _check_names(set(env.factors), set(expect.shapes), "module")
    ranks: dict[str, int] = {}
    for module, roles in env.factors.items():
        if set(roles) != set(expect.roles):
            raise _reject(
                RejectReason.WRONG_ROLE,
                f"module {module!r}: roles {sorted(roles)}, expected {sorted(expect.roles)}",
            )
        r = _module_rank(module, roles, tuple(expect.shapes[module]))
        if r is not None:
            ranks[module] = r
    _check_ranks(env, expect, ranks)
    if not math.isfinite(env.scaling):
        raise _reject(RejectReason.NON_FINITE, f"scaling {env.scaling}")
    if env.scaling < 0:
        raise _reject(RejectReason.MALFORMED, f"negative scaling {env.scaling}")
    tensors = [(f"{m} {k}", t) for m, roles in env.factors.items() for k, t in roles.items()]
    for label, t in tensors + [(f"head {n}", t) for n, t in env.head.items()]:
        if not bool(torch.isfinite(t).all()):
            raise _reject(RejectReason.NON_FINITE, f"{label}: NaN or Inf values")
    if expect.max_norm is not None:
        for label, t in tensors:
            norm = float(torch.linalg.vector_norm(t))
            if norm > expect.max_norm:
                raise _reject(
                    RejectReason.NORM_BOUND,
                    f"{label}: Frobenius norm {norm:.6g} > bound {expect.max_norm:.6g}",
                )


def _check_names(got: set[str], want: set[str], what: str) -> None:
    unknown, missing = sorted(got - want), sorted(want - got)
    if unknown:
        raise _reject(RejectReason.UNKNOWN_MODULE, f"unexpected {what}(s) {unknown[:5]}")
    if missing:
        raise _reject(RejectReason.MISSING_MODULE, f"missing {what}(s) {missing[:5]}")


def _module_rank(module: str, roles: Mapping[str, torch.Tensor], shape: tuple[int, int]) -> int | None:
    """Check the rank-free dimensions of each role, return the module's rank (None: G only)."""
    d_out, d_in = shape
    found: dict[str, int] = {}
    for role, t in roles.items():
        s = tuple(t.shape)
        where = f"module {module!r} role {role}: shape {s}"
        if len(s) != 2:
            raise _reject(RejectReason.WRONG_SHAPE, f"{where} is not 2-D")
        if role == "G" and s != (d_out, d_in):
            raise _reject(RejectReason.WRONG_SHAPE, f"{where}, expected {(d_out, d_in)}")
        if role == "A":
            if s[1] != d_in:
                raise _reject(RejectReason.WRONG_SHAPE, f"{where}, expected (r, {d_in})")
            found[role] = s[0]
        if role == "B":
            if s[0] != d_out:
                raise _reject(RejectReason.WRONG_SHAPE, f"{where}, expected ({d_out}, r)")
            found[role] = s[1]
        if role == "R":
            if s[0] != s[1]:
                raise _reject(RejectReason.WRONG_SHAPE, f"{where}, expected (r, r)")
            found[role] = s[0]
    if len(set(found.values())) > 1:
        raise _reject(RejectReason.WRONG_RANK, f"module {module!r}: factor ranks disagree {found}")
    return next(iter(found.values()), None)


def _check_ranks(env: Envelope, expect: Expectation, ranks: Mapping[str, int]) -> None:
    if expect.rank is not None:
        for module, r in ranks.items():
            if r != expect.rank:
                raise _reject(RejectReason.WRONG_RANK, f"module {module!r}: rank {r}, expected {expect.rank}")
        if env.rank not in (0, expect.rank):
            raise _reject(RejectReason.WRONG_RANK, f"declared rank {env.rank}, expected {expect.rank}")
    elif expect.max_rank is not None:
        distinct = set(ranks.values())
        if len(distinct) > 1:
            raise _reject(RejectReason.WRONG_RANK, f"rank differs across modules: {sorted(distinct)}")
        for r in distinct:
            if not expect.min_rank <= r <= expect.max_rank:
                raise _reject(
                    RejectReason.WRONG_RANK,
                    f"rank {r} outside [{expect.min_rank}, {expect.max_rank}]",
                )
            if env.rank not in (0, r):
                raise _reject(RejectReason.WRONG_RANK, f"declared rank {env.rank}, tensors have {r}")


# ----------------------------------------------------------------------------- sizes


def _sizes(x: Envelope | bytes | bytearray | memoryview, wire_dtype: str) -> tuple[int, int]:
    if isinstance(x, Envelope):
        if wire_dtype not in _DTYPES:
            raise ValueError(f"wire_dtype must be one of {WIRE_DTYPES}, got {wire_dtype!r}")
        size = np.dtype(_DTYPES[wire_dtype][2]).itemsize
        factors = sum(t.numel() for roles in x.factors.values() for t in roles.values())
        return factors * size, sum(t.numel() for t in x.head.values()) * size
    msg = pb.AdapterEnvelope()
    try:
        msg.ParseFromString(bytes(x))
    except DecodeError as e:
        raise _reject(RejectReason.TRUNCATED, f"protobuf parse failed: {e}") from None
    head = sum(len(t.data) for t in msg.tensors if t.role == pb.ROLE_HEAD)
    return sum(len(t.data) for t in msg.tensors) - head, head


def payload_bytes(x: Envelope | bytes | bytearray | memoryview, wire_dtype: str = "float32") -> int:
    """Bytes of adapter-factor tensor data (heads excluded) of an envelope or its encoding.

    For an :class:`Envelope` the size it would have in ``wire_dtype``; for bytes the real
    size (``wire_dtype`` ignored).
    """
    return _sizes(x, wire_dtype)[0]


def head_bytes(x: Envelope | bytes | bytearray | memoryview, wire_dtype: str = "float32") -> int:
    """Bytes of head-parameter tensor data, the counterpart of :func:`payload_bytes`."""
    return _sizes(x, wire_dtype)[1]
