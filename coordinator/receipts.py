"""Builds a site's signed inclusion receipt for one committed round (``Fleet.GetReceipt``).

The round's ``round_committed`` ledger entry (found through ``rounds.ledger_seq``) gives
the update digests and Merkle root; the receipt states only the asking site's own leaf,
so a site learns nothing of who else took part.
"""

from __future__ import annotations

from cryptography.hazmat.primitives import serialization

from coordinator.errors import LedgerError
from coordinator.state import Database
from protos.fedcoord.v1 import fleet_pb2
from protos.merkle import inclusion_proof, merkle_root
from protos.receipts import Receipt, receipt_reply, statement_json


def public_key_bytes(db: Database) -> bytes:
    """The coordinator's raw 32-byte Ed25519 public key."""
    return db.signing_key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )


def build_receipt(db: Database, site_id: str, run_id: str, round_no: int) -> Receipt | None:
    """``site_id``'s receipt for round ``round_no`` of ``run_id``; None until it commits.

    Raises
    ------
    LedgerError
        When the stored entry is not this round's ``round_committed`` entry, or its
        Merkle root does not match its update digests.
    """
    entry = db.round_entry(run_id, round_no)
    if entry is None:
        return None
    payload = entry.payload
    if (
        entry.kind != "round_committed"
        or payload.get("run_id") != run_id
        or payload.get("round") != round_no
    ):
        raise LedgerError(f"ledger entry {entry.seq} is not round {round_no} of {run_id}")
    updates = dict(payload.get("update_digests") or {})
    root = payload.get("merkle_root")
    if root != merkle_root(updates):
        raise LedgerError(f"ledger entry {entry.seq}: merkle_root does not match")
    digest = updates.get(site_id, "")
    text = statement_json(
        run_id=run_id,
        round_no=round_no,
        site_id=site_id,
        update_digest=digest,
        merkle_root=root,
        output_model=payload["output_model"],
        ledger_seq=entry.seq,
        entry_hash=entry.hash,
    )
    return Receipt(
        included=bool(digest),
        statement_json=text,
        statement_signature=db.signing_key.sign(text.encode()),
        entry_signature=bytes.fromhex(entry.signature),
        proof=tuple(inclusion_proof(updates, site_id)) if digest else (),
        coordinator_public_key=public_key_bytes(db),
    )


def receipt_response(
    db: Database, site_id: str, run_id: str, round_no: int
) -> fleet_pb2.ReceiptReply:
    """The ``GetReceipt`` reply: PENDING until the round commits, then the receipt."""
    receipt = build_receipt(db, site_id, run_id, round_no)
    if receipt is None:
        return fleet_pb2.ReceiptReply(status=fleet_pb2.RECEIPT_STATUS_PENDING)
    return receipt_reply(receipt)
