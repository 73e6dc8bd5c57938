"""The Method interface describes itself: the glue (client/, server/, task/) never names a
method nor tests for a role, and every declaration is consistent with the math."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from fedlora.aggregation import ADAPTER_LAYERS, ROLES, available_methods, get_method

ROOT = Path(__file__).resolve().parents[1]
# The method-name guard (client/, server/ and task/ never name a method), applied to code
# lines (comments aside): every registered method's name (the built-ins and any plug-in,
# read from the registry, not a hand list) and any test for the role R.
GREP = "|".join([*map(re.escape, available_methods()), r"\"R\" in", "'R' in"])
FORBIDDEN = re.compile(GREP)


def _code_lines(path: Path) -> list[tuple[int, str]]:
    out = []
    in_doc = False
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        stripped = line.strip()
        quotes = stripped.count('"""')
        if in_doc or stripped.startswith('"""'):
            if quotes == 1:
                in_doc = not in_doc
            continue  # docstrings are prose
        code = line.split("#", 1)[0]
        if code.strip():
            out.append((number, code))
    return out


def test_glue_names_no_method_and_tests_no_role() -> None:
    hits = []
    for folder in ("client", "server", "task"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for number, code in _code_lines(path):
                if FORBIDDEN.search(code):
                    hits.append(f"{path.relative_to(ROOT)}:{number}: {code.strip()}")
    assert not hits, "method-specific code in the glue:\n" + "\n".join(hits)


def test_the_grep_itself_agrees() -> None:
    """The same check as the issue's shell grep (comment-only lines and docstrings aside)."""
    out = subprocess.run(
        ["grep", "-rnE", GREP, "client", "server", "task", "--include=*.py"],
        cwd=ROOT, capture_output=True, text=True).stdout
    code_hits = []
    for hit in out.splitlines():
        path, number, _ = hit.split(":", 2)
        lines = dict(_code_lines(ROOT / path))
        if int(number) in lines and FORBIDDEN.search(lines[int(number)]):
            code_hits.append(hit)
    assert not code_hits


@pytest.mark.parametrize("name", available_methods())
def test_declarations_are_consistent(name: str) -> None:
    method = get_method(name)
    assert method.adapter_layer in ADAPTER_LAYERS
    roles = {"lora": {"A", "B"}, "lora_sb": {"A", "B", "R"}}[method.adapter_layer]
    assert set(method.client_trains) <= roles and set(method.uplink_roles) <= roles
    assert set(method.server_step_roles) <= set(method.uplink_roles)
    assert set(method.node_keeps) <= roles
    assert set(method.init_round_roles) <= set(ROLES)
    assert (method.init_round_steps() > 0) == bool(method.init_round_roles)
    options = method.describe_options()
    assert all(help_text for _, help_text in options.values()), "every option needs help text"
    assert method.options == {k: default for k, (default, _) in options.items()}


def test_typed_options_own_the_method_keys() -> None:
    flora = get_method("flora", ranks=[2, 6])
    from fedlora.aggregation import AdapterSpec

    spec = AdapterSpec(shapes={"m": (4, 4)}, rank=4, alpha=8)
    assert [flora.client_rank(spec, k) for k in range(3)] == [2, 6, 2]
    assert flora.client_rank(spec, 0, declared=5) == 5  # the node's own budget wins
    assert get_method("ffa").client_rank(spec, 1, declared=5) == 4  # one shared rank
    assert get_method("fedsb", init_batches=3).init_round_steps() == 3
    with pytest.raises(ValueError, match="init_batches must be an integer"):
        get_method("fedsb", init_batches=0)
    with pytest.raises(ValueError, match="ranks must be a non-empty list"):
        get_method("flora", ranks=[])
    with pytest.raises(ValueError, match="unknown option"):
        get_method("ffa", ranks=[4])
