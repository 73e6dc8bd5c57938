"""A node's DP-SGD setup for one job: its policy's admission, calibrated settings, its
lifetime ledger, and the budget rules on public quantities.

The noise multiplier is calibrated once for the whole planned federation (every round the
node may train, plus any init-round steps), with the same accountant that reports. The
ledger is the node's lifetime ledger for its data (keyed by the data's fingerprint, never
by the server's run name); its budget is the node policy's (max-epsilon, max-delta).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedlora.privacy import (
    BudgetExhausted,
    DPSettings,
    LedgerError,
    PrivacyLedger,
    calibrate_noise_multiplier,
    ledger_filename,
    validate_delta,
)
from fedlora.privacy.ledger_file import lifetime_key
from fedlora.privacy.policy import NodePolicy, PolicyRefusal
from fedlora.task.files import atomic_write
from fedlora.task.training import local_sample_rate

from .node import NodeIdentity

_log = logging.getLogger(__name__)


@dataclass
class DPSetup:
    settings: DPSettings
    ledger: PrivacyLedger
    run: str  # the job's run label: what the per-run step rule counts under
    job_epsilon: float  # what the noise is calibrated for (within the policy)
    planned_steps: int

    @property
    def budget(self) -> float:
        """The node's lifetime budget (its policy's max-epsilon)."""
        return self.ledger.target_epsilon

    def run_steps(self) -> int:
        return self.ledger.run_steps(self.run)

    def admit(self, steps: int) -> None:
        """Raise PolicyRefusal("budget-exhausted") unless ``steps`` more DP steps keep to
        both public rules: the run's reservation fits the lifetime budget, and the run
        stays within the steps its noise was calibrated for."""
        try:
            self.ledger.reserve(self.run, self.job_epsilon)
        except BudgetExhausted as exc:
            raise PolicyRefusal("budget-exhausted", str(exc)) from exc
        if self.run_steps() + steps > self.planned_steps:
            raise PolicyRefusal("budget-exhausted", f"run {self.run!r} has taken "
                                f"{self.run_steps()} of its {self.planned_steps} planned steps")


@functools.lru_cache(maxsize=256)
def _calibrated_sigma(epsilon: float, delta: float, sample_rate: float, steps: int,
                      accountant: str) -> float:
    """The federation-wide noise multiplier; deterministic, so computed once per process."""
    return calibrate_noise_multiplier(epsilon, delta, sample_rate, steps, accountant)


def marker_path(key_dir: Path, ledger_path: Path) -> Path:
    """The key directory's record that this ledger exists (kept apart from the ledger)."""
    return key_dir / (ledger_path.name + ".exists")


def dp_setup(cfg: dict[str, Any], node: NodeIdentity, policy: NodePolicy, num_examples: int,
             extra_steps: int = 0) -> DPSetup | None:
    """This node's DP setup for the job, or None without DP (the policy admitted that).

    Raises :class:`PolicyRefusal` with a fixed code for everything the node refuses: no
    ledger directory, a delta not below 1/N_k, a batch larger than the data, a ledger that
    is unreadable or gone while the key directory says it existed. Details go to the
    node's log only: they carry N_k.
    """
    privacy = cfg["privacy"]
    if not privacy.get("enabled"):
        return None
    if node.ledger_dir is None or node.key_dir is None:
        raise PolicyRefusal("node-config", "DP is on but the node config sets no ledger-dir")
    delta = float(privacy["delta"])
    try:
        validate_delta(delta, num_examples)
    except ValueError as exc:
        raise PolicyRefusal("invalid-delta", str(exc)) from exc
    strategy, fed = cfg["strategy"], cfg["federation"]
    planned = int(strategy["local_steps"]) * int(fed["rounds"]) + extra_steps
    job_epsilon = float(privacy["epsilon"])
    try:
        sample_rate = local_sample_rate(strategy, num_examples)
        sigma = _calibrated_sigma(job_epsilon, delta, sample_rate, planned,
                                  privacy["accountant"])
        settings = DPSettings(noise_multiplier=sigma,
                              max_grad_norm=float(privacy["max_grad_norm"]),
                              sample_rate=sample_rate, steps=int(strategy["local_steps"]),
                              accountant=privacy["accountant"],
                              grad_sample_mode=privacy.get("grad_sample_mode", "hooks"),
                              max_physical_batch_size=node.max_physical_batch,
                              secure_mode=bool(privacy.get("secure_mode", False)))
    except ValueError as exc:
        raise PolicyRefusal("invalid-batch", str(exc)) from exc
    key = lifetime_key(node.data_fingerprint())
    path = node.ledger_dir / ledger_filename(key, node.name)
    marker = marker_path(node.key_dir, path)
    if marker.exists() and not path.exists():
        raise PolicyRefusal(
            "ledger-missing",
            f"privacy ledger {path} is missing but {marker} shows it existed; refusing rather "
            "than restarting the budget from zero. Restore the ledger from a backup, or reset "
            "knowingly by deleting the marker too")
    try:
        ledger = PrivacyLedger.open(node.ledger_dir, federation=key, node=node.name,
                                    mechanism=privacy["accountant"],
                                    target_epsilon=float(policy.max_epsilon or job_epsilon),
                                    delta=float(policy.max_delta or delta))
    except LedgerError as exc:
        raise PolicyRefusal("ledger-unavailable", str(exc)) from exc
    if not marker.exists():
        node.key_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        atomic_write(marker, f"{path}\n".encode(), mode=0o600)
    return DPSetup(settings, ledger, str(cfg["run_name"]), job_epsilon, planned)
