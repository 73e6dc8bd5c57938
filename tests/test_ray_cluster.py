"""`fedlora simulate simulation.ray_address=...` on an existing Ray cluster: a head and one
worker node started here with `ray start`, one CPU each, so the two clients' actors land
on both nodes; everything the test started is stopped afterwards.

`ray stop --force` would stop every Ray process on the machine (other users' runs too), so
the cluster gets a private temp dir and its processes are found by that path and stopped
by pid, then the test asserts none is left.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import pytest

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _cluster_processes(temp_dir: str) -> list[psutil.Process]:
    """The processes of the cluster under ``temp_dir``: every Ray daemon names its session
    directory on its command line; their workers and agents are their children."""
    found: set[psutil.Process] = set()
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if proc.pid != os.getpid() and any(temp_dir in a for a in proc.info["cmdline"] or []):
                found.add(proc)
                found.update(proc.children(recursive=True))
        except psutil.Error:
            continue
    return [p for p in found if p.is_running()]


def _stop_cluster(temp_dir: str) -> None:
    procs = _cluster_processes(temp_dir)
    for proc in procs:
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=10)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)


def _ray(*args: str, env: dict[str, str]) -> None:
    proc = subprocess.run([str(BIN / "ray"), *args], env=env, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


@pytest.mark.integration
def test_simulate_attaches_to_an_existing_two_node_cluster(tmp_path):
    # Ray's socket paths must stay under ~107 characters: a short temp dir under /tmp.
    temp_dir = tempfile.mkdtemp(prefix="fedlora-ray-", dir="/tmp")
    port = _free_port()
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    run_dir = tmp_path / "run"
    try:
        _ray("start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1",
             "--num-cpus=1", "--include-dashboard=false", f"--temp-dir={temp_dir}",
             "--disable-usage-stats", env=env)
        _ray("start", f"--address=127.0.0.1:{port}", "--node-ip-address=127.0.0.1",
             "--num-cpus=1", f"--temp-dir={temp_dir}", env=env)
        proc = subprocess.run(
            [str(BIN / "fedlora"), "simulate", "model=tiny_bert", "data=synthetic",
             "privacy=none", "federation.num_clients=2", "federation.clients_per_round=2",
             "federation.rounds=1", f"simulation.ray_address=127.0.0.1:{port}",
             f"hydra.run.dir={run_dir}"],
            env=env, capture_output=True, text=True, timeout=400)
        output = proc.stdout + proc.stderr
        assert proc.returncode == 0, output[-4000:]
        assert "attached to the Ray cluster" in output and "2 nodes, 2 CPUs" in output
        rounds = [json.loads(line) for line in
                  (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert len(rounds) == 1 and len(rounds[0]["clients"]) == 2
        # The driver disconnected; the cluster it attached to is still up.
        assert _cluster_processes(temp_dir)
    finally:
        _stop_cluster(temp_dir)
        leftover = _cluster_processes(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert not leftover, [p.pid for p in leftover]
