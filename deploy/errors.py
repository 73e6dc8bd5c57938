"""The errors of local deployments, shared by the process, Flower CLI and federation modules."""

from __future__ import annotations

__all__ = ["FederationError", "FederationTimeout"]


class FederationError(RuntimeError):
    """The local federation could not be brought up or run (see the message and logs)."""


class FederationTimeout(FederationError, TimeoutError):
    """The local federation did not finish within its time limit."""
