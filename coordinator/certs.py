"""``fedcoord certs init|add-site``: a private CA with coordinator, operator and site
certificates for TLS and mutual TLS.

Keys are ECDSA P-256 (gRPC's TLS accepts them on every platform), written as unencrypted
PKCS#8 PEM with mode 0600. Layout of DIR::

    ca.pem, ca.key                    the CA (keep ca.key offline once sites are issued)
    coordinator.pem, coordinator.key  server certificate (``serve --tls-cert/--tls-key``)
    operator.pem, operator.key        client certificate for ``run`` and ``sites``
    sites/<name>.pem, sites/<name>.key  one client certificate per site (CN = site id)
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from coordinator.errors import ConfigError
from coordinator.transport import OPERATOR_NAME
from protos.signing import SITE_ID

DEFAULT_HOSTS = ("127.0.0.1", "localhost")
DEFAULT_DAYS = 365
COORDINATOR_NAME = "fedcoord coordinator"
CLOCK_SKEW = dt.timedelta(minutes=5)
"""Certificates are valid from this long before they are issued."""


@dataclass(frozen=True)
class Issued:
    """A private key and its certificate, not yet written."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedcoord"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _builder(
    subject: x509.Name, issuer: x509.Name, key: ec.EllipticCurvePrivateKey, days: int
) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
    )


def make_ca(days: int) -> Issued:
    """A self-signed CA that may sign end-entity certificates only (path length 0)."""
    key = new_key()
    name = _name("fedcoord CA")
    usage = x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )
    cert = (
        _builder(name, name, key, days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(usage, critical=True)
        .sign(key, hashes.SHA256())
    )
    return Issued(key, cert)


def issue(
    ca: Issued,
    common_name: str,
    days: int,
    *,
    server_hosts: tuple[str, ...] = (),
) -> Issued:
    """An end-entity certificate signed by ``ca``: server auth for ``server_hosts`` (as
    SAN DNS names or IP addresses) when given, client auth otherwise."""
    key = new_key()
    usage = x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )
    eku = ExtendedKeyUsageOID.SERVER_AUTH if server_hosts else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        _builder(_name(common_name), ca.cert.subject, key, days)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), False
        )
    )
    if server_hosts:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([san_entry(h) for h in server_hosts]), critical=False
        )
    return Issued(key, builder.sign(ca.key, hashes.SHA256()))


def san_entry(host: str) -> x509.GeneralName:
    """An IP address entry for an address, a DNS name entry otherwise."""
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


# files ---------------------------------------------------------------------------------
def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def site_paths(directory: Path, site: str) -> tuple[Path, Path]:
    return directory / "sites" / f"{site}.pem", directory / "sites" / f"{site}.key"


def _pair_files(issued: Issued, cert_path: Path, key_path: Path) -> dict[Path, tuple[bytes, int]]:
    return {cert_path: (cert_pem(issued.cert), 0o644), key_path: (key_pem(issued.key), 0o600)}


def write_files(files: dict[Path, tuple[bytes, int]], force: bool) -> list[Path]:
    """Write ``path -> (data, mode)``; refuse before writing anything when a file exists
    and ``force`` is off."""
    if not force:
        for path in files:
            if path.exists():
                raise ConfigError("--force", f"{path} exists; pass --force to overwrite it")
    for path, (data, mode) in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)  # a fresh inode, so the mode applies from the start
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(path, mode)  # not narrowed by the umask
    return list(files)


def load_ca(directory: Path) -> Issued:
    try:
        cert = x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())
        key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), None)
    except OSError as exc:
        raise ConfigError(
            "DIR", f"no CA in {directory} ({exc.strerror}); run 'fedcoord certs init' first"
        ) from None
    except (ValueError, TypeError) as exc:
        raise ConfigError("DIR", f"cannot load the CA in {directory}: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError("DIR", f"{directory / 'ca.key'} is not an ECDSA key")
    return Issued(key, cert)


def check_site_name(name: str) -> str:
    """A site id is 1-64 letters, digits, ``.``, ``_``, ``-`` (argparse type)."""
    if not SITE_ID.match(name):
        raise argparse.ArgumentTypeError(
            f"{name!r}: must be 1-64 characters of letters, digits, '.', '_' or '-'"
        )
    return name


def host_name(text: str) -> str:
    """A DNS name or IP address for the coordinator's certificate (argparse type)."""
    try:
        ipaddress.ip_address(text)
        return text
    except ValueError:
        pass
    if not text or not text.isascii() or any(c.isspace() or c in "/:@" for c in text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a DNS name or IP address")
    return text


def positive_days(text: str) -> int:
    try:
        days = int(text)
    except ValueError:
        days = 0
    if days < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of days >= 1, got {text!r}")
    return days


def init(
    directory: Path,
    hosts: tuple[str, ...] = DEFAULT_HOSTS,
    sites: tuple[str, ...] = (),
    days: int = DEFAULT_DAYS,
    force: bool = False,
) -> list[Path]:
    """Create the CA, coordinator, operator and site certificates; the paths written."""
    ca = make_ca(days)
    files = _pair_files(ca, directory / "ca.pem", directory / "ca.key")
    coordinator = issue(ca, COORDINATOR_NAME, days, server_hosts=hosts)
    files |= _pair_files(coordinator, directory / "coordinator.pem", directory / "coordinator.key")
    operator = issue(ca, OPERATOR_NAME, days)
    files |= _pair_files(operator, directory / "operator.pem", directory / "operator.key")
    for site in sites:
        files |= _pair_files(issue(ca, site, days), *site_paths(directory, site))
    return write_files(files, force)


def add_site(
    directory: Path, site: str, days: int = DEFAULT_DAYS, force: bool = False
) -> list[Path]:
    """Issue one more site certificate from the CA in ``directory``."""
    ca = load_ca(directory)
    return write_files(_pair_files(issue(ca, site, days), *site_paths(directory, site)), force)


# commands ------------------------------------------------------------------------------
def cmd_certs_init(args: argparse.Namespace) -> int:
    if len(set(args.site or ())) != len(args.site or ()):
        raise ConfigError("--site", "each site may be named once")
    written = init(
        Path(args.dir),
        tuple(args.coordinator_host or DEFAULT_HOSTS),
        tuple(args.site or ()),
        args.days,
        args.force,
    )
    for path in written:
        print(f"wrote {path}")
    return 0


def cmd_certs_add_site(args: argparse.Namespace) -> int:
    for path in add_site(Path(args.dir), args.name, args.days, args.force):
        print(f"wrote {path}")
    return 0


def add_certs_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``fedcoord certs init|add-site``."""
    certs = sub.add_parser("certs", help="a private CA and TLS certificates").add_subparsers(
        dest="certs_command", required=True
    )
    p = certs.add_parser("init", help="create a CA, coordinator, operator and site certificates")
    p.add_argument("dir", help="directory to write the PEM files to")
    p.add_argument(
        "--coordinator-host",
        action="append",
        metavar="HOST",
        type=host_name,
        help="DNS name or IP address sites dial (repeatable; default 127.0.0.1 and localhost)",
    )
    p.add_argument(
        "--site",
        action="append",
        metavar="NAME",
        type=check_site_name,
        help="issue a client certificate for this site id (repeatable)",
    )
    p.add_argument("--days", type=positive_days, default=DEFAULT_DAYS, help="validity (365)")
    p.add_argument("--force", action="store_true", help="overwrite existing files")
    p.set_defaults(func=cmd_certs_init)

    p = certs.add_parser("add-site", help="issue one more site certificate from the CA in DIR")
    p.add_argument("dir", help="the directory 'certs init' wrote")
    p.add_argument("name", type=check_site_name, help="the site id (the certificate's CN)")
    p.add_argument("--days", type=positive_days, default=DEFAULT_DAYS, help="validity (365)")
    p.add_argument("--force", action="store_true", help="overwrite an existing certificate")
    p.set_defaults(func=cmd_certs_add_site)
