"""``fedcoord certs``: the fields of the certificates it issues, their chain, the files."""

from __future__ import annotations

import datetime as dt
import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from coordinator import certs
from coordinator.errors import ConfigError
from simulations.cli import main

SITES = ("hospital-1", "hospital-2")


@pytest.fixture
def issued(tmp_path: Path) -> Path:
    d = tmp_path / "certs"
    certs.init(d, ("127.0.0.1", "localhost", "coord.example.org"), SITES, days=30)
    return d


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def ext(cert: x509.Certificate, kind: type) -> x509.Extension:
    return cert.extensions.get_extension_for_class(kind)


def verify_signed_by(cert: x509.Certificate, ca: x509.Certificate) -> None:
    """Raises unless ``ca``'s key signed ``cert``."""
    assert cert.issuer == ca.subject
    key = ca.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    key.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(hashes.SHA256()))


def test_ca_is_a_self_signed_cert_signing_ca(issued):
    ca = load(issued / "ca.pem")
    constraints = ext(ca, x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca and constraints.value.path_length == 0
    usage = ext(ca, x509.KeyUsage)
    assert usage.critical and usage.value.key_cert_sign and usage.value.crl_sign
    verify_signed_by(ca, ca)
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey)
    assert ca.public_key().curve.name == "secp256r1"


def test_coordinator_certificate_names_its_hosts_for_server_auth(issued):
    ca, cert = load(issued / "ca.pem"), load(issued / "coordinator.pem")
    verify_signed_by(cert, ca)
    san = ext(cert, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "coord.example.org"]
    assert list(ext(cert, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert not ext(cert, x509.BasicConstraints).value.ca
    usage = ext(cert, x509.KeyUsage).value
    assert usage.digital_signature and not usage.key_cert_sign
    aki = ext(cert, x509.AuthorityKeyIdentifier).value.key_identifier
    assert aki == ext(ca, x509.SubjectKeyIdentifier).value.digest


def test_site_and_operator_certificates_are_client_certificates(issued):
    ca = load(issued / "ca.pem")
    for name, path in [
        *((s, issued / "sites" / f"{s}.pem") for s in SITES),
        (certs.OPERATOR_NAME, issued / "operator.pem"),
    ]:
        cert = load(path)
        verify_signed_by(cert, ca)
        assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == name
        assert list(ext(cert, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
        assert not ext(cert, x509.BasicConstraints).value.ca
        with pytest.raises(x509.ExtensionNotFound):
            ext(cert, x509.SubjectAlternativeName)


def test_validity_covers_now_and_the_requested_days(issued):
    now = dt.datetime.now(dt.UTC)
    for path in issued.rglob("*.pem"):
        cert = load(path)
        assert cert.not_valid_before_utc <= now - dt.timedelta(minutes=4)
        days = (cert.not_valid_after_utc - now).total_seconds() / 86400
        assert 29.99 < days <= 30


def test_keys_are_private_pem_files_matching_their_certificates(issued):
    pairs = [("ca", issued), ("coordinator", issued), ("operator", issued)]
    pairs += [(s, issued / "sites") for s in SITES]
    for name, d in pairs:
        key_path = d / f"{name}.key"
        assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
        key = serialization.load_pem_private_key(key_path.read_bytes(), None)
        cert = load(d / f"{name}.pem")
        assert key.public_key() == cert.public_key()


def test_default_hosts_are_loopback(tmp_path):
    certs.init(tmp_path)
    san = ext(load(tmp_path / "coordinator.pem"), x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]


def test_existing_files_are_not_overwritten_without_force(issued):
    before = {p: p.read_bytes() for p in issued.rglob("*") if p.is_file()}
    with pytest.raises(ConfigError, match="--force"):
        certs.init(issued, sites=("hospital-9",))
    assert {p: p.read_bytes() for p in issued.rglob("*") if p.is_file()} == before
    with pytest.raises(ConfigError, match=r"hospital-1\.pem exists"):
        certs.add_site(issued, "hospital-1")
    certs.init(issued, force=True)
    assert (issued / "ca.pem").read_bytes() != before[issued / "ca.pem"]


def test_add_site_issues_from_the_existing_ca(issued):
    written = certs.add_site(issued, "hospital-3", days=10)
    assert written == list(certs.site_paths(issued, "hospital-3"))
    verify_signed_by(load(written[0]), load(issued / "ca.pem"))
    with pytest.raises(ConfigError, match="certs init"):
        certs.add_site(issued / "nowhere", "hospital-4")


def test_cli_prints_what_it_wrote_and_refuses_bad_input(tmp_path, capsys):
    d = tmp_path / "c"
    assert main(["certs", "init", str(d), "--site", "a", "--coordinator-host", "::1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"wrote {d / 'ca.pem'}" and out[-1] == f"wrote {d / 'sites' / 'a.key'}"
    san = ext(load(d / "coordinator.pem"), x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("::1")]
    assert main(["certs", "init", str(d)]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["certs", "add-site", str(d), "b"]) == 0
    assert main(["certs", "init", str(d / "x"), "--site", "a", "--site", "a"]) == 2
    for bad in (["--site", "no spaces"], ["--coordinator-host", "a/b"], ["--days", "0"]):
        with pytest.raises(SystemExit) as exc:
            main(["certs", "init", str(tmp_path / "y"), *bad])
        assert exc.value.code == 2
    assert not (tmp_path / "y").exists()
