"""A config field with its meaning and bounds: the one place a knob's rules are written.

:func:`knob` makes a dataclass field whose metadata holds a one-line meaning and its
bounds or choices; :func:`bound_problem` checks a value against them, and
:func:`check_knobs` checks a whole config dataclass (its ``__post_init__`` calls it).
"""

from __future__ import annotations

from dataclasses import field, fields, is_dataclass
from typing import Any


def knob(default: Any, help: str, *, low: float | None = None, high: float | None = None,
         above: bool = False, below: bool = False, choices: tuple[str, ...] | None = None,
         ) -> Any:
    """A schema field: its default, one line of meaning, and its bounds or choices.

    ``low``/``high`` are inclusive unless ``above``/``below`` make them strict; a None
    value (an optional key left unset) is never out of bounds."""
    rules = {"help": help, "low": low, "high": high, "above": above, "below": below,
             "choices": choices}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=rules)
    if is_dataclass(default):
        return field(default_factory=type(default), metadata=rules)
    return field(default=default, metadata=rules)


def bound_problem(key: str, f: Any, value: Any) -> str | None:
    """The knob's bound or choice ``value`` breaks, if any (a None optional never does)."""
    rules = f.metadata
    if value is None or isinstance(value, bool) or value == "???":
        return None
    if rules.get("choices") and isinstance(value, str) and value not in rules["choices"]:
        return f"{key} must be one of {rules['choices']}, got {value!r}"
    if not isinstance(value, (int, float)):
        return None
    low, high = rules.get("low"), rules.get("high")
    too_low = low is not None and (value <= low if rules["above"] else value < low)
    too_high = high is not None and (value >= high if rules["below"] else value > high)
    if not (too_low or too_high):
        return None
    if low is not None and high is not None:
        interval = (f"{'(' if rules['above'] else '['}{low:g}, "
                    f"{high:g}{')' if rules['below'] else ']'}")
        return f"{key} must be in {interval}, got {value}"
    if too_low:
        return f"{key} must be {'>' if rules['above'] else '>='} {low:g}, got {value}"
    return f"{key} must be {'<' if rules['below'] else '<='} {high:g}, got {value}"


def check_knobs(config: Any, section: str) -> None:
    """Raise ValueError naming the first field of ``config`` outside its bounds."""
    for f in fields(config):
        problem = bound_problem(f"{section}.{f.name}", f, getattr(config, f.name))
        if problem:
            raise ValueError(problem)
