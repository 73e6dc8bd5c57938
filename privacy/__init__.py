"""Sample-level DP-SGD for federated clients (Opacus), accounted over the whole federation.

- :func:`calibrate_noise_multiplier`: one sigma for every step the client may take;
- :class:`PrivacyLedger`: the client's spend on disk, epsilon by accountant replay;
- :func:`run_private_round`: one private local round (budget check, DP-SGD, record);
- :func:`run_private_gradient_estimate`: Fed-SB's init gradients under DP;
- :func:`format_privacy_table`: the per-client report.

Nothing here knows about Flower or the rest of fedlora.
"""

from .accounting import (
    ACCOUNTANTS,
    calibrate_noise_multiplier,
    effective_epsilon,
    epsilon_for_history,
    validate_delta,
)
from .dpsgd import GRAD_SAMPLE_MODES, DPSettings, RoundStats, run_private_round
from .gradient import run_private_gradient_estimate
from .ledger import BudgetExhausted, LedgerError, PrivacyLedger, ledger_filename, read_ledgers
from .report import format_privacy_table

__all__ = [
    "ACCOUNTANTS",
    "GRAD_SAMPLE_MODES",
    "BudgetExhausted",
    "DPSettings",
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
