"""Flower's command-line tools: find them, build their command lines, parse their output.

Covers ``flower-superlink``, ``flower-supernode`` and ``flwr`` as of flwr 1.39 (flags
checked against the installed ``--help``):

- ``flower-superlink --ssl-ca-certfile --ssl-certfile --ssl-keyfile
  --enable-supernode-auth --fleet-api-address H:P1 --host H --port P2 --database DB
  --disable-runtime-dependency-installation``. In 1.39 the Control API and the
  ServerApp runtime API share one HTTPS server (``--host`` / ``--port``);
  ``--control-api-address`` is deprecated;
- ``flwr supernode register KEY.pub CONNECTION`` (SuperNode authentication in 1.39 =
  ``--enable-supernode-auth`` plus registration through the Control API; the old
  ``--auth-list-public-keys`` CSV is refused);
- ``flower-supernode --root-certificates ca.crt --superlink H:P1
  --auth-supernode-private-key KEY --node-config '...' --host H --port P3``
  (``--port``: that node's own ClientApp runtime API);
- ``flwr run APP CONNECTION --stream --run-config '...'``, where CONNECTION is named in
  ``$FLWR_HOME/config.toml`` (:func:`write_connection_config`).
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import shutil
import sys
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from fedlora.deploy.errors import FederationError
from fedlora.task.files import atomic_write

if TYPE_CHECKING:  # only for annotations: keeps `cryptography` out of the CLI helpers
    from fedlora.deploy.certs.generate import CertPaths

__all__ = [
    "ConfigValue",
    "flower_env",
    "flower_executable",
    "format_config_args",
    "parse_node_id",
    "parse_run_status",
    "register_command",
    "run_command",
    "run_id_in_line",
    "stage_fab",
    "supernode_command",
    "supernode_id_in_log",
    "superlink_command",
    "write_connection_config",
]

ConfigValue = str | int | float | bool

_KEY_RE = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")
_RUN_ID_RE = re.compile(r"Successfully started run (\d+)")
_NODE_ID_RE = re.compile(r"SuperNode ID: (\d+)")


# --------------------------------------------------------------------------- executables


def flower_executable(name: str) -> str:
    """Find a Flower command: next to this interpreter first (the venv), then on PATH."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise FederationError(f"{name!r} not found next to {sys.executable} nor on PATH")
    return found


def flower_env(flwr_home: Path) -> dict[str, str]:
    """This process's environment, set up for a Flower process with ``FLWR_HOME=flwr_home``."""
    env = dict(os.environ)
    bin_dir = str(Path(flower_executable("flower-superlink")).parent)
    # The SuperLink/SuperNode start `flower-superexec` and the app processes by
    # name: they must find the same installation.
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    env["FLWR_HOME"] = str(flwr_home)
    env["PYTHONUNBUFFERED"] = "1"
    # No phoning home from tests and local runs.
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    return env


# --------------------------------------------------------------------------- command lines


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


def superlink_command(
    *,
    fleet_address: str,
    host: str,
    port: int,
    database: Path,
    certs: CertPaths | None,
    supernode_auth: bool,
) -> list[str]:
    """``flower-superlink`` with TLS from ``certs`` (``None``: ``--insecure``)."""
    args = [flower_executable("flower-superlink")]
    if certs is None:
        args.append("--insecure")
    else:
        args += [
            "--ssl-ca-certfile", str(certs.ca_cert),
            "--ssl-certfile", str(certs.server_cert),
            "--ssl-keyfile", str(certs.server_key),
        ]  # fmt: skip
    if supernode_auth:
        args.append("--enable-supernode-auth")
    args += [
        "--fleet-api-type", "grpc-rere",
        "--fleet-api-address", fleet_address,
        "--host", host,
        "--port", str(port),
        "--database", str(database),
        # Apps run in this environment; never let the SuperLink `uv sync` (it would
        # try to download the app's dependencies).
        "--disable-runtime-dependency-installation",
    ]  # fmt: skip
    return args


def supernode_command(
    *,
    superlink: str,
    insecure: bool,
    root_certificates: Path | None,
    private_key: Path | None,
    node_config: Mapping[str, ConfigValue] | None,
    max_retries: int | None,
    max_wait_time_s: float | None,
    host: str,
    port: int,
) -> list[str]:
    """``flower-supernode`` dialling ``superlink``; ``port`` is its ClientApp runtime API.

    Without ``insecure`` and ``root_certificates`` the node trusts only the system CAs.
    """
    args = [flower_executable("flower-supernode")]
    if insecure:
        args.append("--insecure")
    elif root_certificates is not None:
        args += ["--root-certificates", str(root_certificates)]
    args += ["--superlink", superlink]
    if private_key is not None:
        args += ["--auth-supernode-private-key", str(private_key)]
    if node_config:
        args += ["--node-config", format_config_args(node_config)]
    if max_retries is not None:
        args += ["--max-retries", str(max_retries)]
    if max_wait_time_s is not None:
        args += ["--max-wait-time", str(max_wait_time_s)]
    args += ["--host", host, "--port", str(port)]
    return args


def register_command(public_key: Path, connection: str, *, name: str | None = None) -> list[str]:
    """``flwr supernode register KEY CONNECTION --format json [--name NAME]``."""
    args = [flower_executable("flwr"), "supernode", "register", str(public_key), connection]
    args += ["--format", "json"]
    if name:
        args += ["--name", name]
    return args


def run_command(
    app_dir: Path,
    connection: str,
    *,
    stream: bool,
    run_config: Mapping[str, ConfigValue] | None,
) -> list[str]:
    """``flwr run APP CONNECTION [--stream] [--run-config '...']``."""
    args = [flower_executable("flwr"), "run", str(app_dir), connection]
    if stream:
        args.append("--stream")
    if run_config:
        args += ["--run-config", format_config_args(run_config)]
    return args


# --------------------------------------------------------------------------- output


def _json_object(output: str) -> object:
    # `flwr ... --format json` may print log lines around its JSON object.
    return json.loads(output[output.index("{") : output.rindex("}") + 1])


def parse_node_id(output: str) -> int | None:
    """The node id in the output of ``flwr supernode register --format json``; None on failure."""
    try:
        data = _json_object(output)
        if isinstance(data, dict) and data.get("success"):
            return int(data["node-id"])
    except (ValueError, KeyError, TypeError):
        pass
    return None


def parse_run_status(output: str) -> str:
    """The run's status (e.g. ``finished:completed``) in ``flwr ls --run-id N --format json``."""
    try:
        data = _json_object(output)
        runs = data.get("runs", []) if isinstance(data, dict) else []
        return str(runs[0].get("status", "unknown")) if runs else "unknown"
    except (ValueError, AttributeError, IndexError, KeyError):
        return "unknown"


def supernode_id_in_log(log_text: str) -> int | None:
    """The node id a SuperNode logs once the SuperLink accepted it, else None."""
    match = _NODE_ID_RE.search(log_text)
    return int(match.group(1)) if match else None


def run_id_in_line(line: str) -> int | None:
    """The run id if ``line`` is ``flwr run``'s "Successfully started run N"."""
    match = _RUN_ID_RE.search(line)
    return int(match.group(1)) if match else None


# --------------------------------------------------------------------------- files


def write_connection_config(
    flwr_home: Path, name: str, address: str, root_certificates: Path | None
) -> Path:
    """Write a minimal ``config.toml`` naming one SuperLink connection; return its path.

    ``root_certificates=None`` means an insecure (plain HTTP) connection.
    """
    lines = ["[superlink]", f"default = {json.dumps(name)}", "", f"[superlink.{name}]"]
    lines.append(f"address = {json.dumps(address)}")
    if root_certificates is None:
        lines.append("insecure = true")
    else:
        # flwr 1.39 insists on an absolute path here.
        lines.append(f"root-certificates = {json.dumps(str(Path(root_certificates).resolve()))}")
    path = flwr_home / "config.toml"
    atomic_write(path, ("\n".join(lines) + "\n").encode())
    return path


def stage_fab(app_dir: Path, staged: Path) -> Path:
    """Replace ``staged`` with the files ``flwr run app_dir`` would ship (its FAB).

    Why: in flwr 1.39 ``flwr run DIR`` migrates a ``[tool.flwr.federations]`` table it
    finds in ``DIR/pyproject.toml`` into ``$FLWR_HOME/config.toml`` and then comments
    that table out, i.e. it rewrites the user's pyproject.toml. The staged copy is built
    by Flower's own FAB builder (same include/exclude rules, federations table already
    removed), so running it ships exactly the same app.
    """
    from flwr.cli.build import build_fab_from_disk  # heavy import: only when used

    app_dir, staged = Path(app_dir).resolve(), Path(staged).resolve()
    if not (app_dir / "pyproject.toml").is_file():
        raise FederationError(f"{app_dir} has no pyproject.toml (not a Flower App)")
    with warnings.catch_warnings():
        # Flower's builder triggers pathspec deprecation warnings: not ours to fix.
        warnings.simplefilter("ignore", DeprecationWarning)
        fab = build_fab_from_disk(app_dir)
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
