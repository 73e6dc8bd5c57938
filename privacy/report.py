"""The per-client privacy report: one fixed-width table, the run's guarantee last."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

_COLUMNS: tuple[tuple[str, str], ...] = (
    ("node", "node"),
    ("epsilon", "epsilon"),
    ("delta", "delta"),
    ("noise_multiplier", "sigma"),
    ("max_grad_norm", "C"),
    ("sample_rate", "q"),
    ("steps", "steps"),
    ("rounds", "rounds"),
)


def _cell(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key == "node":
        return str(value)
    if key in ("steps", "rounds"):
        return str(int(value))
    value = float(value)
    if math.isinf(value):
        return "inf"
    if key == "epsilon":
        return f"{value:.4f}"
    return f"{value:.4g}"


def format_privacy_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """A fixed-width table, one row per client, and a final guarantee line.

    Each row maps node, epsilon, delta, noise_multiplier, max_grad_norm, sample_rate,
    steps, rounds (missing or None shows as "-"). Clients hold disjoint data, so the run's
    guarantee is the max epsilon over clients, at the largest delta among them.
    """
    header = [title for _, title in _COLUMNS]
    body = [[_cell(key, row.get(key)) for key, _ in _COLUMNS] for row in rows]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = [c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True)]
        return "  ".join([first, *rest]).rstrip()

    out = [line(header), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in body]
    epsilons = [float(r["epsilon"]) for r in rows if r.get("epsilon") is not None]
    deltas = [float(r["delta"]) for r in rows if r.get("delta") is not None]
    if epsilons:
        eps = max(epsilons)
        eps_text = "inf" if math.isinf(eps) else f"{eps:.4f}"
        delta_text = f"{max(deltas):.4g}" if deltas else "-"
        out.append(f"guarantee (max over clients): epsilon = {eps_text} at delta = {delta_text}")
    else:
        out.append("guarantee (max over clients): none (no client reported)")
    return "\n".join(out)
