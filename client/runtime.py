"""Per-process client runtime: the base model, data and method, built once and reused.

Many virtual clients share one worker process in simulation, so the frozen base model is
loaded once per process (per model config) and clients only swap adapter tensors.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from fedlora.aggregation import AdapterSpec, Method, get_method
from fedlora.task.adapters import AdapterHost
from fedlora.task.data import TokenizedData, load_data
from fedlora.task.models import (
    build_model,
    fingerprint,
    head_parameter_names,
    resolve_device,
    target_module_names,
)

_log = logging.getLogger(__name__)
_RUNTIMES: dict[str, ClientRuntime] = {}


@dataclass
class ClientRuntime:
    cfg: dict[str, Any]
    device: torch.device
    data: TokenizedData
    host: AdapterHost
    method: Method
    spec: AdapterSpec
    fingerprint: str
    task: str


def method_from_config(strategy: Mapping[str, Any]) -> Method:
    return get_method(strategy["name"], weighting=strategy["weighting"],
                      **dict(strategy.get("options") or {}))


def get_runtime(cfg: Mapping[str, Any], device_name: str) -> ClientRuntime:
    """The cached runtime for a job config (model, data, method, adapter rank)."""
    model_cfg, strategy = cfg["model"], cfg["strategy"]
    key = json.dumps([model_cfg, cfg["data"], strategy, device_name], sort_keys=True)
    if key in _RUNTIMES:
        return _RUNTIMES[key]
    device = resolve_device(device_name)
    vocab = int(model_cfg.get("vocab_size") or 0) or None
    data = load_data(cfg["data"], model_cfg, vocab_size=vocab)
    model = build_model(model_cfg, data.num_labels).to(device)
    targets = target_module_names(model, list(model_cfg["target_modules"]))
    heads = head_parameter_names(model, list(model_cfg.get("head_modules") or []))
    method = method_from_config(strategy)
    host = AdapterHost(model, targets, heads, method.adapter_layer)
    spec = AdapterSpec(shapes=host.shapes(), rank=int(strategy["rank"]),
                       alpha=float(strategy["alpha"]), seed=int(cfg["federation"]["seed"]))
    runtime = ClientRuntime(dict(cfg), device, data, host, method, spec,
                            fingerprint(model, targets), model_cfg["task"])
    # One runtime per process is the norm; drop others so memory stays flat.
    _RUNTIMES.clear()
    _RUNTIMES[key] = runtime
    _log.info("client runtime ready: %s on %s, %d target modules", model_cfg["name"], device,
              len(targets))
    return runtime
