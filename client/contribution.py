"""One node's contribution to a secure sum (client/secure.py masks it).

x = (trained - start) over the uplink roles and the head, times the scale the server
assigned (p_k, or 1/m under client-level DP). Under client-level DP (distributed DP) the
difference is first clipped to the server's C, the centred indicator kappa (b - 1/2) / m
is appended for adaptive clipping, and then, in units of the ring's grid step g:

    q = condround(x / g, R) + N_Z(0, sigma^2)          (int64, masked as is)

conditional randomized rounding to L2 norm <= R and a discrete Gaussian share, with R and
sigma = z R / sqrt(t - c) sent by the server (task/secure_sum.distributed_instructions;
the math is in privacy/client_level.py). Randomness: a fresh ChaCha20 keystream per release.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import ConfigRecord

from fedlora.privacy.client_level import (
    centred_indicator,
    check_discrete_noise,
    clip_to_norm,
    conditional_round,
    difference,
    discrete_gaussian,
)
from fedlora.privacy.csprng import Csprng
from fedlora.task.secure_sum import UNCLIPPED, Layout


def contribution(trained: Mapping[str, torch.Tensor], start: Mapping[str, torch.Tensor],
                 config: ConfigRecord) -> tuple[Layout, np.ndarray]:
    """This node's vector for the sum: float64 (quantized by the protocol), or int64 grid
    values already rounded and noised under distributed DP."""
    delta = difference(trained, start)
    clip = float(config.get("secagg-clip", 0.0))
    centred = None
    if clip > 0:
        delta, norm = clip_to_norm(delta, clip)
        centred = centred_indicator(norm, clip)
    scale = float(config["secagg-scale"])
    tensors = {k: v * scale for k, v in delta.items()}
    adaptive = bool(config.get("secagg-unclipped", False))
    layout = Layout.of_named(tensors, unclipped=adaptive)
    sigma = float(config.get("secagg-noise-std", 0.0))
    if sigma <= 0:
        if adaptive:
            raise ValueError("secure aggregation: an unclipped count without noise shares")
        return layout, layout.flatten(tensors)
    if centred is None:
        raise ValueError("distributed DP: noise shares without a clip")
    check_discrete_noise(sigma)
    if adaptive:
        kappa = float(config["secagg-count-scale"])
        tensors[UNCLIPPED] = torch.tensor(kappa * centred * scale, dtype=torch.float64)
    step, bound = float(config["secagg-grid-step"]), float(config["secagg-norm-bound"])
    grid = torch.from_numpy(layout.flatten(tensors)) / step
    rng = Csprng()
    noised = conditional_round(grid, bound, rng) + discrete_gaussian(grid.numel(), sigma, rng)
    return layout, noised.numpy().astype(np.int64)
