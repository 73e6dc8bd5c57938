"""Central evaluation of the global model on the fixed held-out split, and PEFT export.

The server holds its own copy of the frozen base model. Every method's global delta is
W - W0 = U V (fedlora.aggregation's ``Method.delta``), so evaluating the global model is
merging U V into the target weights; no adapter layers are needed here.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from fedlora.aggregation import AdapterSpec, GlobalState, Method
from fedlora.task.adapters import export_peft, merge_deltas
from fedlora.task.data import TokenizedData, data_for
from fedlora.task.evaluate import evaluate
from fedlora.task.models import (
    build_model,
    fingerprint,
    head_parameter_names,
    resolve_device,
    target_module_names,
)

_log = logging.getLogger(__name__)


class CentralEvaluator:
    """The server's view of the model: shapes, W0 fingerprint, initial head, evaluation."""

    def __init__(self, cfg: Mapping[str, Any]):
        self.cfg = cfg
        model_cfg = cfg["model"]
        self.task = model_cfg["task"]
        self.device = resolve_device(str(cfg.get("device", "cpu")))
        self.data: TokenizedData = data_for(cfg)
        self.model = build_model(model_cfg, self.data.num_labels).to(self.device)
        self.targets = target_module_names(self.model, list(model_cfg["target_modules"]))
        self.head_modules = list(model_cfg.get("head_modules") or [])
        self.head_names = head_parameter_names(self.model, self.head_modules)
        self.linears = {n: self.model.get_submodule(n) for n in self.targets}
        self.w0 = {n: lin.weight.detach().clone() for n, lin in self.linears.items()}
        self.fingerprint = fingerprint(self.model, self.targets)
        params = dict(self.model.named_parameters())
        self.initial_head = {n: params[n].detach().float().cpu().clone() for n in self.head_names}

    def spec(self) -> AdapterSpec:
        strategy = self.cfg["strategy"]
        shapes = {n: (lin.out_features, lin.in_features) for n, lin in self.linears.items()}
        return AdapterSpec(shapes=shapes, rank=int(strategy["rank"]),
                           alpha=float(strategy["alpha"]), seed=int(self.cfg["federation"]["seed"]))

    def load_global(self, method: Method, state: GlobalState) -> torch.nn.Module:
        deltas = {n: method.delta(state, n) for n in self.targets}
        merge_deltas(self.linears, self.w0, deltas)
        with torch.no_grad():
            params = dict(self.model.named_parameters())
            for name, tensor in state.head.items():
                params[name].copy_(tensor.to(params[name]))
        return self.model

    def evaluate(self, method: Method, state: GlobalState) -> dict[str, float]:
        model = self.load_global(method, state)
        return evaluate(model, self.data.test, self.task, device=self.device)

    def export(self, method: Method, state: GlobalState, out_dir: Path) -> dict[str, int]:
        """Write the global model's adapter as a PEFT directory (exact: B = U, A = V)."""
        base = build_model(self.cfg["model"], self.data.num_labels)
        deltas = {n: tuple(t.float().cpu() for t in method.delta(state, n)) for n in self.targets}
        return export_peft(base, self.targets, deltas, state.head, self.head_modules, out_dir)
