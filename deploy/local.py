"""Run Flower Apps on a real local federation: SuperLink, N SuperNodes, `flwr run`.

Everything is app-agnostic: any Flower App directory (a ``pyproject.toml`` with
``[tool.flwr.app]``) can be run. One call does it all (``fedlora deploy local`` uses
it)::

    from fedlora.deploy.local import run_local_federation
    rc = run_local_federation(Path("."), nodes=3, run_config={"num-server-rounds": 2},
                              node_configs=[{"partition-id": i} for i in range(3)],
                              work_dir=Path("runs/local"))

It makes a private CA, a SuperLink certificate and one key pair per SuperNode (unless
``insecure``), starts ``flower-superlink`` with TLS and SuperNode authentication,
registers every node's public key (``flwr supernode register``), starts the
``flower-supernode`` processes, waits until all are connected and runs ``flwr run APP
CONNECTION --stream`` with ``FLWR_HOME`` under the work dir: ``~/.flwr`` is never
touched. Every process is stopped on success, failure, Ctrl-C and SIGTERM.

The pieces (:class:`LocalFederation`: ``start_superlink``, ``register_supernodes``,
``start_supernode``, ``wait_for_nodes``, ``run_app``, ``stop_all``; usable as a context
manager) let tests start e.g. an unregistered SuperNode or one without the CA. Process
handling is in :mod:`~fedlora.deploy.processes`, command lines in
:mod:`~fedlora.deploy.flower_cli`, the SuperLink/SuperNode start-up in
:mod:`~fedlora.deploy.federation`.
"""

from __future__ import annotations

import logging
import subprocess
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from fedlora.deploy.errors import FederationError, FederationTimeout
from fedlora.deploy.federation import FederationProcesses
from fedlora.deploy.flower_cli import (
    ConfigValue,
    flower_executable,
    format_config_args,
    parse_node_id,
    parse_run_status,
    register_command,
    run_command,
    run_id_in_line,
    stage_fab,
)
from fedlora.deploy.keys.generate import default_names
from fedlora.deploy.processes import follow_log, sigterm_as_exit, strip_ansi

# The errors are re-exported: they are what callers of this module catch.
__all__ = ["FederationError", "FederationTimeout", "LocalFederation", "run_local_federation"]

_log = logging.getLogger(__name__)


class LocalFederation(FederationProcesses):
    """A local federation plus the ``flwr`` CLI calls against it; a context manager.

    Adds key registration and app runs to :class:`FederationProcesses` (which
    describes the layout of ``work_dir``).
    """

    # ------------------------------------------------------------ flwr CLI

    def flwr_cli(
        self, args: Sequence[str], *, timeout_s: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        """Run one ``flwr`` CLI command against our connection (output captured)."""
        self._require_superlink()
        return subprocess.run(
            [flower_executable("flwr"), *args],
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
        running: dict[str, subprocess.Popen[str]] = {}
        try:
            for name, key in public_keys.items():
                running[name] = subprocess.Popen(
                    register_command(key, self.connection_name, name=name),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                    cwd=self.work_dir,
                    env=self._env(self.cli_home),
                )
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
                node_id = parse_node_id(out)
                if popen.returncode != 0 or node_id is None:
                    failures.append(f"{name}: rc={popen.returncode}\n{strip_ansi(out)}")
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

    # ------------------------------------------------------------ flwr run

    def stage_app(self, app_dir: Path) -> Path:
        """Copy the files ``flwr run`` would ship into ``app/``; return that directory.

        ``flwr run`` then submits the copy, so it cannot rewrite the user's
        pyproject.toml (see :func:`~fedlora.deploy.flower_cli.stage_fab`).
        """
        return stage_fab(app_dir, self.paths.app)

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
        args = run_command(staged, self.connection_name, stream=stream, run_config=run_config)
        proc = self._spawn("flwr-run", args, self.cli_home)
        run_id: int | None = None
        try:
            for line in follow_log(proc, deadline):
                emit(line)
                if run_id is None:
                    run_id = run_id_in_line(line)
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
        return parse_run_status(result.stdout)

    def _wait_run_finished(self, run_id: int, deadline: float | None) -> str:
        while True:
            status = self._run_status(run_id)
            if status.startswith("finished"):
                return status
            if deadline is not None and time.monotonic() > deadline:
                self.flwr_cli(["stop", str(run_id), self.connection_name], timeout_s=30)
                raise FederationTimeout(f"run {run_id} still {status} at its time limit")
            time.sleep(1.0)


def _print_line(line: str) -> None:
    print(line, flush=True)


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
    with sigterm_as_exit(), LocalFederation(work_dir, insecure=insecure) as federation:
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
