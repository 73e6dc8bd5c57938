"""LoRA-aware federated aggregation: pure torch math, one file per method.

Tensors in, tensors out: no Flower, no I/O, nothing else of fedlora. See each method's
module docstring for its exact math, and the Methods section of README.md for an overview.
"""

from .base import (
    ADAPTER_LAYERS,
    HEAD_PREFIX,
    ROLES,
    SEP,
    AdapterSpec,
    ClientStart,
    ClientUpdate,
    Factors,
    GlobalState,
    Method,
    Stacked,
    client_weights,
    option,
    qr_svd,
    shared_a,
    spec_from_meta,
    stable_seed,
)
from .fedavg import FedAvg
from .fedsb import FedSB
from .fedsvd import FedSVD, refactorize
from .ffa import FFA
from .flora import FLoRA
from .registry import ENTRY_POINT_GROUP, available_methods, get_method, register_method

__all__ = [
    "ADAPTER_LAYERS",
    "HEAD_PREFIX",
    "SEP",
    "ENTRY_POINT_GROUP",
    "FFA",
    "ROLES",
    "AdapterSpec",
    "ClientStart",
    "ClientUpdate",
    "FLoRA",
    "Factors",
    "FedAvg",
    "FedSB",
    "FedSVD",
    "GlobalState",
    "Method",
    "Stacked",
    "option",
    "available_methods",
    "client_weights",
    "get_method",
    "qr_svd",
    "refactorize",
    "register_method",
    "shared_a",
    "spec_from_meta",
    "stable_seed",
]
