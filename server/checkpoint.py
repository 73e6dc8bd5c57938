"""Round checkpoints: safetensors for tensors, JSON for the rest, written atomically.

Layout: RUN_DIR/checkpoints/round-000003/{state.safetensors,state.json}. A checkpoint is
written to a temporary directory, fsynced, then renamed into place, so a crash leaves
either the previous checkpoint or the new one, never a torn one. The last ``keep`` stay.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from fedlora.aggregation import GlobalState

_DIR = "checkpoints"
_OPTIMIZER = "server_optimizer.safetensors"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(run_dir: Path, state: GlobalState, extra: dict[str, Any], keep: int = 2,
                    optimizer_state: dict[str, Any] | None = None) -> Path:
    """Write round ``state.round``; ``optimizer_state`` (server optimizer moments) beside it."""
    root = Path(run_dir) / _DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"round-{state.round:06d}"
    tmp = root / f".tmp-round-{state.round:06d}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.tensors().items()}
    save_file(tensors, str(tmp / "state.safetensors"))
    names = ["state.safetensors"]
    if optimizer_state:
        save_file({k: v.detach().contiguous().cpu() for k, v in optimizer_state.items()},
                  str(tmp / _OPTIMIZER))
        names.append(_OPTIMIZER)
    meta = {"round": state.round, "meta": state.meta, **extra}
    with open(tmp / "state.json", "w", encoding="utf-8") as handle:
        json.dump(meta, handle, indent=1, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    for name in names:
        with open(tmp / name, "rb") as handle:
            os.fsync(handle.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    for old in sorted(p for p in root.glob("round-*") if p.is_dir())[:-max(1, keep)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    root = Path(run_dir) / _DIR
    found = sorted(p for p in root.glob("round-*") if (p / "state.json").is_file())
    return found[-1] if found else None


def load_checkpoint(path: Path) -> tuple[GlobalState, dict[str, Any]]:
    meta = json.loads((path / "state.json").read_text(encoding="utf-8"))
    tensors = load_file(str(path / "state.safetensors"))
    state = GlobalState.from_tensors(int(meta["round"]), tensors, meta["meta"])
    return state, meta


def load_optimizer_state(path: Path) -> dict[str, Any]:
    """The server optimizer's moments saved with a checkpoint ({} when there were none)."""
    file = path / _OPTIMIZER
    return load_file(str(file)) if file.is_file() else {}
