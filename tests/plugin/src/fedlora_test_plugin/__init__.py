"""fedlora-test-plugin: a third-party aggregation method for fedlora's contract suite, and
the fault suite's fault injection (faults.py, a ClientApp mod; faulty_cli.py runs `fedlora`
with it)."""

from .frozenb import FrozenB

__all__ = ["FrozenB"]
