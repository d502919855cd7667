"""The site registry's rules: invitations (one-time tokens), enrollment and revocation.

``invite`` issues a random token (32 bytes from :mod:`secrets`, URL-safe base64) that is
shown once and stored only as its SHA-256 hash, with an expiry. ``enroll`` records the
site's Ed25519 public key against a valid unused token (or, under open enrollment, on
first contact) and burns the token; the same key presenting again is simply "already
enrolled". ``revoke`` ends a site's access. Each change and its ledger entry
(``site_invited``, ``site_enrolled``, ``site_revoked``) commit in one short transaction,
so these work on the data directory while a coordinator runs.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass, replace

from coordinator import ledger
from coordinator.auth import AuthError
from coordinator.errors import UnknownSite
from coordinator.state import Database, SiteRow
from protos.signing import SITE_ID, SITE_ID_RULE, key_fingerprint

TOKEN_BYTES = 32
DEFAULT_TTL_S = 7 * 86400.0
MAX_TTL_S = 365 * 86400.0
ALREADY_ENROLLED, BY_TOKEN, OPEN = "already_enrolled", "token", "open_enrollment"


def check_site_id(site_id: str) -> str:
    if not SITE_ID.match(site_id):
        raise ValueError(f"a site id is {SITE_ID_RULE}, got {site_id[:80]!r}")
    return site_id


def check_ttl(ttl_s: float) -> float:
    if not 0 < ttl_s <= MAX_TTL_S:
        raise ValueError(f"must be more than 0 and at most {MAX_TTL_S / 86400:.0f} days")
    return float(ttl_s)


def hash_token(token: str) -> str:
    """How a token is stored: ``sha256:<hex>`` of its UTF-8 bytes (it has 256 bits of
    entropy, so a fast hash is enough)."""
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class Invitation:
    site_id: str
    token: str
    """Shown once: only its hash is stored."""
    expires: float
    status: str
    """The site's status after the invitation (``pending`` unless enrolled or revoked:
    then the token lets it enroll a new key)."""


def invite(
    db: Database, site_id: str, ttl_s: float = DEFAULT_TTL_S, now: float | None = None
) -> Invitation:
    """Issue a new token for ``site_id``, replacing any outstanding one."""
    check_site_id(site_id)
    check_ttl(ttl_s)
    now = time.time() if now is None else now
    token = secrets.token_urlsafe(TOKEN_BYTES)
    expires = now + ttl_s
    with db.transaction() as c:
        row = db.read_site(c, site_id) or SiteRow(site_id, "pending", 0.0, None, {})
        row = replace(row, invited=now, token_hash=hash_token(token), token_expires=expires)
        db.write_site(c, row)
        ledger.append(c, db.signing_key, "site_invited", {
            "site_id": site_id, "status": row.status, "expires": round(expires, 3),
        })  # fmt: skip
    return Invitation(site_id, token, expires, row.status)


def revoke(db: Database, site_id: str, now: float | None = None) -> tuple[SiteRow, bool]:
    """Revoke the site and burn any outstanding token; its row and whether it changed
    (a revoked site stays revoked). Raises :class:`UnknownSite`."""
    now = time.time() if now is None else now
    with db.transaction() as c:
        row = db.read_site(c, site_id)
        if row is None:
            raise UnknownSite(f"no site {site_id[:80]!r} (fedcoord sites list shows them)")
        if row.status == "revoked":
            return row, False
        new = replace(row, status="revoked", revoked=now, token_hash=None, token_expires=None)
        db.write_site(c, new)
        ledger.append(c, db.signing_key, "site_revoked", {
            "site_id": site_id, "previous_status": row.status,
            "public_key_fingerprint": (
                None if row.public_key is None else key_fingerprint(row.public_key)
            ),
        })  # fmt: skip
    return new, True


def decide_enrollment(
    row: SiteRow | None, public_key: bytes, token: str, now: float, open_enrollment: bool
) -> str:
    """How an ``Enroll`` presenting ``public_key`` (and ``token``) is admitted:
    ``already_enrolled``, ``token`` or ``open_enrollment``; raises :class:`AuthError`."""
    site = repr(row.site_id) if row is not None else "this site"
    if row is not None and row.status == "enrolled" and row.public_key == public_key:
        return ALREADY_ENROLLED
    matches = (
        bool(token)
        and row is not None
        and row.token_hash is not None
        and hmac.compare_digest(row.token_hash, hash_token(token))
    )
    if matches:
        assert row is not None
        if row.token_expires is not None and now < row.token_expires:
            return BY_TOKEN
        if not open_enrollment:
            raise AuthError(
                "expired_token",
                f"the enrollment token of site {site} has expired; ask the operator for a "
                "new one (fedcoord sites add)",
            )
    if row is not None and row.status == "revoked":
        raise AuthError("revoked", f"site {site} was revoked by the operator")
    if open_enrollment:  # any site may join, also with a new key (local experiments only)
        return OPEN
    if row is not None and row.status == "enrolled" and row.public_key is not None:
        raise AuthError(
            "key_mismatch",
            f"site {site} is enrolled with another key; enrolling a new key needs a new "
            "token (fedcoord sites add)",
        )
    raise AuthError(
        "invalid_token",
        "no valid enrollment token for this site (wrong, already used or never issued; "
        "the operator issues a new one with fedcoord sites add)"
        if token
        else "enrollment needs a one-time token (the operator issues one with fedcoord "
        "sites add; the site passes it with --token)",
    )


def enroll(
    db: Database,
    site_id: str,
    public_key: bytes,
    token: str,
    properties: dict[str, str],
    *,
    open_enrollment: bool,
    now: float | None = None,
) -> str:
    """Admit the site with ``public_key`` (checked beforehand) or raise
    :class:`AuthError`; the decision of :func:`decide_enrollment`. A new key burns the
    token and appends ``site_enrolled`` in the same transaction."""
    now = time.time() if now is None else now
    with db.transaction() as c:
        row = db.read_site(c, site_id)
        how = decide_enrollment(row, public_key, token, now, open_enrollment)
        if how == ALREADY_ENROLLED:
            return how
        previous = None if row is None or row.public_key is None else row.public_key
        db.write_site(c, SiteRow(
            site_id, "enrolled", now, public_key, properties,
            invited=None if row is None else row.invited,
        ))  # fmt: skip
        ledger.append(c, db.signing_key, "site_enrolled", {
            "site_id": site_id, "public_key_fingerprint": key_fingerprint(public_key), "via": how,
            "replaces": None if previous is None else key_fingerprint(previous),
        })  # fmt: skip
    return how
