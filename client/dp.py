"""A node's DP-SGD setup for one job: calibrated settings, its ledger and its budget.

The noise multiplier is calibrated once for the whole planned federation (every round the
node may train, plus any init-round steps), with the same accountant that reports.
"""

from __future__ import annotations

import functools
import hashlib
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedlora.privacy import (
    DPSettings,
    LedgerError,
    PrivacyLedger,
    calibrate_noise_multiplier,
    effective_epsilon,
    ledger_filename,
    validate_delta,
)
from fedlora.task.files import atomic_write
from fedlora.task.training import local_sample_rate

from .node import NodeIdentity


@dataclass
class DPSetup:
    settings: DPSettings
    ledger: PrivacyLedger
    budget: float  # the stricter of the job's epsilon and the node's max-epsilon


class LedgerMissing(LedgerError):
    """The node has trained in this federation before, but its ledger is gone."""


@functools.lru_cache(maxsize=256)
def _calibrated_sigma(epsilon: float, delta: float, sample_rate: float, steps: int,
                      accountant: str) -> float:
    """The federation-wide noise multiplier; deterministic, so computed once per process."""
    return calibrate_noise_multiplier(epsilon, delta, sample_rate, steps, accountant)


def secret_path(ledger_path: Path) -> Path:
    return ledger_path.with_suffix(".secret")


def dp_setup(cfg: dict[str, Any], node: NodeIdentity, num_examples: int,
             extra_steps: int = 0) -> DPSetup | None:
    """This node's DP setup, or None without DP.

    Raises :class:`LedgerMissing` when the node's secret exists (it trained in this
    federation before) but its ledger does not: starting from zero would silently reset
    the budget. Other unreadable ledgers raise :class:`LedgerError`.
    """
    privacy = cfg["privacy"]
    if not privacy.get("enabled"):
        return None
    delta = float(privacy["delta"])
    validate_delta(delta, num_examples)
    budget = effective_epsilon(float(privacy["epsilon"]),
                               None if node.max_epsilon is None else float(node.max_epsilon))
    strategy, fed = cfg["strategy"], cfg["federation"]
    sample_rate = local_sample_rate(strategy, num_examples)
    planned = int(strategy["local_steps"]) * int(fed["rounds"]) + extra_steps
    sigma = _calibrated_sigma(budget, delta, sample_rate, planned, privacy["accountant"])
    if not node.ledger_dir:
        raise ValueError("DP is on but no ledger directory is set (node config ledger-dir)")
    federation = str(cfg["run_name"])
    path = Path(node.ledger_dir) / ledger_filename(federation, node.name)
    if secret_path(path).exists() and not path.exists():
        raise LedgerMissing(
            f"privacy ledger {path} is missing but this node's secret {secret_path(path).name} "
            "shows it trained in this federation before; refusing rather than restarting the "
            "budget from zero. Restore the ledger from a backup, or reset knowingly by deleting "
            "the secret too (README, Privacy: a lost ledger)")
    ledger = PrivacyLedger.open(
        node.ledger_dir, federation=federation, node=node.name,
        mechanism=privacy["accountant"], target_epsilon=budget, delta=delta,
    )
    settings = DPSettings(noise_multiplier=sigma, max_grad_norm=float(privacy["max_grad_norm"]),
                          sample_rate=sample_rate, steps=int(strategy["local_steps"]),
                          accountant=privacy["accountant"],
                          grad_sample_mode=privacy.get("grad_sample_mode", "hooks"),
                          max_physical_batch_size=node.max_physical_batch,
                          secure_mode=bool(privacy.get("secure_mode", False)))
    return DPSetup(settings, ledger, budget)


def private_seed(ledger: PrivacyLedger, round_: int) -> int:
    """A seed for DP-SGD's noise and Poisson sampling that only this node knows.

    Noise seeded from the shared config seed would let the server regenerate and subtract
    it. The node keeps a random secret beside its ledger (mode 0600, never sent), so its
    noise is unpredictable to everyone else yet reproducible for the node itself.
    """
    path = secret_path(ledger.path)
    if not path.exists():
        atomic_write(path, secrets.token_hex(32).encode(), mode=0o600)
    digest = hashlib.sha256(f"{path.read_text().strip()}:{round_}".encode()).digest()
    return int.from_bytes(digest[:7], "little")
