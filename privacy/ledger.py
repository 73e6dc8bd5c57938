"""The per-client privacy ledger: one JSON file per (federation, node) on the client's disk.

It holds the accountant's history of ``(noise_multiplier, sample_rate, steps)`` and a
per-round log, survives restarts and server resumes, and is rewritten atomically after
every recorded round (how the file is named, written and locked: :mod:`.ledger_file`).
Epsilon spent is never read from the file: it is always a fresh accountant's replay of
the history (:func:`~.accounting.epsilon_for_history`).
"""

from __future__ import annotations

import json
import math
from contextlib import AbstractContextManager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .accounting import (
    ACCOUNTANTS,
    HistoryEntry,
    check_accountant,
    check_delta,
    check_epsilon,
    check_noise_multiplier,
    check_sample_rate,
    check_steps,
    epsilon_for_history,
    merge_history,
)
from .ledger_file import exclusive_lock, ledger_filename, write_durably

LEDGER_VERSION = 1
_REQUIRED = ("version", "federation", "node", "mechanism", "delta", "target_epsilon",
             "history", "rounds")


class BudgetExhausted(RuntimeError):
    """Taking the requested steps would spend more than the budget; nothing was done."""

    def __init__(self, epsilon_spent: float, epsilon_after: float, budget: float) -> None:
        self.epsilon_spent = float(epsilon_spent)
        self.epsilon_after = float(epsilon_after)
        self.budget = float(budget)
        super().__init__(
            f"privacy budget exhausted: spent epsilon={self.epsilon_spent:.4f}, these steps "
            f"would bring it to {self.epsilon_after:.4f} > budget {self.budget:.4f}"
        )


class LedgerError(ValueError):
    """A ledger file that is unreadable, inconsistent, or keyed differently than asked."""


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class PrivacyLedger:
    """A client's privacy spend for one federation. Build it with :meth:`open`."""

    def __init__(
        self,
        path: Path,
        *,
        federation: str,
        node: str,
        mechanism: str,
        target_epsilon: float,
        delta: float,
        history: list[HistoryEntry] | None = None,
        rounds: list[dict[str, Any]] | None = None,
        reservations: dict[str, float] | None = None,
        created_at: str | None = None,
    ) -> None:
        self.path = Path(path)
        self.federation = federation
        self.node = node
        self.mechanism = check_accountant(mechanism)
        self.delta = check_delta(delta)
        self.target_epsilon = check_epsilon(target_epsilon, "target_epsilon")
        self._history: list[HistoryEntry] = list(history or [])
        self._rounds: list[dict[str, Any]] = [dict(r) for r in rounds or []]
        # run label -> epsilon that run reserved from the lifetime budget (privacy/policy.py)
        self._reservations: dict[str, float] = dict(reservations or {})
        self.created_at = created_at or _now()
        self.updated_at = self.created_at

    # -- opening ---------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        directory: str | Path,
        *,
        federation: str,
        node: str,
        mechanism: str,
        target_epsilon: float,
        delta: float,
    ) -> PrivacyLedger:
        """Create the ledger of (federation, node) in ``directory``, or load it.

        A stored ledger whose mechanism or delta differs raises :class:`LedgerError`: its
        history was accounted under other terms and is never silently re-keyed. A new
        ``target_epsilon`` is stored; the spend is unaffected (it is the history's replay).
        A corrupt file raises :class:`LedgerError` and is left untouched.
        """
        check_accountant(mechanism)
        delta = check_delta(delta)
        target_epsilon = check_epsilon(target_epsilon, "target_epsilon")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / ledger_filename(federation, node)
        fresh = cls(path, federation=federation, node=node, mechanism=mechanism,
                    target_epsilon=target_epsilon, delta=delta)
        with fresh._locked():
            stored = cls._load(path)
            if stored is None:
                fresh._write()
                return fresh
            if (stored.federation, stored.node) != (federation, node):
                raise LedgerError(
                    f"{path} belongs to federation={stored.federation!r} node={stored.node!r}, "
                    f"not federation={federation!r} node={node!r}"
                )
            if stored.mechanism != mechanism:
                raise LedgerError(
                    f"{path} was accounted with mechanism {stored.mechanism!r}, not "
                    f"{mechanism!r}; use the stored accountant or a new federation name"
                )
            if stored.delta != delta:
                raise LedgerError(
                    f"{path} was accounted at delta={stored.delta!r}, not {delta!r}; an "
                    f"epsilon is only meaningful at the delta it was spent under"
                )
            if stored.target_epsilon != target_epsilon:
                stored.target_epsilon = target_epsilon
                stored._write()
            return stored

    @classmethod
    def load(cls, path: str | Path) -> PrivacyLedger:
        """Read an existing ledger file (read-only use: reports, audits)."""
        ledger = cls._load(Path(path))
        if ledger is None:
            raise LedgerError(f"no privacy ledger at {path}")
        return ledger

    @classmethod
    def _load(cls, path: Path) -> PrivacyLedger | None:
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise LedgerError(f"cannot read privacy ledger {path}: {exc}") from exc
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise LedgerError(f"privacy ledger {path} is corrupt (not JSON): {exc}") from exc
        try:
            return cls._from_dict(path, data)
        except (KeyError, TypeError, ValueError) as exc:
            raise LedgerError(f"privacy ledger {path} is invalid: {exc}") from exc

    @classmethod
    def _from_dict(cls, path: Path, data: Any) -> PrivacyLedger:
        if not isinstance(data, dict):
            raise TypeError("top level is not an object")
        missing = [k for k in _REQUIRED if k not in data]
        if missing:
            raise KeyError(f"missing fields {missing}")
        if data["version"] != LEDGER_VERSION:
            raise ValueError(f"unsupported ledger version {data['version']!r}")
        if data["mechanism"] not in ACCOUNTANTS:
            raise ValueError(f"unknown mechanism {data['mechanism']!r}")
        for name in ("federation", "node"):
            if not isinstance(data[name], str) or not data[name]:
                raise TypeError(f"{name} must be a non-empty string")
        if not isinstance(data["history"], list) or not isinstance(data["rounds"], list):
            raise TypeError("history and rounds must be lists")
        history: list[HistoryEntry] = []
        for entry in data["history"]:
            if not isinstance(entry, list) or len(entry) != 3:
                raise ValueError(f"history entry {entry!r} is not [sigma, q, steps]")
            sigma = check_noise_multiplier(entry[0])
            if sigma == 0:
                raise ValueError("history entry with noise_multiplier 0")
            history.append((sigma, check_sample_rate(entry[1]), check_steps(entry[2])))
        if not all(isinstance(r, dict) for r in data["rounds"]):
            raise TypeError("rounds must be a list of objects")
        ledger = cls(
            path, federation=data["federation"], node=data["node"],
            mechanism=data["mechanism"], target_epsilon=data["target_epsilon"],
            delta=data["delta"], history=history, rounds=data["rounds"],
            reservations={str(k): check_epsilon(v, "reservation")
                          for k, v in (data.get("reservations") or {}).items()},
            created_at=data.get("created_at"),
        )
        ledger.updated_at = str(data.get("updated_at", ledger.created_at))
        return ledger

    # -- reading ---------------------------------------------------------------------
    @property
    def history(self) -> list[HistoryEntry]:
        """The accountant history, as Opacus keeps it (a copy)."""
        return list(self._history)

    @property
    def rounds(self) -> list[dict[str, Any]]:
        """The per-round log (a copy)."""
        return [dict(r) for r in self._rounds]

    @property
    def steps(self) -> int:
        """DP steps recorded so far."""
        return sum(s for _, _, s in self._history)

    @property
    def epsilon_spent(self) -> float:
        """Epsilon spent at :attr:`delta`: the replay of the history (an upper bound)."""
        return epsilon_for_history(self._history, self.delta, self.mechanism)

    def epsilon_after(self, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """Epsilon spent if ``steps`` more steps at (sigma, q) were taken now."""
        if check_noise_multiplier(noise_multiplier) == 0:
            return math.inf
        entry = (noise_multiplier, check_sample_rate(sample_rate), check_steps(steps))
        return epsilon_for_history(merge_history([*self._history, entry]), self.delta,
                                   self.mechanism)

    def check_budget(
        self,
        noise_multiplier: float,
        sample_rate: float,
        steps: int,
        budget: float | None = None,
    ) -> float:
        """Return epsilon after the steps, or raise :class:`BudgetExhausted` if over budget.

        ``budget`` defaults to :attr:`target_epsilon`.
        """
        limit = self.target_epsilon if budget is None else check_epsilon(budget, "budget")
        after = self.epsilon_after(noise_multiplier, sample_rate, steps)
        if not after <= limit:
            raise BudgetExhausted(self.epsilon_spent, after, limit)
        return after

    @property
    def reservations(self) -> dict[str, float]:
        """Epsilon reserved from the lifetime budget, by run label (a copy)."""
        return dict(self._reservations)

    def run_steps(self, run: str) -> int:
        """DP steps recorded under the run label ``run``."""
        return sum(int(r.get("steps", 0)) for r in self._rounds if r.get("run") == run)

    def reserve(self, run: str, epsilon: float) -> None:
        """Reserve ``epsilon`` of :attr:`target_epsilon` (the lifetime budget) for ``run``.

        A run reserves once, when it first trains; the reservations of all runs never
        exceed the lifetime budget, so a new run label never opens a new budget. Raises
        :class:`BudgetExhausted` (nothing written) when it would. Public inputs only: the
        decision reveals nothing about the data.
        """
        epsilon = check_epsilon(epsilon, "epsilon")
        with self._locked():
            stored = self._load(self.path)
            if stored is not None:
                self._reservations = stored._reservations
            if run in self._reservations:
                return
            reserved = sum(self._reservations.values())
            if reserved + epsilon > self.target_epsilon + 1e-12:
                raise BudgetExhausted(reserved, reserved + epsilon, self.target_epsilon)
            self._reservations[run] = epsilon
            self._write()

    def has_round(self, round: int) -> bool:
        """Whether a round with this number was recorded (a resumed federation asks)."""
        return any(r.get("round") == round for r in self._rounds)

    def report_row(self) -> dict[str, Any]:
        """One row for :func:`~.report.format_privacy_table`."""
        last = self._rounds[-1] if self._rounds else {}
        return {
            "node": self.node,
            "epsilon": self.epsilon_spent,
            "delta": self.delta,
            "noise_multiplier": self._history[-1][0] if self._history else None,
            "max_grad_norm": last.get("max_grad_norm"),
            "sample_rate": self._history[-1][1] if self._history else None,
            "steps": self.steps,
            "rounds": len(self._rounds),
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": LEDGER_VERSION,
            "federation": self.federation,
            "node": self.node,
            "mechanism": self.mechanism,
            "delta": self.delta,
            "target_epsilon": self.target_epsilon,
            "epsilon_spent": self.epsilon_spent,  # informative; loading replays the history
            "history": [list(e) for e in self._history],
            "rounds": self.rounds,
            "reservations": self.reservations,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        }

    # -- writing ---------------------------------------------------------------------
    def record(
        self,
        noise_multiplier: float,
        sample_rate: float,
        steps: int,
        *,
        round: int | None = None,
        max_grad_norm: float | None = None,
        run: str | None = None,
    ) -> float:
        """Append ``steps`` DP steps at (sigma, q), save atomically, return epsilon spent.

        Consecutive entries with equal (sigma, q) merge, as in Opacus. Every call counts:
        steps that ran are spent even if the round number was seen before (the log then
        holds two entries for it); :meth:`has_round` lets a resumed client avoid that.
        The budget is not checked here (see :meth:`check_budget`): steps already taken
        must be recorded whatever they cost.
        """
        sigma = check_noise_multiplier(noise_multiplier)
        if sigma == 0:
            raise ValueError("noise_multiplier 0 has no finite epsilon; a ledger records DP steps")
        q, steps = check_sample_rate(sample_rate), check_steps(steps)
        if round is not None and (isinstance(round, bool) or not isinstance(round, int)):
            raise ValueError(f"round must be an int or None, got {round!r}")
        with self._locked():
            # Another ledger object (or process) for this node may have written since we
            # loaded: writing our copy would lose its spend, so refuse instead.
            on_disk = self._load(self.path)
            if on_disk is not None and on_disk._history != self._history:
                raise LedgerError(
                    f"{self.path} changed on disk since it was loaded (another writer?); "
                    f"reopen the ledger before recording"
                )
            history = merge_history([*self._history, (sigma, q, steps)])
            epsilon = epsilon_for_history(history, self.delta, self.mechanism)
            entry = {
                "round": round, "noise_multiplier": sigma, "sample_rate": q, "steps": steps,
                "max_grad_norm": None if max_grad_norm is None else float(max_grad_norm),
                "epsilon_after": epsilon, "recorded_at": _now(),
            }
            if run is not None:
                entry["run"] = str(run)
            old = (self._history, self._rounds, self.updated_at)
            self._history, self._rounds = history, [*self._rounds, entry]
            try:
                self._write()
            except BaseException:
                # Memory must keep matching the file that is still on disk.
                self._history, self._rounds, self.updated_at = old
                raise
        return epsilon

    def save(self) -> None:
        """Write the ledger atomically (temp file, fsync, os.replace, fsync directory)."""
        with self._locked():
            self._write()

    def _write(self) -> None:
        previous = self.updated_at
        self.updated_at = _now()
        try:
            write_durably(self.path, json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n")
        except BaseException:
            self.updated_at = previous
            raise

    def _locked(self) -> AbstractContextManager[None]:
        return exclusive_lock(self.path)

    def __repr__(self) -> str:
        return (f"PrivacyLedger(federation={self.federation!r}, node={self.node!r}, "
                f"mechanism={self.mechanism!r}, delta={self.delta}, "
                f"target_epsilon={self.target_epsilon}, steps={self.steps})")


def read_ledgers(directory: str | Path) -> list[dict[str, Any]]:
    """Report rows (epsilon by replay) of every ledger in a directory, by node name."""
    paths = sorted(Path(directory).glob("*.privacy.json"))
    rows = [PrivacyLedger.load(path).report_row() for path in paths]
    return sorted(rows, key=lambda row: str(row["node"]))
