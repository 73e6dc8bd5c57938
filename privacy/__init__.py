"""Sample-level DP-SGD for federated clients (Opacus), accounted over the whole federation.

- :func:`calibrate_noise_multiplier`: one sigma for every step the client may take;
- :class:`PrivacyLedger`: the client's spend on disk, epsilon by accountant replay;
- :func:`run_private_round`: one private local round (budget check, DP-SGD, record);
- :func:`run_private_gradient_estimate`: Fed-SB's init gradients under DP;
- :func:`format_privacy_table`: the per-client report.

Nothing here knows about Flower or the rest of fedlora. Names load from their module on
first use (PEP 562): checking a config or a ledger must not pay for importing torch and
Opacus (about 5 s), which only the training engine needs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_OWNERS = {
    "ACCOUNTANTS": "accounting",
    "calibrate_noise_multiplier": "accounting",
    "effective_epsilon": "accounting",
    "epsilon_for_history": "accounting",
    "validate_delta": "accounting",
    "GRAD_SAMPLE_MODES": "settings",
    "DPSettings": "settings",
    "RoundStats": "dpsgd",
    "run_private_round": "dpsgd",
    "run_private_gradient_estimate": "gradient",
    "BudgetExhausted": "ledger",
    "LedgerError": "ledger",
    "PrivacyLedger": "ledger",
    "ledger_filename": "ledger",
    "read_ledgers": "ledger",
    "format_privacy_table": "report",
}

__all__ = [
    "ACCOUNTANTS",
    "BudgetExhausted",
    "DPSettings",
    "GRAD_SAMPLE_MODES",
    "LedgerError",
    "PrivacyLedger",
    "RoundStats",
    "calibrate_noise_multiplier",
    "effective_epsilon",
    "epsilon_for_history",
    "format_privacy_table",
    "ledger_filename",
    "read_ledgers",
    "run_private_gradient_estimate",
    "run_private_round",
    "validate_delta",
]


def __getattr__(name: str) -> Any:
    if name not in _OWNERS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_OWNERS[name]}", __name__), name)
    globals()[name] = value  # later lookups skip this hook
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_OWNERS])


if TYPE_CHECKING:  # what type checkers and IDEs see
    from .accounting import (
        ACCOUNTANTS,
        calibrate_noise_multiplier,
        effective_epsilon,
        epsilon_for_history,
        validate_delta,
    )
    from .dpsgd import RoundStats, run_private_round
    from .gradient import run_private_gradient_estimate
    from .ledger import BudgetExhausted, LedgerError, PrivacyLedger, ledger_filename, read_ledgers
    from .report import format_privacy_table
    from .settings import GRAD_SAMPLE_MODES, DPSettings
