"""Shared test helpers: run the real `fedlora` CLI and check nothing is left running."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]
FLOWER_NAMES = ("flower-superlink", "flower-supernode", "flwr-serverapp", "flwr-clientapp",
                "raylet", "gcs_server", "ray::")


def fedlora_cmd() -> list[str]:
    return [sys.executable, "-m", "fedlora.deploy.cli"]


def run_fedlora(args: list[str], *, timeout: float = 600, cwd: Path | None = None,
                check: bool = True) -> subprocess.CompletedProcess:
    """Run `fedlora ARGS` in a subprocess; on failure show its output."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run(fedlora_cmd() + args, cwd=cwd or ROOT, env=env, timeout=timeout,
                          capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"fedlora {' '.join(args)} exited {proc.returncode}\n--- stdout\n"
            f"{proc.stdout[-6000:]}\n--- stderr\n{proc.stderr[-6000:]}"
        )
    return proc


def stray_processes(since: float) -> list[str]:
    """Flower/Ray processes started after `since` that are still alive."""
    found = []
    for proc in psutil.process_iter(["name", "cmdline", "create_time"]):
        try:
            if proc.info["create_time"] < since:
                continue
            text = " ".join(proc.info["cmdline"] or []) or (proc.info["name"] or "")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if any(name in text for name in FLOWER_NAMES):
            found.append(f"{proc.pid}: {text[:120]}")
    return found


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if line.strip()]


@pytest.fixture
def no_strays():
    """Fails the test if it leaves Flower or Ray processes behind."""
    import time

    since = time.time() - 1
    yield
    deadline = time.time() + 10
    while (left := stray_processes(since)) and time.time() < deadline:
        time.sleep(0.5)
    assert not left, f"processes left running: {left}"
