"""Every method can be selected and run; the test plug-in is really installed.

What a user relies on: `fedlora simulate strategy=<name>` composes and validates for every
registered method (the built-ins' conf/strategy/<name>.yaml, a plug-in's own through its
Hydra search-path plug-in), and a method registered through the ``fedlora.methods`` entry
point is listed like a built-in. A broken plug-in install fails here instead of silently
shrinking the contract suite to the built-ins.
"""

from __future__ import annotations

from importlib.metadata import entry_points

from fedlora.aggregation import ENTRY_POINT_GROUP, available_methods, get_method
from fedlora.task.config import compose_job, validate

from .helpers import PLUGIN_METHOD, builtin_methods


def test_the_test_plugin_is_registered_through_its_entry_point() -> None:
    assert PLUGIN_METHOD in available_methods(), (
        "the test plug-in is not installed: run `.venv/bin/python -m pip install -e tests/plugin` "
        "(.ci/setup does)")
    (ep,) = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == PLUGIN_METHOD]
    cls = type(get_method(PLUGIN_METHOD))
    assert ep.load() is cls and not cls.__module__.startswith("fedlora.")
    assert PLUGIN_METHOD not in builtin_methods()


def test_every_method_is_selectable_by_strategy(name: str) -> None:
    """strategy=<name> composes the method's config, which validates (what a 2-round
    simulation of it needs; tests/test_simulation.py runs one for every method)."""
    job = compose_job(["model=tiny_bert", "data=synthetic", f"strategy={name}",
                       "privacy=none", "federation.rounds=2", "federation.num_clients=2",
                       "federation.clients_per_round=2"])
    assert job["strategy"]["name"] == name
    validate(job)
