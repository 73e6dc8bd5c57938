"""TLS certificates, SuperNode keys, registration CLI and config formatting (fast, no Flower
processes)."""

from __future__ import annotations

import ipaddress
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from flwr.common.config import parse_config_args
from flwr.supercore.primitives.asymmetric import uses_nist_ec_curve

from fedlora.deploy.certs.generate import cert_paths, generate_certificates
from fedlora.deploy.flower_cli import format_config_args, write_connection_config
from fedlora.deploy.keys.generate import (
    SUPEREXEC_SECRET,
    generate_node_key,
    generate_node_keys,
    generate_superexec_secret,
)
from fedlora.deploy.keys.register import main as register_main


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _sans(cert: x509.Certificate) -> tuple[set[str], set[str]]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    dns = set(san.get_values_for_type(x509.DNSName))
    ips = {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
    return dns, ips


def test_certificates_chain_sans_and_modes(tmp_path: Path) -> None:
    paths = generate_certificates(
        tmp_path, hosts=["superlink", "link.example.org"], ips=["10.0.0.7"]
    )
    assert paths == cert_paths(tmp_path)
    ca = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(paths.server_cert.read_bytes())
    # Signed by the CA (raises if not), and the CA is a CA.
    server.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    dns, ips = _sans(server)
    assert {"localhost", "superlink", "link.example.org"} <= dns
    assert {"127.0.0.1", "10.0.0.7"} <= ips
    # The key matches the certificate; private keys are 0600, certificates readable.
    key = serialization.load_pem_private_key(paths.server_key.read_bytes(), password=None)
    assert key.public_key().public_numbers() == server.public_key().public_numbers()
    assert _mode(paths.server_key) == 0o600
    assert _mode(paths.ca_key) == 0o600
    assert _mode(paths.ca_cert) == 0o644
    # Atomic writes leave no temporary files behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ca.crt",
        "ca.key",
        "server.key",
        "server.pem",
    ]


def test_certificates_reuse_ca_unless_new_ca(tmp_path: Path) -> None:
    first = generate_certificates(tmp_path)
    ca_bytes = first.ca_cert.read_bytes()
    server_bytes = first.server_cert.read_bytes()
    again = generate_certificates(tmp_path, hosts=["extra"])
    assert again.ca_cert.read_bytes() == ca_bytes  # nodes holding ca.crt stay valid
    assert again.server_cert.read_bytes() != server_bytes
    ca = x509.load_pem_x509_certificate(ca_bytes)
    x509.load_pem_x509_certificate(again.server_cert.read_bytes()).verify_directly_issued_by(ca)
    generate_certificates(tmp_path, new_ca=True)
    assert first.ca_cert.read_bytes() != ca_bytes


def test_certificates_reject_bad_ip(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        generate_certificates(tmp_path, ips=["not-an-ip"])
    assert not any(tmp_path.iterdir())  # nothing written


def test_certs_cli(tmp_path: Path) -> None:
    out = tmp_path / "certs"
    result = subprocess.run(
        [sys.executable, "-m", "fedlora.deploy.certs.generate", "--out", str(out),
         "--host", "superlink", "--ip", "192.0.2.10"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert "server.pem" in result.stdout
    server = x509.load_pem_x509_certificate((out / "server.pem").read_bytes())
    dns, ips = _sans(server)
    assert "superlink" in dns
    assert ipaddress.ip_address("192.0.2.10") in {ipaddress.ip_address(a) for a in ips}


def test_node_keys_are_openssh_p384(tmp_path: Path) -> None:
    pairs = generate_node_keys(tmp_path, ["supernode-0", "edge-a"])
    for pair in pairs:
        # Exactly what flower-supernode (load_ssh_private_key) and `flwr supernode
        # register` (load_ssh_public_key, NIST curves only) load.
        private = serialization.load_ssh_private_key(pair.private_key.read_bytes(), None)
        public = serialization.load_ssh_public_key(pair.public_key.read_bytes())
        assert isinstance(private, ec.EllipticCurvePrivateKey)
        assert isinstance(public, ec.EllipticCurvePublicKey)
        assert isinstance(private.curve, ec.SECP384R1)
        assert uses_nist_ec_curve(public)
        assert private.public_key().public_numbers() == public.public_numbers()
        assert pair.public_key.read_text().startswith("ecdsa-sha2-nistp384 ")
        assert _mode(pair.private_key) == 0o600
    assert pairs[0].private_key.name == "supernode-0.key"


def test_node_keys_never_overwritten_by_accident(tmp_path: Path) -> None:
    pair = generate_node_key(tmp_path, "n0")
    before = pair.private_key.read_bytes()
    with pytest.raises(FileExistsError):
        generate_node_key(tmp_path, "n0")
    assert pair.private_key.read_bytes() == before
    generate_node_key(tmp_path, "n0", force=True)
    assert pair.private_key.read_bytes() != before
    with pytest.raises(ValueError):
        generate_node_key(tmp_path, "../evil")
    with pytest.raises(ValueError):
        generate_node_keys(tmp_path, ["a", "a"])


def test_keys_cli_and_superexec_secret(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "fedlora.deploy.keys.generate", "--out", str(tmp_path),
         "--nodes", "2", "--superexec-secret"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [
        SUPEREXEC_SECRET,
        "supernode-0.key",
        "supernode-0.pub",
        "supernode-1.key",
        "supernode-1.pub",
    ]
    secret = tmp_path / SUPEREXEC_SECRET
    assert _mode(secret) == 0o600 and len(secret.read_bytes()) == 64
    with pytest.raises(FileExistsError):
        generate_superexec_secret(tmp_path)
    # Refuses to overwrite existing keys without --force.
    again = subprocess.run(
        [sys.executable, "-m", "fedlora.deploy.keys.generate", "--out", str(tmp_path),
         "--nodes", "1"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert again.returncode != 0 and "already exists" in again.stderr


def test_connection_config_for_flwr(tmp_path: Path) -> None:
    import tomllib  # Python >= 3.11, as the project requires

    from flwr.cli.flower_config import parse_superlink_connection

    path = write_connection_config(tmp_path, "link", "127.0.0.1:8000", tmp_path / "ca.crt")
    data = tomllib.loads(path.read_text())
    assert data["superlink"]["default"] == "link"
    conn = parse_superlink_connection(data["superlink"]["link"], "link")
    assert conn.address == "127.0.0.1:8000" and not conn.insecure
    assert conn.root_certificates == str((tmp_path / "ca.crt").resolve())
    insecure = write_connection_config(tmp_path / "i", "x", "127.0.0.1:1", None)
    assert tomllib.loads(insecure.read_text())["superlink"]["x"]["insecure"] is True


def test_register_cli_validates_arguments(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    key = generate_node_key(tmp_path, "n").public_key
    with pytest.raises(SystemExit):
        register_main(["--address", "127.0.0.1:1", str(key)])  # neither CA nor --insecure
    with pytest.raises(SystemExit):
        register_main(["--connection", "x", str(tmp_path / "missing.pub")])


@pytest.mark.parametrize(
    "config",
    [
        {"partition-id": 0, "num-partitions": 3, "ledger-dir": "/tmp/with space/ledger"},
        {"flag": True, "off": False, "eps": 1e-05, "big": 3.5e12, "neg": -2},
        {"device": "cuda:0", "quote": 'say "hi"', "win": "C:\\data\\x"},
        {"strategy.name": "ffa", "lr": 0.01},
    ],
)
def test_format_config_args_round_trips_through_flower(config: dict) -> None:
    assert parse_config_args([format_config_args(config)]) == config


def test_format_config_args_rejects_what_flower_cannot_parse() -> None:
    with pytest.raises(ValueError):
        format_config_args({"bad key": 1})
    with pytest.raises(ValueError):
        format_config_args({"k": "both ' and \" quotes"})
    with pytest.raises(TypeError):
        format_config_args({"k": [1, 2]})  # type: ignore[dict-item]
