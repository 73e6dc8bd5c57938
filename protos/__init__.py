"""The wire contract: fedlora.v1.AdapterEnvelope (protos/fedlora/v1/adapter.proto) and its codec.

Imports nothing else of fedlora: client and server both depend on it, never the reverse.
"""

from .codec import (
    DIRECTIONS,
    PRIVACY_FIELDS,
    SCHEMA_VERSION,
    WIRE_DTYPES,
    Envelope,
    Expectation,
    decode,
    encode,
    head_bytes,
    payload_bytes,
    to_message,
)
from .validation import RejectReason, UpdateRejected, validate

__all__ = [
    "DIRECTIONS",
    "PRIVACY_FIELDS",
    "SCHEMA_VERSION",
    "WIRE_DTYPES",
    "Envelope",
    "Expectation",
    "RejectReason",
    "UpdateRejected",
    "decode",
    "encode",
    "head_bytes",
    "payload_bytes",
    "to_message",
    "validate",
]
