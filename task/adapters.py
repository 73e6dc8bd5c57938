"""Adapter injection on a frozen base model, factor swapping, delta merging and PEFT export.

One :class:`AdapterHost` wraps one base model for the life of a process; virtual clients
only swap adapter tensors in and out of it. The A/B methods use PEFT LoRA layers (one PEFT
adapter per rank, so FLoRA's heterogeneous ranks share the base); Fed-SB uses
:class:`SBLinear` (W0 x + s B R A x with B, A frozen and R an ``nn.Linear``, so Opacus's
per-sample gradient machinery covers it).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedlora.aggregation import ClientStart, Factors

ROLES = ("A", "B", "R")


def _peft_wrap(base: nn.Module, config: Any, **kwargs: Any) -> nn.Module:
    """get_peft_model, without the FutureWarning that PEFT triggers by reading
    transformers' deprecated ``is_gradient_checkpointing`` (nothing here uses it)."""
    from peft import get_peft_model

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated",
                                category=FutureWarning)
        return get_peft_model(base, config, **kwargs)


class SBLinear(nn.Module):
    """LoRA-SB layer: y = W0 x + s B R A x with only R trained."""

    def __init__(self, base: nn.Linear, rank: int, scaling: float) -> None:
        super().__init__()
        self.base_layer = base
        self.scaling = scaling
        self.sb_A = nn.Linear(base.in_features, rank, bias=False)
        self.sb_R = nn.Linear(rank, rank, bias=False)
        self.sb_B = nn.Linear(rank, base.out_features, bias=False)
        for layer in (self.sb_A, self.sb_R, self.sb_B):
            layer.to(base.weight.device)
            nn.init.zeros_(layer.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The factors stay float32 under a half-precision base (as PEFT keeps LoRA's).
        low_rank = self.sb_B(self.sb_R(self.sb_A(x.to(self.sb_A.weight.dtype))))
        return self.base_layer(x) + (self.scaling * low_rank).to(x.dtype)


class AdapterHost:
    """A frozen base model whose adapters are (re)loaded per client and per round."""

    def __init__(self, model: nn.Module, targets: list[str], head_params: list[str], kind: str):
        if kind not in ("lora", "lora_sb"):
            raise ValueError(f"adapter kind must be 'lora' or 'lora_sb', got {kind!r}")
        self.kind = kind
        self.base = model
        self.targets = list(targets)
        self.linears: dict[str, nn.Linear] = {n: model.get_submodule(n) for n in self.targets}
        self.w0 = {n: lin.weight.detach().clone() for n, lin in self.linears.items()}
        self.head = {n: p for n, p in model.named_parameters() if n in set(head_params)}
        self.model: nn.Module = model
        self._layers: dict[str, nn.Module] = {}
        self._active: str | None = None
        self._sb_rank: int | None = None

    # -- loading ---------------------------------------------------------------------
    def start(self, start: ClientStart, head: Mapping[str, torch.Tensor]) -> nn.Module:
        """Load a client's starting point; returns the module to train (train mode)."""
        with torch.no_grad():
            for name, linear in self.linears.items():
                weight = self.w0[name]
                if name in start.base_delta:
                    u, v = start.base_delta[name]
                    if u.shape[1]:
                        weight = weight + (u.to(weight) @ v.to(weight))
                linear.weight.copy_(weight)
        if self.kind == "lora":
            self._activate_lora(start.rank, start.scaling)
        else:
            self._activate_sb(start.rank, start.scaling)
        self.load_factors(start.init)
        self.set_trainable(start.trainable)
        self.load_head(head)
        return self.model.train()

    def load_factors(self, factors: Factors) -> None:
        with torch.no_grad():
            for name, roles in factors.items():
                for role, tensor in roles.items():
                    param = self._factor(name, role)
                    if param.shape != tensor.shape:
                        raise ValueError(
                            f"{name}.{role}: adapter shape {tuple(param.shape)} but got "
                            f"{tuple(tensor.shape)}"
                        )
                    param.copy_(tensor.to(param))

    def load_head(self, head: Mapping[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, tensor in head.items():
                if name not in self.head:
                    raise ValueError(f"unknown head parameter {name!r}")
                self.head[name].copy_(tensor.to(self.head[name]))

    def set_trainable(self, roles: tuple[str, ...]) -> None:
        for param in self.model.parameters():
            param.requires_grad_(False)
        for name in self.targets:
            for role in roles:
                self._factor(name, role).requires_grad_(True)
        for param in self.head.values():
            param.requires_grad_(True)

    # -- reading ---------------------------------------------------------------------
    def factors(self, roles: tuple[str, ...]) -> Factors:
        return {
            name: {role: self._factor(name, role).detach().float().cpu().clone() for role in roles}
            for name in self.targets
        }

    def head_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().float().cpu().clone() for n, p in self.head.items()}

    def shapes(self) -> dict[str, tuple[int, int]]:
        return {n: (lin.out_features, lin.in_features) for n, lin in self.linears.items()}

    # -- internals -------------------------------------------------------------------
    def _factor(self, name: str, role: str) -> torch.Tensor:
        layer = self._layers[name]
        if self.kind == "lora":
            if role == "A":
                return layer.lora_A[self._active].weight
            if role == "B":
                return layer.lora_B[self._active].weight
        else:
            if role in ROLES:
                return getattr(layer, f"sb_{role}").weight
        raise ValueError(f"adapter kind {self.kind!r} has no factor role {role!r}")

    def _activate_lora(self, rank: int, scaling: float) -> None:
        from peft import LoraConfig

        adapter = f"r{rank}"
        config = LoraConfig(
            r=rank, lora_alpha=scaling * rank, target_modules=self.targets, lora_dropout=0.0,
            bias="none",
        )
        if self._active is None:
            # PEFT injects into the base in place; it must already sit on its device.
            self.model = _peft_wrap(self.base, config, adapter_name=adapter)
            inner = self.model.base_model.model
            self._layers = {n: inner.get_submodule(n) for n in self.targets}
        elif adapter not in self.model.peft_config:
            self.model.add_adapter(adapter, config)
        if self._active != adapter:
            self.model.set_adapter(adapter)
            self._active = adapter
        for layer in self._layers.values():
            layer.scaling[adapter] = scaling

    def _activate_sb(self, rank: int, scaling: float) -> None:
        if self._sb_rank is None:
            for name, linear in self.linears.items():
                parent_name, _, child = name.rpartition(".")
                parent = self.base.get_submodule(parent_name) if parent_name else self.base
                layer = SBLinear(linear, rank, scaling)
                setattr(parent, child, layer)
                self._layers[name] = layer
            self._sb_rank = rank
        elif self._sb_rank != rank:
            raise ValueError(f"Fed-SB rank is fixed per run ({self._sb_rank}), got {rank}")
        for layer in self._layers.values():
            layer.scaling = scaling


def merge_deltas(
    linears: Mapping[str, nn.Linear],
    w0: Mapping[str, torch.Tensor],
    deltas: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
) -> None:
    """Set every target weight to W0 + U V (the global model for evaluation)."""
    with torch.no_grad():
        for name, linear in linears.items():
            u, v = deltas[name]
            weight = w0[name]
            if u.shape[1]:
                weight = weight + u.to(weight) @ v.to(weight)
            linear.weight.copy_(weight)


def export_peft(
    base: nn.Module,
    targets: list[str],
    deltas: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    head: Mapping[str, torch.Tensor],
    head_modules: list[str],
    out_dir: str | Path,
    pooling: str = "pooler",
    task_type: str | None = None,
) -> dict[str, int]:
    """Write the global delta as a PEFT LoRA adapter directory; returns the rank per module.

    Every method's global delta is exactly U V, so a LoRA with B = U, A = V and scaling 1
    (lora_alpha = r per module) reproduces it with no approximation. ``base`` is consumed.
    """
    from peft import LoraConfig

    ranks = {name: max(1, int(deltas[name][0].shape[1])) for name in targets}
    top = max(ranks.values())
    config = LoraConfig(
        r=top, lora_alpha=top, target_modules=targets, lora_dropout=0.0, bias="none",
        rank_pattern={name: r for name, r in ranks.items() if r != top},
        alpha_pattern={name: r for name, r in ranks.items() if r != top},
        modules_to_save=list(head_modules) or None, task_type=task_type,
    )
    with torch.no_grad():
        for name, tensor in head.items():
            base.get_parameter(name).copy_(tensor)
    model = _peft_wrap(base, config)
    inner = model.base_model.model
    with torch.no_grad():
        for name in targets:
            layer = inner.get_submodule(name)
            u, v = deltas[name]
            a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            a.zero_()
            b.zero_()
            if u.shape[1]:
                a.copy_(v.to(a))
                b.copy_(u.to(b))
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    # The base the adapter belongs on: with mean pooling it is build_model's
    # MeanPooledClassifier, not AutoModelForSequenceClassification (README, Outputs).
    (tmp / "fedlora.json").write_text(json.dumps({"ranks": ranks, "pooling": pooling},
                                                 indent=1))
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)
    return ranks
