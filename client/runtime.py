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
from fedlora.task.base_model import load_base
from fedlora.task.data import TokenizedData

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
    base = load_base(cfg, device_name)
    method = method_from_config(strategy)
    # PEFT injects into the base in place: it is already on its device (load_base).
    host = AdapterHost(base.model, base.targets, base.head_names, method.adapter_layer)
    spec = base.spec(cfg)
    runtime = ClientRuntime(dict(cfg), base.device, base.data, host, method, spec,
                            base.fingerprint, base.task)
    # One runtime per process is the norm; drop others so memory stays flat.
    _RUNTIMES.clear()
    _RUNTIMES[key] = runtime
    _log.info("client runtime ready: %s on %s, %d target modules", model_cfg["name"], base.device,
              len(base.targets))
    return runtime
