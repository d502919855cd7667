"""Signed Fleet requests: the gRPC metadata a site attaches and the bytes it signs.

Every Fleet call of a site carries four metadata entries::

    x-fedcoord-site       the site id (the request's site_id fields must equal it)
    x-fedcoord-timestamp  unix time in milliseconds, decimal
    x-fedcoord-nonce      16 random bytes, 32 lowercase hex digits
    x-fedcoord-signature  Ed25519 signature (64 bytes, 128 lowercase hex digits)

The signature covers these UTF-8 bytes, lines joined by ``\\n`` (no trailing newline)::

    fedcoord-request-v1
    <method>          the full gRPC method, e.g. /fedcoord.v1.Fleet/PullTask
    <body digest>     SHA-256 hex of the request message's deterministic serialization
                      (PushResult: of its first message, the header, whose payload
                      digest covers the chunks)
    <timestamp>
    <nonce>
    <site id>

Every field is checked against a pattern without newlines before it is joined, so the
encoding is unambiguous. Both ends use this module: sites sign, the coordinator verifies.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass

from google.protobuf.message import Message

from protos.fedcoord.v1 import fleet_pb2

SIGNING_CONTEXT = "fedcoord-request-v1"
SITE_HEADER = "x-fedcoord-site"
TIMESTAMP_HEADER = "x-fedcoord-timestamp"
NONCE_HEADER = "x-fedcoord-nonce"
SIGNATURE_HEADER = "x-fedcoord-signature"
HEADERS = (SITE_HEADER, TIMESTAMP_HEADER, NONCE_HEADER, SIGNATURE_HEADER)
NONCE_BYTES = 16
PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64

SITE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
"""A site id: 1-64 characters of letters, digits, ``.``, ``_`` and ``-``, not starting
with a punctuation mark."""
SITE_ID_RULE = "1-64 characters of letters, digits, '.', '_' or '-'"
_METHOD = re.compile(r"^/[A-Za-z0-9_.]{1,128}/[A-Za-z0-9_]{1,64}\Z")
_TIMESTAMP = re.compile(r"^[0-9]{1,15}\Z")
_NONCE = re.compile(r"^[0-9a-f]{32}\Z")
_DIGEST = re.compile(r"^[0-9a-f]{64}\Z")
_SIGNATURE = re.compile(r"^[0-9a-f]{128}\Z")

_FLEET = fleet_pb2.DESCRIPTOR.services_by_name["Fleet"]


def fleet_method(name: str) -> str:
    """The full gRPC path of a Fleet method (``/fedcoord.v1.Fleet/<name>``)."""
    if name not in _FLEET.methods_by_name:
        raise ValueError(f"Fleet has no method {name!r}")
    return f"/{_FLEET.full_name}/{name}"


def message_digest(message: Message) -> str:
    """SHA-256 hex of the message's deterministic serialization (sorted map entries)."""
    return hashlib.sha256(message.SerializeToString(deterministic=True)).hexdigest()


def key_fingerprint(public_key: bytes) -> str:
    """``sha256:<hex>`` of a raw public key: how ledger entries and listings name it."""
    return "sha256:" + hashlib.sha256(public_key).hexdigest()


def signed_bytes(method: str, digest: str, timestamp_ms: int, nonce: str, site_id: str) -> bytes:
    """The bytes a site signs for one request; ``ValueError`` on a malformed field."""
    fields = (
        (_METHOD, method, "method"),
        (_DIGEST, digest, "body digest"),
        (_TIMESTAMP, str(timestamp_ms), "timestamp"),
        (_NONCE, nonce, "nonce"),
        (SITE_ID, site_id, "site id"),
    )
    for pattern, value, what in fields:
        if not pattern.match(value):
            raise ValueError(f"malformed {what}")
    return "\n".join([SIGNING_CONTEXT, *(value for _, value, _ in fields)]).encode()


@dataclass(frozen=True)
class RequestSignature:
    """The four signature entries of one request."""

    site_id: str
    timestamp_ms: int
    nonce: str
    signature: bytes

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (
            (SITE_HEADER, self.site_id),
            (TIMESTAMP_HEADER, str(self.timestamp_ms)),
            (NONCE_HEADER, self.nonce),
            (SIGNATURE_HEADER, self.signature.hex()),
        )

    @classmethod
    def from_metadata(cls, metadata: Sequence[tuple[str, str | bytes]]) -> RequestSignature:
        """Parse a call's metadata; ``ValueError`` names what is missing or malformed."""
        found: dict[str, str] = {}
        for key, value in metadata:
            if key not in HEADERS:
                continue
            if key in found:
                raise ValueError(f"{key} appears more than once")
            if not isinstance(value, str):
                raise ValueError(f"{key} must be text")
            found[key] = value
        missing = [h for h in HEADERS if h not in found]
        if missing:
            raise ValueError(f"missing {', '.join(missing)}")
        checks = (
            (SITE_HEADER, SITE_ID),
            (TIMESTAMP_HEADER, _TIMESTAMP),
            (NONCE_HEADER, _NONCE),
            (SIGNATURE_HEADER, _SIGNATURE),
        )
        for key, pattern in checks:
            if not pattern.match(found[key]):
                raise ValueError(f"malformed {key}")
        return cls(
            found[SITE_HEADER],
            int(found[TIMESTAMP_HEADER]),
            found[NONCE_HEADER],
            bytes.fromhex(found[SIGNATURE_HEADER]),
        )
