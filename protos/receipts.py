"""Inclusion receipts: the signed statement a site gets about its update in one round.

A receipt is the canonical JSON *statement* ::

    {"kind": "inclusion_receipt", "run_id", "round", "site_id", "update_digest",
     "merkle_root", "output_model", "ledger_seq", "entry_hash"}

signed (Ed25519, over its UTF-8 bytes) by the coordinator's ledger key, plus the
ledger entry's own signature over ``entry_hash`` (the signed entry head) and the Merkle
proof from the site's leaf to ``merkle_root``. ``update_digest`` is ``""`` when the
round committed without an update of the site (a signed exclusion; the proof is empty).
Nothing in a receipt names another site of the round.

Both ends use this module: the coordinator builds replies, sites and auditors verify.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from protos.canonical import canonical_json
from protos.codec import DIGEST_PREFIX
from protos.fedcoord.v1 import fleet_pb2
from protos.merkle import MAX_PROOF_STEPS, ProofStep, root_from_proof

STATEMENT_KIND = "inclusion_receipt"
STATEMENT_KEYS = frozenset(
    {"kind", "run_id", "round", "site_id", "update_digest", "merkle_root", "output_model",
     "ledger_seq", "entry_hash"}
)  # fmt: skip
MAX_STATEMENT_CHARS = 4096
MAX_ID_CHARS = 256
PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64
_HEX32 = re.compile(r"^[0-9a-f]{64}$")
_DIGEST = re.compile(r"^" + DIGEST_PREFIX + r"[0-9a-f]{64}$")
_SIDES = {fleet_pb2.PROOF_SIDE_LEFT: "L", fleet_pb2.PROOF_SIDE_RIGHT: "R"}


class ReceiptError(ValueError):
    """A receipt is malformed, badly signed, or does not prove what it states."""


@dataclass(frozen=True)
class Receipt:
    """One receipt as received (or read back from a receipts file)."""

    included: bool
    statement_json: str
    statement_signature: bytes
    entry_signature: bytes
    proof: tuple[ProofStep, ...]
    coordinator_public_key: bytes

    def to_json(self) -> dict[str, Any]:
        """The JSON form kept in receipts files (bytes as hex)."""
        return {
            "status": "included" if self.included else "not_included",
            "statement_json": self.statement_json,
            "statement_signature": self.statement_signature.hex(),
            "entry_signature": self.entry_signature.hex(),
            "proof": [list(step) for step in self.proof],
            "coordinator_public_key": self.coordinator_public_key.hex(),
        }

    @classmethod
    def from_json(cls, obj: Any) -> Receipt:
        """Parse :meth:`to_json`'s form; raises :class:`ReceiptError` when malformed."""
        if not isinstance(obj, dict):
            raise ReceiptError("a receipt must be a JSON object")
        status = obj.get("status")
        if status not in ("included", "not_included"):
            raise ReceiptError("receipt status must be 'included' or 'not_included'")
        text = obj.get("statement_json")
        if not isinstance(text, str):
            raise ReceiptError("receipt statement_json must be a string")
        proof = obj.get("proof")
        if not isinstance(proof, list) or len(proof) > MAX_PROOF_STEPS:
            raise ReceiptError(f"receipt proof must be a list of at most {MAX_PROOF_STEPS} steps")
        steps: list[ProofStep] = []
        for step in proof:
            pair = isinstance(step, list) and len(step) == 2
            if not (pair and all(isinstance(x, str) for x in step)):
                raise ReceiptError("each proof step must be a [sibling hex, side] pair")
            steps.append((step[0], step[1]))
        return cls(
            status == "included",
            text,
            _hex_field(obj, "statement_signature", SIGNATURE_BYTES),
            _hex_field(obj, "entry_signature", SIGNATURE_BYTES),
            tuple(steps),
            _hex_field(obj, "coordinator_public_key", PUBLIC_KEY_BYTES),
        )


def _hex_field(obj: dict[str, Any], name: str, size: int) -> bytes:
    value = obj.get(name)
    if not (isinstance(value, str) and len(value) == 2 * size):
        raise ReceiptError(f"receipt {name} must be {size} bytes as hex")
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise ReceiptError(f"receipt {name} is not hex") from None


def statement_json(
    *,
    run_id: str,
    round_no: int,
    site_id: str,
    update_digest: str,
    merkle_root: str,
    output_model: str,
    ledger_seq: int,
    entry_hash: str,
) -> str:
    """The canonical text the coordinator signs."""
    return canonical_json({
        "kind": STATEMENT_KIND, "run_id": run_id, "round": round_no, "site_id": site_id,
        "update_digest": update_digest, "merkle_root": merkle_root,
        "output_model": output_model, "ledger_seq": ledger_seq, "entry_hash": entry_hash,
    })  # fmt: skip


def parse_statement(text: str) -> dict[str, Any]:
    """The statement's fields, each checked for type and form."""
    if len(text) > MAX_STATEMENT_CHARS:
        raise ReceiptError(f"statement is longer than {MAX_STATEMENT_CHARS} characters")
    try:
        obj = json.loads(text)
    except ValueError:
        raise ReceiptError("statement is not valid JSON") from None
    if not isinstance(obj, dict) or set(obj) != STATEMENT_KEYS:
        raise ReceiptError(f"statement must have exactly the keys {sorted(STATEMENT_KEYS)}")
    if canonical_json(obj) != text:
        raise ReceiptError("statement is not in canonical form")
    if obj["kind"] != STATEMENT_KIND:
        raise ReceiptError(f"statement kind must be {STATEMENT_KIND!r}")
    for key in ("run_id", "site_id"):
        value = obj[key]
        if not (isinstance(value, str) and 0 < len(value) <= MAX_ID_CHARS):
            raise ReceiptError(f"statement {key} must be a non-empty string")
    for key in ("round", "ledger_seq"):
        value = obj[key]
        if not (type(value) is int and value >= 1):
            raise ReceiptError(f"statement {key} must be a positive integer")
    for key in ("merkle_root", "entry_hash"):
        if not (isinstance(obj[key], str) and _HEX32.match(obj[key])):
            raise ReceiptError(f"statement {key} must be 64 lowercase hex digits")
    if not (isinstance(obj["output_model"], str) and _DIGEST.match(obj["output_model"])):
        raise ReceiptError("statement output_model must be a sha256:<hex> digest")
    digest = obj["update_digest"]
    if not (isinstance(digest, str) and (digest == "" or _DIGEST.match(digest))):
        raise ReceiptError("statement update_digest must be '' or a sha256:<hex> digest")
    return obj


def verify_receipt(receipt: Receipt, public_key: bytes) -> dict[str, Any]:
    """Check a receipt against the trusted coordinator key; its statement when it holds.

    Checks: the receipt names ``public_key``; both signatures; the statement's form;
    that its status agrees with ``update_digest``; and for an inclusion, that the proof
    leads from the site's leaf to ``merkle_root`` (an exclusion carries no proof).

    Raises
    ------
    ReceiptError
        Naming the first check that fails.
    """
    if len(public_key) != PUBLIC_KEY_BYTES:
        raise ReceiptError("the trusted coordinator key must be 32 raw Ed25519 bytes")
    if receipt.coordinator_public_key != public_key:
        raise ReceiptError("receipt is signed by a different coordinator key than the trusted one")
    statement = parse_statement(receipt.statement_json)
    key = Ed25519PublicKey.from_public_bytes(public_key)
    try:
        key.verify(receipt.statement_signature, receipt.statement_json.encode())
    except InvalidSignature:
        raise ReceiptError("bad coordinator signature on the receipt statement") from None
    try:
        key.verify(receipt.entry_signature, bytes.fromhex(statement["entry_hash"]))
    except InvalidSignature:
        raise ReceiptError("bad coordinator signature on the ledger entry head") from None
    if receipt.included != bool(statement["update_digest"]):
        raise ReceiptError("receipt status disagrees with the statement's update_digest")
    if not receipt.included:
        if receipt.proof:
            raise ReceiptError("an exclusion receipt carries no proof")
        return statement
    try:
        site, digest = statement["site_id"], statement["update_digest"]
        root = root_from_proof(site, digest, list(receipt.proof))
    except ValueError as exc:
        raise ReceiptError(f"malformed proof: {exc}") from None
    if root != statement["merkle_root"]:
        raise ReceiptError("the proof does not lead to the statement's merkle_root")
    return statement


def receipt_from_reply(reply: fleet_pb2.ReceiptReply) -> Receipt:
    """A receipt from a ``GetReceipt`` reply of status INCLUDED or NOT_INCLUDED, its
    fields checked for size (not yet for signatures: see :func:`verify_receipt`)."""
    if reply.status not in (
        fleet_pb2.RECEIPT_STATUS_INCLUDED,
        fleet_pb2.RECEIPT_STATUS_NOT_INCLUDED,
    ):
        raise ReceiptError(f"reply status {reply.status} is not a receipt")
    if len(reply.statement_json) > MAX_STATEMENT_CHARS:
        raise ReceiptError(f"statement is longer than {MAX_STATEMENT_CHARS} characters")
    for name, size in (
        ("statement_signature", SIGNATURE_BYTES),
        ("entry_signature", SIGNATURE_BYTES),
        ("coordinator_public_key", PUBLIC_KEY_BYTES),
    ):
        if len(getattr(reply, name)) != size:
            raise ReceiptError(f"reply {name} must be {size} bytes")
    if len(reply.proof) > MAX_PROOF_STEPS:
        raise ReceiptError(f"proof has more than {MAX_PROOF_STEPS} steps")
    steps: list[ProofStep] = []
    for i, step in enumerate(reply.proof):
        if len(step.sibling) != 32 or step.side not in _SIDES:
            raise ReceiptError(f"proof step {i} is malformed")
        steps.append((step.sibling.hex(), _SIDES[step.side]))
    return Receipt(
        reply.status == fleet_pb2.RECEIPT_STATUS_INCLUDED,
        reply.statement_json,
        bytes(reply.statement_signature),
        bytes(reply.entry_signature),
        tuple(steps),
        bytes(reply.coordinator_public_key),
    )


def receipt_reply(receipt: Receipt) -> fleet_pb2.ReceiptReply:
    """The wire form of a receipt."""
    sides = {v: k for k, v in _SIDES.items()}
    return fleet_pb2.ReceiptReply(
        status=fleet_pb2.RECEIPT_STATUS_INCLUDED
        if receipt.included
        else fleet_pb2.RECEIPT_STATUS_NOT_INCLUDED,
        statement_json=receipt.statement_json,
        statement_signature=receipt.statement_signature,
        entry_signature=receipt.entry_signature,
        proof=[
            fleet_pb2.ProofStep(sibling=bytes.fromhex(sibling), side=sides[side])
            for sibling, side in receipt.proof
        ],
        coordinator_public_key=receipt.coordinator_public_key,
    )
