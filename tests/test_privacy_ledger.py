"""The privacy ledger on disk: replay, restart, atomic writes, refusals (privacy/ledger.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from opacus.accountants import create_accountant

from fedlora.privacy import (
    ACCOUNTANTS,
    BudgetExhausted,
    LedgerError,
    PrivacyLedger,
    ledger_filename,
)

DELTA = 1e-4


def _open(directory: Path, mechanism: str = "rdp", target: float = 5.0, **kw) -> PrivacyLedger:
    args = dict(federation="fed-1", node="node-0", mechanism=mechanism, target_epsilon=target,
                delta=DELTA)
    args.update(kw)
    return PrivacyLedger.open(directory, **args)


def test_new_ledger_is_written_with_all_fields(tmp_path: Path) -> None:
    ledger = _open(tmp_path)
    data = json.loads(ledger.path.read_text())
    for key in ("mechanism", "history", "target_epsilon", "delta", "epsilon_spent",
                "federation", "node", "version", "updated_at", "rounds"):
        assert key in data
    assert data["history"] == [] and data["rounds"] == [] and data["epsilon_spent"] == 0.0
    assert ledger.epsilon_spent == 0.0


def test_file_names_are_safe_and_distinct(tmp_path: Path) -> None:
    evil = _open(tmp_path, federation="../../etc", node="/passwd")
    assert evil.path.parent == tmp_path
    assert evil.path.name.endswith(".privacy.json") and not evil.path.name.startswith(".")
    assert "/" not in ledger_filename("a/b", "c") and ".." not in ledger_filename("..", "..")[:2]
    # Names that slug to the same text still get different files.
    assert ledger_filename("a/b", "c") != ledger_filename("a_b", "c")
    assert ledger_filename("f", "n1") != ledger_filename("f", "n2")
    with pytest.raises(ValueError):
        ledger_filename("", "n")


@pytest.mark.parametrize("accountant", ACCOUNTANTS)
def test_replaying_the_stored_history_gives_epsilon_spent(tmp_path: Path, accountant: str) -> None:
    ledger = _open(tmp_path, mechanism=accountant, target=50.0)
    ledger.record(1.2, 0.05, 10, round=1, max_grad_norm=1.0)
    ledger.record(1.2, 0.05, 10, round=2, max_grad_norm=1.0)
    ledger.record(0.9, 0.04, 5, round=3, max_grad_norm=0.5)
    data = json.loads(ledger.path.read_text())
    # Consecutive equal (sigma, q) merge as in Opacus.
    assert data["history"] == [[1.2, 0.05, 20], [0.9, 0.04, 5]]
    fresh = create_accountant(data["mechanism"])
    fresh.history = [tuple(entry) for entry in data["history"]]
    replayed = fresh.get_epsilon(delta=data["delta"])
    assert ledger.epsilon_spent == pytest.approx(replayed, rel=1e-12)
    assert data["epsilon_spent"] == pytest.approx(replayed, rel=1e-12)
    assert data["rounds"][-1]["epsilon_after"] == pytest.approx(replayed, rel=1e-12)
    assert [r["round"] for r in data["rounds"]] == [1, 2, 3]
    assert data["rounds"][2]["max_grad_norm"] == 0.5


def test_reopening_after_restart_keeps_epsilon(tmp_path: Path) -> None:
    ledger = _open(tmp_path)
    spent = ledger.record(1.0, 0.1, 8, round=1)
    del ledger
    again = _open(tmp_path, target=7.0)  # a new process, a new target
    assert again.epsilon_spent == pytest.approx(spent)
    assert again.history == [(1.0, 0.1, 8)]
    assert again.has_round(1) and not again.has_round(2)
    assert json.loads(again.path.read_text())["target_epsilon"] == 7.0
    assert again.target_epsilon == 7.0


@pytest.mark.parametrize("change", [dict(delta=1e-5), dict(mechanism="prv")])
def test_mismatched_key_is_refused_and_file_untouched(tmp_path: Path, change: dict) -> None:
    ledger = _open(tmp_path)
    ledger.record(1.0, 0.1, 4)
    before = ledger.path.read_bytes()
    with pytest.raises(LedgerError):
        _open(tmp_path, **change)
    assert ledger.path.read_bytes() == before


@pytest.mark.parametrize(
    "content",
    [b"{not json", b"\xff\xfe", b"[]", b'{"version": 1}',
     b'{"version": 1, "federation": "fed-1", "node": "node-0", "mechanism": "rdp", '
     b'"delta": 0.0001, "target_epsilon": 5.0, "history": [[1.0, 2.0, 3]], "rounds": []}'],
)
def test_corrupt_file_raises_and_is_never_overwritten(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / ledger_filename("fed-1", "node-0")
    path.write_bytes(content)
    with pytest.raises(LedgerError):
        _open(tmp_path)
    assert path.read_bytes() == content


def test_crash_mid_save_leaves_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ledger = _open(tmp_path)
    ledger.record(1.0, 0.1, 4, round=1)
    before = ledger.path.read_bytes()

    def crash(*args, **kwargs):
        raise OSError("simulated crash during os.replace")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated"):
        ledger.record(1.0, 0.1, 4, round=2)
    monkeypatch.undo()
    assert ledger.path.read_bytes() == before
    data = json.loads(before)  # still parseable
    assert data["history"] == [[1.0, 0.1, 4]]
    assert ledger.history == [(1.0, 0.1, 4)] and not ledger.has_round(2)  # memory = disk
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".tmp"] == []
    # The next attempt goes through.
    ledger.record(1.0, 0.1, 4, round=2)
    assert _open(tmp_path).history == [(1.0, 0.1, 8)]


def test_budget_check(tmp_path: Path) -> None:
    ledger = _open(tmp_path, target=2.0)
    after = ledger.check_budget(2.0, 0.05, 10)
    assert 0.0 < after <= 2.0
    assert ledger.history == []  # checking spends nothing
    with pytest.raises(BudgetExhausted) as info:
        ledger.check_budget(0.5, 0.5, 100)
    err = info.value
    assert err.budget == 2.0 and err.epsilon_spent == 0.0 and err.epsilon_after > 2.0
    with pytest.raises(BudgetExhausted):
        ledger.check_budget(2.0, 0.05, 10, budget=after / 2)  # an explicit, stricter budget
    with pytest.raises(BudgetExhausted):
        ledger.check_budget(0.0, 0.05, 1)  # no noise: infinite epsilon


def test_second_writer_is_detected(tmp_path: Path) -> None:
    first, second = _open(tmp_path), _open(tmp_path)
    first.record(1.0, 0.1, 4)
    with pytest.raises(LedgerError, match="changed on disk"):
        second.record(1.0, 0.1, 4)
    assert _open(tmp_path).history == [(1.0, 0.1, 4)]


def test_record_validates(tmp_path: Path) -> None:
    ledger = _open(tmp_path)
    with pytest.raises(ValueError):
        ledger.record(0.0, 0.1, 4)
    with pytest.raises(ValueError):
        ledger.record(1.0, 0.0, 4)
    with pytest.raises(ValueError):
        ledger.record(1.0, 0.1, 0)
    assert ledger.history == []


def test_report_row(tmp_path: Path) -> None:
    ledger = _open(tmp_path)
    ledger.record(1.0, 0.1, 4, round=1, max_grad_norm=0.7)
    ledger.record(1.0, 0.1, 4, round=2, max_grad_norm=0.7)
    row = ledger.report_row()
    assert row["node"] == "node-0" and row["steps"] == 8 and row["rounds"] == 2
    assert row["noise_multiplier"] == 1.0 and row["max_grad_norm"] == 0.7
    assert row["epsilon"] == ledger.epsilon_spent and row["delta"] == DELTA


def test_lazy_package_names_agree_and_resolve() -> None:
    """privacy/__init__.py lists its names three times (the lazy map, __all__, the
    TYPE_CHECKING imports); they must agree, and each resolves to its owner's object."""
    import ast
    import importlib
    from pathlib import Path

    import fedlora.privacy as package

    tree = ast.parse(Path(package.__file__).read_text())
    checked = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.If):  # the TYPE_CHECKING block
            for stmt in node.body:
                if isinstance(stmt, ast.ImportFrom):
                    checked.update({alias.asname or alias.name: stmt.module
                                    for alias in stmt.names})
    assert checked == package._OWNERS
    assert sorted(package.__all__) == sorted(package._OWNERS)
    for name, owner in package._OWNERS.items():
        module = importlib.import_module(f"fedlora.privacy.{owner}")
        assert getattr(package, name) is getattr(module, name), name
