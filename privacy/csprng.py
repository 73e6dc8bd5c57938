"""Randomness for DP releases: a ChaCha20 keystream under a fresh key from the OS.

Every release (one private round, one init-round estimate) draws its Poisson samples and
its Gaussian noise from a new :class:`Csprng`, whose 256-bit key comes from
``os.urandom`` and is never stored. Nothing about the noise is a function of anything the
node keeps, so training a round again draws independent noise (and is charged again).

Uniforms: 53 bits from each 64-bit keystream word, shifted off zero, u in (0, 1).
Gaussians: Box-Muller in float64, then cast to the target dtype. A float64 Box-Muller
leaves far fewer representable gaps than a float32 one (Mironov 2012's attack exploits
those gaps); it is not the snapping mechanism, and README says so.

:class:`SeededRandomness` is the deterministic stand-in that tests and the audit's
deliberately broken mechanisms use (noise reused across two releases); production code
never constructs it.
"""

from __future__ import annotations

import math
import os
from typing import Protocol

import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

_TWO_PI = 2.0 * math.pi


class Randomness(Protocol):
    """What a DP release draws from: uniforms in (0, 1) and Gaussian noise."""

    def uniform(self, n: int) -> torch.Tensor: ...

    def normal(self, shape: torch.Size | tuple[int, ...], std: float, *,
               device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.float32) -> torch.Tensor: ...


def _box_muller(u1: torch.Tensor, u2: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(_TWO_PI * u2)


class Csprng:
    """A ChaCha20 keystream keyed with 32 fresh bytes of OS randomness."""

    def __init__(self) -> None:
        key, nonce = os.urandom(32), os.urandom(16)
        self._stream = Cipher(algorithms.ChaCha20(key, nonce), mode=None).encryptor()

    def _words(self, n: int) -> torch.Tensor:
        raw = self._stream.update(bytes(8 * n))
        return torch.frombuffer(bytearray(raw), dtype=torch.int64)

    def uniform(self, n: int) -> torch.Tensor:
        """``n`` float64 uniforms in the open interval (0, 1)."""
        if n <= 0:
            return torch.empty(0, dtype=torch.float64)
        top53 = torch.bitwise_right_shift(self._words(n), 11) & ((1 << 53) - 1)
        return (top53.to(torch.float64) + 0.5) * 2.0**-53

    def normal(self, shape: torch.Size | tuple[int, ...], std: float, *,
               device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """N(0, std^2) noise of ``shape`` (drawn on the CPU, moved to ``device``)."""
        n = math.prod(shape)
        u = self.uniform(2 * n)
        z = _box_muller(u[:n], u[n:]) * float(std)
        return z.reshape(shape).to(device=device, dtype=dtype)


class SeededRandomness:
    """Deterministic randomness from a seed: for tests and deliberately broken mechanisms.

    Two instances with the same seed give the same draws: exactly the reuse a DP release
    must never have.
    """

    def __init__(self, seed: int) -> None:
        self._generator = torch.Generator().manual_seed(int(seed))

    def uniform(self, n: int) -> torch.Tensor:
        u = torch.rand(max(n, 0), generator=self._generator, dtype=torch.float64)
        return u.clamp_min(2.0**-54)

    def normal(self, shape: torch.Size | tuple[int, ...], std: float, *,
               device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
        z = torch.randn(tuple(shape), generator=self._generator, dtype=torch.float64)
        return (z * float(std)).to(device=device, dtype=dtype)
