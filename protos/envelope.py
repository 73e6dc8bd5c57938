"""What an adapter envelope holds and what a receiver expects of one: the wire contract's
data types, shared by the codec (codec.py) and the gate every update passes
(validation.py), so that neither imports the other."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

Factors = dict[str, dict[str, torch.Tensor]]

SCHEMA_VERSION = 1
WIRE_DTYPES: tuple[str, ...] = ("float32", "float16", "bfloat16")
DIRECTIONS: tuple[str, ...] = ("up", "down")
FACTOR_ROLES: tuple[str, ...] = ("A", "B", "R", "G", "U", "V", "Y", "W")
PRIVACY_FIELDS: tuple[str, ...] = (
    "epsilon", "delta", "noise_multiplier", "max_grad_norm", "sample_rate", "steps", "accountant",
)


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
