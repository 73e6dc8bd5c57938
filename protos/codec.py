"""Encode and decode adapter envelopes (fedlora.v1.AdapterEnvelope).

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
from collections.abc import Sequence

import numpy as np
import torch
from google.protobuf.message import DecodeError

from .envelope import (
    DIRECTIONS,
    FACTOR_ROLES,
    PRIVACY_FIELDS,
    SCHEMA_VERSION,
    WIRE_DTYPES,
    Envelope,
    Expectation,
    Factors,
)
from .fedlora.v1 import adapter_pb2 as pb
from .validation import RejectReason, reject, validate

__all__ = ["DIRECTIONS", "FACTOR_ROLES", "PRIVACY_FIELDS", "SCHEMA_VERSION", "WIRE_DTYPES",
           "Envelope", "Expectation", "Factors", "decode", "encode", "head_bytes",
           "payload_bytes", "to_message"]

_ROLE_PB = {"A": pb.ROLE_A, "B": pb.ROLE_B, "R": pb.ROLE_R, "G": pb.ROLE_G, "HEAD": pb.ROLE_HEAD,
            "U": pb.ROLE_U, "V": pb.ROLE_V, "Y": pb.ROLE_Y, "W": pb.ROLE_W}
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


# ----------------------------------------------------------------------------- encode


def _tensor_bytes(t: torch.Tensor, wire_dtype: str) -> bytes:
    _, tdtype, npdtype = _DTYPES[wire_dtype]
    write_into = None if isinstance(t, torch.Tensor) else getattr(t, "write_into", None)
    if write_into is not None:
        # A factor kept as blocks by reference (FLoRA's stack, aggregation.Stacked): its
        # blocks are written once, straight into a buffer of the wire dtype. numpy's buffer,
        # not torch.empty: numpy's allocator reuses mapped pages for big buffers, where
        # torch's maps fresh ones (page faults cost ~8x the copy on a loaded server).
        buffer = np.empty(tuple(t.shape), dtype=np.dtype(npdtype).newbyteorder("="))
        view = torch.from_numpy(buffer)
        write_into(view.view(torch.bfloat16) if tdtype == torch.bfloat16 else view)
        return buffer.astype(npdtype, copy=False).tobytes()
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


def _parse(data: bytes, max_bytes: int | None) -> pb.AdapterEnvelope:
    if max_bytes is not None and len(data) > max_bytes:
        raise reject(RejectReason.OVERSIZED, f"{len(data)} bytes > limit {max_bytes}")
    msg = pb.AdapterEnvelope()
    try:
        msg.ParseFromString(bytes(data))
    except DecodeError as e:
        raise reject(RejectReason.TRUNCATED, f"protobuf parse failed: {e}") from None
    # A newer schema may lay fields out differently: report its version before anything else.
    # (0 means absent, e.g. a message cut before its first byte: the trailer check decides.)
    if msg.schema_version not in (0, SCHEMA_VERSION):
        raise reject(
            RejectReason.SCHEMA_VERSION,
            f"schema version {msg.schema_version}, this decoder reads {SCHEMA_VERSION}",
        )
    if not msg.HasField("tensor_count"):
        raise reject(RejectReason.TRUNCATED, "no trailer (tensor_count): message cut short")
    if msg.tensor_count > len(msg.tensors):
        raise reject(
            RejectReason.TRUNCATED, f"{len(msg.tensors)} tensors, trailer says {msg.tensor_count}"
        )
    if msg.tensor_count < len(msg.tensors):
        raise reject(
            RejectReason.MALFORMED, f"{len(msg.tensors)} tensors, trailer says {msg.tensor_count}"
        )
    if msg.schema_version != SCHEMA_VERSION:
        raise reject(
            RejectReason.SCHEMA_VERSION,
            f"schema version {msg.schema_version}, this decoder reads {SCHEMA_VERSION}",
        )
    if msg.direction not in _PB_DIR:
        raise reject(RejectReason.MALFORMED, f"direction {msg.direction} is not up or down")
    return msg


def _tensor(t: pb.Tensor, dtypes: Sequence[str]) -> tuple[str, torch.Tensor]:
    where = f"tensor {t.module!r}"
    if not t.module:
        raise reject(RejectReason.MALFORMED, "tensor with an empty module name")
    if t.role not in _PB_ROLE:
        raise reject(RejectReason.WRONG_ROLE, f"{where}: unknown role {t.role}")
    role = _PB_ROLE[t.role]
    where = f"tensor {t.module!r} role {role}"
    name = _PB_DTYPE.get(t.dtype)
    if name is None or name not in dtypes:
        raise reject(
            RejectReason.UNSUPPORTED_DTYPE,
            f"{where}: wire dtype {name or t.dtype} not in {tuple(dtypes)}",
        )
    _, tdtype, npdtype = _DTYPES[name]
    shape = tuple(int(d) for d in t.shape)
    need = math.prod(shape) * np.dtype(npdtype).itemsize
    if len(t.data) < need:
        raise reject(
            RejectReason.TRUNCATED, f"{where}: {len(t.data)} data bytes, shape {shape} needs {need}"
        )
    if len(t.data) > need:
        raise reject(
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
            raise reject(RejectReason.DUPLICATE_MODULE, f"tensor {t.module!r} role {role} repeated")
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
        raise reject(RejectReason.WRONG_METHOD, f"method {msg.method!r}, expected {expect.method!r}")
    if msg.round < expect.round:
        raise reject(RejectReason.STALE_ROUND, f"round {msg.round}, expected {expect.round}")
    if msg.round > expect.round:
        raise reject(RejectReason.FUTURE_ROUND, f"round {msg.round}, expected {expect.round}")
    if _PB_DIR[msg.direction] != expect.direction:
        raise reject(
            RejectReason.MALFORMED,
            f"direction {_PB_DIR[msg.direction]!r}, expected {expect.direction!r}",
        )
    if expect.fingerprint is not None and msg.fingerprint != expect.fingerprint:
        raise reject(
            RejectReason.WRONG_FINGERPRINT,
            f"base model {msg.fingerprint!r}, expected {expect.fingerprint!r}",
        )
    env = _envelope(msg, expect.dtypes)
    validate(env, expect)
    return env


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
        raise reject(RejectReason.TRUNCATED, f"protobuf parse failed: {e}") from None
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
