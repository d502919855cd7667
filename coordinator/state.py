"""The coordinator's durable state: ``<data-dir>/ledger.db`` (SQLite, WAL) plus models.

One connection, guarded by a lock, serves all threads; writes happen in short explicit
transactions with ``synchronous=FULL`` so a committed round survives ``kill -9`` and
power loss. A round commits atomically: its model file is fsynced first, then the round
row, the run's progress and the ledger entry go in one transaction.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coordinator import ledger
from coordinator.faults import crash_point
from coordinator.keys import load_or_create_signing_key
from coordinator.model_store import ModelStore

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs(
    run_id TEXT PRIMARY KEY, name TEXT NOT NULL, experiment TEXT NOT NULL,
    config_digest TEXT NOT NULL, status TEXT NOT NULL, rounds_total INTEGER NOT NULL,
    rounds_completed INTEGER NOT NULL DEFAULT 0, model_digest TEXT,
    created REAL NOT NULL, updated REAL NOT NULL, summary TEXT, error TEXT);
CREATE TABLE IF NOT EXISTS rounds(
    run_id TEXT NOT NULL, round INTEGER NOT NULL, model_digest TEXT NOT NULL,
    parent_digest TEXT NOT NULL, metrics TEXT NOT NULL, participants TEXT NOT NULL,
    rng_state TEXT NOT NULL, strategy_state TEXT, ledger_seq INTEGER NOT NULL,
    committed REAL NOT NULL, privacy_state TEXT,
    PRIMARY KEY(run_id, round));
CREATE TABLE IF NOT EXISTS sites(
    site_id TEXT PRIMARY KEY, status TEXT NOT NULL, enrolled REAL NOT NULL,
    public_key BLOB, properties TEXT NOT NULL DEFAULT '{}');
CREATE TABLE IF NOT EXISTS ledger(
    seq INTEGER PRIMARY KEY, kind TEXT NOT NULL, payload TEXT NOT NULL,
    prev_hash TEXT NOT NULL, hash TEXT NOT NULL, signature TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS events(
    run_id TEXT NOT NULL, seq INTEGER NOT NULL, kind TEXT NOT NULL, message TEXT NOT NULL,
    data TEXT NOT NULL, time REAL NOT NULL, PRIMARY KEY(run_id, seq));
"""

RUN_ACTIVE = ("queued", "running")

ADDED_COLUMNS = {
    "rounds": {"privacy_state": "TEXT"},
    "sites": {"invited": "REAL", "token_hash": "TEXT", "token_expires": "REAL", "revoked": "REAL"},
}
"""Columns newer than some data directories: added on open when missing."""


@dataclass(frozen=True)
class RunRow:
    run_id: str
    name: str
    experiment: str
    config_digest: str
    status: str
    rounds_total: int
    rounds_completed: int
    model_digest: str | None
    summary: str | None
    error: str | None


@dataclass(frozen=True)
class RoundRecord:
    """What a committed round leaves for a resume: its model, the sampling RNG state,
    the strategy state (a digest in the model store) and the privacy state (JSON)."""

    round: int
    model_digest: str
    parent_digest: str
    metrics: dict[str, Any]
    participants: list[str]
    rng_state: dict[str, Any]
    strategy_state: str | None = None
    privacy_state: dict[str, Any] | None = None


@dataclass(frozen=True)
class SiteRow:
    """One row of ``sites``: status ``pending`` (invited, no key yet), ``enrolled`` or
    ``revoked``; ``enrolled`` is the time of the last enrollment (0 while pending), and
    an outstanding enrollment token is kept only as its hash."""

    site_id: str
    status: str
    enrolled: float
    public_key: bytes | None
    properties: dict[str, str]
    invited: float | None = None
    token_hash: str | None = None
    token_expires: float | None = None
    revoked: float | None = None


_SITE_COLUMNS = (
    "site_id, status, enrolled, public_key, properties, invited, token_hash, token_expires, revoked"
)


def _site_row(row: tuple[Any, ...]) -> SiteRow:
    site_id, status, enrolled, key, properties, *rest = row
    return SiteRow(
        site_id,
        status,
        enrolled,
        None if key is None else bytes(key),
        json.loads(properties),
        *rest,
    )


_RUN_COLUMNS = (
    "run_id, name, experiment, config_digest, status, rounds_total, rounds_completed, "
    "model_digest, summary, error"
)


class Database:
    """``ledger.db`` of one data directory, its signing key and its model store."""

    def __init__(self, data_dir: Path):
        self.data_dir = data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        self.models = ModelStore(data_dir / "models")
        self.signing_key = load_or_create_signing_key(data_dir)
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(
            data_dir / "ledger.db", check_same_thread=False, isolation_level=None
        )
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute("PRAGMA foreign_keys=ON")
        self._conn.executescript(SCHEMA)
        self._add_missing_columns()
        # the fleet's hot reads (site rows, revocations, receipts) go through a second
        # connection: under WAL it reads the last commit while the writer's COMMIT waits
        # for its fsync, so a slow disk stalls the round's commit, not every site's RPC
        self._read_lock = threading.Lock()
        self._reader = sqlite3.connect(
            data_dir / "ledger.db", check_same_thread=False, isolation_level=None
        )
        self._reader.execute("PRAGMA query_only=ON")

    def _add_missing_columns(self) -> None:
        for table, columns in ADDED_COLUMNS.items():
            have = {row[1] for row in self._conn.execute(f"PRAGMA table_info({table})")}
            for name, kind in columns.items():
                if name not in have:
                    self._conn.execute(f"ALTER TABLE {table} ADD COLUMN {name} {kind}")

    def close(self) -> None:
        with self._lock, self._read_lock:
            self._reader.close()
            self._conn.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """An exclusive write transaction; commits on success, rolls back on error."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    def read(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """A query on the reader connection: what was committed last, never waiting
        for a write in progress (nor seeing one)."""
        with self._read_lock:
            return self._reader.execute(sql, params).fetchall()

    # runs ------------------------------------------------------------------------
    def create_run(
        self, run_id: str, name: str, experiment: str, config_digest: str, rounds_total: int
    ) -> None:
        now = time.time()
        with self.transaction() as c:
            c.execute(
                "INSERT INTO runs(run_id, name, experiment, config_digest, status, rounds_total,"
                " created, updated) VALUES (?,?,?,?,?,?,?,?)",
                (run_id, name, experiment, config_digest, "queued", rounds_total, now, now),
            )

    def run(self, run_id: str) -> RunRow | None:
        rows = self.query(f"SELECT {_RUN_COLUMNS} FROM runs WHERE run_id=?", (run_id,))
        return RunRow(*rows[0]) if rows else None

    def runs(self) -> list[RunRow]:
        return [RunRow(*r) for r in self.query(f"SELECT {_RUN_COLUMNS} FROM runs ORDER BY created")]

    def next_queued_run(self) -> RunRow | None:
        rows = self.query(
            f"SELECT {_RUN_COLUMNS} FROM runs WHERE status IN ('queued','running')"
            " ORDER BY created LIMIT 1"
        )
        return RunRow(*rows[0]) if rows else None

    def set_run_status(
        self,
        c: sqlite3.Connection,
        run_id: str,
        status: str,
        *,
        error: str | None = None,
        summary: str | None = None,
        model_digest: str | None = None,
    ) -> None:
        c.execute(
            "UPDATE runs SET status=?, error=COALESCE(?, error), summary=COALESCE(?, summary),"
            " model_digest=COALESCE(?, model_digest), updated=? WHERE run_id=?",
            (status, error, summary, model_digest, time.time(), run_id),
        )

    # rounds ----------------------------------------------------------------------
    def commit_round(
        self,
        run_id: str,
        record: RoundRecord,
        ledger_payload: dict[str, Any],
        alerts: Sequence[dict[str, Any]] = (),
    ) -> ledger.Entry:
        """Atomically record a finished round (and the ``drift_alert`` entries it raised);
        the model file must already be stored."""
        now = time.time()
        privacy = None if record.privacy_state is None else json.dumps(record.privacy_state)
        with self.transaction() as c:
            entry = ledger.append(c, self.signing_key, "round_committed", ledger_payload)
            for alert in alerts:
                ledger.append(c, self.signing_key, "drift_alert", alert)
            c.execute(
                "INSERT INTO rounds(run_id, round, model_digest, parent_digest, metrics,"
                " participants, rng_state, strategy_state, privacy_state, ledger_seq,"
                " committed) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (
                    run_id,
                    record.round,
                    record.model_digest,
                    record.parent_digest,
                    json.dumps(record.metrics),
                    json.dumps(record.participants),
                    json.dumps(record.rng_state),
                    record.strategy_state,
                    privacy,
                    entry.seq,
                    now,
                ),
            )
            c.execute(
                "UPDATE runs SET rounds_completed=?, model_digest=?, updated=? WHERE run_id=?",
                (record.round, record.model_digest, now, run_id),
            )
            crash_point("in_commit")
        return entry

    def last_round(self, run_id: str) -> RoundRecord | None:
        """The run's last committed round."""
        rows = self.query(
            "SELECT round, model_digest, parent_digest, metrics, participants, rng_state,"
            " strategy_state, privacy_state FROM rounds WHERE run_id=?"
            " ORDER BY round DESC LIMIT 1",
            (run_id,),
        )
        if not rows:
            return None
        round_no, digest, parent, metrics, participants, rng, strategy, privacy = rows[0]
        return RoundRecord(
            round_no,
            digest,
            parent,
            json.loads(metrics),
            json.loads(participants),
            json.loads(rng),
            strategy,
            None if privacy is None else json.loads(privacy),
        )

    def history(self, run_id: str) -> list[dict[str, Any]]:
        rows = self.query(
            "SELECT round, metrics FROM rounds WHERE run_id=? ORDER BY round", (run_id,)
        )
        return [{"round": r, **json.loads(m)} for r, m in rows]

    def round_entry(self, run_id: str, round_no: int) -> ledger.Entry | None:
        """The ledger entry that committed round ``round_no`` of ``run_id`` (None until then)."""
        rows = self.read(
            "SELECT l.seq, l.kind, l.payload, l.prev_hash, l.hash, l.signature FROM rounds r"
            " JOIN ledger l ON l.seq = r.ledger_seq WHERE r.run_id=? AND r.round=?",
            (run_id, round_no),
        )
        if not rows:
            return None
        seq, kind, payload, prev, h, sig = rows[0]
        return ledger.Entry(seq, kind, json.loads(payload), prev, h, sig)

    # ledger ----------------------------------------------------------------------
    def append_ledger(self, kind: str, payload: dict[str, Any]) -> ledger.Entry:
        with self.transaction() as c:
            return ledger.append(c, self.signing_key, kind, payload)

    def ledger_head(self) -> str:
        with self._lock:
            return ledger.head(self._conn)

    def ledger_entries(self) -> list[ledger.Entry]:
        with self._lock:
            return list(ledger.entries(self._conn))

    def verify_ledger(self) -> int:
        """Check the chain, signatures and every model the ledger names; returns entry count."""
        with self._lock:
            count = ledger.verify_chain(self._conn, self.signing_key.public_key())
            entries = list(ledger.entries(self._conn))
        for entry in entries:
            for key in ("input_model", "output_model", "initial_model", "strategy_state", "model"):
                digest = entry.payload.get(key)
                if digest:
                    self.models.verify(digest)
            drift = entry.payload.get("drift") or {}
            for digest in (drift.get("profiles") or {}).values():
                self.models.verify(digest)
            pooled = (drift.get("pooled") or {}).get("digest")
            if pooled:
                self.models.verify(pooled)
        return count

    # sites -----------------------------------------------------------------------
    def site(self, site_id: str) -> SiteRow | None:
        with self._read_lock:
            return self.read_site(self._reader, site_id)

    @staticmethod
    def read_site(c: sqlite3.Connection, site_id: str) -> SiteRow | None:
        """The site's row (inside ``c``'s open transaction, if any)."""
        row = c.execute(f"SELECT {_SITE_COLUMNS} FROM sites WHERE site_id=?", (site_id,)).fetchone()
        return None if row is None else _site_row(row)

    @staticmethod
    def write_site(c: sqlite3.Connection, site: SiteRow) -> None:
        """Insert or replace the site's row; call inside an open transaction of ``c``."""
        c.execute(
            f"INSERT OR REPLACE INTO sites({_SITE_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?)",
            (
                site.site_id, site.status, site.enrolled, site.public_key,
                json.dumps(site.properties, sort_keys=True), site.invited, site.token_hash,
                site.token_expires, site.revoked,
            ),
        )  # fmt: skip

    def site_rows(self) -> list[SiteRow]:
        return [
            _site_row(r) for r in self.query(f"SELECT {_SITE_COLUMNS} FROM sites ORDER BY site_id")
        ]

    def sites(self) -> list[tuple[str, str]]:
        return [(s.site_id, s.status) for s in self.site_rows()]

    def revoked_sites(self) -> set[str]:
        return {s for (s,) in self.read("SELECT site_id FROM sites WHERE status='revoked'")}

    def data_version(self) -> int:
        """Changes whenever something (this process or another, e.g. ``fedcoord sites``
        on this data directory) has committed since the last call."""
        return int(self.read("PRAGMA data_version")[0][0])

    # events ----------------------------------------------------------------------
    def add_event(
        self,
        run_id: str,
        kind: str,
        message: str,
        data: dict[str, Any],
        conn: sqlite3.Connection | None = None,
    ) -> int:
        """Append a run event (inside ``conn``'s open transaction when given); its seq."""
        if conn is None:
            with self.transaction() as c:
                return self.add_event(run_id, kind, message, data, c)
        row = conn.execute("SELECT MAX(seq) FROM events WHERE run_id=?", (run_id,)).fetchone()
        seq = (row[0] or 0) + 1
        conn.execute(
            "INSERT INTO events(run_id, seq, kind, message, data, time) VALUES (?,?,?,?,?,?)",
            (run_id, seq, kind, message, json.dumps(data), time.time()),
        )
        return seq

    def events(self, run_id: str, from_seq: int = 0) -> list[tuple[int, str, str, str, float]]:
        return self.query(
            "SELECT seq, kind, message, data, time FROM events WHERE run_id=? AND seq>=?"
            " ORDER BY seq",
            (run_id, from_seq),
        )
