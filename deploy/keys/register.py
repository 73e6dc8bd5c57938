"""Register SuperNode public keys with a SuperLink (SuperNode authentication, flwr 1.39).

Usage, with a connection named in ``$FLWR_HOME/config.toml`` (``~/.flwr`` by default)::

    python -m fedlora.deploy.keys.register --connection my-superlink keys/*.pub

or without touching any Flower config (a throw-away ``FLWR_HOME`` is used)::

    python -m fedlora.deploy.keys.register --address superlink.example.org:8000 \\
        --root-certificates certs/ca.crt keys/supernode-0.pub keys/supernode-1.pub

In flwr 1.39 SuperNode authentication works like this: the SuperLink runs with
``--enable-supernode-auth`` (which requires TLS), the operator registers each node's
public key through the Control API (``flwr supernode register KEY.pub CONNECTION``; this
module calls exactly that), and each SuperNode starts with
``--auth-supernode-private-key KEY``. A SuperNode whose key is not registered is refused
("Failed to activate SuperNode", exit code 305). The old ``--auth-list-public-keys`` CSV
is rejected by 1.39.

Registering a key that is already registered is reported and counted as success, so the
step can run on every (re)start, e.g. as a one-shot compose service.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from fedlora.deploy.flower_cli import parse_node_id, register_command, write_connection_config

_ALREADY = "Public key already in use"


@dataclass(frozen=True)
class Registration:
    """Outcome for one public key."""

    public_key: Path
    node_id: int | None
    already_registered: bool
    output: str

    @property
    def ok(self) -> bool:
        """True if the key is registered now (new or from before)."""
        return self.node_id is not None or self.already_registered


def register_public_key(
    public_key: Path,
    connection: str,
    *,
    flwr_home: Path | None = None,
    node_name: str | None = None,
    timeout_s: float = 60.0,
) -> Registration:
    """Run ``flwr supernode register KEY CONNECTION --format json`` for one key."""
    env = dict(os.environ)
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    args = register_command(public_key, connection, name=node_name)
    # cwd: a neutral directory, because flwr migrates (rewrites) a pyproject.toml with
    # [tool.flwr.federations] that it finds in the working directory.
    with tempfile.TemporaryDirectory() as cwd:
        result = subprocess.run(
            args,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            cwd=cwd,
            env=env,
            timeout=timeout_s,
            check=False,
        )
    output = (result.stdout + result.stderr).strip()
    node_id = parse_node_id(result.stdout)
    return Registration(Path(public_key), node_id, _ALREADY in output, output)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; exit code 1 if any key could not be registered."""
    parser = argparse.ArgumentParser(
        prog="python -m fedlora.deploy.keys.register",
        description="Register SuperNode public keys with a SuperLink (flwr supernode register).",
    )
    parser.add_argument("public_keys", nargs="+", type=Path, help="OpenSSH EC public key files")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--connection", help="connection name in $FLWR_HOME/config.toml")
    where.add_argument("--address", help="SuperLink Control API HOST:PORT (e.g. superlink:8000)")
    parser.add_argument("--root-certificates", type=Path, help="CA certificate (with --address)")
    parser.add_argument(
        "--insecure", action="store_true", help="plain HTTP Control API (with --address)"
    )
    args = parser.parse_args(argv)
    if args.address and (args.root_certificates is None) == (not args.insecure):
        parser.error("--address needs exactly one of --root-certificates or --insecure")
    for key in args.public_keys:
        if not key.is_file():
            parser.error(f"no such public key file: {key}")

    with tempfile.TemporaryDirectory(prefix="fedlora-flwr-home-") as tmp:
        flwr_home: Path | None = None
        connection = args.connection
        if args.address:
            flwr_home = Path(tmp)
            connection = "fedlora"
            write_connection_config(flwr_home, connection, args.address, args.root_certificates)
        failed = 0
        for key in args.public_keys:
            # The key file's stem (supernode-0) doubles as the node's display name.
            reg = register_public_key(key, connection, flwr_home=flwr_home, node_name=key.stem)
            if reg.node_id is not None:
                print(f"{key}: registered as node {reg.node_id}")
            elif reg.already_registered:
                print(f"{key}: already registered")
            else:
                failed += 1
                print(f"{key}: FAILED\n{reg.output}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
