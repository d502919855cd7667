"""``fedcoord ledger verify-receipt DIR RECEIPT.json``: check a site's saved receipt
against the coordinator's ledger.

A receipt verifies when its signatures hold under the data directory's coordinator
key, its proof leads to its Merkle root, the ledger chain verifies, and the entry at the
receipt's ``ledger_seq`` is that round's ``round_committed`` entry with the same hash,
output model and Merkle root, holding the site's update digest (or, for an exclusion,
none of that site).
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization

from coordinator import ledger
from coordinator.errors import ConfigError, LedgerError
from coordinator.keys import load_public_key
from protos.merkle import merkle_root
from protos.receipts import Receipt, ReceiptError, verify_receipt


def read_receipts(path: Path) -> list[Any]:
    """The receipts in a file: one JSON object, or JSON Lines (a site's receipts file)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError("RECEIPT", f"cannot read {path}: {exc}") from None
    try:
        return [json.loads(text)]
    except ValueError:
        pass
    try:
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    except ValueError as exc:
        raise ConfigError("RECEIPT", f"{path} is neither JSON nor JSON Lines: {exc}") from None


def as_receipt(obj: Any) -> Receipt:
    """A bare receipt, or the ``receipt`` of a site's record."""
    if isinstance(obj, dict) and "outcome" in obj:
        if obj.get("receipt") is None:
            raise ReceiptError(f"the site recorded no valid receipt ({obj.get('error')})")
        obj = obj["receipt"]
    return Receipt.from_json(obj)


def check_against_ledger(conn: sqlite3.Connection, key_bytes: bytes, receipt: Receipt) -> str:
    """One line describing what ``receipt`` proves; raises :class:`LedgerError` if not."""
    try:
        statement = verify_receipt(receipt, key_bytes)
    except ReceiptError as exc:
        raise LedgerError(f"receipt does not verify: {exc}") from None
    seq = statement["ledger_seq"]
    row = conn.execute(
        "SELECT seq, kind, payload, prev_hash, hash, signature FROM ledger WHERE seq=?", (seq,)
    ).fetchone()
    if row is None:
        raise LedgerError(f"the ledger has no entry {seq}")
    entry = ledger.Entry(row[0], row[1], json.loads(row[2]), row[3], row[4], row[5])
    payload = entry.payload
    where = f"ledger entry {seq}"
    if entry.kind != "round_committed":
        raise LedgerError(f"{where} is a {entry.kind} entry, not round_committed")
    if entry.hash != statement["entry_hash"]:
        raise LedgerError(f"{where} has hash {entry.hash}, not the receipt's entry_hash")
    for key in ("run_id", "round", "output_model", "merkle_root"):
        if payload.get(key) != statement[key]:
            raise LedgerError(f"{where}: {key} {payload.get(key)!r} differs from the receipt")
    updates = payload.get("update_digests") or {}
    if merkle_root(updates) != payload["merkle_root"]:
        raise LedgerError(f"{where}: merkle_root does not match its update digests")
    site, digest = statement["site_id"], statement["update_digest"]
    if updates.get(site, "") != digest:
        raise LedgerError(f"{where}: the update digest of site {site} differs from the receipt")
    round_of = f"site {site} round {statement['round']} of {statement['run_id']}"
    if digest:
        return f"receipt OK: {round_of}: update {digest} is in {payload['output_model']} ({where})"
    return f"receipt OK: {round_of}: no update in {payload['output_model']} ({where})"


def cmd_verify_receipt(args: argparse.Namespace) -> int:
    data_dir = Path(args.dir)
    if not (data_dir / "ledger.db").is_file() or not (data_dir / "keys").is_dir():
        raise ConfigError("DIR", f"{data_dir} is not a fedcoord data directory")
    receipts = read_receipts(Path(args.receipt))
    if not receipts:
        raise ConfigError("RECEIPT", f"{args.receipt} holds no receipt")
    public_key = load_public_key(data_dir)
    key_bytes = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    conn = sqlite3.connect((data_dir / "ledger.db").resolve().as_uri() + "?mode=ro", uri=True)
    failed = 0
    try:
        count = ledger.verify_chain(conn, public_key)
        for i, obj in enumerate(receipts, start=1):
            try:
                print(check_against_ledger(conn, key_bytes, as_receipt(obj)))
            except (LedgerError, ReceiptError) as exc:
                failed += 1
                print(f"receipt {i}: FAILED: {exc}", file=sys.stderr)
    finally:
        conn.close()
    if failed:
        raise LedgerError(f"{failed} of {len(receipts)} receipt(s) failed verification")
    print(f"{len(receipts)} receipt(s) verified against a ledger of {count} entries")
    return 0


def add_verify_receipt(ledger_commands: argparse._SubParsersAction) -> None:
    """Register ``verify-receipt`` under ``fedcoord ledger``."""
    p = ledger_commands.add_parser(
        "verify-receipt", help="check sites' inclusion receipts against the ledger"
    )
    p.add_argument("dir", help="the coordinator's data directory")
    p.add_argument("receipt", help="a receipt JSON file, or a site's receipts file (JSON Lines)")
    p.set_defaults(func=cmd_verify_receipt)
