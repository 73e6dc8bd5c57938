"""Builders of raw, possibly invalid, wire payloads for the codec's rejection tests."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedlora.protos.codec import _DIR_PB, _DTYPES, _PB_DTYPE, _ROLE_PB, SCHEMA_VERSION
from fedlora.protos.fedlora.v1 import adapter_pb2 as pb


def raw_tensor(
    module: str,
    role: str | int,
    shape: Sequence[int],
    dtype: str | int = "float32",
    data: bytes | None = None,
) -> pb.Tensor:
    """A protobuf Tensor with arbitrary (possibly invalid) fields, for tests and fault
    injection. Roles/dtypes by name ("A".."G", "HEAD"; "float32"...) or raw enum int;
    ``data`` defaults to zeros of the right length when the dtype is known."""
    role_v = _ROLE_PB[role] if isinstance(role, str) else role
    dtype_v = _DTYPES[dtype][0] if isinstance(dtype, str) else dtype
    if data is None:
        name = _PB_DTYPE.get(dtype_v)
        size = np.dtype(_DTYPES[name][2]).itemsize if name else 4
        data = bytes(math.prod(shape) * size)
    return pb.Tensor(module=module, role=role_v, shape=list(shape), dtype=dtype_v, data=data)


def raw_envelope(
    *,
    tensors: Sequence[pb.Tensor] = (),
    schema_version: int = SCHEMA_VERSION,
    method: str = "",
    round: int = 0,
    direction: str | int = "up",
    fingerprint: str = "",
    node: str = "",
    num_examples: int = 0,
    scaling: float = 0.0,
    rank: int = 0,
    privacy: Mapping[str, Any] | None = None,
    extra: Mapping[str, str] | None = None,
    tensor_count: int | None | str = "auto",
) -> bytes:
    """Serialize an envelope with arbitrary (possibly invalid) fields. ``tensor_count``:
    "auto" = len(tensors), None = omit the trailer, or any integer."""
    msg = pb.AdapterEnvelope(
        schema_version=schema_version, method=method, round=round,
        direction=_DIR_PB[direction] if isinstance(direction, str) else direction,
        fingerprint=fingerprint, node=node, tensors=list(tensors), num_examples=num_examples,
        scaling=scaling, rank=rank, extra=dict(extra or {}),
    )
    if privacy is not None:
        msg.privacy.SetInParent()
        for key, value in privacy.items():
            setattr(msg.privacy, key, value)
    if tensor_count == "auto":
        msg.tensor_count = len(tensors)
    elif tensor_count is not None:
        msg.tensor_count = int(tensor_count)
    return msg.SerializeToString(deterministic=True)
