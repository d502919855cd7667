"""Authentication of Fleet requests: every call is signed by its site's Ed25519 key.

:class:`RequestVerifier` checks a call's signature metadata (format in
:mod:`protos.signing`) against the key the site enrolled with, refuses timestamps more
than ``max_skew_s`` from the coordinator's clock and nonces it has seen, and notices
revocations (also ones made by ``fedcoord sites revoke`` on the data directory while
the coordinator runs). Every refusal is an :class:`AuthError` with a named reason.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from typing import NoReturn

import grpc
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from google.protobuf.message import Message

from coordinator.logs import LogThrottle
from coordinator.state import Database, SiteRow
from protos.signing import PUBLIC_KEY_BYTES, RequestSignature, message_digest, signed_bytes

log = logging.getLogger("fedcoord.auth")

MAX_SKEW_S = 60.0
"""Largest accepted distance between a request's timestamp and the coordinator's clock."""
MAX_NONCES_PER_SITE = 8192
"""Above what the default rate limit lets one site send in the 120 s a nonce is kept."""
MAX_NONCES = 100_000


class AuthError(Exception):
    """A refused request: ``reason`` is a stable name (``bad_signature``,
    ``stale_timestamp``, ``replayed_nonce``, ``unknown_site``, ``revoked`` ...)."""

    def __init__(
        self, reason: str, detail: str, code: grpc.StatusCode = grpc.StatusCode.UNAUTHENTICATED
    ):
        self.reason = reason
        self.detail = detail
        self.code = code
        super().__init__(f"{reason}: {detail}")


_throttle = LogThrottle()


def refuse(context: grpc.ServicerContext, method: str, site_id: str, error: AuthError) -> NoReturn:
    """Log the refusal (at most once per method, site and reason every 10 s: a flood must
    not flood the log) and end the call with its status."""
    if _throttle.allow((method, site_id[:64], error.reason)):
        log.warning(
            "refused %s for site %r from %s: %s", method, site_id[:64], context.peer(), error
        )
    context.abort(error.code, str(error))
    raise error  # abort raises already; this keeps the type honest


# public keys ---------------------------------------------------------------------------
_P = 2**255 - 19
_D = -121665 * pow(121666, _P - 2, _P) % _P
_SQRT_M1 = pow(2, (_P - 1) // 4, _P)
_IDENTITY = (0, 1)


def _decode_point(raw: bytes) -> tuple[int, int]:
    """The affine point of an Ed25519 public key (RFC 8032, 5.1.3)."""
    y = int.from_bytes(raw, "little")
    sign, y = y >> 255, y & ((1 << 255) - 1)
    if y >= _P:
        raise ValueError("non-canonical point encoding")
    u, v = (y * y - 1) % _P, (_D * y * y + 1) % _P
    x = u * pow(v, 3, _P) * pow(u * pow(v, 7, _P), (_P - 5) // 8, _P) % _P
    if v * x * x % _P == (-u) % _P:
        x = x * _SQRT_M1 % _P
    elif v * x * x % _P != u:
        raise ValueError("not a point on the curve")
    if x == 0 and sign:
        raise ValueError("non-canonical point encoding")
    return (_P - x if x & 1 != sign else x), y


def _add(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int]:
    (x1, y1), (x2, y2) = a, b
    t = _D * x1 * x2 * y1 * y2 % _P
    x = (x1 * y2 + y1 * x2) * pow(1 + t, _P - 2, _P) % _P
    y = (y1 * y2 + x1 * x2) * pow(1 - t, _P - 2, _P) % _P
    return x, y


def check_public_key(raw: bytes) -> Ed25519PublicKey:
    """The key of 32 raw bytes; ``ValueError`` for anything but a canonical point of large
    order (low-order keys would let anyone forge signatures that verify)."""
    if len(raw) != PUBLIC_KEY_BYTES:
        raise ValueError(f"must be {PUBLIC_KEY_BYTES} raw bytes of an Ed25519 key, got {len(raw)}")
    point = _decode_point(raw)
    for _ in range(3):  # times the cofactor 8
        point = _add(point, point)
    if point == _IDENTITY:
        raise ValueError("a low-order point, not a usable Ed25519 key")
    return Ed25519PublicKey.from_public_bytes(raw)


# nonces --------------------------------------------------------------------------------
class NonceCache:
    """The nonces of recent requests, each kept ``keep_s`` seconds after it was seen.

    Memory is bounded: at most ``max_per_site`` nonces of one site and ``max_total`` in
    all; a request beyond either is refused as ``too_many_requests`` (a transient
    ``RESOURCE_EXHAUSTED``), never let through unchecked.
    """

    def __init__(
        self,
        keep_s: float,
        max_per_site: int = MAX_NONCES_PER_SITE,
        max_total: int = MAX_NONCES,
    ):
        self.keep_s = keep_s
        self.max_per_site = max_per_site
        self.max_total = max_total
        self._expiry: OrderedDict[tuple[str, str], float] = OrderedDict()
        self._per_site: Counter[str] = Counter()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._expiry)

    def add(self, site_id: str, nonce: str, now: float) -> None:
        """Remember ``nonce``; raises :class:`AuthError` if it was seen or memory is full."""
        with self._lock:
            self._prune(now)
            key = (site_id, nonce)
            if key in self._expiry:
                raise AuthError("replayed_nonce", f"nonce {nonce} was already used")
            if self._per_site[site_id] >= self.max_per_site or len(self._expiry) >= self.max_total:
                raise AuthError(
                    "too_many_requests",
                    f"more than {self.max_per_site} signed requests of site {site_id!r} (or "
                    f"{self.max_total} in all) within {self.keep_s:.0f}s; retry later",
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                )
            self._expiry[key] = now + self.keep_s
            self._per_site[site_id] += 1

    def _prune(self, now: float) -> None:
        while self._expiry:
            key, expiry = next(iter(self._expiry.items()))
            if expiry > now:
                return
            del self._expiry[key]
            self._per_site[key[0]] -= 1
            if not self._per_site[key[0]]:
                del self._per_site[key[0]]


# requests ------------------------------------------------------------------------------
class RequestVerifier:
    """Checks that a Fleet call comes, fresh and once, from the enrolled site it names.

    Parameters
    ----------
    db
        The coordinator's state: each call reads its site's row (status and key).
    on_revoked
        Called with a site id once the verifier sees that the site is revoked (the
        dispatcher fails its open assignment and stops offering it tasks).
    max_skew_s
        Accepted distance of a request's timestamp from this clock. Nonces are kept
        ``2 * max_skew_s`` after they were seen, longer than a timestamp stays acceptable.
    """

    def __init__(
        self,
        db: Database,
        *,
        on_revoked: Callable[[str], None] = lambda site_id: None,
        max_skew_s: float = MAX_SKEW_S,
        nonces: NonceCache | None = None,
        clock: Callable[[], float] = time.time,
    ):
        self.db = db
        self.on_revoked = on_revoked
        self.max_skew_s = max_skew_s
        self.nonces = nonces or NonceCache(2 * max_skew_s)
        self.clock = clock
        self._lock = threading.Lock()
        self._seen_version: int | None = None
        self._revoked: set[str] = set()

    def verify(
        self,
        metadata: Sequence[tuple[str, str | bytes]],
        method: str,
        message: Message,
        site_id: str,
    ) -> SiteRow:
        """The row of the enrolled site that signed this call of ``method`` (``message``:
        the request, or a client stream's first message); raises :class:`AuthError`."""
        now = self.clock()
        signature = self.check(metadata, method, message, site_id, None, now)
        row = self.db.site(site_id)
        if row is not None and row.status == "revoked":
            self.on_revoked(site_id)
            raise AuthError("revoked", f"site {site_id!r} was revoked by the operator")
        if row is None or row.status != "enrolled" or row.public_key is None:
            raise AuthError("unknown_site", f"site {site_id!r} is not enrolled")
        self._check_signature(row.public_key, signature, method, message)
        self.nonces.add(site_id, signature.nonce, now)
        return row

    def check(
        self,
        metadata: Sequence[tuple[str, str | bytes]],
        method: str,
        message: Message,
        site_id: str,
        public_key: bytes | None,
        now: float | None = None,
    ) -> RequestSignature:
        """The call's signature, checked for form, site, freshness and (when
        ``public_key`` is given) validity under that key; nonces are not recorded."""
        now = self.clock() if now is None else now
        self.sync()
        try:
            signature = RequestSignature.from_metadata(metadata)
        except ValueError as exc:
            raise AuthError("unsigned", f"the request carries no valid signature ({exc})") from None
        if signature.site_id != site_id:
            raise AuthError(
                "site_mismatch",
                f"signed as site {signature.site_id!r} but the request names {site_id[:64]!r}",
            )
        skew = signature.timestamp_ms / 1000 - now
        if abs(skew) > self.max_skew_s:
            raise AuthError(
                "stale_timestamp",
                f"request time is {skew:+.0f}s from the coordinator's clock (limit "
                f"{self.max_skew_s:.0f}s); check the site's clock",
            )
        if public_key is not None:
            self._check_signature(public_key, signature, method, message)
        return signature

    def remember(self, signature: RequestSignature, now: float | None = None) -> None:
        """Record a checked call's nonce (raises ``replayed_nonce`` if seen before)."""
        self.nonces.add(signature.site_id, signature.nonce, self.clock() if now is None else now)

    @staticmethod
    def _check_signature(
        public_key: bytes, signature: RequestSignature, method: str, message: Message
    ) -> None:
        data = signed_bytes(
            method, message_digest(message), signature.timestamp_ms, signature.nonce,
            signature.site_id,
        )  # fmt: skip
        try:
            Ed25519PublicKey.from_public_bytes(public_key).verify(signature.signature, data)
        except (InvalidSignature, ValueError):
            raise AuthError(
                "bad_signature",
                f"the signature does not verify under site {signature.site_id!r}'s key",
            ) from None

    def reinstate(self, site_id: str) -> None:
        """A revoked site enrolled again: a later revocation counts as new."""
        with self._lock:
            self._revoked.discard(site_id)

    def sync(self) -> None:
        """Pass on revocations another process committed (cheap when nothing changed)."""
        with self._lock:
            version = self.db.data_version()
            if version == self._seen_version:
                return
            self._seen_version = version
            revoked = self.db.revoked_sites()
            fresh, self._revoked = revoked - self._revoked, revoked
        for site_id in sorted(fresh):
            log.info("site %s is revoked: refusing its requests", site_id)
            self.on_revoked(site_id)
