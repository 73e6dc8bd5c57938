"""Real local federations: flower-superlink + flower-supernode processes over TLS with
SuperNode authentication, driven by fedlora.deploy.local, on a minimal Message-API app.

Every test checks that no process it started survives it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from fedlora.deploy.local import FederationError, LocalFederation, run_local_federation

pytestmark = pytest.mark.integration

APP_PYPROJECT = """\
[build-system]
requires = ["setuptools>=69"]
build-backend = "setuptools.build_meta"

[project]
name = "deploytestapp"
version = "0.1.0"
description = "Minimal Flower Message-API app for fedlora's deployment tests"
license = "Apache-2.0"
dependencies = ["flwr>=1.39,<1.40"]

[tool.flwr.app]
publisher = "fedlora-tests"

[tool.flwr.app.components]
serverapp = "deploytestapp.server:app"
clientapp = "deploytestapp.client:app"

[tool.flwr.app.config]
num-server-rounds = 2
min-nodes = 3

# flwr 1.39's `flwr run DIR` rewrites a pyproject.toml that has this table; the launcher
# must not let it touch the user's file.
[tool.flwr.federations]
default = "local-simulation"

[tool.flwr.federations.local-simulation]
options.num-supernodes = 3
"""

SERVER = """\
import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    nodes = int(context.run_config["min-nodes"])
    strategy = FedAvg(fraction_evaluate=0.0, min_train_nodes=nodes, min_available_nodes=nodes)
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord([np.zeros(4, dtype=np.float32)]),
        num_rounds=int(context.run_config["num-server-rounds"]),
        train_config=ConfigRecord({"lr": 0.1}),
    )
    print("FINAL-WEIGHTS", result.arrays.to_numpy_ndarrays()[0].tolist(), flush=True)
"""

CLIENT = """\
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    arrays = msg.content["arrays"].to_numpy_ndarrays()
    step = 1.0 + int(context.node_config["partition-id"])
    reply = RecordDict(
        {"arrays": ArrayRecord([a + step for a in arrays]),
         "metrics": MetricRecord({"num-examples": 1})}
    )
    return Message(content=reply, reply_to=msg)
"""


def write_app(root: Path) -> Path:
    """The throw-away Flower app: FedAvg over 4 floats; node i adds 1 + i per round."""
    package = root / "deploytestapp"
    package.mkdir(parents=True)
    (root / "pyproject.toml").write_text(APP_PYPROJECT)
    (package / "__init__.py").write_text("")
    (package / "server.py").write_text(SERVER)
    (package / "client.py").write_text(CLIENT)
    return root


def survivors(work_dir: Path) -> list[str]:
    """Live processes started for ``work_dir``: every one we start gets a FLWR_HOME inside
    it, and Flower's own children (SuperExec, ServerApp, ClientApp) inherit it, also
    those Flower starts in new sessions. Plus any live flower/flwr child of this test."""
    found = []
    marker = str(work_dir)
    for proc in psutil.process_iter(["pid"]):
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            if proc.environ().get("FLWR_HOME", "").startswith(marker):
                found.append(f"{proc.pid}: {' '.join(proc.cmdline())[:160]}")
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
            continue
    for child in psutil.Process().children(recursive=True):
        try:
            text = " ".join(child.cmdline())
            if child.status() != psutil.STATUS_ZOMBIE and ("flower-" in text or "flwr" in text):
                found.append(f"{child.pid} (child): {text[:160]}")
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def assert_no_survivors(work_dir: Path, within_s: float = 10.0) -> None:
    deadline = time.monotonic() + within_s
    while (left := survivors(work_dir)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"processes survived: {left}"


def test_three_supernodes_tls_auth_two_rounds(tmp_path: Path) -> None:
    app = write_app(tmp_path / "app")
    pyproject_before = (app / "pyproject.toml").read_bytes()
    work = tmp_path / "work"
    lines: list[str] = []
    start = time.monotonic()
    try:
        code = run_local_federation(
            app,
            nodes=3,
            run_config={"num-server-rounds": 2, "min-nodes": 3},
            node_configs=[
                {
                    "partition-id": i,
                    "num-partitions": 3,
                    "ledger-dir": str(tmp_path / f"ledger {i}"),
                }
                for i in range(3)
            ],
            work_dir=work,
            timeout_s=150,
            on_line=lines.append,
        )
    finally:
        assert_no_survivors(work)
    elapsed = time.monotonic() - start
    output = "\n".join(lines)
    assert code == 0, output[-4000:]
    assert "[ROUND 2/2]" in output and "[ROUND 3/2]" not in output
    assert "Received 3 results and 0 failures" in output
    # Node i adds 1 + i each round; FedAvg with equal weights: +2 per round.
    assert "FINAL-WEIGHTS [4.0, 4.0, 4.0, 4.0]" in output
    assert "status: finished:completed" in output

    logs = work / "logs"
    superlink_log = (logs / "superlink.log").read_text()
    assert "--enable-supernode-auth" in superlink_log.splitlines()[0]
    assert "--ssl-certfile" in superlink_log.splitlines()[0]
    assert "Uvicorn running on https://127.0.0.1:" in superlink_log  # Control API is TLS
    assert superlink_log.count("Activated node_id=") == 3
    for i in range(3):
        node_log = (logs / f"supernode-{i}.log").read_text()
        command = node_log.splitlines()[0]
        assert "--root-certificates" in command and "--auth-supernode-private-key" in command
        assert f"partition-id={i}" in command
        assert "--superlink 127.0.0.1:" in command
        assert "SuperNode ID:" in node_log
    assert (logs / "register.log").read_text().count("registered supernode-") == 3
    # The CLI config lives in the work dir, with the CA; the user's app was not rewritten.
    config = (work / "flwr" / "cli" / "config.toml").read_text()
    assert "root-certificates" in config and "insecure" not in config
    assert (app / "pyproject.toml").read_bytes() == pyproject_before
    assert (work / "state" / "superlink.db").exists()
    print(f"3 nodes x 2 rounds over TLS + auth: {elapsed:.1f} s")


def test_unregistered_and_untrusting_supernodes_are_refused(tmp_path: Path) -> None:
    work = tmp_path / "work"
    try:
        with LocalFederation(work) as fed:
            endpoint = fed.start_superlink()
            assert endpoint.supernode_auth and not endpoint.insecure
            registered = {name: fed.ensure_node_key(name).public_key for name in ("good", "no-ca")}
            fed.register_supernodes(registered)
            # An EC key pair the SuperLink never saw.
            intruder = fed.start_supernode("intruder", node_config={"partition-id": 0})
            # A registered key, but the node does not trust our CA (system CAs only).
            no_ca = fed.start_supernode("no-ca", with_ca=False)
            # No key at all while the SuperLink requires authentication.
            anonymous = fed.start_supernode("anonymous", with_key=False)
            # Positive control: the same SuperLink accepts a registered, trusting node.
            good = fed.start_supernode("good")
            assert set(fed.wait_for_nodes(["good"], timeout_s=60)) == {"good"}

            for proc in (intruder, no_ca, anonymous):
                assert proc.wait(60) is not None, f"{proc.name} was not refused"
                assert proc.returncode != 0
            intruder_log = intruder.log_text()
            assert "Failed to activate SuperNode" in intruder_log
            assert "Exit Code: 305" in intruder_log
            assert "SuperNode ID:" not in intruder_log
            no_ca_log = no_ca.log_text()
            assert "CERTIFICATE_VERIFY_FAILED" in no_ca_log
            assert "SuperNode ID:" not in no_ca_log
            assert "must be registered" in anonymous.log_text()
            assert good.is_running()
            superlink_log = fed.superlink_process.log_text()
            assert "No SuperNode found with the given public key" in superlink_log
            # wait_for_nodes reports a refused node instead of hanging.
            with pytest.raises(FederationError, match="intruder"):
                fed.wait_for_nodes(["intruder"], timeout_s=5)
    finally:
        assert_no_survivors(work)


def test_ctrl_c_tears_everything_down(tmp_path: Path) -> None:
    """SIGINT (Ctrl-C) to a launcher mid-way leaves no SuperLink/SuperNode/SuperExec."""
    work = tmp_path / "work"
    script = tmp_path / "launcher.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import signal
            import time
            from pathlib import Path
            from fedlora.deploy.local import LocalFederation

            # Ctrl-C as at a terminal: a test started in the background inherits SIGINT
            # ignored, and Python then never raises KeyboardInterrupt.
            signal.signal(signal.SIGINT, signal.default_int_handler)

            with LocalFederation(Path({str(work)!r})) as fed:
                fed.start_superlink()
                fed.register_supernodes({{"n0": fed.ensure_node_key("n0").public_key}})
                fed.start_supernode("n0")
                fed.wait_for_nodes(timeout_s=60)
                print("READY", flush=True)
                time.sleep(300)
            """
        )
    )
    proc = subprocess.Popen(
        [sys.executable, str(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    try:
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:  # stderr is merged: a warning may come before READY
            lines.append(line)
            if line.strip() == "READY":
                break
        assert lines and lines[-1].strip() == "READY", "".join(lines) + proc.stdout.read()
        # The SuperNode's SuperExec runs in its own session: the launcher must still
        # find and stop it. It may start a moment after the node registered.
        deadline = time.monotonic() + 30
        while len(survivors(work)) < 4 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(survivors(work)) >= 4, survivors(work)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
        assert "KeyboardInterrupt" in out, out
        assert_no_survivors(work)
    finally:
        # Whatever failed above, leave nothing running (and do not mask that failure).
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for entry in survivors(work):
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(entry.split()[0].rstrip(":")), signal.SIGKILL)
