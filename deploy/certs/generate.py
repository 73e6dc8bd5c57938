"""Generate a private CA and a SuperLink server certificate signed by it.

Usage::

    python -m fedlora.deploy.certs.generate --out DIR [--host NAME ...] [--ip ADDR ...]

Writes, in ``DIR``:

- ``ca.crt``      the CA certificate: give it to every SuperNode (``--root-certificates``)
                  and to the ``flwr`` CLI (``root-certificates`` in ``$FLWR_HOME/config.toml``);
- ``ca.key``      the CA private key (mode 0600): keep it off the SuperLink host if you can;
- ``server.pem``  the SuperLink certificate (``flower-superlink --ssl-certfile``);
- ``server.key``  its private key (mode 0600, ``flower-superlink --ssl-keyfile``).

``flower-superlink --ssl-ca-certfile`` takes ``ca.crt``. The server certificate always
names ``localhost`` and ``127.0.0.1`` (the SuperLink's own ServerApp and SuperExec
processes connect to it over loopback with TLS) plus every ``--host`` / ``--ip`` given:
add the name or address the SuperNodes use to reach the SuperLink.

An existing CA in ``DIR`` is reused (so certificates already handed to SuperNodes stay
valid) unless ``--new-ca`` is given; the server certificate is always re-issued.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedlora.task.files import atomic_write

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
SERVER_CERT = "server.pem"
SERVER_KEY = "server.key"

DEFAULT_HOSTS = ("localhost",)
DEFAULT_IPS = ("127.0.0.1", "::1")


@dataclass(frozen=True)
class CertPaths:
    """Where the generated files are."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


def cert_paths(out: Path) -> CertPaths:
    """Return the file names used in ``out`` (without creating anything)."""
    out = Path(out)
    return CertPaths(out / CA_CERT, out / CA_KEY, out / SERVER_CERT, out / SERVER_KEY)


def _new_key() -> ec.EllipticCurvePrivateKey:
    # P-384: accepted by gRPC (BoringSSL), Python's ssl (uvicorn/httpx) and modern clients.
    return ec.generate_private_key(ec.SECP384R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _now() -> dt.datetime:
    # Back-date by a few minutes so that small clock skew between hosts does not make a
    # fresh certificate "not yet valid".
    return dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)


def _make_ca(common_name: str, days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = _new_key()
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedlora"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )
    start = _now()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=days))
        # path_length=0: this CA signs leaf certificates only, never another CA.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA384())
    )
    return key, cert


def _make_server_cert(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    hosts: list[str],
    ips: list[str],
    days: int,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = _new_key()
    sans: list[x509.GeneralName] = [x509.DNSName(h) for h in hosts]
    sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in ips]
    start = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedlora"),
                    x509.NameAttribute(NameOID.COMMON_NAME, hosts[0]),
                ]
            )
        )
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(min(start + dt.timedelta(days=days), ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


def _dedupe(values: list[str]) -> list[str]:
    seen: dict[str, None] = {}
    for value in values:
        seen.setdefault(value, None)
    return list(seen)


def generate_certificates(
    out: Path,
    *,
    hosts: list[str] | None = None,
    ips: list[str] | None = None,
    days: int = 365,
    ca_days: int = 3650,
    new_ca: bool = False,
) -> CertPaths:
    """Create (or reuse) the CA in ``out`` and issue a fresh SuperLink certificate.

    ``hosts`` are extra DNS names and ``ips`` extra IP addresses for the certificate's
    subjectAltName, on top of ``localhost``, ``127.0.0.1`` and ``::1``.
    """
    paths = cert_paths(out)
    all_hosts = _dedupe([*DEFAULT_HOSTS, *(hosts or [])])
    all_ips = _dedupe([*DEFAULT_IPS, *(ips or [])])
    for addr in all_ips:
        ipaddress.ip_address(addr)  # fail before writing anything on a bad address

    if not new_ca and paths.ca_cert.exists() and paths.ca_key.exists():
        ca_cert = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
        loaded = serialization.load_pem_private_key(paths.ca_key.read_bytes(), password=None)
        if not isinstance(loaded, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{paths.ca_key} is not an EC private key")
        ca_key = loaded
    else:
        ca_key, ca_cert = _make_ca("fedlora SuperLink CA", ca_days)
        atomic_write(paths.ca_key, _key_pem(ca_key), mode=0o600)
        atomic_write(paths.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM))

    server_key, server_cert = _make_server_cert(ca_key, ca_cert, all_hosts, all_ips, days)
    # Key first: a certificate on disk whose key is missing would be a confusing state.
    atomic_write(paths.server_key, _key_pem(server_key), mode=0o600)
    atomic_write(paths.server_cert, server_cert.public_bytes(serialization.Encoding.PEM))
    return paths


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(
        prog="python -m fedlora.deploy.certs.generate",
        description="Generate a CA and a SuperLink TLS certificate signed by it.",
    )
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument(
        "--host", action="append", default=[], help="extra DNS name for the SuperLink (repeat)"
    )
    parser.add_argument(
        "--ip", action="append", default=[], help="extra IP address for the SuperLink (repeat)"
    )
    parser.add_argument("--days", type=int, default=365, help="server certificate lifetime")
    parser.add_argument("--ca-days", type=int, default=3650, help="CA certificate lifetime")
    parser.add_argument(
        "--new-ca",
        action="store_true",
        help="replace an existing CA in --out (re-distribute ca.crt)",
    )
    args = parser.parse_args(argv)
    try:
        paths = generate_certificates(
            args.out,
            hosts=args.host,
            ips=args.ip,
            days=args.days,
            ca_days=args.ca_days,
            new_ca=args.new_ca,
        )
    except ValueError as err:
        parser.error(str(err))
    print(f"CA certificate:     {paths.ca_cert}")
    print(f"CA key (private):   {paths.ca_key}")
    print(f"server certificate: {paths.server_cert}")
    print(f"server key:         {paths.server_key}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
