"""A user's bad data file gets one clear error before any work: the file, the line and the
field of every problem (exit 2 from the CLI), never a traceback from the tokenizer."""

from __future__ import annotations

import json
import string
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedlora.deploy.simulate import prepare_run
from fedlora.task.config import ConfigError, compose_job
from fedlora.task.tables import TableError, read_table

from .conftest import run_fedlora

BASE = ["model=tiny_bert", "privacy=none", "federation.num_clients=1",
        "federation.clients_per_round=1", "federation.min_clients=1"]


def _prepare(tmp_path: Path, *overrides: str) -> str:
    with pytest.raises(ConfigError) as info:
        prepare_run(compose_job([*BASE, *overrides]), tmp_path / "run")
    assert not (tmp_path / "run").exists()  # refused before any work
    return str(info.value)


def test_csv_row_with_a_missing_field(tmp_path: Path) -> None:
    path = tmp_path / "train.csv"
    path.write_text('text,label\n"fine",a\n"no label"\n"fine too",b\n"more",a\n"and",b\n')
    message = _prepare(tmp_path, "data=csv", f"data.path={path}")
    assert f"{path}:3: field 'label' is missing (data.label_column)" in message


def test_csv_too_small_for_a_test_split(tmp_path: Path) -> None:
    path = tmp_path / "two.csv"
    path.write_text("text,label\none,a\ntwo,b\n")
    message = _prepare(tmp_path, "data=csv", f"data.path={path}")
    assert str(path) in message and "data.test_fraction" in message


def test_jsonl_row_without_the_text_field(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    rows = [{"text": "a", "label": "x"}, {"body": "b", "label": "y"}, "not an object"]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n{broken\n")
    message = _prepare(tmp_path, "data=jsonl", f"data.path={path}")
    assert f"{path}:2: field 'text' is missing (data.text_column)" in message
    assert f"{path}:3: a JSON object is expected" in message
    assert f"{path}:4: not valid JSON" in message  # every problem at once


def test_csv_without_a_path_names_the_knob(tmp_path: Path) -> None:
    assert "data=csv needs data.path" in _prepare(tmp_path, "data=csv")


@pytest.mark.integration
def test_cli_exits_2_with_the_line_and_field(tmp_path: Path) -> None:
    path = tmp_path / "train.csv"
    path.write_text('text,label\n"fine",a\n"no label"\n')
    proc = run_fedlora(["simulate", *BASE, "data=csv", f"data.path={path}",
                        f"hydra.run.dir={tmp_path / 'run'}"], check=False)
    assert proc.returncode == 2
    assert f"{path}:3: field 'label' is missing" in proc.stderr + proc.stdout


_CELL = st.text(alphabet=string.printable, max_size=12)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(st.one_of(_CELL, st.builds(json.dumps, st.dictionaries(_CELL, _CELL))),
                      max_size=6),
       source=st.sampled_from(["csv", "jsonl"]))
def test_malformed_files_only_ever_raise_a_table_error(tmp_path: Path, lines: list[str],
                                                       source: str) -> None:
    path = tmp_path / f"data.{source}"
    path.write_text("\n".join(lines), encoding="utf-8")
    cfg = {"source": source, "text_column": "text", "label_column": "label"}
    try:
        texts, labels, names = read_table(cfg, path, "classification")
    except TableError:
        return
    assert len(texts) == len(labels) > 0 and all(0 <= i < len(names) for i in labels)
