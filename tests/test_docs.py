"""The README and the docs say what the code does: short README, the methods table matches
the registry, every relative link and referenced repository file exists, no internal
history in the product."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from .contract.helpers import builtin_methods

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted((ROOT / "docs").rglob("*.md"))
PAGES = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *DOCS]
# Repository paths written in backticks: top-level folders of this repository.
FOLDERS = ("aggregation", "client", "server", "privacy", "protos", "task", "deploy", "conf",
           "bench", "tests", "docs")
CODE_DIRS = [d for d in FOLDERS if d != "docs"]
# Team history: session numbers and issue numbers (pages also forbid "s10-" style names).
HISTORY = r"session[- ]?[0-9]+|\bissue #?[0-9]+"


def test_readme_is_an_entry_point_not_a_manual() -> None:
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200


def test_readme_methods_table_is_the_registry() -> None:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Methods"):text.index("## Privacy")]
    listed = re.findall(r"^\| `(\w+)`", section, re.M)
    # fedlora's own methods: an installed plug-in (tests/plugin) is not in fedlora's README.
    assert sorted(listed) == builtin_methods()


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_and_file_references_exist(page: Path) -> None:
    text = page.read_text()
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if not re.match(r"[a-z]+:", target):
            assert (page.parent / target).exists(), f"{page.name}: broken link {target}"
    folders = "|".join(FOLDERS)
    for ref in re.findall(rf"`((?:{folders})/[\w./-]+\.\w+)`", text):
        if "*" in ref or "<" in ref or "NNN" in ref:
            continue
        assert (ROOT / ref).exists(), f"{page.name}: names {ref}, which does not exist"


def test_no_internal_history_in_the_product() -> None:
    pattern = re.compile(rf"{HISTORY}|\bs[0-9]+[-.]", re.I)
    pages = [ROOT / "README.md", *DOCS, *(ROOT / "bench").rglob("*.md")]
    hits = [f"{p.name}: {m.group(0)}" for p in pages for m in pattern.finditer(p.read_text())]
    assert not hits
    # Comments and docstrings too: the code speaks of the software, not of its history.
    code = [p for d in CODE_DIRS for p in (ROOT / d).rglob("*") if p.suffix in (".py", ".yaml")]
    code_pattern = re.compile(HISTORY, re.I)
    hits = [f"{p.relative_to(ROOT)}: {m.group(0)}" for p in code
            for m in code_pattern.finditer(p.read_text(encoding="utf-8"))]
    assert not hits
    names = [p.name for p in (ROOT / "bench" / "results").rglob("*")]
    assert not [n for n in names if re.search(r"-s\d+", n)]
