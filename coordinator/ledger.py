"""The append-only, hash-chained, signed round ledger (stored in ``ledger.db``).

Each entry's ``hash`` is SHA-256 over the canonical JSON of its ``seq``, ``kind``,
``payload`` and ``prev_hash``; the coordinator signs the hash with its Ed25519 key.
Entries are appended inside the caller's SQLite transaction, so an entry commits
together with the state it describes.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from coordinator.errors import LedgerError
from protos.canonical import canonical_json, sha256_hex

GENESIS = "0" * 64
KINDS = frozenset(
    {
        "run_started", "site_enrolled", "site_revoked", "round_committed", "drift_alert",
        "budget_exhausted", "model_promoted", "promotion_refused", "run_finished",
        "round_aborted", "site_invited",
    }
)  # fmt: skip


@dataclass(frozen=True)
class Entry:
    seq: int
    kind: str
    payload: dict[str, Any]
    prev_hash: str
    hash: str
    signature: str

    def as_json(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "kind": self.kind,
            "payload": self.payload,
            "prev_hash": self.prev_hash,
            "hash": self.hash,
            "signature": self.signature,
        }


def entry_hash(seq: int, kind: str, payload: dict[str, Any], prev_hash: str) -> str:
    return sha256_hex(
        canonical_json({"seq": seq, "kind": kind, "payload": payload, "prev_hash": prev_hash})
    )


def append(
    conn: sqlite3.Connection, key: Ed25519PrivateKey, kind: str, payload: dict[str, Any]
) -> Entry:
    """Append an entry; call inside an open transaction of ``conn``."""
    if kind not in KINDS:
        raise ValueError(f"unknown ledger entry kind {kind!r}")
    row = conn.execute("SELECT seq, hash FROM ledger ORDER BY seq DESC LIMIT 1").fetchone()
    seq, prev = (row[0] + 1, row[1]) if row else (1, GENESIS)
    h = entry_hash(seq, kind, payload, prev)
    sig = key.sign(bytes.fromhex(h)).hex()
    conn.execute(
        "INSERT INTO ledger(seq, kind, payload, prev_hash, hash, signature) VALUES (?,?,?,?,?,?)",
        (seq, kind, canonical_json(payload), prev, h, sig),
    )
    return Entry(seq, kind, payload, prev, h, sig)


def _rows(conn: sqlite3.Connection) -> Iterator[tuple[int, str, str, str, str, str]]:
    yield from conn.execute(
        "SELECT seq, kind, payload, prev_hash, hash, signature FROM ledger ORDER BY seq"
    )


def entries(conn: sqlite3.Connection) -> Iterator[Entry]:
    for seq, kind, payload, prev, h, sig in _rows(conn):
        yield Entry(seq, kind, json.loads(payload), prev, h, sig)


def head(conn: sqlite3.Connection) -> str:
    row = conn.execute("SELECT hash FROM ledger ORDER BY seq DESC LIMIT 1").fetchone()
    return row[0] if row else GENESIS


def verify_chain(conn: sqlite3.Connection, public_key: Ed25519PublicKey) -> int:
    """Re-check sequence, hashes, links and signatures; returns the number of entries.

    Raises
    ------
    LedgerError
        Naming the first entry that does not verify.
    """
    prev = GENESIS
    count = 0
    for expected_seq, (seq, kind, text, prev_hash, h, sig) in enumerate(_rows(conn), start=1):
        where = f"ledger entry {seq} ({kind})"
        try:
            payload = json.loads(text)
        except ValueError:
            raise LedgerError(f"{where}: payload is not valid JSON (entry edited)") from None
        if canonical_json(payload) != text:
            raise LedgerError(f"{where}: payload is not in canonical form (entry edited)")
        entry = Entry(seq, kind, payload, prev_hash, h, sig)
        if entry.seq != expected_seq:
            raise LedgerError(f"{where}: expected seq {expected_seq} (entry removed or reordered)")
        if entry.prev_hash != prev:
            raise LedgerError(f"{where}: prev_hash does not match the previous entry's hash")
        if entry_hash(entry.seq, entry.kind, entry.payload, entry.prev_hash) != entry.hash:
            raise LedgerError(f"{where}: hash does not match its content (entry edited)")
        try:
            public_key.verify(bytes.fromhex(entry.signature), bytes.fromhex(entry.hash))
        except (InvalidSignature, ValueError):
            raise LedgerError(f"{where}: bad coordinator signature") from None
        prev = entry.hash
        count += 1
    return count
