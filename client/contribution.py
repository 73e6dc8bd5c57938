"""One node's contribution to a secure sum (client/secure.py masks it).

(trained - start) over the uplink roles and the head; under client-level DP clipped to the
server's C, plus this node's share of the noise (distributed DP: N(0, z_u^2 C^2 / t)),
and the unclipped indicator for adaptive clipping; times the scale the server assigned
(p_k, or 1/m under client-level DP).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import ConfigRecord

from fedlora.privacy.client_level import add_gaussian, clip_to_norm, difference
from fedlora.privacy.common import secure_generator
from fedlora.task.secure_sum import UNCLIPPED, Layout


def contribution(trained: Mapping[str, torch.Tensor], start: Mapping[str, torch.Tensor],
                 config: ConfigRecord) -> tuple[Layout, np.ndarray]:
    """This node's vector for the sum: (trained - start), clipped and noised as the server
    instructs under client-level DP, times the scale the server assigned."""
    delta = difference(trained, start)
    clip = float(config.get("secagg-clip", 0.0))
    indicator = None
    if clip > 0:
        delta, norm = clip_to_norm(delta, clip)
        indicator = 1.0 if norm <= clip else 0.0
    std = float(config.get("secagg-noise-std", 0.0))
    generator = secure_generator() if std > 0 else None
    if generator is not None:
        delta = add_gaussian(delta, std, generator)
    if bool(config.get("secagg-unclipped", False)):
        count_std = float(config.get("secagg-count-noise-std", 0.0))
        noise = float(torch.randn((), generator=generator or secure_generator(),
                                  dtype=torch.float64)) * count_std
        delta[UNCLIPPED] = torch.tensor((indicator or 0.0) + noise, dtype=torch.float64)
    scale = float(config["secagg-scale"])
    tensors = {k: v * scale for k, v in delta.items()}
    factors_and_head = {k: v for k, v in tensors.items() if k != UNCLIPPED}
    layout = Layout.of_named(factors_and_head, unclipped=UNCLIPPED in tensors)
    return layout, layout.flatten(tensors)
