"""A real local multi-process Flower federation: SuperLink, N SuperNodes, `flwr run`.

Everything is app-agnostic: any Flower App directory (a ``pyproject.toml`` with
``[tool.flwr.app]``) can be run. One call does it all::

    from fedlora.deploy.local import run_local_federation
    rc = run_local_federation(Path("."), nodes=3, run_config={"num-server-rounds": 2},
                              node_configs=[{"partition-id": i} for i in range(3)],
                              work_dir=Path("runs/local"))

What it does (flwr 1.39 flags, checked against the installed ``--help``):

1. a private CA and a SuperLink certificate (``certs/``), one EC key pair per SuperNode
   (``keys/``), unless ``insecure``;
2. ``flower-superlink --ssl-ca-certfile --ssl-certfile --ssl-keyfile
   --enable-supernode-auth --fleet-api-address 127.0.0.1:P1 --host 127.0.0.1 --port P2
   --database state/superlink.db --disable-runtime-dependency-installation``. In 1.39
   the Control API and the ServerApp runtime API share one HTTPS server (``--host`` /
   ``--port``); ``--control-api-address`` is deprecated;
3. ``flwr supernode register KEY.pub CONNECTION`` for every node (SuperNode
   authentication in 1.39 = ``--enable-supernode-auth`` plus registration through the
   Control API; the old ``--auth-list-public-keys`` CSV is refused);
4. ``flower-supernode --root-certificates ca.crt --superlink 127.0.0.1:P1
   --auth-supernode-private-key KEY --node-config '...' --host 127.0.0.1 --port P3``
   per node (``--port``: that node's own ClientApp runtime API);
5. ``flwr run APP CONNECTION --stream --run-config '...'`` with ``FLWR_HOME`` pointing
   at ``flwr/cli`` under the work dir, whose ``config.toml`` names the connection
   (``[superlink.NAME] address``, ``root-certificates``): ``~/.flwr`` is never touched.

Every process runs in its own session/process group, logs to ``logs/NAME.log`` and is
stopped (SIGTERM, then SIGKILL, whole process group plus every descendant, also those
that Flower detaches into new sessions) on success, failure, Ctrl-C and SIGTERM.

Smaller pieces (:class:`LocalFederation`: ``start_superlink``, ``register_supernodes``,
``start_supernode``, ``wait_for_nodes``, ``run_app``, ``stop_all``; usable as a context
manager) let tests start e.g. an unregistered SuperNode or one without the CA.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
import warnings
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, TracebackType

import psutil

from fedlora.deploy.certs.generate import CertPaths, generate_certificates
from fedlora.deploy.keys.generate import NodeKeyPair, default_names, generate_node_key, key_paths
from fedlora.deploy.keys.register import write_connection_config

__all__ = [
    "ConfigValue",
    "DEFAULT_CONNECTION",
    "FederationError",
    "FederationTimeout",
    "LocalFederation",
    "ManagedProcess",
    "SuperLinkEndpoint",
    "format_config_args",
    "free_port",
    "run_local_federation",
]

ConfigValue = str | int | float | bool

DEFAULT_CONNECTION = "fedlora-local"
LOOPBACK = "127.0.0.1"
# Set in the environment of every process we start, so that teardown can find all of
# them, including those that Flower starts in new sessions (SuperExec, ServerApp,
# ClientApp processes) or that were re-parented after their parent died.
MARKER_ENV = "FEDLORA_LOCAL_FEDERATION_ID"

_log = logging.getLogger(__name__)
_ANSI_RE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_KEY_RE = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")
_RUN_ID_RE = re.compile(r"Successfully started run (\d+)")
_NODE_ID_RE = re.compile(r"SuperNode ID: (\d+)")
_BIND_ERROR_RE = re.compile(r"address already in use|failed to bind|errno 98", re.IGNORECASE)


class FederationError(RuntimeError):
    """The local federation could not be brought up or run (see the message and logs)."""


class FederationTimeout(FederationError, TimeoutError):
    """The local federation did not finish within its time limit."""


# --------------------------------------------------------------------------- helpers


def free_port(host: str = LOOPBACK) -> int:
    """Return a TCP port on ``host`` that is free right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _strip_ansi(text: str) -> str:
    return _ANSI_RE.sub("", text)


def _format_value(key: str, value: ConfigValue) -> str:
    # bool before int: bool is a subclass of int.
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        # Flower splits "k=v" pairs with a regex that takes a quoted value up to the
        # next quote of the same kind, so escaped quotes cannot be used: pick the kind
        # the value does not contain. JSON escaping is valid TOML basic-string escaping.
        if '"' not in value:
            return json.dumps(value)
        if "'" not in value and "\n" not in value:
            return f"'{value}'"
        raise ValueError(f"config value for {key!r} contains both quote kinds: {value!r}")
    raise TypeError(f"config value for {key!r} must be str, int, float or bool, not {type(value)}")


def format_config_args(config: Mapping[str, ConfigValue]) -> str:
    """Format a flat config as Flower's ``'k1=v1 k2="v2"'`` (``--run-config``/``--node-config``)."""
    parts = []
    for key, value in config.items():
        if not _KEY_RE.match(key):
            raise ValueError(f"invalid config key {key!r}: use letters, digits, '_', '-', '.'")
        parts.append(f"{key}={_format_value(key, value)}")
    return " ".join(parts)


def _flower_executable(name: str) -> str:
    """Find a Flower command: next to this interpreter first (the venv), then on PATH."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise FederationError(f"{name!r} not found next to {sys.executable} nor on PATH")
    return found


def _marked_processes(marker: str) -> list[psutil.Process]:
    """Every live process whose environment carries our marker."""
    found = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if proc.pid == os.getpid() or proc.status() == psutil.STATUS_ZOMBIE:
                continue
            if proc.environ().get(MARKER_ENV) == marker:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
            continue
    return found


# --------------------------------------------------------------------------- processes


@dataclass
class ManagedProcess:
    """One process we started, in its own process group, logging to ``log_path``."""

    name: str
    args: list[str]
    popen: subprocess.Popen[bytes]
    log_path: Path
    # Logs are appended to (a restarted process keeps its predecessor's log), so each
    # process reads its own part only: from this byte offset on.
    log_offset: int = 0

    @property
    def pid(self) -> int:
        """Process id (also its process group id)."""
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        """Exit code, or None while it runs."""
        return self.popen.poll()

    def is_running(self) -> bool:
        """True while the process has not exited."""
        return self.popen.poll() is None

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait for the exit code; None if still running after ``timeout`` seconds."""
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def log_text(self) -> str:
        """This process's log so far, without terminal colour codes."""
        try:
            with open(self.log_path, "rb") as handle:
                handle.seek(self.log_offset)
                data = handle.read()
        except FileNotFoundError:
            return ""
        return _strip_ansi(data.decode("utf-8", errors="replace"))

    def log_tail(self, lines: int = 30) -> str:
        """The last ``lines`` lines of the log."""
        return "\n".join(self.log_text().splitlines()[-lines:])


@dataclass(frozen=True)
class SuperLinkEndpoint:
    """How to reach the running SuperLink."""

    fleet_address: str
    control_address: str
    ca_cert: Path | None
    insecure: bool
    supernode_auth: bool


@dataclass
class _Layout:
    root: Path
    certs: Path = field(init=False)
    keys: Path = field(init=False)
    logs: Path = field(init=False)
    state: Path = field(init=False)
    flwr: Path = field(init=False)
    app: Path = field(init=False)

    def __post_init__(self) -> None:
        self.certs = self.root / "certs"
        self.keys = self.root / "keys"
        self.logs = self.root / "logs"
        self.state = self.root / "state"
        self.flwr = self.root / "flwr"
        self.app = self.root / "app"


class LocalFederation:
    """Start and stop the pieces of a local federation; a context manager.

    Layout under ``work_dir``: ``certs/`` (CA + server certificate), ``keys/`` (node key
    pairs), ``logs/`` (one log per process), ``state/superlink.db`` (SuperLink state),
    ``flwr/`` (a separate ``FLWR_HOME`` per process; ``flwr/cli/config.toml`` holds the
    connection), ``app/`` (the staged app that ``flwr run`` submits).
    """

    def __init__(
        self,
        work_dir: Path,
        *,
        insecure: bool = False,
        connection_name: str = DEFAULT_CONNECTION,
        grace_s: float = 10.0,
    ) -> None:
        self.work_dir = Path(work_dir).resolve()
        self.insecure = insecure
        self.connection_name = connection_name
        self.grace_s = grace_s
        self.paths = _Layout(self.work_dir)
        self.superlink: SuperLinkEndpoint | None = None
        self.superlink_process: ManagedProcess | None = None
        self.supernodes: dict[str, ManagedProcess] = {}
        self.processes: list[ManagedProcess] = []
        self.node_ids: dict[str, int] = {}
        self.marker = uuid.uuid4().hex
        self._certs: CertPaths | None = None
        for directory in (self.paths.logs, self.paths.state, self.paths.flwr):
            directory.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------ context manager

    def __enter__(self) -> LocalFederation:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # A second Ctrl-C while we tear down must not leave half the processes alive.
        with _signals_ignored():
            self.stop_all()

    # ------------------------------------------------------------ credentials

    def ensure_certificates(self) -> CertPaths:
        """CA + SuperLink certificate in ``certs/`` (CA reused if present)."""
        if self._certs is None:
            self._certs = generate_certificates(self.paths.certs)
        return self._certs

    def ensure_node_key(self, name: str) -> NodeKeyPair:
        """The key pair of node ``name`` in ``keys/``, generated if missing."""
        pair = key_paths(self.paths.keys, name)
        if pair.private_key.exists() and pair.public_key.exists():
            return pair
        return generate_node_key(self.paths.keys, name, force=True)

    # ------------------------------------------------------------ environment

    def _env(self, flwr_home: Path) -> dict[str, str]:
        env = dict(os.environ)
        bin_dir = str(Path(_flower_executable("flower-superlink")).parent)
        # The SuperLink/SuperNode start `flower-superexec` and the app processes by
        # name: they must find the same installation.
        env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
        env["FLWR_HOME"] = str(flwr_home)
        env["PYTHONUNBUFFERED"] = "1"
        # No phoning home from tests and local runs.
        env["FLWR_TELEMETRY_ENABLED"] = "0"
        env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
        env[MARKER_ENV] = self.marker
        return env

    def start_process(
        self, name: str, args: Sequence[str], *, flwr_home: Path | None = None
    ) -> ManagedProcess:
        """Start any command under this federation's management (logs, teardown).

        For commands not covered by the helpers, e.g. a SuperNode started with the
        exact command line of the edge unit file. ``flwr_home`` defaults to
        ``flwr/NAME`` under the work dir.
        """
        return self._spawn(name, list(args), flwr_home or self.paths.flwr / name)

    def _spawn(self, name: str, args: list[str], flwr_home: Path) -> ManagedProcess:
        if name in {p.name for p in self.processes if p.is_running()}:
            raise FederationError(f"a process named {name!r} is already running")
        flwr_home.mkdir(parents=True, exist_ok=True)
        log_path = self.paths.logs / f"{name}.log"
        with open(log_path, "ab") as log_file:
            offset = log_file.tell()
            log_file.write(f"$ {' '.join(args)}\n".encode())
            log_file.flush()
            # start_new_session: its own process group, so that a Ctrl-C in the
            # terminal does not race our orderly teardown and killpg reaches it all.
            popen = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd=self.work_dir,
                env=self._env(flwr_home),
                start_new_session=True,
            )
        proc = ManagedProcess(name, args, popen, log_path, offset)
        self.processes.append(proc)
        _log.info("started %s (pid %d), log %s", name, proc.pid, log_path)
        return proc

    # ------------------------------------------------------------ SuperLink

    def start_superlink(
        self,
        *,
        supernode_auth: bool | None = None,
        fresh_state: bool = True,
        ready_timeout_s: float = 60.0,
        attempts: int = 3,
    ) -> SuperLinkEndpoint:
        """Start ``flower-superlink`` on loopback ports and wait until both APIs answer.

        ``supernode_auth`` defaults to on with TLS (it requires TLS in flwr 1.39).
        ``fresh_state`` deletes ``state/superlink.db`` of an earlier run in this work
        dir first: its registered keys would make re-registration fail ("Public key
        already in use"). The database of this run stays for inspection.
        """
        if self.superlink_process is not None and self.superlink_process.is_running():
            raise FederationError("the SuperLink is already running")
        if fresh_state:
            for stale in self.paths.state.glob("superlink.db*"):
                stale.unlink()
        auth = (not self.insecure) if supernode_auth is None else supernode_auth
        if auth and self.insecure:
            raise ValueError("SuperNode authentication requires TLS (insecure=False)")
        exe = _flower_executable("flower-superlink")
        last_error = ""
        for attempt in range(attempts):
            fleet_port, control_port = free_port(), free_port()
            while control_port == fleet_port:
                control_port = free_port()
            args = [exe]
            if self.insecure:
                args.append("--insecure")
            else:
                certs = self.ensure_certificates()
                args += [
                    "--ssl-ca-certfile", str(certs.ca_cert),
                    "--ssl-certfile", str(certs.server_cert),
                    "--ssl-keyfile", str(certs.server_key),
                ]  # fmt: skip
            if auth:
                args.append("--enable-supernode-auth")
            args += [
                "--fleet-api-type", "grpc-rere",
                "--fleet-api-address", f"{LOOPBACK}:{fleet_port}",
                "--host", LOOPBACK,
                "--port", str(control_port),
                "--database", str(self.paths.state / "superlink.db"),
                # Apps run in this environment; never let the SuperLink `uv sync` (it
                # would try to download the app's dependencies).
                "--disable-runtime-dependency-installation",
            ]  # fmt: skip
            name = "superlink" if attempt == 0 else f"superlink-{attempt}"
            proc = self._spawn(name, args, self.paths.flwr / "superlink")
            deadline = time.monotonic() + ready_timeout_s
            while time.monotonic() < deadline and proc.is_running():
                if _port_open(LOOPBACK, fleet_port) and _port_open(LOOPBACK, control_port):
                    break
                time.sleep(0.2)
            if (
                proc.is_running()
                and _port_open(LOOPBACK, control_port)
                and _port_open(LOOPBACK, fleet_port)
            ):
                self.superlink_process = proc
                self.superlink = SuperLinkEndpoint(
                    fleet_address=f"{LOOPBACK}:{fleet_port}",
                    control_address=f"{LOOPBACK}:{control_port}",
                    ca_cert=None if self.insecure else self.ensure_certificates().ca_cert,
                    insecure=self.insecure,
                    supernode_auth=auth,
                )
                self.write_cli_config()
                return self.superlink
            self._stop([proc])
            last_error = proc.log_tail()
            if not _BIND_ERROR_RE.search(last_error):
                break  # not a port race: retrying will not help
        raise FederationError(f"the SuperLink did not start; log tail:\n{last_error}")

    def write_cli_config(self) -> Path:
        """Write ``flwr/cli/config.toml`` naming the running SuperLink's Control API."""
        endpoint = self._require_superlink()
        return write_connection_config(
            self.cli_home, self.connection_name, endpoint.control_address, endpoint.ca_cert
        )

    @property
    def cli_home(self) -> Path:
        """``FLWR_HOME`` of the ``flwr`` CLI calls (holds ``config.toml``)."""
        return self.paths.flwr / "cli"

    def _require_superlink(self) -> SuperLinkEndpoint:
        if self.superlink is None:
            raise FederationError("start the SuperLink first")
        return self.superlink

    # ------------------------------------------------------------ flwr CLI

    def flwr_cli(
        self, args: Sequence[str], *, timeout_s: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        """Run one ``flwr`` CLI command against our connection (output captured)."""
        self._require_superlink()
        return subprocess.run(
            [_flower_executable("flwr"), *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            # Never the user's project dir: `flwr` rewrites a pyproject.toml with a
            # [tool.flwr.federations] table that it takes for legacy usage.
            cwd=self.work_dir,
            env=self._env(self.cli_home),
            timeout=timeout_s,
            check=False,
        )

    def register_supernodes(
        self, public_keys: Mapping[str, Path], *, timeout_s: float = 60.0
    ) -> dict[str, int]:
        """Register public keys (``{name: path}``) with the SuperLink; return node ids.

        Runs ``flwr supernode register KEY CONNECTION --name NAME --format json`` for
        every key at once (each CLI call costs ~1.5 s of interpreter start-up).
        """
        self._require_superlink()
        exe = _flower_executable("flwr")
        running: dict[str, subprocess.Popen[str]] = {}
        try:
            for name, key in public_keys.items():
                running[name] = subprocess.Popen(
                    [exe, "supernode", "register", str(key), self.connection_name,
                     "--name", name, "--format", "json"],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                    cwd=self.work_dir,
                    env=self._env(self.cli_home),
                )  # fmt: skip
            ids: dict[str, int] = {}
            failures: list[str] = []
            deadline = time.monotonic() + timeout_s
            for name, popen in running.items():
                try:
                    out, _ = popen.communicate(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    raise FederationTimeout(
                        f"`flwr supernode register` for {name} took over {timeout_s:.0f} s"
                    ) from None
                node_id = _parse_node_id(out)
                if popen.returncode != 0 or node_id is None:
                    failures.append(f"{name}: rc={popen.returncode}\n{_strip_ansi(out)}")
                else:
                    ids[name] = node_id
        finally:
            for popen in running.values():
                if popen.poll() is None:
                    popen.kill()
                    popen.wait()
        self.node_ids.update(ids)
        with open(self.paths.logs / "register.log", "a", encoding="utf-8") as log_file:
            for name, node_id in ids.items():
                log_file.write(f"registered {name} -> node {node_id}\n")
            for failure in failures:
                log_file.write(f"FAILED {failure}\n")
        if failures:
            raise FederationError("SuperNode registration failed:\n" + "\n".join(failures))
        return ids

    def list_nodes(self) -> list[dict[str, object]]:
        """``flwr supernode list --format json`` (empty list if the call fails)."""
        result = self.flwr_cli(["supernode", "list", self.connection_name, "--format", "json"])
        try:
            data = json.loads(result.stdout[result.stdout.index("{") :])
        except ValueError:
            return []
        nodes = data.get("nodes", []) if isinstance(data, dict) else []
        return [n for n in nodes if isinstance(n, dict)]

    # ------------------------------------------------------------ SuperNodes

    def start_supernode(
        self,
        name: str,
        *,
        node_config: Mapping[str, ConfigValue] | None = None,
        with_ca: bool = True,
        with_key: bool | None = None,
        private_key: Path | None = None,
        max_retries: int | None = None,
        max_wait_time_s: float | None = None,
    ) -> ManagedProcess:
        """Start ``flower-supernode`` named ``name`` (log ``logs/NAME.log``).

        ``with_ca=False`` leaves out ``--root-certificates`` (the node then trusts only
        the system CAs and cannot verify our SuperLink). ``with_key`` defaults to
        whether the SuperLink authenticates SuperNodes; the key is ``private_key`` or
        ``keys/NAME.key`` (created if missing; creating it does not register it).
        """
        endpoint = self._require_superlink()
        use_key = endpoint.supernode_auth if with_key is None else with_key
        args = [_flower_executable("flower-supernode")]
        if endpoint.insecure:
            args.append("--insecure")
        elif with_ca:
            assert endpoint.ca_cert is not None
            args += ["--root-certificates", str(endpoint.ca_cert)]
        args += ["--superlink", endpoint.fleet_address]
        if use_key:
            key = private_key or self.ensure_node_key(name).private_key
            args += ["--auth-supernode-private-key", str(key)]
        if node_config:
            args += ["--node-config", format_config_args(node_config)]
        if max_retries is not None:
            args += ["--max-retries", str(max_retries)]
        if max_wait_time_s is not None:
            args += ["--max-wait-time", str(max_wait_time_s)]
        args += ["--host", LOOPBACK, "--port", str(free_port())]
        proc = self._spawn(name, args, self.paths.flwr / name)
        self.supernodes[name] = proc
        return proc

    def _restart_supernode(self, proc: ManagedProcess) -> ManagedProcess:
        """Same command on a new ClientApp port (after losing a port race)."""
        args = list(proc.args)
        args[args.index("--port") + 1] = str(free_port())
        new = self._spawn(proc.name, args, self.paths.flwr / proc.name)
        self.supernodes[proc.name] = new
        return new

    def wait_for_nodes(
        self, names: Sequence[str] | None = None, *, timeout_s: float = 60.0
    ) -> dict[str, int]:
        """Wait until our SuperNodes (all, or ``names``) are connected; return their ids.

        A SuperNode logs ``SuperNode ID: N`` once the SuperLink accepted it (TLS and,
        with authentication, its registered key). Reading that from its log costs
        nothing, where each ``flwr supernode list`` costs a 1.5 s interpreter start.
        Fails fast, with the log tail, if one of them or the SuperLink exits.
        """
        self._require_superlink()
        wanted = list(self.supernodes) if names is None else list(names)
        deadline = time.monotonic() + timeout_s
        restarts = 0
        while True:
            connected: dict[str, int] = {}
            for name in wanted:
                proc = self.supernodes[name]
                match = _NODE_ID_RE.search(proc.log_text())
                if match:
                    connected[name] = int(match.group(1))
                    continue
                if proc.is_running():
                    continue
                tail = proc.log_tail()
                if _BIND_ERROR_RE.search(tail) and restarts < 3:
                    restarts += 1  # lost a port race with another process: new port
                    self._restart_supernode(proc)
                    continue
                raise FederationError(
                    f"SuperNode {name} exited with code {proc.returncode}; log tail:\n{tail}"
                )
            if len(connected) == len(wanted):
                self.node_ids.update(connected)
                return connected
            if self.superlink_process is not None and not self.superlink_process.is_running():
                raise FederationError(
                    "the SuperLink exited; log tail:\n" + self.superlink_process.log_tail()
                )
            if time.monotonic() > deadline:
                missing = sorted(set(wanted) - set(connected))
                raise FederationTimeout(
                    f"SuperNodes {missing} not connected after {timeout_s:.0f} s; see their logs"
                )
            time.sleep(0.2)

    # ------------------------------------------------------------ flwr run

    def stage_app(self, app_dir: Path) -> Path:
        """Copy the files ``flwr run`` would ship (its FAB) into ``app/``.

        Why: in flwr 1.39 ``flwr run DIR`` migrates a ``[tool.flwr.federations]``
        table it finds in ``DIR/pyproject.toml`` into ``$FLWR_HOME/config.toml`` and
        then comments that table out, i.e. it rewrites the user's pyproject.toml. The
        staged copy is built by Flower's own FAB builder (same include/exclude rules,
        federations table already removed), so the run ships exactly the same app.
        """
        from flwr.cli.build import build_fab_from_disk  # heavy import: only when used

        app_dir = Path(app_dir).resolve()
        if not (app_dir / "pyproject.toml").is_file():
            raise FederationError(f"{app_dir} has no pyproject.toml (not a Flower App)")
        with warnings.catch_warnings():
            # Flower's builder triggers pathspec deprecation warnings: not ours to fix.
            warnings.simplefilter("ignore", DeprecationWarning)
            fab = build_fab_from_disk(app_dir)
        staged = self.paths.app
        if staged.exists():
            shutil.rmtree(staged)
        staged.mkdir(parents=True)
        with zipfile.ZipFile(io.BytesIO(fab)) as archive:
            for member in archive.infolist():
                target = (staged / member.filename).resolve()
                if member.is_dir() or member.filename.startswith(".info/"):
                    continue
                if not target.is_relative_to(staged):
                    raise FederationError(f"unsafe path in app bundle: {member.filename}")
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(archive.read(member))
        return staged

    def run_app(
        self,
        app_dir: Path,
        *,
        run_config: Mapping[str, ConfigValue] | None = None,
        stream: bool = True,
        timeout_s: float | None = None,
        on_line: Callable[[str], None] | None = None,
    ) -> int:
        """``flwr run`` the app, stream its lines to ``on_line``, wait for the end.

        Returns the exit code of ``flwr run``, except that a run whose final status
        is not ``finished:completed`` gives 1 even where ``flwr run`` said 0 (it does
        not report the ServerApp's failure in its exit code). Raises
        :class:`FederationTimeout` after ``timeout_s``.
        """
        self._require_superlink()
        emit = on_line or _print_line
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        staged = self.stage_app(app_dir)
        args = [_flower_executable("flwr"), "run", str(staged), self.connection_name]
        if stream:
            args.append("--stream")
        if run_config:
            args += ["--run-config", format_config_args(run_config)]
        proc = self._spawn("flwr-run", args, self.cli_home)
        run_id: int | None = None
        try:
            for line in _follow(proc, deadline):
                emit(line)
                match = _RUN_ID_RE.search(line)
                if match and run_id is None:
                    run_id = int(match.group(1))
        except FederationTimeout:
            if run_id is not None:
                self.flwr_cli(["stop", str(run_id), self.connection_name], timeout_s=30)
            raise
        code = proc.wait()
        assert code is not None
        if run_id is None:
            return code or 1
        if not stream:
            # Without --stream `flwr run` returns once the run is submitted: wait here.
            status = self._wait_run_finished(run_id, deadline)
        else:
            status = self._run_status(run_id)
        emit(f"[fedlora] run {run_id} status: {status}")
        if code == 0 and status != "finished:completed":
            return 1
        return code

    def _run_status(self, run_id: int) -> str:
        result = self.flwr_cli(
            ["ls", self.connection_name, "--run-id", str(run_id), "--format", "json"]
        )
        try:
            data = json.loads(result.stdout[result.stdout.index("{") :])
            runs = data.get("runs", [])
            return str(runs[0].get("status", "unknown")) if runs else "unknown"
        except (ValueError, AttributeError, IndexError):
            return "unknown"

    def _wait_run_finished(self, run_id: int, deadline: float | None) -> str:
        while True:
            status = self._run_status(run_id)
            if status.startswith("finished"):
                return status
            if deadline is not None and time.monotonic() > deadline:
                self.flwr_cli(["stop", str(run_id), self.connection_name], timeout_s=30)
                raise FederationTimeout(f"run {run_id} still {status} at its time limit")
            time.sleep(1.0)

    # ------------------------------------------------------------ teardown

    def stop_all(self) -> None:
        """Stop every process we started and everything they started. Idempotent."""
        # Order: the CLI client first, then SuperNodes, the SuperLink last, so that no
        # node spends the grace period reconnecting to a SuperLink that is gone.
        ordered = sorted(
            self.processes,
            key=lambda p: 0 if p.name == "flwr-run" else 2 if p.name.startswith("superlink") else 1,
        )
        self._stop(ordered)
        # Last sweep: anything still carrying our marker (e.g. an app process that a
        # SuperExec started between the snapshot and its own termination).
        leftovers = _marked_processes(self.marker)
        for proc in leftovers:
            _kill_quietly(proc)
        psutil.wait_procs(leftovers, timeout=5)

    def _stop(self, procs: Sequence[ManagedProcess]) -> None:
        live = [p for p in procs if p.is_running()]
        tree: dict[int, psutil.Process] = {}
        for proc in live:
            try:
                root = psutil.Process(proc.pid)
                for child in root.children(recursive=True):
                    tree[child.pid] = child
            except psutil.NoSuchProcess:
                pass
        for proc in live:
            _signal_group(proc.pid, signal.SIGTERM)
        for child in tree.values():
            try:
                child.terminate()  # descendants in other sessions miss the killpg
            except psutil.NoSuchProcess:
                pass
        deadline = time.monotonic() + self.grace_s
        for proc in live:
            proc.wait(max(0.0, deadline - time.monotonic()))
        _, alive = psutil.wait_procs(
            list(tree.values()), timeout=max(0.1, deadline - time.monotonic())
        )
        for proc in live:
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait(5)
        for child in alive:
            _kill_quietly(child)
        psutil.wait_procs(alive, timeout=5)
        for proc in procs:
            if proc.returncode is None:
                _log.warning("%s (pid %d) did not stop", proc.name, proc.pid)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _kill_quietly(proc: psutil.Process) -> None:
    try:
        proc.kill()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        pass


def _parse_node_id(output: str) -> int | None:
    try:
        data = json.loads(output[output.index("{") : output.rindex("}") + 1])
        return int(data["node-id"]) if data.get("success") else None
    except (ValueError, KeyError, TypeError):
        return None


def _print_line(line: str) -> None:
    print(line, flush=True)


def _follow(proc: ManagedProcess, deadline: float | None) -> Iterator[str]:
    """Yield new lines of ``proc``'s log until it exits; raise at ``deadline``.

    Reading the log file (rather than a pipe) keeps the child independent of us: it
    can never block on a full pipe, and the log is complete even if we are killed.
    """
    lines: queue.Queue[str | None] = queue.Queue()
    stop = threading.Event()

    def decode(raw: bytes) -> str:
        return _strip_ansi(raw.decode("utf-8", errors="replace").rstrip("\r\n"))

    def reader() -> None:
        with open(proc.log_path, "rb") as handle:
            handle.seek(proc.log_offset)
            pending = b""
            while True:
                chunk = handle.readline()
                if chunk:
                    pending += chunk
                    if pending.endswith(b"\n"):
                        lines.put(decode(pending))
                        pending = b""
                    continue
                if stop.is_set() or not proc.is_running():
                    # Process gone: drain what it wrote last, then finish.
                    for raw in (pending + handle.read()).splitlines():
                        lines.put(decode(raw))
                    lines.put(None)
                    return
                time.sleep(0.05)

    thread = threading.Thread(target=reader, name=f"follow-{proc.name}", daemon=True)
    thread.start()
    try:
        first = True
        while True:
            try:
                line = lines.get(timeout=0.2)
            except queue.Empty:
                if deadline is not None and time.monotonic() > deadline:
                    raise FederationTimeout(
                        f"{proc.name} still running at its time limit"
                    ) from None
                continue
            if line is None:
                return
            # Skip the "$ command" header we wrote ourselves.
            if first and line.startswith("$ "):
                first = False
                continue
            first = False
            yield line
    finally:
        stop.set()
        thread.join(timeout=2)


@contextmanager
def _signals_ignored() -> Iterator[None]:
    """Ignore SIGINT/SIGTERM for a bounded critical section (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextmanager
def _sigterm_as_exit() -> Iterator[None]:
    """Turn SIGTERM into SystemExit while we run, so that `finally` tears down."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# --------------------------------------------------------------------------- one call


def run_local_federation(
    app_dir: Path,
    *,
    nodes: int,
    run_config: dict[str, ConfigValue],
    node_configs: list[dict[str, ConfigValue]],
    work_dir: Path,
    insecure: bool = False,
    stream: bool = True,
    timeout_s: float | None = None,
    on_line: Callable[[str], None] | None = None,
    nodes_online_timeout_s: float = 120.0,
) -> int:
    """Run ``app_dir`` on a local SuperLink and ``nodes`` SuperNodes; return the exit code.

    ``node_configs[i]`` is SuperNode i's ``--node-config`` (e.g. partition-id,
    num-partitions, ledger-dir); an empty list means no node config. TLS and SuperNode
    authentication are on unless ``insecure`` (then a loud warning). ``timeout_s``
    bounds the whole call (start-up included) and raises :class:`FederationTimeout`.
    Every process is stopped before this returns or raises (also on Ctrl-C/SIGTERM).
    Output lines of ``flwr run`` go to ``on_line`` (default: print).
    """
    if nodes < 1:
        raise ValueError("nodes must be at least 1")
    if node_configs and len(node_configs) != nodes:
        raise ValueError(f"node_configs has {len(node_configs)} entries for {nodes} nodes")
    # Validate both configs before starting anything.
    format_config_args(run_config)
    for config in node_configs:
        format_config_args(config)
    emit = on_line or _print_line
    start = time.monotonic()

    def remaining(default: float) -> float:
        if timeout_s is None:
            return default
        left = timeout_s - (time.monotonic() - start)
        if left <= 0:
            raise FederationTimeout(f"local federation exceeded {timeout_s:.0f} s")
        return min(default, left)

    if insecure:
        message = (
            "INSECURE local federation: no TLS, no SuperNode authentication. Any process "
            "on this machine can join it. Use only for debugging."
        )
        warnings.warn(message, stacklevel=2)
        _log.warning(message)
        emit(f"[fedlora] WARNING: {message}")

    names = default_names(nodes)
    with _sigterm_as_exit(), LocalFederation(work_dir, insecure=insecure) as federation:
        endpoint = federation.start_superlink(ready_timeout_s=remaining(60.0))
        emit(
            f"[fedlora] SuperLink up: Fleet API {endpoint.fleet_address}, Control API "
            f"{endpoint.control_address} ({'insecure' if insecure else 'TLS + node auth'})"
        )
        if endpoint.supernode_auth:
            pairs = {name: federation.ensure_node_key(name).public_key for name in names}
            ids = federation.register_supernodes(pairs, timeout_s=remaining(60.0))
            emit(f"[fedlora] registered {len(ids)} SuperNode public keys")
        for i, name in enumerate(names):
            federation.start_supernode(name, node_config=node_configs[i] if node_configs else None)
        federation.wait_for_nodes(timeout_s=remaining(nodes_online_timeout_s))
        emit(f"[fedlora] {nodes} SuperNodes online; logs in {federation.paths.logs}")
        run_timeout = None if timeout_s is None else remaining(timeout_s)
        code = federation.run_app(
            app_dir, run_config=run_config, stream=stream, timeout_s=run_timeout, on_line=emit
        )
        emit(f"[fedlora] flwr run exited with {code}; stopping all processes")
        return code
