"""The seams between components: no import cycles among the server, client and wire
modules, and nothing in server/ reaches into the federation loop's private members."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("server", "client", "protos")


def _module(path: Path) -> str:
    return "fedlora." + ".".join(path.relative_to(ROOT).with_suffix("").parts)


def _imports(path: Path) -> set[str]:
    """fedlora modules ``path`` imports (TYPE_CHECKING-only imports too: a cycle is a
    cycle to a reader)."""
    package = _module(path).rsplit(".", 1)[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            names = [f"{target}.{a.name}" for a in node.names]
            out.update([target, *names])
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {m for m in out if m.startswith("fedlora.")}


def _graph() -> dict[str, set[str]]:
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")
             if "_pb2" not in p.name]
    modules = {_module(p): p for p in files}
    return {name: {m for m in _imports(path) if m in modules and m != name}
            for name, path in modules.items()}


def test_no_import_cycles_in_server_client_protos() -> None:
    graph = _graph()
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, cycles


@pytest.mark.parametrize("path", sorted((ROOT / "server").glob("*.py")),
                         ids=lambda p: p.name)
def test_nothing_reaches_into_the_loop(path: Path) -> None:
    if path.name == "loop.py":
        return
    hits = re.findall(r"\b(?:strategy|loop|fed|s)\._\w+", path.read_text())
    assert not hits, f"{path.name} uses private members of the loop: {hits}"
