"""LoRA-aware federated aggregation: pure torch math, one file per method.

Tensors in, tensors out: no Flower, no I/O, nothing else of fedlora. See each method's
module docstring for its exact math. Every built-in method is exported here, with the
helpers a method written elsewhere (a plug-in) builds on.
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
    as_factor,
    client_weights,
    option,
    qr_svd,
    require_downlink,
    shared_a,
    spec_from_meta,
    stable_seed,
    weighted_sum,
)
from .fedavg import FedAvg
from .fedex import FedExLoRA
from .fedsa import FedSALoRA
from .fedsb import FedSB
from .fedsvd import FedSVD, refactorize
from .ffa import FFA
from .flexlora import FlexLoRA
from .flora import FLoRA
from .registry import ENTRY_POINT_GROUP, available_methods, get_method, register_method
from .rolora import RoLoRA

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
    "FedExLoRA",
    "FedSALoRA",
    "FedSB",
    "FedSVD",
    "FlexLoRA",
    "RoLoRA",
    "GlobalState",
    "Method",
    "Stacked",
    "as_factor",
    "option",
    "available_methods",
    "client_weights",
    "get_method",
    "qr_svd",
    "refactorize",
    "register_method",
    "require_downlink",
    "shared_a",
    "spec_from_meta",
    "stable_seed",
    "weighted_sum",
]
