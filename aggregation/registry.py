"""Method registry: the built-ins plus plug-ins from the ``fedlora.methods`` entry points.

A built-in method is one file in this package: every concrete Method subclass defined in
a module of fedlora.aggregation is registered when the registry is first used, so adding
a method touches no other file.

A third-party package adds a method by declaring, in its own pyproject::

    [project.entry-points."fedlora.methods"]
    mymethod = "mypkg.mymodule:MyMethod"   # a Method subclass with a unique ``name``

Plug-ins are loaded lazily (on the first lookup) so importing fedlora stays cheap, and a
broken plug-in only produces a warning: one bad package must not take the server down.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import warnings
from importlib.metadata import entry_points
from typing import Any

from .base import Method

ENTRY_POINT_GROUP = "fedlora.methods"

_REGISTRY: dict[str, type[Method]] = {}
_plugins_loaded = False


def register_method(cls: type[Method]) -> type[Method]:
    """Register a Method subclass under ``cls.name`` (usable as a class decorator)."""
    if not (inspect.isclass(cls) and issubclass(cls, Method)) or inspect.isabstract(cls):
        raise TypeError(f"register_method needs a concrete Method subclass, got {cls!r}")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls.__qualname__} must set a non-empty class attribute 'name'")
    existing = _REGISTRY.get(name)
    if existing is not None and existing is not cls:
        raise ValueError(
            f"method name {name!r} is already registered by "
            f"{existing.__module__}.{existing.__qualname__}"
        )
    _REGISTRY[name] = cls
    return cls


def _load_plugins() -> None:
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            register_method(ep.load())
        except Exception as e:  # noqa: BLE001 - any plug-in failure is a warning, not a crash
            warnings.warn(
                f"fedlora: skipping method plug-in {ep.name!r} ({ep.value}): "
                f"{type(e).__name__}: {e}",
                RuntimeWarning,
                stacklevel=3,
            )


def available_methods() -> list[str]:
    """Names of every registered method (built-ins and plug-ins), sorted."""
    _load_plugins()
    return sorted(_REGISTRY)


def get_method(name: str, **options: Any) -> Method:
    """An instance of the method called ``name``; options go to its constructor
    (``weighting`` and the method's own options)."""
    _load_plugins()
    try:
        cls = _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown aggregation method {name!r}; available: {', '.join(sorted(_REGISTRY))}"
        ) from None
    return cls(**options)


def _register_builtins() -> None:
    """Every concrete Method defined in a module of this package (one file per method)."""
    package = __name__.rpartition(".")[0]
    for info in pkgutil.iter_modules(importlib.import_module(package).__path__):
        if info.name in ("base", "registry") or info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{package}.{info.name}")
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if (issubclass(cls, Method) and cls.__module__ == module.__name__
                    and not inspect.isabstract(cls)):
                register_method(cls)


_register_builtins()
