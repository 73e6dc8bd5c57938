"""Central evaluation of the global model on the fixed held-out split, and PEFT export.

The server holds its own copy of the frozen base model. Every method's global delta is
W - W0 = U V (fedlora.aggregation's ``Method.delta``), so evaluating the global model is
merging U V into the target weights; no adapter layers are needed here.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from fedlora.aggregation import AdapterSpec, GlobalState, Method
from fedlora.task.adapters import export_peft, merge_deltas
from fedlora.task.base_model import load_base
from fedlora.task.evaluate import evaluate
from fedlora.task.llm import resolve_heads
from fedlora.task.models import (
    build_model,
)

_log = logging.getLogger(__name__)


class CentralEvaluator:
    """The server's view of the model: shapes, W0 fingerprint, initial head, evaluation."""

    def __init__(self, cfg: Mapping[str, Any]):
        self.cfg = cfg
        base = load_base(cfg, str(cfg.get("device", "cpu")))
        self.base = base
        self.task, self.device, self.data, self.model = base.task, base.device, base.data, base.model
        self.targets, self.head_names = base.targets, base.head_names
        self.head_modules = resolve_heads(self.model, cfg["model"])
        self.linears = {n: self.model.get_submodule(n) for n in self.targets}
        self.w0 = {n: lin.weight.detach().clone() for n, lin in self.linears.items()}
        self.fingerprint = base.fingerprint
        params = dict(self.model.named_parameters())
        self.initial_head = {n: params[n].detach().float().cpu().clone() for n in self.head_names}

    def spec(self) -> AdapterSpec:
        return self.base.spec(self.cfg)

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
        result = evaluate(model, self.data.test, self.task, device=self.device)
        validation = getattr(self.data, "validation", None)
        if validation is not None:  # for tuning: the test split is for reporting only
            scored = evaluate(model, validation, self.task, device=self.device)
            result.update(val_accuracy=scored["accuracy"], val_loss=scored["loss"])
        if self.task == "causal_lm" and getattr(self.data, "gen_prompts", None):
            result.update(self._generation(model, state))
        return result

    def _generation(self, model: torch.nn.Module, state: GlobalState) -> dict[str, float]:
        """exact_match and rougeL of the global model's greedy answers to the held-out
        prompts; also appended to RUN_DIR/generation.jsonl with the answers."""
        from fedlora.task.generation import generate, generation_scores
        from fedlora.task.models import load_tokenizer

        model_cfg = self.cfg["model"]
        tiny = str(model_cfg["source"]).startswith("tiny")
        answers = generate(model, load_tokenizer(model_cfg), self.data.gen_prompts,
                           template=self.data.template, max_length=int(model_cfg["max_length"]),
                           max_new_tokens=int(self.cfg["data"].get("max_new_tokens") or 32),
                           vocab_cap=int(model_cfg["vocab_size"]) if tiny else None,
                           device=self.device)
        scores = generation_scores(answers, self.data.gen_references)
        if self.cfg.get("run_dir"):
            row = {"round": state.round, **scores,
                   "answers": [{"answer": a, "reference": r} for a, r in
                               zip(answers, self.data.gen_references, strict=True)]}
            path = Path(self.cfg["run_dir"]) / "generation.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(row) + "\n")
        return scores

    def export(self, method: Method, state: GlobalState, out_dir: Path) -> dict[str, int]:
        """Write the global model's adapter as a PEFT directory (exact: B = U, A = V)."""
        base = build_model(self.cfg["model"], self.data.num_labels)
        deltas = {n: tuple(t.float().cpu() for t in method.delta(state, n)) for n in self.targets}
        return export_peft(base, self.targets, deltas, state.head, self.head_modules, out_dir,
                           pooling=str(self.cfg["model"].get("pooling") or "pooler"),
                           task_type="CAUSAL_LM" if self.task == "causal_lm" else None)
