"""Reading a user's table (CSV, JSON lines, datasets-on-disk) with every problem named.

Every row is checked before any work: a missing or empty text or label field, a line that
is not JSON or not an object, an empty file. Problems are collected, not raised one by
one, so a user fixes a file in one pass: each names the file, the line and the field.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

_SHOWN = 20  # problems listed in full; the rest are counted


class TableError(ValueError):
    """A data file fedlora cannot use; the message lists every problem found."""


def _unset(value: Any) -> bool:
    return value in (None, "", "???")


def read_rows(source: str, path: Path) -> tuple[list[tuple[int, dict[str, Any]]], list[str]]:
    """(line number, row) pairs and the problems of parsing itself."""
    rows: list[tuple[int, dict[str, Any]]] = []
    problems: list[str] = []
    if source == "csv":
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            for row in reader:
                rows.append((reader.line_num, dict(row)))
    elif source == "jsonl":
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    problems.append(f"{path}:{number}: not valid JSON ({exc.msg})")
                    continue
                if not isinstance(row, dict):
                    problems.append(f"{path}:{number}: a JSON object is expected, got "
                                    f"{type(row).__name__}")
                    continue
                rows.append((number, row))
    else:
        import datasets

        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            loaded = loaded["train"]
        rows = [(i + 1, dict(row)) for i, row in enumerate(loaded)]
    return rows, problems


def read_table(data_cfg: Mapping[str, Any], path: Any, task: str, key: str = "data.path",
               names: list[str] | None = None) -> tuple[list[str], list[int] | None, list[str]]:
    """(texts, label indices or None for causal LM, label names) of a table file.

    Raises :class:`TableError` naming the file, line and field of every problem.
    """
    source = data_cfg["source"]
    if _unset(path):
        raise TableError(f"data={source} needs {key}: the file to read (e.g. "
                         f"{key}=/data/train.{source})")
    path = Path(str(path)).expanduser()
    if not path.exists():
        raise TableError(f"{key}={path} does not exist")
    text_col, label_col = data_cfg["text_column"], data_cfg["label_column"]
    labelled = task != "causal_lm"
    rows, problems = read_rows(source, path)
    fields = [text_col, label_col] if labelled else [text_col]
    for number, row in rows:
        for name in fields:
            if _unset(row.get(name)):
                knob = "data.text_column" if name == text_col else "data.label_column"
                state = "missing" if row.get(name) in (None,) else "empty"
                problems.append(f"{path}:{number}: field {name!r} is {state} ({knob})")
    if not rows and not problems:
        problems.append(f"{path}: the file holds no rows")
    if problems:
        shown = problems[:_SHOWN]
        more = len(problems) - len(shown)
        raise TableError("\n  - ".join(shown) + (f"\n  - ... and {more} more" if more else ""))
    texts = [str(row[text_col]) for _, row in rows]
    if not labelled:
        return texts, None, []
    raw_labels = [str(row[label_col]) for _, row in rows]
    names = names or sorted(set(raw_labels))
    index = {name: i for i, name in enumerate(names)}
    unknown = sorted(set(raw_labels) - set(index))
    if unknown:
        raise TableError(f"{path}: labels {unknown[:5]} are not among the training labels")
    return texts, [index[label] for label in raw_labels], names
