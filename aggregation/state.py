"""The data a method works on: the adapter spec, client updates, the global state.

Notation (DESIGN.md section 4), for one adapted linear module with frozen weight W0
(d_out x d_in): B is d_out x r, A is r x d_in, R is r x r, s = alpha / r is the LoRA
scaling. Pure torch: no I/O, nothing else of fedlora.
"""

from __future__ import annotations

import copy
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

Factors = dict[str, dict[str, torch.Tensor]]
"""module name -> role -> tensor. Roles: "A" (r x d_in), "B" (d_out x r), "R" (r x r) and
"G" (d_out x d_in full-weight gradient estimate, only in Fed-SB's init round), and "U"
(d_out x m), "V" (m x d_in): a low-rank term U V folded into the frozen weight."""

ROLES: tuple[str, ...] = ("A", "B", "R", "G", "U", "V")
WEIGHTINGS: tuple[str, ...] = ("examples", "uniform")
HEAD_PREFIX = "head"
SEP = "::"


@dataclass(frozen=True)
class AdapterSpec:
    """The adapted modules of a base model and the global LoRA hyper-parameters."""

    shapes: dict[str, tuple[int, int]]  # module name -> (d_out, d_in)
    rank: int
    alpha: float
    seed: int = 0

    def __post_init__(self) -> None:
        if not is_int(self.rank) or self.rank < 1:
            raise ValueError(f"AdapterSpec.rank must be an integer >= 1, got {self.rank!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)):
            raise ValueError(f"AdapterSpec.alpha must be a number > 0, got {self.alpha!r}")
        if not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ValueError(f"AdapterSpec.alpha must be finite and > 0, got {self.alpha!r}")
        if not is_int(self.seed):
            raise ValueError(f"AdapterSpec.seed must be an integer, got {self.seed!r}")
        if not isinstance(self.shapes, Mapping) or not self.shapes:
            raise ValueError("AdapterSpec.shapes must name at least one module: {name: (d_out, d_in)}")
        shapes: dict[str, tuple[int, int]] = {}
        for name, shape in self.shapes.items():
            check_module_name(name)
            dims = tuple(shape)
            if len(dims) != 2 or any(not is_int(d) or d < 1 for d in dims):
                raise ValueError(
                    f"AdapterSpec.shapes[{name!r}] must be (d_out, d_in) with integers >= 1, "
                    f"got {shape!r}"
                )
            shapes[name] = (int(dims[0]), int(dims[1]))
        # Normalize to plain tuples (lists from JSON/Hydra would otherwise leak through).
        object.__setattr__(self, "shapes", shapes)
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "rank", int(self.rank))
        object.__setattr__(self, "seed", int(self.seed))

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


def is_int(x: object) -> bool:
    """An integer (Python, numpy or torch), but not a bool."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def check_module_name(name: object) -> None:
    """Module names become flat checkpoint keys "module::role": keep them unambiguous."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"module names must be non-empty strings, got {name!r}")
    if SEP in name:
        raise ValueError(f"module name {name!r} must not contain {SEP!r}")
    if name == HEAD_PREFIX:
        raise ValueError(f"module name {HEAD_PREFIX!r} is reserved for head parameters")


@dataclass
class ClientUpdate:
    """What one client sends up after its local round."""

    factors: Factors  # exactly the method's uplink roles for every module
    num_examples: int
    scaling: float  # alpha_k / r_k the client used
    head: dict[str, torch.Tensor] = field(default_factory=dict)
    node: str = ""


@dataclass
class GlobalState:
    """The server's global adapter after ``round`` completed aggregation rounds."""

    round: int
    factors: Factors
    head: dict[str, torch.Tensor]
    meta: dict[str, Any]  # JSON-able: method, rank, alpha, seed, shapes, weighting, options

    def tensors(self) -> dict[str, torch.Tensor]:
        """Flat names for safetensors: "module::role" and "head::name"."""
        out: dict[str, torch.Tensor] = {}
        for module, roles in self.factors.items():
            check_module_name(module)
            for role, tensor in roles.items():
                out[f"{module}{SEP}{role}"] = tensor.contiguous()
        for name, tensor in self.head.items():
            out[f"{HEAD_PREFIX}{SEP}{name}"] = tensor.contiguous()
        return out

    @classmethod
    def from_tensors(
        cls, round: int, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]
    ) -> GlobalState:
        """Inverse of :meth:`tensors` (exact round trip)."""
        factors: Factors = {}
        head: dict[str, torch.Tensor] = {}
        for key, tensor in tensors.items():
            prefix, sep, rest = key.partition(SEP)
            if not sep or not rest:
                raise ValueError(f"tensor name {key!r} is not 'module::role' or 'head::name'")
            if prefix == HEAD_PREFIX:
                head[rest] = tensor
            else:
                if rest not in ROLES:
                    raise ValueError(f"tensor name {key!r}: unknown role {rest!r}")
                factors.setdefault(prefix, {})[rest] = tensor
        return cls(round=int(round), factors=factors, head=head, meta=copy.deepcopy(dict(meta)))


@dataclass
class ClientStart:
    """What a client loads at the start of its local round."""

    init: Factors  # initial factor values per module (fedsb without first contact: only R)
    trainable: tuple[str, ...]  # roles the client trains this round
    base_delta: dict[str, tuple[torch.Tensor, torch.Tensor]]  # flora: W = W0 + U @ V
    rank: int
    scaling: float
