"""The progress display: one line per round (live client counts on a terminal)."""

from __future__ import annotations

import sys
from typing import Any, TextIO


class Progress:
    """Round i/N, clients done, latest accuracy: one line per round, live on a terminal."""

    def __init__(self, total_rounds: int, stream: TextIO | None = None):
        self.total = total_rounds
        self.stream = stream or sys.stdout
        self.live = getattr(self.stream, "isatty", lambda: False)()

    def clients(self, round_: int, done: int, expected: int) -> None:
        if self.live:
            self.stream.write(f"\r[fedlora] round {round_}/{self.total}: {done}/{expected} clients")
            self.stream.flush()

    def line(self, text: str) -> None:
        if self.live:
            self.stream.write("\r\033[K")
        self.stream.write(f"[fedlora] {text}\n")
        self.stream.flush()

    def round(self, row: dict[str, Any]) -> None:
        self.line(format_round(row, self.total))


def format_round(row: dict[str, Any], total: int) -> str:
    """The one-line summary of a metrics.jsonl row."""
    parts = [f"round {row['round']}/{total}", f"{len(row['clients'])} updates"]
    if row["accuracy"] is not None:
        parts.append(f"accuracy {row['accuracy']:.4f}")
        parts.append(f"loss {row['loss']:.4f}")
    if row.get("epsilon_max") is not None:
        parts.append(f"epsilon {row['epsilon_max']:.3f}")
    if row.get("client_level_epsilon") is not None:
        parts.append(f"client-level epsilon {row['client_level_epsilon']:.3f}")
    secure = row.get("secure_aggregation")
    if secure:
        parts.append(f"secure sum of {secure['survivors']}"
                     + (f" ({len(secure['dropped'])} dropped)" if secure["dropped"] else ""))
    for key in ("rejected", "refused", "lost"):
        if row[key]:
            parts.append(f"{len(row[key])} {key}")
    if row["skipped"]:
        parts.append("SKIPPED")
    parts.append(f"{row['bytes_up'] / 1e3:.1f} kB up / {row['bytes_down'] / 1e3:.1f} kB down")
    parts.append(f"{row['wall_seconds']:.1f} s")
    return " | ".join(parts)
