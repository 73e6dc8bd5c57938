"""The integer ring secure aggregation sums in: its parameters, fixed-point quantization and
error bound (pure numpy; the protocol is in task/secagg.py).

Quantization: x is clipped to [-c, c], scaled to [-L, L], L = 2^(bits-1) - 1, and rounded
stochastically (floor(y + u), u uniform in [0, 1): unbiased, each value moves by less than one
step c/L; 0 stays exactly 0), then stored mod M in two's complement. A sum of k vectors is off
by less than k steps per coordinate, plus float64 rounding of at most 2^(bits-52) steps
(``SecAggParams.sum_error_bound``). Not Flower's ``quantize``: it rounds into int32, which
caps bits at 31, and Fed-SB's init round needs more (its gradient estimates are about 1e-6
and the method takes their sign; see ``secagg.init_bits``).

Modulus: M = 2^(bits + ceil(log2 n)) > 2 n L, so a sum of at most n inputs, in [-nL, nL],
never wraps; a power of two makes "mod M" a bit mask, exact on uint64 (which wraps mod 2^64,
a multiple of M). bits + ceil(log2 n) <= 53 keeps the sum exact in float64.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

import numpy as np

MAX_BITS = 44  # float64 keeps the scaling exact to 2^(bits-52) steps (see sum_error_bound)


def modulus_bits(bits: int, num_clients: int) -> int:
    """log2 M = bits + ceil(log2 n): the ring a sum of n inputs of ``bits`` bits needs."""
    return bits + math.ceil(math.log2(max(num_clients, 1)))


def check_sum_fits(bits: int, num_clients: int) -> None:
    """Raise ValueError unless a sum of ``num_clients`` inputs quantized to ``bits`` bits
    converts to float64 exactly: the modulus' size bits + ceil(log2 n) <= 53."""
    need = modulus_bits(bits, num_clients)
    if need > 53:
        raise ValueError(f"bits + ceil(log2(num_clients)) = {bits} + {need - bits} = "
                         f"{need} bits, over float64's 53: the sum would not convert "
                         "exactly; lower bits")


@dataclass(frozen=True)
class SecAggParams:
    num_clients: int  # n, the cohort that shares keys
    threshold: int  # t, 2 <= t <= n: min survivors and Shamir threshold
    clip_range: float  # c > 0: inputs are clipped to [-c, c]
    bits: int = 16  # quantization: 2^bits - 1 levels over [-c, c] per client

    def __post_init__(self) -> None:
        for name, v in (("num_clients", self.num_clients), ("threshold", self.threshold),
                        ("bits", self.bits)):
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"SecAggParams.{name} must be an int, got {v!r}")
        if self.num_clients < 2:
            raise ValueError(f"num_clients must be >= 2, got {self.num_clients}")
        if not 2 <= self.threshold <= self.num_clients:
            raise ValueError(f"threshold must satisfy 2 <= t <= num_clients={self.num_clients}, "
                             f"got {self.threshold}")
        c = self.clip_range
        if isinstance(c, bool) or not isinstance(c, int | float) or not math.isfinite(c) or c <= 0:
            raise ValueError(f"clip_range must be a finite number > 0, got {c!r}")
        if not 2 <= self.bits <= MAX_BITS:
            raise ValueError(f"bits must be in [2, {MAX_BITS}], got {self.bits}")
        check_sum_fits(self.bits, self.num_clients)

    @property
    def half_levels(self) -> int:  # L = 2^(bits-1) - 1: one client's values are in [-L, L]
        return (1 << (self.bits - 1)) - 1

    @property
    def step(self) -> float:  # c / L: the value of one quantization level
        return self.clip_range / self.half_levels

    @property
    def modulus_bits(self) -> int:  # log2 M
        return modulus_bits(self.bits, self.num_clients)

    @property
    def modulus(self) -> int:
        """M = 2^(bits + ceil(log2 n)) > 2 n L: a sum of n inputs never wraps."""
        return 1 << self.modulus_bits

    def sum_error_bound(self, survivors: int) -> float:
        """Max |dequantized sum - true sum| per coordinate, inputs inside [-c, c].

        Stochastic rounding moves each value by less than one step c / L, so a sum of
        ``survivors`` vectors is off by less than survivors steps; scaling into and out of
        the integers in float64 adds at most 2^(bits-52) steps (1/256 of one at 44 bits).
        Inputs outside [-c, c] add their clipping error on top."""
        if not 1 <= survivors <= self.num_clients:
            raise ValueError(f"survivors must be in [1, {self.num_clients}], got {survivors}")
        return survivors * self.step * (1 + 2.0 ** (self.bits - 52))


def quantize_vector(params: SecAggParams, vector: np.ndarray) -> np.ndarray:
    """Clip to [-c, c], scale to [-L, L], round stochastically; two's complement mod M (uint64)."""
    y = np.clip(np.asarray(vector, dtype=np.float64).ravel(), -params.clip_range,
                params.clip_range) * (params.half_levels / params.clip_range)
    # Rounding noise is not a secret and not a privacy mechanism; OS entropy keeps it unbiased
    # across clients and rounds.
    u = np.random.default_rng(secrets.randbits(128)).random(y.shape)
    q = np.clip(np.floor(y + u), -params.half_levels, params.half_levels).astype(np.int64)
    return q.view(np.uint64) & np.uint64(params.modulus - 1)


def dequantize_sum(params: SecAggParams, q_sum: np.ndarray, count: int, *,
                   check_range: bool = True) -> np.ndarray:
    """The float64 sum of ``count`` vectors from their quantized sum mod M.

    ``check_range=False`` for inputs the clients quantized themselves with noise added on
    the grid (distributed DP): they may leave [-L, L], and a sum outside [-M/2, M/2) wraps,
    which is post-processing of the sum mod M, not a corruption to detect."""
    signed = q_sum.astype(np.int64)  # < M <= 2^53: fits
    signed[signed >= params.modulus // 2] -= params.modulus
    if check_range and signed.size and int(np.abs(signed).max()) > count * params.half_levels:
        raise ValueError("unmask: the unmasked sum is out of range; shares or masked "
                         "vectors are corrupt")
    return signed.astype(np.float64) * params.step
