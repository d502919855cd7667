"""The signed hash chain and the content-addressed model store detect tampering."""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest

from coordinator.errors import LedgerError
from coordinator.state import Database
from protos.codec import digest_arrays
from protos.merkle import merkle_root


@pytest.fixture
def db(tmp_path):
    database = Database(tmp_path / "data")
    yield database
    database.close()


def fill(db: Database) -> str:
    arrays = {"w": np.arange(8, dtype=np.float32)}
    digest = digest_arrays(arrays)
    db.models.put(arrays, digest)
    db.append_ledger("run_started", {"run_id": "r", "initial_model": digest})
    db.append_ledger("round_committed", {"run_id": "r", "round": 1, "output_model": digest})
    db.append_ledger("run_finished", {"run_id": "r", "status": "finished"})
    return digest


def raw(db: Database, sql: str, params=()):
    conn = sqlite3.connect(db.data_dir / "ledger.db")
    conn.execute(sql, params)
    conn.commit()
    conn.close()


def test_untouched_ledger_verifies(db):
    fill(db)
    assert db.verify_ledger() == 3


@pytest.mark.parametrize(
    "sql, message",
    [
        (
            "UPDATE ledger SET payload=replace(payload, '\"round\":1', '\"round\":2') WHERE seq=2",
            "entry 2 .*edited",
        ),
        ("UPDATE ledger SET payload=payload || ' ' WHERE seq=1", "entry 1 .*canonical"),
        ("DELETE FROM ledger WHERE seq=2", "entry 3 .*removed or reordered"),
        (
            "UPDATE ledger SET signature=replace(signature, substr(signature,1,1), "
            "CASE substr(signature,1,1) WHEN 'a' THEN 'b' ELSE 'a' END) WHERE seq=3",
            "entry 3 .*signature",
        ),
        ("UPDATE ledger SET kind='drift_alert' WHERE seq=3", "entry 3 .*edited"),
    ],
)
def test_tampering_is_detected_and_named(db, sql, message):
    fill(db)
    raw(db, sql)
    with pytest.raises(LedgerError, match=message):
        db.verify_ledger()


def test_edited_model_file_is_detected(db):
    digest = fill(db)
    path = db.models.path(digest)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(LedgerError, match="file edited"):
        db.verify_ledger()


def test_missing_model_file_is_detected(db):
    digest = fill(db)
    db.models.path(digest).unlink()
    with pytest.raises(LedgerError, match="missing"):
        db.verify_ledger()


def test_model_store_roundtrip_keeps_dtypes(db):
    arrays = {"w": np.ones((2, 2), np.float32), "n": np.array(3, np.int64)}
    digest = digest_arrays(arrays)
    db.models.put(arrays, digest)
    db.models.put(arrays, digest)  # idempotent
    back = db.models.get(digest)
    assert {k: (v.dtype, v.shape) for k, v in back.items()} == {
        k: (v.dtype, v.shape) for k, v in arrays.items()
    }
    db.models.verify(digest)


def test_merkle_root_depends_on_every_leaf():
    updates = {f"site-{i}": f"sha256:{i:064x}" for i in range(5)}
    root = merkle_root(updates)
    assert root == merkle_root(dict(reversed(list(updates.items()))))
    assert root != merkle_root({**updates, "site-3": "sha256:" + "f" * 64})
    assert root != merkle_root({k: v for k, v in updates.items() if k != "site-4"})
