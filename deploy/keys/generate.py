"""Generate SuperNode authentication key pairs.

Usage::

    python -m fedlora.deploy.keys.generate --out DIR --nodes 3      # supernode-0 .. -2
    python -m fedlora.deploy.keys.generate --out DIR --name edge-a --name edge-b

For each node NAME this writes, in ``DIR``:

- ``NAME.key``  EC P-384 private key in OpenSSH format, mode 0600. Only that SuperNode
                needs it: ``flower-supernode --auth-supernode-private-key NAME.key``;
- ``NAME.pub``  the public key as one OpenSSH line (``ecdsa-sha2-nistp384 ...``). The
                SuperLink operator registers it (``flwr supernode register NAME.pub
                CONNECTION``, see ``fedlora.deploy.keys.register``).

Why this format: in flwr 1.39 ``flower-supernode`` loads the private key with
``load_ssh_private_key`` and ``flwr supernode register`` loads the public key with
``load_ssh_public_key`` and accepts NIST EC curves only. The result is the same as
``ssh-keygen -t ecdsa -b 384 -N '' -f NAME``. Existing key pairs are never overwritten
(a node's identity must not change by accident) unless ``--force`` is given.

``--superexec-secret`` also writes ``superexec-secret.key`` (0600): the shared secret of a
SuperLink running ``--isolation process`` and its separate ``flower-superexec`` (see
deploy/docker/compose.yaml).
"""

from __future__ import annotations

import argparse
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedlora.task.files import atomic_write

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class NodeKeyPair:
    """Paths of one SuperNode's key pair."""

    name: str
    private_key: Path
    public_key: Path


def key_paths(out: Path, name: str) -> NodeKeyPair:
    """Return where the key pair of node ``name`` lives in ``out``."""
    if not _NAME_RE.match(name):
        raise ValueError(f"invalid node key name {name!r}: use letters, digits, '.', '_', '-'")
    out = Path(out)
    return NodeKeyPair(name, out / f"{name}.key", out / f"{name}.pub")


def default_names(nodes: int) -> list[str]:
    """Names used for ``nodes`` anonymous SuperNodes: supernode-0, supernode-1, ..."""
    return [f"supernode-{i}" for i in range(nodes)]


def generate_node_key(out: Path, name: str, *, force: bool = False) -> NodeKeyPair:
    """Create one key pair; refuse to replace an existing one unless ``force``."""
    pair = key_paths(out, name)
    if not force and (pair.private_key.exists() or pair.public_key.exists()):
        raise FileExistsError(f"key pair {name!r} already exists in {out} (use force)")
    key = ec.generate_private_key(ec.SECP384R1())
    private_bytes = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public_bytes = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    # The comment names the node so that an operator can tell the lines apart.
    atomic_write(pair.private_key, private_bytes, mode=0o600)
    atomic_write(pair.public_key, public_bytes + f" {name}\n".encode())
    return pair


def generate_node_keys(out: Path, names: list[str], *, force: bool = False) -> list[NodeKeyPair]:
    """Create one key pair per name (see :func:`generate_node_key`)."""
    if len(set(names)) != len(names):
        raise ValueError("node key names must be unique")
    # Validate every name before writing anything.
    for name in names:
        key_paths(out, name)
    return [generate_node_key(out, name, force=force) for name in names]


SUPEREXEC_SECRET = "superexec-secret.key"


def generate_superexec_secret(out: Path, *, force: bool = False) -> Path:
    """Write a random SuperLink/SuperExec shared secret (``superexec-secret.key``, 0600).

    Used with ``--isolation process``: ``flower-superlink --superexec-auth-secret-file``
    and ``flower-superexec --superexec-auth-secret-file`` must read the same bytes, so
    that only our SuperExec can pick up ServerApp runs from the runtime API (flwr 1.39
    marks this experimental). The ``.key`` suffix keeps it out of git (.gitignore).
    """
    path = Path(out) / SUPEREXEC_SECRET
    if path.exists() and not force:
        raise FileExistsError(f"{path} already exists (use force)")
    atomic_write(path, secrets.token_hex(32).encode(), mode=0o600)
    return path


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(
        prog="python -m fedlora.deploy.keys.generate",
        description="Generate SuperNode authentication key pairs (EC P-384, OpenSSH format).",
    )
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--nodes", type=int, help="number of key pairs: supernode-0 .. N-1")
    group.add_argument("--name", action="append", help="name of one node's key pair (repeat)")
    parser.add_argument(
        "--superexec-secret",
        action="store_true",
        help=f"also write {SUPEREXEC_SECRET} (SuperLink/SuperExec shared secret)",
    )
    parser.add_argument("--force", action="store_true", help="overwrite existing files")
    args = parser.parse_args(argv)
    if args.nodes is None and not args.name and not args.superexec_secret:
        parser.error("give --nodes N, --name NAME or --superexec-secret")
    if args.nodes is not None and args.nodes < 1:
        parser.error("--nodes must be at least 1")
    names = default_names(args.nodes) if args.nodes is not None else (args.name or [])
    try:
        pairs = generate_node_keys(args.out, names, force=args.force)
        secret = (
            generate_superexec_secret(args.out, force=args.force) if args.superexec_secret else None
        )
    except (ValueError, FileExistsError) as err:
        parser.error(str(err))
    for pair in pairs:
        print(f"{pair.name}: private {pair.private_key} (0600), public {pair.public_key}")
    if secret is not None:
        print(f"SuperExec shared secret: {secret} (0600)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
