"""TLS for the gRPC channels: the transport flags of ``fedcoord``, the credentials they
build and the binding of a site's client certificate to its site id.

TLS is on unless ``--insecure`` is given. ``serve`` needs ``--tls-cert`` and
``--tls-key`` (``--tls-client-ca`` adds mutual TLS); a dialling command trusts
``--tls-ca`` (system roots without it) and presents ``--tls-cert``/``--tls-key`` when
given. ``--insecure`` together with any TLS option is a usage error.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from coordinator.errors import ConfigError

SERVER_FLAGS = ("tls_cert", "tls_key", "tls_client_ca")
CLIENT_FLAGS = ("tls_ca", "tls_cert", "tls_key")


@dataclass(frozen=True)
class ServerTLS:
    """The coordinator's certificate chain and key (PEM); with ``client_ca``, mutual TLS:
    every client must present a certificate that this CA signed."""

    certificate_chain: bytes
    private_key: bytes
    client_ca: bytes | None = None

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.private_key, self.certificate_chain)],
            root_certificates=self.client_ca,
            require_client_auth=self.client_ca is not None,
        )


@dataclass(frozen=True)
class ClientTLS:
    """What a dialling command trusts (``root_certificates``; None: the system roots) and,
    for mutual TLS, the certificate it presents."""

    root_certificates: bytes | None = None
    certificate_chain: bytes | None = None
    private_key: bytes | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            self.root_certificates, self.private_key, self.certificate_chain
        )


def add_transport_flags(p: argparse.ArgumentParser, *, server: bool = False) -> None:
    """``--insecure`` and the TLS options of a server (``serve``) or a dialling command."""
    g = p.add_argument_group("transport (TLS is on unless --insecure)")
    if server:
        g.add_argument("--tls-cert", metavar="FILE", help="the coordinator's certificate (PEM)")
        g.add_argument("--tls-key", metavar="FILE", help="its private key (PEM)")
        g.add_argument(
            "--tls-client-ca",
            metavar="FILE",
            help="mutual TLS: require client certificates signed by this CA (PEM)",
        )
    else:
        g.add_argument(
            "--tls-ca", metavar="FILE", help="CA to trust for the coordinator (default: system)"
        )
        g.add_argument("--tls-cert", metavar="FILE", help="mutual TLS: client certificate (PEM)")
        g.add_argument("--tls-key", metavar="FILE", help="mutual TLS: its private key (PEM)")
    g.add_argument(
        "--insecure",
        action="store_true",
        help="plaintext gRPC without TLS (local experiments only)",
    )


def flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _given(args: argparse.Namespace, names: Sequence[str]) -> list[str]:
    return [n for n in names if getattr(args, n, None) is not None]


def _check_pair(args: argparse.Namespace) -> None:
    if args.tls_cert is not None and args.tls_key is None:
        raise ConfigError("--tls-key", "--tls-cert needs --tls-key")
    if args.tls_key is not None and args.tls_cert is None:
        raise ConfigError("--tls-cert", "--tls-key needs --tls-cert")


def _not_insecure(args: argparse.Namespace, given: list[str]) -> None:
    if args.insecure and given:
        raise ConfigError(
            "--insecure", f"cannot be combined with {', '.join(flag(n) for n in given)}"
        )


def server_tls(args: argparse.Namespace) -> ServerTLS | None:
    """The TLS settings of ``serve`` (None under ``--insecure``)."""
    given = _given(args, SERVER_FLAGS)
    _not_insecure(args, given)
    if args.insecure:
        return None
    if not given:
        raise ConfigError(
            "--insecure",
            "serve needs TLS: pass --tls-cert FILE --tls-key FILE (and --tls-client-ca FILE "
            "for mutual TLS), or --insecure to run without TLS",
        )
    _check_pair(args)
    if args.tls_cert is None:
        raise ConfigError("--tls-cert", "--tls-client-ca needs --tls-cert and --tls-key")
    chain = read_certificates("--tls-cert", args.tls_cert)
    key = read_private_key("--tls-key", args.tls_key, chain)
    client_ca = None
    if args.tls_client_ca is not None:
        client_ca = read_certificates("--tls-client-ca", args.tls_client_ca)
    return ServerTLS(chain, key, client_ca)


def client_tls(args: argparse.Namespace) -> ClientTLS | None:
    """The TLS settings of a dialling command (None under ``--insecure``)."""
    given = _given(args, CLIENT_FLAGS)
    _not_insecure(args, given)
    if args.insecure:
        return None
    _check_pair(args)
    roots = None if args.tls_ca is None else read_certificates("--tls-ca", args.tls_ca)
    if args.tls_cert is None:
        return ClientTLS(roots)
    chain = read_certificates("--tls-cert", args.tls_cert)
    return ClientTLS(roots, chain, read_private_key("--tls-key", args.tls_key, chain))


def _read(option: str, path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise ConfigError(option, f"cannot read {path}: {exc.strerror}") from None


def read_certificates(option: str, path: str) -> bytes:
    """The PEM bytes of ``path``, checked to hold at least one X.509 certificate."""
    data = _read(option, path)
    try:
        x509.load_pem_x509_certificates(data)
    except ValueError:
        raise ConfigError(option, f"{path} is not a PEM certificate") from None
    return data


def read_private_key(option: str, path: str, certificate_chain: bytes) -> bytes:
    """The PEM bytes of ``path``, checked to be an unencrypted private key that belongs to
    the first certificate of ``certificate_chain``."""
    data = _read(option, path)
    try:
        key: Any = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise ConfigError(option, f"{path} is not an unencrypted PEM private key") from None
    cert = x509.load_pem_x509_certificates(certificate_chain)[0]
    raw = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*raw) != cert.public_key().public_bytes(*raw):
        raise ConfigError(option, f"{path} is not the key of the certificate given with it")
    return data


def dial(address: str, tls: ClientTLS | None, options: Sequence[tuple[str, Any]]) -> grpc.Channel:
    """A channel to ``address``: TLS with ``tls``, plaintext when it is None."""
    if tls is None:
        return grpc.insecure_channel(address, options=list(options))
    return grpc.secure_channel(address, tls.credentials(), options=list(options))


def check_peer_site(site_id: str, context: grpc.ServicerContext) -> None:
    """Under mutual TLS, refuse a request whose client certificate's CN is not ``site_id``
    (plaintext and server-only TLS carry no peer certificate: nothing to check)."""
    names = context.auth_context().get("x509_common_name")
    if names and site_id.encode() not in names:
        cn = names[0].decode(errors="replace")
        context.abort(
            grpc.StatusCode.UNAUTHENTICATED,
            f"client certificate is for {cn[:64]!r}, not site {site_id[:64]!r}",
        )


OPERATOR_NAME = "fedcoord-operator"
"""CN of the operator's client certificate (``fedcoord certs init`` issues it)."""
LOOPBACK_PEERS = ("ipv4:127.", "ipv6:[::1]", "unix:")


def require_operator(context: grpc.ServicerContext) -> None:
    """Control is for operators: a client presenting the operator certificate (CN
    ``fedcoord-operator``, under mutual TLS), or one without a client certificate on this
    host's loopback interface. Anything else (a site's certificate, a remote plaintext or
    server-only-TLS client) is refused with PERMISSION_DENIED."""
    names = context.auth_context().get("x509_common_name")
    if names:
        if OPERATOR_NAME.encode() in names:
            return
        cn = names[0].decode(errors="replace")
        context.abort(
            grpc.StatusCode.PERMISSION_DENIED,
            f"the Control service is for operators; certificate {cn[:64]!r} is not the "
            f"operator's ({OPERATOR_NAME})",
        )
    if not context.peer().startswith(LOOPBACK_PEERS):
        context.abort(
            grpc.StatusCode.PERMISSION_DENIED,
            "the Control service is for operators: connect from the coordinator's host, or "
            "with the operator certificate under mutual TLS (fedcoord certs init)",
        )
