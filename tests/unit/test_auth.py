"""Site identity: the signed bytes, the verifier's decisions, enrollment tokens and the
bounded nonce memory."""

from __future__ import annotations

import hashlib
import os
import stat
import threading

import grpc
import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from client_sdk.errors import SiteError
from client_sdk.identity import SiteIdentity
from coordinator import enrollment
from coordinator.auth import AuthError, NonceCache, RequestVerifier, check_public_key
from coordinator.dispatch import Assignment, Dispatcher, RoundCollector
from coordinator.state import Database
from protos.fedcoord.v1 import fleet_pb2
from protos.signing import (
    RequestSignature,
    fleet_method,
    key_fingerprint,
    message_digest,
    signed_bytes,
)
from strategies.accumulator import WeightedDeltaMean
from strategies.validation import UpdateLimits

NOW = 1_800_000_000.0
PULL = fleet_method("PullTask")


@pytest.fixture
def db(tmp_path):
    database = Database(tmp_path / "data")
    yield database
    database.close()


def enrolled(db: Database, site_id: str) -> SiteIdentity:
    """A site enrolled with a fresh key through a token."""
    identity = SiteIdentity.generate()
    invitation = enrollment.invite(db, site_id, now=NOW)
    how = enrollment.enroll(
        db, site_id, identity.public_key, invitation.token, {}, open_enrollment=False, now=NOW
    )
    assert how == enrollment.BY_TOKEN
    return identity


def reason(excinfo: pytest.ExceptionInfo[AuthError]) -> str:
    return excinfo.value.reason


# the signed bytes ----------------------------------------------------------------------
def test_signed_bytes_have_the_documented_form():
    digest = hashlib.sha256(b"body").hexdigest()
    nonce = "00112233445566778899aabbccddeeff"
    data = signed_bytes(PULL, digest, 1_700_000_000_123, nonce, "hospital-1")
    assert data == (
        b"fedcoord-request-v1\n/fedcoord.v1.Fleet/PullTask\n" + digest.encode()
        + b"\n1700000000123\n" + nonce.encode() + b"\nhospital-1"
    )  # fmt: skip


@pytest.mark.parametrize(
    "field, value",
    [
        ("site_id", "hospital-1\nx"),  # a newline would make the encoding ambiguous
        ("site_id", "../etc"),
        ("nonce", "00112233445566778899AABBCCDDEEFF"),
        ("nonce", "0011"),
        ("digest", "ab"),
        ("method", "PullTask"),
    ],
)
def test_signed_bytes_refuse_malformed_fields(field, value):
    fields = {
        "method": PULL,
        "digest": "0" * 64,
        "timestamp_ms": 1,
        "nonce": "0" * 32,
        "site_id": "s",
    }
    fields[field] = value
    with pytest.raises(ValueError):
        signed_bytes(**fields)


def test_the_body_digest_does_not_depend_on_map_order():
    a = fleet_pb2.EnrollRequest(site_id="s", properties={"a": "1", "b": "2", "c": "3"})
    b = fleet_pb2.EnrollRequest(site_id="s", properties={"c": "3", "a": "1", "b": "2"})
    assert message_digest(a) == message_digest(b)
    assert message_digest(a) != message_digest(fleet_pb2.EnrollRequest(site_id="s"))


def test_signature_metadata_round_trips_and_malformed_metadata_is_refused():
    identity = SiteIdentity.generate()
    metadata = identity.sign(PULL, fleet_pb2.PullTaskRequest(site_id="s"), "s", now=NOW)
    parsed = RequestSignature.from_metadata(metadata)
    assert parsed.metadata() == metadata and parsed.timestamp_ms == int(NOW * 1000)
    assert len(bytes.fromhex(parsed.nonce)) == 16 and len(parsed.signature) == 64
    with pytest.raises(ValueError, match="missing x-fedcoord-nonce"):
        RequestSignature.from_metadata([m for m in metadata if m[0] != "x-fedcoord-nonce"])
    with pytest.raises(ValueError, match="more than once"):
        RequestSignature.from_metadata([*metadata, metadata[0]])
    bad = [(k, v + "\n") if k == "x-fedcoord-timestamp" else (k, v) for k, v in metadata]
    with pytest.raises(ValueError, match="malformed"):
        RequestSignature.from_metadata(bad)


# public keys ---------------------------------------------------------------------------
def low_order_encodings() -> list[bytes]:
    p = 2**255 - 19
    return [
        (1).to_bytes(32, "little"),  # the identity point
        bytes(32),  # (sqrt(-1), 0): order 4
        (p - 1).to_bytes(32, "little"),  # (0, -1): order 2
        (1 | 1 << 255).to_bytes(32, "little"),  # the identity with a sign bit: non-canonical
    ]


def test_real_keys_are_accepted_and_low_order_or_invalid_ones_refused():
    for _ in range(20):
        raw = Ed25519PrivateKey.generate().public_key().public_bytes_raw()
        assert check_public_key(raw).public_bytes_raw() == raw
    for raw in low_order_encodings():
        with pytest.raises(ValueError):
            check_public_key(raw)
    with pytest.raises(ValueError, match="32 raw bytes"):
        check_public_key(b"\x01" * 31)
    with pytest.raises(ValueError, match="non-canonical"):
        check_public_key(b"\xff" * 31 + b"\x7f")  # y >= p
    off_curve = next(
        y.to_bytes(32, "little") for y in range(2, 100) if not on_curve(y.to_bytes(32, "little"))
    )
    with pytest.raises(ValueError, match="not a point"):
        check_public_key(off_curve)


def on_curve(raw: bytes) -> bool:
    try:
        check_public_key(raw)
    except ValueError as exc:
        return "not a point" not in str(exc)
    return True


# the verifier's decisions --------------------------------------------------------------
def make_verifier(db: Database, now: list[float], revoked: list[str]) -> RequestVerifier:
    return RequestVerifier(db, on_revoked=revoked.append, clock=lambda: now[0])


def test_a_fresh_signed_request_is_accepted_once(db):
    identity = enrolled(db, "s1")
    verifier = make_verifier(db, [NOW + 1], [])
    request = fleet_pb2.PullTaskRequest(site_id="s1", wait_s=5)
    metadata = identity.sign(PULL, request, "s1", now=NOW)
    assert verifier.verify(metadata, PULL, request, "s1").public_key == identity.public_key
    with pytest.raises(AuthError) as info:
        verifier.verify(metadata, PULL, request, "s1")
    assert reason(info) == "replayed_nonce"


@pytest.mark.parametrize("offset", [-61.0, 61.0])
def test_stale_and_future_timestamps_are_refused(db, offset):
    identity = enrolled(db, "s1")
    verifier = make_verifier(db, [NOW], [])
    request = fleet_pb2.HeartbeatRequest(site_id="s1")
    metadata = identity.sign(fleet_method("Heartbeat"), request, "s1", now=NOW + offset)
    with pytest.raises(AuthError) as info:
        verifier.verify(metadata, fleet_method("Heartbeat"), request, "s1")
    assert reason(info) == "stale_timestamp" and info.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert len(verifier.nonces) == 0  # nothing recorded for a refused request


def test_forged_tampered_and_misdirected_signatures_are_refused(db):
    identity = enrolled(db, "s1")
    enrolled(db, "s2")
    verifier = make_verifier(db, [NOW], [])
    request = fleet_pb2.PullTaskRequest(site_id="s1")
    other_key = SiteIdentity.generate().sign(PULL, request, "s1", now=NOW)
    tampered = fleet_pb2.PullTaskRequest(site_id="s1", cached_model_digest="x")
    cases = [
        (other_key, PULL, request, "s1", "bad_signature"),  # another key
        (identity.sign(PULL, request, "s1", now=NOW), PULL, tampered, "s1", "bad_signature"),
        (
            identity.sign(PULL, request, "s1", now=NOW),
            fleet_method("Heartbeat"),  # a signature of one method replayed on another
            request,
            "s1",
            "bad_signature",
        ),
        (identity.sign(PULL, request, "s1", now=NOW), PULL, request, "s2", "site_mismatch"),
        ([], PULL, request, "s1", "unsigned"),
    ]
    for metadata, method, message, site, expected in cases:
        with pytest.raises(AuthError) as info:
            verifier.verify(metadata, method, message, site)
        assert reason(info) == expected
    assert len(verifier.nonces) == 0


def test_unknown_pending_and_revoked_sites_are_refused(db):
    verifier_revoked: list[str] = []
    verifier = make_verifier(db, [NOW], verifier_revoked)
    stranger = SiteIdentity.generate()
    request = fleet_pb2.PullTaskRequest(site_id="x")
    enrollment.invite(db, "pending-site", now=NOW)
    for site in ("x", "pending-site"):
        request = fleet_pb2.PullTaskRequest(site_id=site)
        with pytest.raises(AuthError) as info:
            verifier.verify(stranger.sign(PULL, request, site, now=NOW), PULL, request, site)
        assert reason(info) == "unknown_site"
    identity = enrolled(db, "s1")
    enrollment.revoke(db, "s1", now=NOW)
    request = fleet_pb2.PullTaskRequest(site_id="s1")
    with pytest.raises(AuthError) as info:
        verifier.verify(identity.sign(PULL, request, "s1", now=NOW), PULL, request, "s1")
    assert reason(info) == "revoked" and "s1" in verifier_revoked


def test_a_revocation_by_another_process_reaches_the_verifier(db):
    """``fedcoord sites revoke --data-dir`` while the coordinator runs: its next request
    of any site passes the revocation on (the dispatcher then fails the open task)."""
    enrolled(db, "victim")
    honest = enrolled(db, "honest")
    seen: list[str] = []
    verifier = make_verifier(db, [NOW], seen)
    request = fleet_pb2.HeartbeatRequest(site_id="honest")
    heartbeat = fleet_method("Heartbeat")

    def beat() -> None:
        metadata = honest.sign(heartbeat, request, "honest", now=NOW)
        verifier.verify(metadata, heartbeat, request, "honest")

    beat()
    other = Database(db.data_dir)  # the CLI's own connection
    enrollment.revoke(other, "victim")
    other.close()
    assert seen == []
    beat()
    assert seen == ["victim"]


# tokens --------------------------------------------------------------------------------
def test_tokens_are_random_stored_as_hashes_and_used_once(db):
    first = enrollment.invite(db, "s1", now=NOW)
    again = enrollment.invite(db, "s2", now=NOW)
    assert first.token != again.token and len(first.token) >= 43  # 32 bytes, base64url
    row = db.site("s1")
    assert row is not None and row.status == "pending" and row.public_key is None
    assert row.token_hash == enrollment.hash_token(first.token) != first.token
    stored = (db.data_dir / "ledger.db").read_bytes() + b"".join(
        p.read_bytes() for p in db.data_dir.glob("ledger.db-*")
    )
    assert first.token.encode() not in stored
    key, thief = SiteIdentity.generate(), SiteIdentity.generate()

    def enroll(identity: SiteIdentity, token: str) -> str:
        return enrollment.enroll(
            db, "s1", identity.public_key, token, {}, open_enrollment=False, now=NOW + 1
        )

    assert enroll(key, first.token) == enrollment.BY_TOKEN
    row = db.site("s1")
    assert row is not None and row.status == "enrolled" and row.token_hash is None
    assert enroll(key, first.token) == enrollment.ALREADY_ENROLLED  # same key: idempotent
    assert enroll(key, "") == enrollment.ALREADY_ENROLLED  # e.g. after a restart
    with pytest.raises(AuthError) as info:
        enroll(thief, first.token)  # a used token enrolls no other key
    assert reason(info) == "key_mismatch"
    with pytest.raises(AuthError) as info:
        enrollment.enroll(db, "s2", thief.public_key, "x" * 43, {}, open_enrollment=False)
    assert reason(info) == "invalid_token"
    with pytest.raises(AuthError) as info:
        enrollment.enroll(db, "s2", thief.public_key, first.token, {}, open_enrollment=False)
    assert reason(info) == "invalid_token"  # a token is bound to its site


def test_tokens_expire_and_a_new_token_replaces_the_old_one(db):
    old = enrollment.invite(db, "s1", ttl_s=60, now=NOW)
    key = SiteIdentity.generate().public_key
    with pytest.raises(AuthError) as info:
        enrollment.enroll(db, "s1", key, old.token, {}, open_enrollment=False, now=NOW + 61)
    assert reason(info) == "expired_token"
    new = enrollment.invite(db, "s1", now=NOW + 62)
    with pytest.raises(AuthError) as info:
        enrollment.enroll(db, "s1", key, old.token, {}, open_enrollment=False, now=NOW + 63)
    assert reason(info) == "invalid_token"
    how = enrollment.enroll(db, "s1", key, new.token, {}, open_enrollment=False, now=NOW + 63)
    assert how == enrollment.BY_TOKEN
    with pytest.raises(ValueError):
        enrollment.check_ttl(0)
    with pytest.raises(ValueError):
        enrollment.check_ttl(400 * 86400)


def test_rekeying_needs_a_new_token_and_revocation_holds_even_under_open_enrollment(db):
    first = enrolled(db, "s1")
    second = SiteIdentity.generate()
    with pytest.raises(AuthError) as info:
        enrollment.enroll(db, "s1", second.public_key, "", {}, open_enrollment=False)
    assert reason(info) == "key_mismatch"
    token = enrollment.invite(db, "s1").token
    how = enrollment.enroll(db, "s1", second.public_key, token, {}, open_enrollment=False)
    assert how == enrollment.BY_TOKEN
    row = db.site("s1")
    assert row is not None and row.public_key == second.public_key != first.public_key
    enrollment.revoke(db, "s1")
    for open_enrollment in (False, True):
        with pytest.raises(AuthError) as info:
            enrollment.enroll(db, "s1", second.public_key, "", {}, open_enrollment=open_enrollment)
        assert reason(info) == "revoked"
    token = enrollment.invite(db, "s1").token  # the operator lets it back in, explicitly
    assert enrollment.enroll(db, "s1", first.public_key, token, {}, open_enrollment=False)


def test_open_enrollment_lets_a_restarted_site_join_with_a_new_key(db):
    """The quick path keeps no site state: a site restarted without its key joins again
    (open enrollment is for local experiments), and the ledger says which key it replaced."""
    first = enrolled(db, "s1")
    second = SiteIdentity.generate()
    how = enrollment.enroll(db, "s1", second.public_key, "", {}, open_enrollment=True)
    assert how == enrollment.OPEN and db.site("s1").public_key == second.public_key
    last = [e.payload for e in db.ledger_entries() if e.kind == "site_enrolled"][-1]
    assert last["replaces"] == key_fingerprint(first.public_key)


def test_open_enrollment_registers_the_first_key_of_any_name(db):
    key = SiteIdentity.generate().public_key
    assert enrollment.enroll(db, "new", key, "", {}, open_enrollment=True) == enrollment.OPEN
    assert enrollment.enroll(db, "new", key, "", {}, open_enrollment=True) == "already_enrolled"
    with pytest.raises(AuthError) as info:
        enrollment.enroll(db, "other", key, "", {}, open_enrollment=False)
    assert reason(info) == "invalid_token"


def test_registry_changes_are_ledger_entries_that_verify(db):
    identity = enrolled(db, "s1")
    _, changed = enrollment.revoke(db, "s1")
    assert changed and not enrollment.revoke(db, "s1")[1]
    kinds = [(e.kind, e.payload) for e in db.ledger_entries()]
    assert [k for k, _ in kinds] == ["site_invited", "site_enrolled", "site_revoked"]
    fp = key_fingerprint(identity.public_key)
    assert kinds[1][1] == {
        "site_id": "s1", "public_key_fingerprint": fp, "via": "token", "replaces": None,
    }  # fmt: skip
    assert kinds[2][1] == {
        "site_id": "s1", "public_key_fingerprint": fp, "previous_status": "enrolled",
    }  # fmt: skip
    assert db.verify_ledger() == 3


# bounded nonce memory ------------------------------------------------------------------
def test_nonce_memory_is_bounded_per_site_and_in_all():
    cache = NonceCache(keep_s=120, max_per_site=3, max_total=5)
    for i in range(3):
        cache.add("a", f"{i:032x}", NOW)
    with pytest.raises(AuthError) as info:
        cache.add("a", f"{9:032x}", NOW)
    assert reason(info) == "too_many_requests"
    assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    cache.add("b", f"{0:032x}", NOW)  # a nonce is per site
    cache.add("b", f"{1:032x}", NOW)
    with pytest.raises(AuthError):
        cache.add("c", f"{0:032x}", NOW)  # the total bound
    assert len(cache) == 5
    with pytest.raises(AuthError) as info:
        cache.add("a", f"{0:032x}", NOW + 119)
    assert reason(info) == "replayed_nonce"
    cache.add("a", f"{0:032x}", NOW + 120)  # forgotten after keep_s: old timestamps are stale
    assert len(cache) == 1


def test_the_verifier_keeps_nonces_for_twice_the_skew_window(db):
    verifier = RequestVerifier(db)
    assert verifier.nonces.keep_s == 2 * verifier.max_skew_s == 120


# the site's key file -------------------------------------------------------------------
def test_the_site_key_file_is_private_and_reloads(tmp_path):
    path = tmp_path / "state" / "s1.ed25519.pem"
    first = SiteIdentity.load_or_create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert SiteIdentity.load_or_create(path).public_key == first.public_key
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp files left
    os.chmod(path, 0o644)
    with pytest.raises(SiteError, match="chmod 600"):
        SiteIdentity.load_or_create(path)
    os.chmod(path, 0o600)
    path.write_text("not a key")
    with pytest.raises(SiteError, match="not a PEM private key"):
        SiteIdentity.load_or_create(path)


# revocation in the dispatcher ----------------------------------------------------------
def test_revoking_fails_the_open_assignment_and_takes_the_site_offline():
    reference = {"w": np.zeros(3, np.float32)}
    collector = RoundCollector(
        {"s1", "s2"}, reference, WeightedDeltaMean(reference), UpdateLimits()
    )
    dispatcher = Dispatcher()

    def assignment(site: str) -> Assignment:
        return Assignment(f"t-{site}", site, "run", 1, fleet_pb2.TASK_KIND_FIT, "{}", None,
                          NOW, collector)  # fmt: skip

    dispatcher.post([assignment("s1")])
    dispatcher.touch("s1")
    dispatcher.revoke("s1")
    assert collector.outcomes["s1"].status == "failed"
    assert collector.outcomes["s1"].reason == "revoked"
    assert dispatcher.lookup("t-s1", "s1") is None and dispatcher.take("s1", 0.0) is None
    dispatcher.touch("s1")
    assert "s1" not in dispatcher.online()
    dispatcher.post([assignment("s1")])  # sampled before the revocation reached the engine
    assert dispatcher.take("s1", 0.0) is None
    dispatcher.reinstate("s1")
    dispatcher.touch("s1")
    assert dispatcher.online() == ["s1"]


def test_a_long_poll_ends_when_its_site_is_revoked():
    dispatcher = Dispatcher()
    result: list[object] = []
    poll = threading.Thread(target=lambda: result.append(dispatcher.take("s1", 10.0)))
    poll.start()
    dispatcher.revoke("s1")
    poll.join(timeout=5)
    assert not poll.is_alive() and result == [None]
