"""How fedlora messages are laid out inside Flower records (shared by client and server).

The adapter travels as one encoded protobuf envelope (fedlora.protos) stored as a single
uint8 array in an ArrayRecord; Flower chunks large arrays for transport. The byte count a
run reports is the envelope's length.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

ENVELOPE = "envelope"
CONFIG = "config"
METRICS = "metrics"
JOB_CONFIG_KEY = "fedlora-config"

# Phases of the server's messages (ConfigRecord "phase").
PHASE_DESCRIBE = "describe"   # the node tells its partition, released size and rank
PHASE_INIT = "init"           # the method's init round (e.g. gradient estimates)
PHASE_TRAIN = "train"
# Secure aggregation's stages around a round's training message (client/secure.py).
PHASE_SECAGG_KEYS = "secagg-keys"
PHASE_SECAGG_SHARES = "secagg-shares"
PHASE_SECAGG_UNMASK = "secagg-unmask"
# The record (ConfigRecord / ArrayRecord) that carries the protocol's payloads.
SECAGG = "secagg"


def node_name(partition: int) -> str:
    """A node's name in reports, ledgers and envelopes."""
    return f"partition-{partition}"


def envelope_record(data: bytes) -> ArrayRecord:
    return ArrayRecord({"bytes": Array(np.frombuffer(data, dtype=np.uint8).copy())})


def envelope_bytes(content: RecordDict) -> bytes:
    if ENVELOPE not in content.array_records:
        raise ValueError("message carries no adapter envelope")
    return content.array_records[ENVELOPE]["bytes"].numpy().tobytes()


def config_record(job: Mapping[str, Any], **values: Any) -> ConfigRecord:
    record = ConfigRecord({JOB_CONFIG_KEY: json.dumps(job, sort_keys=True)})
    for key, value in values.items():
        record[key] = value
    return record
