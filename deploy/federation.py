"""The processes of a local Flower federation: a SuperLink and SuperNodes, with credentials.

:class:`FederationProcesses` starts ``flower-superlink`` (TLS and SuperNode
authentication unless ``insecure``) and ``flower-supernode`` processes on loopback,
makes the CA, certificates and node keys they need, waits for the nodes to connect and
stops everything. :class:`fedlora.deploy.local.LocalFederation` adds the ``flwr`` CLI
calls (key registration, app runs) on top.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self

from fedlora.deploy.certs.generate import CertPaths, generate_certificates
from fedlora.deploy.errors import FederationError, FederationTimeout
from fedlora.deploy.flower_cli import (
    ConfigValue,
    flower_env,
    superlink_command,
    supernode_command,
    supernode_id_in_log,
    write_connection_config,
)
from fedlora.deploy.keys.generate import NodeKeyPair, generate_node_key, key_paths
from fedlora.deploy.processes import (
    LOOPBACK,
    ManagedProcess,
    Supervisor,
    free_port,
    is_bind_error,
    port_open,
    signals_ignored,
)

__all__ = ["DEFAULT_CONNECTION", "FederationProcesses", "SuperLinkEndpoint"]

DEFAULT_CONNECTION = "fedlora-local"


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


def _stop_order(proc: ManagedProcess) -> int:
    # The CLI client first, then SuperNodes, the SuperLink last, so that no node spends
    # the grace period reconnecting to a SuperLink that is gone.
    return 0 if proc.name == "flwr-run" else 2 if proc.name.startswith("superlink") else 1


class FederationProcesses:
    """Start and stop the SuperLink and SuperNodes of a local federation; a context manager.

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
        self.paths = _Layout(self.work_dir)
        self.superlink: SuperLinkEndpoint | None = None
        self.superlink_process: ManagedProcess | None = None
        self.supernodes: dict[str, ManagedProcess] = {}
        self.node_ids: dict[str, int] = {}
        self._certs: CertPaths | None = None
        for directory in (self.paths.logs, self.paths.state, self.paths.flwr):
            directory.mkdir(parents=True, exist_ok=True)
        # Every child goes through it (also the `flwr` calls' marker), so that
        # stop_all finds them all, including what Flower starts in new sessions.
        self.supervisor = Supervisor(self.paths.logs, self.work_dir, grace_s=grace_s)

    @property
    def cli_home(self) -> Path:
        """``FLWR_HOME`` of the ``flwr`` CLI calls (holds ``config.toml``)."""
        return self.paths.flwr / "cli"

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # A second Ctrl-C while we tear down must not leave half the processes alive.
        with signals_ignored():
            self.stop_all()

    def stop_all(self) -> None:
        """Stop every process we started and everything they started. Idempotent."""
        self.supervisor.stop_all(_stop_order)

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

    # ------------------------------------------------------------ processes

    def _env(self, flwr_home: Path) -> dict[str, str]:
        return self.supervisor.marked(flower_env(flwr_home))

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
        flwr_home.mkdir(parents=True, exist_ok=True)
        return self.supervisor.start(name, args, self._env(flwr_home))

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
        last_error = ""
        for attempt in range(attempts):
            fleet_port, control_port = free_port(), free_port()
            while control_port == fleet_port:
                control_port = free_port()
            args = superlink_command(
                fleet_address=f"{LOOPBACK}:{fleet_port}",
                host=LOOPBACK,
                port=control_port,
                database=self.paths.state / "superlink.db",
                certs=None if self.insecure else self.ensure_certificates(),
                supernode_auth=auth,
            )
            name = "superlink" if attempt == 0 else f"superlink-{attempt}"
            proc = self._spawn(name, args, self.paths.flwr / "superlink")
            deadline = time.monotonic() + ready_timeout_s
            while time.monotonic() < deadline and proc.is_running():
                if port_open(LOOPBACK, fleet_port) and port_open(LOOPBACK, control_port):
                    break
                time.sleep(0.2)
            if (
                proc.is_running()
                and port_open(LOOPBACK, control_port)
                and port_open(LOOPBACK, fleet_port)
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
            self.supervisor.stop([proc])
            last_error = proc.log_tail()
            if not is_bind_error(last_error):
                break  # not a port race: retrying will not help
        raise FederationError(f"the SuperLink did not start; log tail:\n{last_error}")

    def write_cli_config(self) -> Path:
        """Write ``flwr/cli/config.toml`` naming the running SuperLink's Control API."""
        endpoint = self._require_superlink()
        return write_connection_config(
            self.cli_home, self.connection_name, endpoint.control_address, endpoint.ca_cert
        )

    def _require_superlink(self) -> SuperLinkEndpoint:
        if self.superlink is None:
            raise FederationError("start the SuperLink first")
        return self.superlink

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
        if with_ca and not endpoint.insecure:
            assert endpoint.ca_cert is not None  # a TLS endpoint always names its CA
        key = None
        if use_key:
            key = private_key or self.ensure_node_key(name).private_key
        args = supernode_command(
            superlink=endpoint.fleet_address,
            insecure=endpoint.insecure,
            root_certificates=endpoint.ca_cert if with_ca else None,
            private_key=key,
            node_config=node_config,
            max_retries=max_retries,
            max_wait_time_s=max_wait_time_s,
            host=LOOPBACK,
            port=free_port(),
        )
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
                node_id = supernode_id_in_log(proc.log_text())
                if node_id is not None:
                    connected[name] = node_id
                    continue
                if proc.is_running():
                    continue
                tail = proc.log_tail()
                if is_bind_error(tail) and restarts < 3:
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
