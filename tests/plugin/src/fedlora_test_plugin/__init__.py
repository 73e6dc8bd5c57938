"""fedlora-test-plugin: a third-party aggregation method for fedlora's contract suite."""

from .frozenb import FrozenB

__all__ = ["FrozenB"]
