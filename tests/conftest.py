"""Shared test helpers: run the real `fedlora` CLI and check nothing is left running.

Every process a test starts carries a unique FEDLORA_TEST_RUN token in its environment
(Ray's and Flower's processes inherit it), so "nothing left running" is checked exactly
for what that test started, even while other federations run on the machine.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]
TOKEN_VAR = "FEDLORA_TEST_RUN"


def fedlora_cmd(cli: str = "fedlora.deploy.cli") -> list[str]:
    """`fedlora` as a command line; ``cli``: a module that stands in for it (e.g. the test
    plug-in's fedlora_test_plugin.faulty_cli, with fault injection)."""
    return [sys.executable, "-m", cli]


def marked_env(token: str) -> dict[str, str]:
    return dict(os.environ, PYTHONUNBUFFERED="1", **{TOKEN_VAR: token})


def new_token() -> str:
    return uuid.uuid4().hex


def processes_with(token: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get(TOKEN_VAR) == token:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def assert_nothing_left(token: str, grace_s: float = 15.0) -> None:
    """Every process started under ``token`` has exited (within a grace period)."""
    deadline = time.time() + grace_s
    while (left := processes_with(token)) and time.time() < deadline:
        time.sleep(0.5)
    if left:
        names = [f"{p.pid}: {' '.join(p.cmdline())[:100]}" for p in left]
        for proc in left:
            proc.kill()
        raise AssertionError(f"processes left running: {names}")


def _flwr_home(proc: psutil.Process) -> str:
    try:
        if proc.status() == psutil.STATUS_ZOMBIE:
            return ""
        return proc.environ().get("FLWR_HOME", "")
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
        return ""


def assert_none_under_flwr_home(work: Path, grace_s: float = 10.0) -> None:
    """No process whose FLWR_HOME lies under ``work`` (a test's federation) is alive."""
    deadline = time.monotonic() + grace_s
    while True:
        left = [p.pid for p in psutil.process_iter() if _flwr_home(p).startswith(str(work))]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert not left, left


def kill_all(token: str, grace_s: float = 10.0) -> None:
    """SIGKILL everything started under ``token``, again while new ones appear (a Ray
    raylet can still be starting a worker when it is itself killed)."""
    deadline = time.monotonic() + grace_s
    while (procs := processes_with(token)) and time.monotonic() < deadline:
        for proc in procs:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        time.sleep(0.2)


# Simulations in tests run one Ray actor (Ray may use 1 CPU): the tiny models train in
# milliseconds, while every actor pays ~9 CPU-s of imports and model loading, and two
# tests share the 2 cores (pytest-xdist).
ONE_ACTOR = "simulation.num_cpus=1"
# The default job is private (privacy=dp_eps8 with its recipe); a test that does not choose
# a privacy preset tests mechanics, not DP, and runs without it. The tests of DP choose one.
NOT_PRIVATE = "privacy=none"


def for_test_run(args: list[str]) -> list[str]:
    """``args`` of a `fedlora simulate` (or `tune`, whose overrides follow --) plus
    :data:`ONE_ACTOR`, and `simulate` or `deploy local` plus :data:`NOT_PRIVATE` unless
    they choose a privacy preset; other commands unchanged."""
    command = args[0] if args else ""
    out = list(args)
    runs_a_job = command == "simulate" or args[:2] == ["deploy", "local"]
    if runs_a_job and not any(a.startswith("privacy=") for a in args):
        out.append(NOT_PRIVATE)
    if command == "simulate" or (command == "tune" and "--" in args):
        out.append(ONE_ACTOR)
    return out


def run_fedlora(args: list[str], *, timeout: float = 900, check: bool = True,
                cli: str = "fedlora.deploy.cli") -> subprocess.CompletedProcess:
    """Run `fedlora ARGS` (as :func:`for_test_run` completes them; ``cli`` as in
    :func:`fedlora_cmd`); on failure show its output; then check nothing is left."""
    args = for_test_run(args)
    token = new_token()
    try:
        proc = subprocess.run(fedlora_cmd(cli) + args, cwd=ROOT, env=marked_env(token),
                              timeout=timeout, capture_output=True, text=True)
    finally:
        assert_nothing_left(token)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"fedlora {' '.join(args)} exited {proc.returncode}\n--- stdout\n"
            f"{proc.stdout[-6000:]}\n--- stderr\n{proc.stderr[-6000:]}"
        )
    return proc


def tutorial_command(page: str, prefix: str) -> list[str]:
    """The arguments of the command a tutorial shows (docs/tutorials/PAGE, the line that
    starts with ``prefix``), without the leading ``fedlora``: tests run the tutorials'
    own commands, so a tutorial cannot drift from what is tested."""
    for line in (ROOT / "docs" / "tutorials" / page).read_text().splitlines():
        if line.strip().startswith(prefix):
            return shlex.split(line.strip())[1:]
    raise AssertionError(f"docs/tutorials/{page} shows no command starting with {prefix!r}")


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if line.strip()]


# The integration modules, longest first (by their measured serial durations, printed by
# --durations): run in parallel (pytest-xdist, one module per worker at a time), the long
# ones must start first or the suite ends with one worker running the deploy test alone.
_LONGEST_FIRST = ["test_simulation", "test_secure_aggregation", "test_reliability",
                  "test_deploy_fedlora", "test_dp_simulation", "test_deploy_local", "test_minilm",
                  "test_recipes", "test_client_level_dp", "test_deploy_compose"]


# Modules whose every test starts processes or trains real models: marked integration as a
# whole, so `-m "not integration"` is the fast unit layer (tests elsewhere mark themselves).
_INTEGRATION_MODULES = {*_LONGEST_FIRST, "test_cli", "test_privacy_training",
                        "test_privacy_recipe_features", "test_client_training",
                        "test_deploy_edge", "test_ray_cluster", "test_llm_simulation",
                        "test_aggregation_process", "test_minilm"}


def pytest_collection_modifyitems(config, items) -> None:  # noqa: ANN001 - pytest hook
    rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
    for item in items:
        if item.module.__name__.rsplit(".", 1)[-1] in _INTEGRATION_MODULES:
            item.add_marker(pytest.mark.integration)

    def key(item) -> int:  # noqa: ANN001
        return rank.get(item.module.__name__.rsplit(".", 1)[-1], len(rank))

    items.sort(key=key)  # stable: the order inside a module is kept
