"""Data: the BBC News split, Dirichlet partitions, CSV/JSONL/disk loading, synthetic data."""

from __future__ import annotations

import json

import pytest
import torch

from fedlora.task.data import dirichlet_partition, load_data

TINY = {"source": "tiny_bert", "task": "classification", "max_length": 16, "vocab_size": 512,
        "path": None, "package": None}


def test_dirichlet_partition_is_seeded_disjoint_and_complete():
    labels = torch.arange(600) % 5
    parts = dirichlet_partition(labels, 600, 10, 0.5, seed=3)
    again = dirichlet_partition(labels, 600, 10, 0.5, seed=3)
    assert parts == again
    flat = sorted(i for p in parts for i in p)
    assert flat == list(range(600))
    assert min(len(p) for p in parts) >= 8
    assert parts != dirichlet_partition(labels, 600, 10, 0.5, seed=4)


def test_small_alpha_is_non_iid():
    labels = torch.arange(1000) % 5
    parts = dirichlet_partition(labels, 1000, 5, 0.1, seed=0)
    # With alpha = 0.1 most clients are dominated by one class.
    dominant = [max(torch.bincount(labels[p], minlength=5)).item() / len(p) for p in parts]
    assert sum(d > 0.5 for d in dominant) >= 3


def test_impossible_partition_is_a_clear_error():
    with pytest.raises(ValueError, match="cannot give 50 clients"):
        dirichlet_partition(torch.zeros(100, dtype=torch.long), 100, 50, 0.5, seed=0)


def test_bbc_news_split_is_fixed_and_stratified():
    data_cfg = {"source": "bbc_news", "test_fraction": 0.2, "split_seed": 0,
                "text_column": "text", "label_column": "label"}
    data = load_data(data_cfg, TINY, vocab_size=512)
    assert len(data.train) + len(data.test) == 2225
    assert len(data.test) == 444  # 20% of each topic, rounded per topic
    assert data.label_names == ["business", "entertainment", "politics", "sports", "tech"]
    test_counts = torch.bincount(data.test.tensors[2], minlength=5).tolist()
    assert test_counts == [102, 77, 83, 102, 80]


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_local_files_load(tmp_path, fmt):
    rows = [{"text": f"document number {i} about {'cats' if i % 2 else 'dogs'}",
             "label": "cat" if i % 2 else "dog"} for i in range(40)]
    path = tmp_path / f"data.{fmt}"
    if fmt == "csv":
        path.write_text("text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in rows))
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data_cfg = {"source": fmt, "path": str(path), "test_fraction": 0.25, "split_seed": 0,
                "text_column": "text", "label_column": "label"}
    data = load_data(data_cfg, TINY, vocab_size=512)
    assert data.label_names == ["cat", "dog"]
    assert len(data.train) == 30 and len(data.test) == 10
    assert data.train.tensors[0].shape[1] == 16


def test_missing_label_column_is_a_clear_error(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"text": "x", "topic": "a"}) + "\n")
    data_cfg = {"source": "jsonl", "path": str(path), "test_fraction": 0.25, "split_seed": 0,
                "text_column": "text", "label_column": "label"}
    with pytest.raises(ValueError, match=r"d.jsonl:1: field 'label' is missing \(data.label_column\)"):
        load_data(data_cfg, TINY, vocab_size=512)


def test_synthetic_causal_lm_is_predictable():
    data_cfg = {"source": "synthetic", "num_train": 20, "num_test": 4, "num_classes": 2,
                "seq_len": 8, "split_seed": 0}
    model_cfg = dict(TINY, task="causal_lm")
    data = load_data(data_cfg, model_cfg, vocab_size=64)
    ids = data.train.tensors[0]
    step = (ids[:, 1] - ids[:, 0]) % 64
    assert torch.equal((ids[:, 2] - ids[:, 1]) % 64, step)
    assert data.train_labels is None
