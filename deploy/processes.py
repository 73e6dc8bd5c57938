"""Process supervision: start children in their own process groups, log, follow, stop them.

A :class:`Supervisor` starts every child in a new session (its own process group) with
its output appended to ``LOG_DIR/NAME.log`` and a marker in its environment. Stopping
is SIGTERM, then SIGKILL after a grace period, to the whole process group plus every
descendant, and finally to anything else carrying the marker: Flower detaches some of
its processes into new sessions, where a ``killpg`` does not reach them.
"""

from __future__ import annotations

import logging
import os
import queue
import re
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import psutil

from fedlora.deploy.errors import FederationError, FederationTimeout

__all__ = [
    "LOOPBACK",
    "MARKER_ENV",
    "ManagedProcess",
    "Supervisor",
    "follow_log",
    "free_port",
    "is_bind_error",
    "port_open",
    "signals_ignored",
    "sigterm_as_exit",
    "strip_ansi",
]

LOOPBACK = "127.0.0.1"
# Set in the environment of every process we start, so that teardown can find all of
# them, including those that Flower starts in new sessions (SuperExec, ServerApp,
# ClientApp processes) or that were re-parented after their parent died.
MARKER_ENV = "FEDLORA_LOCAL_FEDERATION_ID"

_log = logging.getLogger(__name__)
_ANSI_RE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_BIND_ERROR_RE = re.compile(r"address already in use|failed to bind|errno 98", re.IGNORECASE)


def free_port(host: str = LOOPBACK) -> int:
    """Return a TCP port on ``host`` that is free right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_open(host: str, port: int) -> bool:
    """True if something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def strip_ansi(text: str) -> str:
    """``text`` without terminal colour codes."""
    return _ANSI_RE.sub("", text)


def is_bind_error(log_text: str) -> bool:
    """True if a log says its process lost a race for its port (a retry may help)."""
    return _BIND_ERROR_RE.search(log_text) is not None


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
        return strip_ansi(data.decode("utf-8", errors="replace"))

    def log_tail(self, lines: int = 30) -> str:
        """The last ``lines`` lines of the log."""
        return "\n".join(self.log_text().splitlines()[-lines:])


class Supervisor:
    """The children of one owner: each with a log in ``log_dir``, all stopped together."""

    def __init__(self, log_dir: Path, cwd: Path, *, grace_s: float = 10.0) -> None:
        self.log_dir = log_dir
        self.cwd = cwd
        self.grace_s = grace_s
        self.processes: list[ManagedProcess] = []
        self.marker = uuid.uuid4().hex

    def marked(self, env: Mapping[str, str]) -> dict[str, str]:
        """``env`` plus our marker: give it to anything we start, also outside :meth:`start`."""
        return {**env, MARKER_ENV: self.marker}

    def start(self, name: str, args: Sequence[str], env: Mapping[str, str]) -> ManagedProcess:
        """Start ``args`` as ``name`` (log ``LOG_DIR/NAME.log``, appended to)."""
        if name in {p.name for p in self.processes if p.is_running()}:
            raise FederationError(f"a process named {name!r} is already running")
        args = list(args)
        log_path = self.log_dir / f"{name}.log"
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
                cwd=self.cwd,
                env=self.marked(env),
                start_new_session=True,
            )
        proc = ManagedProcess(name, args, popen, log_path, offset)
        self.processes.append(proc)
        _log.info("started %s (pid %d), log %s", name, proc.pid, log_path)
        return proc

    def stop_all(self, order: Callable[[ManagedProcess], int] | None = None) -> None:
        """Stop every child (sorted by ``order``) and all they started. Idempotent."""
        self.stop(sorted(self.processes, key=order) if order else self.processes)
        # Last sweep: anything still carrying our marker (e.g. an app process that a
        # SuperExec started between the snapshot and its own termination).
        leftovers = _marked_processes(self.marker)
        for proc in leftovers:
            _kill_quietly(proc)
        psutil.wait_procs(leftovers, timeout=5)

    def stop(self, procs: Sequence[ManagedProcess]) -> None:
        """SIGTERM ``procs``' groups and descendants; SIGKILL what outlives the grace."""
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


def follow_log(proc: ManagedProcess, deadline: float | None) -> Iterator[str]:
    """Yield new lines of ``proc``'s log until it exits; raise at ``deadline``.

    Reading the log file (rather than a pipe) keeps the child independent of us: it
    can never block on a full pipe, and the log is complete even if we are killed.
    """
    lines: queue.Queue[str | None] = queue.Queue()
    stop = threading.Event()

    def decode(raw: bytes) -> str:
        return strip_ansi(raw.decode("utf-8", errors="replace").rstrip("\r\n"))

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
            # Skip the "$ command" header that Supervisor.start wrote.
            if first and line.startswith("$ "):
                first = False
                continue
            first = False
            yield line
    finally:
        stop.set()
        thread.join(timeout=2)


@contextmanager
def signals_ignored() -> Iterator[None]:
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
def sigterm_as_exit() -> Iterator[None]:
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
