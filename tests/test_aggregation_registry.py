"""Registry: built-ins, options, custom methods and entry-point plug-ins."""

from __future__ import annotations

import textwrap
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest

from fedlora.aggregation import (
    FFA,
    FedAvg,
    FedSVD,
    Method,
    available_methods,
    get_method,
    register_method,
    registry,
)


@pytest.fixture
def isolated(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """A private copy of the registry, plug-ins not yet loaded, no real entry points."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_plugins_loaded", False)
    monkeypatch.setattr(registry, "entry_points", lambda group: [])
    return monkeypatch


def test_builtins() -> None:
    assert {"fedavg", "fedsb", "fedsvd", "ffa", "flora"} <= set(available_methods())
    for name in available_methods():
        m = get_method(name)
        assert m.name == name and m.summary and isinstance(m.exact, bool)
        assert set(m.client_trains) <= {"A", "B", "R"}
    assert not get_method("fedavg").exact and get_method("ffa").exact
    assert isinstance(get_method("ffa"), FFA)
    assert get_method("fedsvd", period=3).options["period"] == 3
    assert get_method("fedavg", weighting="uniform").weighting == "uniform"
    assert "FedSVD(weighting='examples', period=2)" == repr(FedSVD(period=2))


def test_unknown_name_lists_available() -> None:
    listed = ", ".join(available_methods())
    with pytest.raises(ValueError, match=f"available: {listed}$"):
        get_method("fedprox")
    with pytest.raises(ValueError, match="known options: period"):
        get_method("fedsvd", perid=2)


def test_register_custom_method(isolated: pytest.MonkeyPatch) -> None:
    @register_method
    class Mine(FedAvg):
        name = "mine"

    assert "mine" in available_methods() and isinstance(get_method("mine"), Mine)
    register_method(Mine)  # idempotent for the same class

    class Clash(FedAvg):
        name = "ffa"

    with pytest.raises(ValueError, match="already registered"):
        register_method(Clash)
    with pytest.raises(TypeError):
        register_method(int)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        register_method(Method)


def test_entry_point_plugins_load_lazily_and_broken_ones_warn(
    isolated: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "fedlora_plugin_example.py").write_text(textwrap.dedent("""
        from fedlora.aggregation import FFA

        class Plugged(FFA):
            name = "plugged"
            summary = "a third-party method"
    """))
    isolated.syspath_prepend(str(tmp_path))
    group = "fedlora.methods"
    eps = [
        EntryPoint("plugged", "fedlora_plugin_example:Plugged", group),
        EntryPoint("missing", "no_such_module_xyz:Thing", group),
        EntryPoint("notamethod", "fedlora_plugin_example:FFA.name", group),
    ]
    calls = []

    def fake_entry_points(*, group: str) -> list[EntryPoint]:
        calls.append(group)
        return eps

    isolated.setattr(registry, "entry_points", fake_entry_points)
    with pytest.warns(RuntimeWarning) as record:
        names = available_methods()
    assert "plugged" in names and get_method("plugged").summary == "a third-party method"
    messages = " ".join(str(w.message) for w in record)
    assert "missing" in messages and "notamethod" in messages
    available_methods()
    assert calls == ["fedlora.methods"]  # loaded once
