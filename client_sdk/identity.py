"""The site's identity: its Ed25519 key, and the signatures every Fleet call carries.

The key is created on first use and kept in a PEM file (PKCS#8, mode 0600) under the
site's state directory, or only in memory for the life of the process. Its raw public
key is registered at enrollment; from then on :class:`SignedFleet` signs each request
(see :mod:`protos.signing` for the signed bytes).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import secrets
import stat
import time
from collections.abc import Iterator
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from google.protobuf.message import Message

from client_sdk.errors import SiteError
from protos.fedcoord.v1 import fleet_pb2, fleet_pb2_grpc
from protos.signing import (
    NONCE_BYTES,
    RequestSignature,
    fleet_method,
    key_fingerprint,
    message_digest,
    signed_bytes,
)

log = logging.getLogger("fedcoord.site")

Metadata = tuple[tuple[str, str], ...]


class SiteIdentity:
    """A site's Ed25519 key pair (``path``: the file it lives in; None: memory only)."""

    def __init__(self, private_key: Ed25519PrivateKey, path: Path | None = None):
        self._key = private_key
        self.path = path
        self.public_key = private_key.public_key().public_bytes_raw()
        """The raw 32-byte public key sent at enrollment."""
        self.fingerprint = key_fingerprint(self.public_key)

    @classmethod
    def generate(cls) -> SiteIdentity:
        """A fresh key kept in memory only (gone when the process ends)."""
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load_or_create(cls, path: str | Path) -> SiteIdentity:
        """The key in ``path``, created (mode 0600, directory 0700) when missing.

        Raises :class:`SiteError` when the file is readable by others or not an
        Ed25519 private key.
        """
        path = Path(path)
        if not path.exists():
            _create_key_file(path)
        mode = path.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise SiteError(
                f"site key {path} is accessible by others (mode {stat.S_IMODE(mode):o}); "
                f"run: chmod 600 {path}"
            )
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except ValueError as exc:
            raise SiteError(f"site key {path} is not a PEM private key: {exc}") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise SiteError(f"site key {path} is not an Ed25519 private key")
        return cls(key, path)

    def sign(
        self, method: str, message: Message, site_id: str, now: float | None = None
    ) -> Metadata:
        """The metadata that authenticates ``message`` as ``site_id``'s call of ``method``
        (``now``: the unix time to claim, for tests)."""
        timestamp_ms = int((time.time() if now is None else now) * 1000)
        nonce = secrets.token_hex(NONCE_BYTES)
        data = signed_bytes(method, message_digest(message), timestamp_ms, nonce, site_id)
        return RequestSignature(site_id, timestamp_ms, nonce, self._key.sign(data)).metadata()


def _create_key_file(path: Path) -> None:
    """Write a new key to ``path`` atomically; a key another process created first wins."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
            f.flush()
            os.fsync(f.fileno())
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)
            log.info("created site key %s", path)
    finally:
        tmp.unlink(missing_ok=True)


class SignedFleet:
    """A Fleet stub whose calls carry ``site_id``'s signature (same call signatures as
    :class:`~protos.fedcoord.v1.fleet_pb2_grpc.FleetStub`)."""

    def __init__(self, stub: fleet_pb2_grpc.FleetStub, identity: SiteIdentity, site_id: str):
        self.stub = stub
        self.identity = identity
        self.site_id = site_id

    def _metadata(self, name: str, message: Message) -> Metadata:
        return self.identity.sign(fleet_method(name), message, self.site_id)

    def Enroll(  # noqa: N802 - the RPC's name
        self, request: fleet_pb2.EnrollRequest, timeout: float | None = None
    ) -> fleet_pb2.EnrollReply:
        metadata = self._metadata("Enroll", request)
        return self.stub.Enroll(request, timeout=timeout, metadata=metadata)

    def PullTask(  # noqa: N802
        self, request: fleet_pb2.PullTaskRequest, timeout: float | None = None
    ) -> Iterator[fleet_pb2.TaskMessage]:
        metadata = self._metadata("PullTask", request)
        return self.stub.PullTask(request, timeout=timeout, metadata=metadata)

    def PushResult(  # noqa: N802
        self, messages: Iterator[fleet_pb2.ResultMessage | bytes], timeout: float | None = None
    ) -> fleet_pb2.PushReply:
        """Signs the first message (the header); the chunks after it (messages, or
        pre-encoded ones for a :func:`~client_sdk.connection.fleet_stub`) are covered by
        the header's payload digest."""
        messages = iter(messages)
        first = next(messages, None)
        if not isinstance(first, fleet_pb2.ResultMessage):
            raise ValueError("a result stream starts with its header message")
        metadata = self._metadata("PushResult", first)
        stream = itertools.chain([first], messages)
        return self.stub.PushResult(stream, timeout=timeout, metadata=metadata)

    def Heartbeat(  # noqa: N802
        self, request: fleet_pb2.HeartbeatRequest, timeout: float | None = None
    ) -> fleet_pb2.HeartbeatReply:
        metadata = self._metadata("Heartbeat", request)
        return self.stub.Heartbeat(request, timeout=timeout, metadata=metadata)

    def GetReceipt(  # noqa: N802
        self, request: fleet_pb2.ReceiptRequest, timeout: float | None = None
    ) -> fleet_pb2.ReceiptReply:
        metadata = self._metadata("GetReceipt", request)
        return self.stub.GetReceipt(request, timeout=timeout, metadata=metadata)
