"""The frozen base model of a job, loaded the same way by the clients and the server:
data, model on its device, adapted target modules, trained head parameters, the W0
fingerprint both sides must agree on, and the adapter spec."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fedlora.aggregation import AdapterSpec

from .data import TokenizedData, data_for
from .llm import check_llm, resolve_heads
from .memory import check_memory
from .models import (
    build_model,
    fingerprint,
    head_parameter_names,
    resolve_device,
    target_module_names,
)


@dataclass
class BaseModel:
    data: TokenizedData
    model: nn.Module
    device: torch.device
    targets: list[str]  # adapted linear modules
    head_names: list[str]  # trained non-adapter parameters (e.g. the classifier)
    fingerprint: str  # of W0 of the targets: both sides must adapt the same weights
    task: str

    def spec(self, cfg: Mapping[str, Any]) -> AdapterSpec:
        """The adapter spec of a job: target shapes, rank, alpha, the shared seed."""
        strategy = cfg["strategy"]
        shapes = {}
        for name in self.targets:
            linear = self.model.get_submodule(name)
            shapes[name] = (linear.out_features, linear.in_features)
        return AdapterSpec(shapes=shapes, rank=int(strategy["rank"]),
                           alpha=float(strategy["alpha"]), seed=int(cfg["federation"]["seed"]))


def load_base(cfg: Mapping[str, Any], device_name: str) -> BaseModel:
    """Load a job's data and frozen base model on ``device_name`` (cpu, cuda[:N], auto)."""
    model_cfg = cfg["model"]
    device = resolve_device(device_name)
    data = data_for(cfg)
    check_llm(cfg)  # dtype, quantization, checkpointing under DP: refused with why
    if model_cfg.get("check_memory", True):
        check_memory(cfg)  # before the weights load: refuse with the numbers
    model = build_model(model_cfg, data.num_labels, device_name)
    if not getattr(model, "is_loaded_in_4bit", False) and not getattr(model, "is_loaded_in_8bit",
                                                                         False):
        model = model.to(device)  # a quantized base already sits on its GPU
    targets = target_module_names(model, list(model_cfg["target_modules"]))
    heads = head_parameter_names(model, resolve_heads(model, model_cfg))
    return BaseModel(data, model, device, targets, heads, fingerprint(model, targets),
                     model_cfg["task"])
