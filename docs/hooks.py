"""MkDocs hooks: tables generated from the code, so the docs cannot drift from it.

- ``<!-- fedlora:methods -->``: every registered method (fedlora.aggregation's registry)
  with what it trains, sends and whether it aggregates exactly, and its bytes per module
  per round at MiniLM's shapes.
- ``<!-- fedlora:options -->``: every method's typed options with default and help.
- ``<!-- fedlora:config -->``: every key of the job schema (task/schema.py) with its type,
  its value in the default job and its meaning.
- ``<!-- fedlora:refusals -->``: the node's fixed refusal codes (privacy/policy.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parents[1]
_PACKAGES = ("aggregation", "client", "server", "privacy", "protos", "task", "deploy", "conf")


def _api_tree() -> None:
    """build/apidoc/fedlora/<pkg> -> <pkg>: the import layout (pyproject's package-dir),
    which mkdocstrings reads statically (mkdocs.yml: paths [build/apidoc])."""
    root = _ROOT / "build" / "apidoc" / "fedlora"
    root.mkdir(parents=True, exist_ok=True)
    (root / "__init__.py").touch()
    for name in _PACKAGES:
        link = root / name
        if not link.is_symlink():
            link.symlink_to(_ROOT / name, target_is_directory=True)


_api_tree()


def _builtin_methods() -> list[str]:
    """fedlora's own methods (a plug-in installed beside it has its own docs)."""
    from fedlora.aggregation import available_methods, get_method

    return [name for name in available_methods()
            if type(get_method(name)).__module__.startswith("fedlora.aggregation")]


def _methods_table() -> str:
    from fedlora.aggregation import get_method

    rows = ["| method | client trains | up | down | exact | bytes up / down (float32, 384 x 384, r 8) | summary |",
            "|---|---|---|---|---|---|---|"]
    for name in _builtin_methods():
        m = get_method(name)
        up, down = 4 * m.uplink_floats(384, 384, 8), 4 * m.downlink_floats(384, 384, 8)
        rows.append(f"| [`{name}`]({name}.md) | {', '.join(m.client_trains)} | "
                    f"{', '.join(m.uplink_roles)} | {', '.join(m.downlink_roles)} | "
                    f"{'yes' if m.exact else 'no'} | {up:,} / {down:,} | {m.summary} |")
    return "\n".join(rows)


def _options_table() -> str:
    from fedlora.aggregation import get_method

    rows = ["| method | option | default | meaning |", "|---|---|---|---|"]
    for name in _builtin_methods():
        for key, (default, help_text) in get_method(name).describe_options().items():
            rows.append(f"| `{name}` | `strategy.options.{key}` | `{default!r}` | {help_text} |")
    return "\n".join(rows)


def _config_table() -> str:
    from fedlora.task.config import compose_job
    from fedlora.task.schema import schema_default, schema_fields, type_words

    job = compose_job([])
    rows = ["| key | type | default job | meaning |", "|---|---|---|---|"]
    for key, f in schema_fields():
        value: Any = job
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else schema_default(f)
        rows.append(f"| `{key}` | {type_words(f)} | `{json.dumps(value, default=str)}` | "
                    f"{f.metadata.get('help', '')} |")
    return "\n".join(rows)


def _refusals_table() -> str:
    from fedlora.privacy.policy import REFUSAL_CODES

    rows = ["| code | meaning |", "|---|---|"]
    rows += [f"| `{code}` | {meaning} |" for code, meaning in REFUSAL_CODES.items()]
    return "\n".join(rows)


_MARKERS = {"<!-- fedlora:methods -->": _methods_table,
            "<!-- fedlora:options -->": _options_table,
            "<!-- fedlora:config -->": _config_table,
            "<!-- fedlora:refusals -->": _refusals_table}


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    for marker, make in _MARKERS.items():
        if marker in markdown:
            markdown = markdown.replace(marker, make())
    return markdown
