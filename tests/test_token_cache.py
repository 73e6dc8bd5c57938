"""The node-local token cache (task/token_cache.py): the second load reads the cache,
and any change to what decides the tokens (the data file's bytes, the tokenizer's
files, max_length) misses it; a damaged entry is rebuilt; ``off`` turns it off."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from fedlora.task import data as data_module
from fedlora.task import instruct, token_cache
from fedlora.task.data import TokenizedData, load_data

from .llm_models import model_cfg, model_dir

ROWS = [{"instruction": "Name the colour.", "input": "The sky", "output": "blue", "cat": "a"},
        {"instruction": "Say hi.", "output": "hi there", "cat": "b"}] * 10


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory) -> Path:
    return model_dir("qwen2", tmp_path_factory.getbasetemp() / "llm-models")


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv(token_cache.CACHE_ENV, str(root))
    return root


@pytest.fixture
def builds(monkeypatch) -> list[int]:
    """Counts real tokenizations; the per-process cache is emptied before each load."""
    count: list[int] = []
    real = instruct.build_instruct

    def counted(*args, **kwargs):
        count.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(instruct, "build_instruct", counted)
    monkeypatch.setattr(data_module, "_CACHE", {})
    return count


def _write(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _data_cfg(path: Path) -> dict:
    return {"name": "instruct", "kind": "instruct", "source": "jsonl", "path": str(path),
            "test_path": None, "format": "auto", "template": "auto", "group_column": "cat",
            "packing": False, "generation_prompts": 2, "max_new_tokens": 8,
            "test_fraction": 0.2, "split_seed": 0, "max_train_examples": None,
            "max_test_examples": None}


def _load(data_cfg: dict, model: dict):
    data_module._CACHE.clear()  # a new process: only the disk cache is left
    return load_data(data_cfg, model)


def _same(a, b) -> None:
    assert type(a) is type(b)
    for split in ("train", "test"):
        for x, y in zip(getattr(a, split).tensors, getattr(b, split).tensors, strict=True):
            assert torch.equal(x, y)
    assert torch.equal(a.train_labels, b.train_labels)
    for name in ("label_names", "gen_prompts", "gen_references", "template",
                 "truncated_prompts", "truncated_responses"):
        assert getattr(a, name) == getattr(b, name)


def test_second_load_reads_the_cache_and_a_changed_file_misses_it(tmp_path, qwen2, cache,
                                                                   builds):
    path = _write(tmp_path / "d.jsonl", ROWS)
    cfg, model = _data_cfg(path), model_cfg(qwen2, max_length=32)
    first = _load(cfg, model)
    assert len(builds) == 1
    assert len(list((cache / "tokens").glob("*.safetensors"))) == 1
    second = _load(cfg, model)
    assert len(builds) == 1  # read back, not tokenized again
    _same(first, second)
    assert isinstance(second, instruct.InstructData)

    # The same name, size class and fields, one answer changed: a new key, a new build.
    _write(path, [dict(ROWS[0], output="green"), *ROWS[1:]])
    third = _load(cfg, model)
    assert len(builds) == 2
    assert not all(torch.equal(x, y) for x, y in zip(first.train.tensors + first.test.tensors,
                                                      third.train.tensors + third.test.tensors,
                                                      strict=True))
    _load(cfg, model)
    assert len(builds) == 2  # the edited file's entry is cached in turn

    _load(cfg, model_cfg(qwen2, max_length=24))  # another max_length: another key
    assert len(builds) == 3


def test_key_covers_the_tokenizer_files_not_the_weights(tmp_path, qwen2):
    path = _write(tmp_path / "d.jsonl", ROWS)
    other = tmp_path / "model"
    shutil.copytree(qwen2, other)
    cfg = _data_cfg(path)
    key = token_cache.cache_key(cfg, model_cfg(qwen2, max_length=32), None)
    assert token_cache.cache_key(cfg, model_cfg(other, max_length=32), None) == key
    weights = next(other.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)  # weights do not decide tokens
    assert token_cache.cache_key(cfg, model_cfg(other, max_length=32), None) == key
    config = json.loads((other / "tokenizer_config.json").read_text())
    config["chat_template"] = "{{ messages[0]['content'] }}"
    (other / "tokenizer_config.json").write_text(json.dumps(config))
    assert token_cache.cache_key(cfg, model_cfg(other, max_length=32), None) != key


def test_a_damaged_entry_is_rebuilt(tmp_path, qwen2, cache, builds):
    path = _write(tmp_path / "d.jsonl", ROWS)
    cfg, model = _data_cfg(path), model_cfg(qwen2, max_length=32)
    first = _load(cfg, model)
    (entry,) = (cache / "tokens").glob("*.safetensors")
    entry.write_bytes(entry.read_bytes()[:100])
    again = _load(cfg, model)
    assert len(builds) == 2
    _same(first, again)
    _load(cfg, model)
    assert len(builds) == 2  # rewritten whole


def test_off_never_writes(tmp_path, qwen2, monkeypatch, builds):
    monkeypatch.setenv(token_cache.CACHE_ENV, "off")
    path = _write(tmp_path / "d.jsonl", ROWS)
    cfg, model = _data_cfg(path), model_cfg(qwen2, max_length=32)
    _load(cfg, model)
    _load(cfg, model)
    assert len(builds) == 2
    assert token_cache.cache_dir() is None


def test_classification_data_round_trips(tmp_path):
    train = TensorDataset(torch.arange(12).view(3, 4), torch.ones(3, 4, dtype=torch.long),
                          torch.tensor([0, 1, 0]))
    whole = TokenizedData(train, train, ["a", "b"], torch.tensor([0, 1, 0]),
                          TensorDataset(*(t[1:] for t in train.tensors)))  # shares memory
    assert token_cache.store(tmp_path, "k" * 64, whole) is not None
    back = token_cache.load(tmp_path, "k" * 64)
    assert back.label_names == ["a", "b"]
    for a, b in zip(whole.validation.tensors, back.validation.tensors, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(back.train_labels, whole.train_labels)
    assert token_cache.load(tmp_path, "j" * 64) is None  # another key: nothing
