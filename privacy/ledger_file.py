"""Where a privacy ledger lives on disk and how it is written so a crash never corrupts it.

The name is derived from (federation, node) and cannot leave its directory. Every write
goes to a temporary file in the same directory, is fsynced, replaces the ledger with
``os.replace`` and then fsyncs the directory: after a crash the file is either the old
ledger or the new one, never a torn mix. Writers of one ledger are serialised by a POSIX
advisory lock on a sidecar file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

try:  # POSIX advisory locks; without them (Windows) a ledger must have one writer.
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]


def _slug(text: str) -> str:
    # Only [A-Za-z0-9._-], no leading dot: the name can never climb out of the directory
    # or hide itself; the hash in ledger_filename keeps distinct keys distinct.
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", text).lstrip(".")
    return slug[:48] or "_"


def ledger_filename(federation: str, node: str) -> str:
    """The ledger's file name for (federation, node): readable, unique, traversal-safe."""
    for name, value in (("federation", federation), ("node", node)):
        if not isinstance(value, str) or not value or "\x00" in value:
            raise ValueError(f"{name} must be a non-empty string, got {value!r}")
    digest = hashlib.sha256(json.dumps([federation, node]).encode()).hexdigest()[:16]
    return f"{_slug(federation)}--{_slug(node)}--{digest}.privacy.json"


# A node's lifetime ledger is keyed by its data's fingerprint under this prefix, so the
# simulation's reports can tell node ledgers from the server's client-level one.
LIFETIME_PREFIX = "data-"


def lifetime_key(fingerprint: str) -> str:
    """The ledger key of a node's lifetime ledger for the data with ``fingerprint``."""
    return f"{LIFETIME_PREFIX}{fingerprint}"


def is_lifetime_key(federation: str) -> bool:
    return str(federation).startswith(LIFETIME_PREFIX)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def write_durably(path: Path, text: str) -> None:
    """Replace ``path`` with ``text``: temp file, fsync, os.replace, fsync the directory."""
    directory = path.parent
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(directory)


@contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock for the ledger at ``path`` (blocks until it is free)."""
    # A sidecar lock file: the ledger itself is replaced on every write, so a lock on it
    # would not exclude a writer holding the previous inode.
    if fcntl is None:  # pragma: no cover
        yield
        return
    lock_path = path.with_name(path.name + ".lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock
