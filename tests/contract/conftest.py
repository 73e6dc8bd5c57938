"""Every test of the contract suite that takes ``name`` runs once per registered method.

The list is read from the registry at collection time (``available_methods()``: the
built-ins and every ``fedlora.methods`` entry-point plug-in), so a new method gets the
whole suite without touching it.
"""

from __future__ import annotations

import pytest

from fedlora.aggregation import Method, available_methods, get_method


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "name" in metafunc.fixturenames:
        metafunc.parametrize("name", available_methods())


@pytest.fixture
def method(name: str) -> Method:
    """The method under test, with its default options."""
    return get_method(name)
