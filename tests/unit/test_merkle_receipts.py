"""Merkle inclusion proofs and signed inclusion receipts: every leaf proves, every
tampered bit fails, the root is the one existing ledgers hold, and a site refuses what
it did not send or what another key signed."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from client_sdk.errors import SiteError
from client_sdk.receipts import Owed, ReceiptBook
from coordinator.errors import LedgerError
from coordinator.receipt_audit import as_receipt, check_against_ledger
from coordinator.receipts import build_receipt, public_key_bytes, receipt_response
from coordinator.state import Database, RoundRecord
from protos.canonical import canonical_json
from protos.fedcoord.v1 import fleet_pb2
from protos.merkle import MAX_PROOF_STEPS, inclusion_proof, leaf, merkle_root, root_from_proof
from protos.receipts import (
    Receipt,
    ReceiptError,
    receipt_from_reply,
    receipt_reply,
    statement_json,
    verify_receipt,
)


def digest(i: int) -> str:
    return "sha256:" + hashlib.sha256(str(i).encode()).hexdigest()


def updates(n: int) -> dict[str, str]:
    return {f"site-{i}": digest(i) for i in range(n)}


def raw(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def flip_byte(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1 :]


def flip_hex(text: str, index: int) -> str:
    return text[:index] + format(int(text[index], 16) ^ 1, "x") + text[index + 1 :]


# the tree ------------------------------------------------------------------------------
# Roots the ledger has always held for these inputs (computed by the implementation in
# coordinator/merkle.py before proofs existed): existing ledgers must keep verifying.
KNOWN_ROOTS = {
    0: "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    1: "3f941d41bfd282bcc63795581f8d41b16d91e53e273c0a6dfbea32bcc5db3802",
    2: "0204eb307d3612cb7bc4b2c9c0cff7fe34591a8f28518e1785611846ea852b43",
    3: "361d37c36aa6b6f566011bcdcd99489f57e39b411964745cfa25c9b166b7e615",
    5: "e514d266c9321093609ffb3d51b5005dd6fc53892679047a11215e870ab15250",
    8: "984096463a648c7e4a419d9361d39bd7214ced8712679830728c05c41deeafcb",
    17: "8fb04e4fa6d47478bf302309ad486938b7397f96caee49de41421079805dfe15",
}


@pytest.mark.parametrize("n", sorted(KNOWN_ROOTS))
def test_root_is_unchanged_for_fixed_inputs(n):
    assert merkle_root(updates(n)) == KNOWN_ROOTS[n]
    assert merkle_root(dict(reversed(list(updates(n).items())))) == KNOWN_ROOTS[n]


def test_a_single_leaf_is_its_own_root():
    assert merkle_root(updates(1)) == leaf("site-0", digest(0)).hex()
    assert inclusion_proof(updates(1), "site-0") == []


@pytest.mark.parametrize("n", range(1, 18))
def test_every_leaf_proves_and_every_tampered_step_fails(n):
    tree = updates(n)
    root = merkle_root(tree)
    depth = (n - 1).bit_length()
    for site, d in tree.items():
        proof = inclusion_proof(tree, site)
        assert len(proof) == depth
        assert root_from_proof(site, d, proof) == root
        assert root_from_proof(site, flip_hex(d, len(d) - 1), proof) != root
        assert root_from_proof(site + "x", d, proof) != root
        node = leaf(site, d).hex()
        for i, (sibling, side) in enumerate(proof):
            for pos in (0, 63):
                bad = [*proof[:i], (flip_hex(sibling, pos), side), *proof[i + 1 :]]
                assert root_from_proof(site, d, bad) != root
            swapped = [*proof[:i], (sibling, "R" if side == "L" else "L"), *proof[i + 1 :]]
            # a level's odd last node pairs with itself: its side is the one free choice
            assert (root_from_proof(site, d, swapped) == root) == (sibling == node)
            if i + 1 < len(proof):
                assert root_from_proof(site, d, proof[:i] + proof[i + 1 :]) != root
            left, right = (sibling, node) if side == "L" else (node, sibling)
            node = hashlib.sha256(b"\x01" + bytes.fromhex(left) + bytes.fromhex(right)).hexdigest()
        assert node == root
        assert root_from_proof(site, d, [*proof, (root, "R")]) != root


def test_inclusion_proof_refuses_an_absent_site():
    with pytest.raises(KeyError):
        inclusion_proof(updates(3), "site-9")


@pytest.mark.parametrize(
    "step",
    [("ab", "L"), ("A" * 64, "L"), ("0" * 64, "X"), ("g" * 64, "R"), ("0" * 64,), 7],
)
def test_malformed_proof_steps_are_refused(step):
    with pytest.raises(ValueError):
        root_from_proof("site-0", digest(0), [step])  # type: ignore[list-item]


def test_overlong_proofs_are_refused():
    with pytest.raises(ValueError, match="steps"):
        root_from_proof("site-0", digest(0), [("0" * 64, "L")] * (MAX_PROOF_STEPS + 1))


# receipts ------------------------------------------------------------------------------
KEY = Ed25519PrivateKey.generate()
TREE = updates(5)
SITE = "site-3"
ENTRY_HASH = "ab" * 32


def make_receipt(
    key: Ed25519PrivateKey = KEY, site: str = SITE, text: str | None = None
) -> Receipt:
    d = TREE.get(site, "")
    text = text or statement_json(
        run_id="run-1", round_no=2, site_id=site, update_digest=d,
        merkle_root=merkle_root(TREE), output_model=digest(99), ledger_seq=7,
        entry_hash=ENTRY_HASH,
    )  # fmt: skip
    return Receipt(
        bool(d), text, key.sign(text.encode()), key.sign(bytes.fromhex(ENTRY_HASH)),
        tuple(inclusion_proof(TREE, site)) if d else (), raw(key),
    )  # fmt: skip


def test_a_good_receipt_verifies_and_survives_wire_and_file_round_trips():
    receipt = make_receipt()
    statement = verify_receipt(receipt, raw(KEY))
    assert statement["site_id"] == SITE and statement["update_digest"] == TREE[SITE]
    assert receipt_from_reply(receipt_reply(receipt)) == receipt
    assert Receipt.from_json(json.loads(json.dumps(receipt.to_json()))) == receipt
    excluded = make_receipt(site="site-9")
    assert verify_receipt(excluded, raw(KEY))["update_digest"] == ""
    assert not excluded.proof


def test_every_tampered_field_fails():
    receipt = make_receipt()
    text = receipt.statement_json
    other = merkle_root({**TREE, SITE: digest(42)})
    sibling, side = receipt.proof[0]
    cases = {
        "statement edited": replace(receipt, statement_json=text.replace('"round":2', '"round":3')),
        "statement signature": replace(
            receipt, statement_signature=flip_byte(receipt.statement_signature, 0)
        ),
        "entry signature": replace(receipt, entry_signature=flip_byte(receipt.entry_signature, 63)),
        "status": replace(receipt, included=False),
        "proof sibling": replace(receipt, proof=((flip_hex(sibling, 5), side), *receipt.proof[1:])),
        "proof dropped": replace(receipt, proof=receipt.proof[:-1]),
        "root re-signed": make_receipt(text=text.replace(merkle_root(TREE), other)),
        "not canonical": make_receipt(text=text.replace(":", ": ", 1)),
        "extra key": make_receipt(text=canonical_json({**json.loads(text), "extra": 1})),
        "kind": make_receipt(text=text.replace("inclusion_receipt", "other_receipt")),
        "bad digest": make_receipt(text=text.replace(TREE[SITE], "sha256:xyz")),
        "float round": make_receipt(text=canonical_json({**json.loads(text), "round": 2.0})),
        "exclusion with proof": replace(make_receipt(site="site-9"), proof=receipt.proof),
    }
    for name, bad in cases.items():
        with pytest.raises(ReceiptError):
            print(name)  # shown when a case fails to fail
            verify_receipt(bad, raw(KEY))


def test_a_receipt_under_another_key_is_refused():
    mine = make_receipt()
    attacker = Ed25519PrivateKey.generate()
    with pytest.raises(ReceiptError, match="different coordinator key"):
        verify_receipt(mine, raw(attacker))  # the site pinned another key
    forged = make_receipt(key=attacker)  # consistent in itself, but not the pinned key
    with pytest.raises(ReceiptError, match="different coordinator key"):
        verify_receipt(forged, raw(KEY))
    relabelled = replace(forged, coordinator_public_key=raw(KEY))
    with pytest.raises(ReceiptError, match="signature"):
        verify_receipt(relabelled, raw(KEY))


@pytest.mark.parametrize(
    "edit",
    [
        {"status": "maybe"},
        {"statement_json": 3},
        {"statement_signature": "00"},
        {"entry_signature": "zz" * 64},
        {"coordinator_public_key": None},
        {"proof": "nope"},
        {"proof": [["00", "L", "x"]]},
    ],
)
def test_malformed_receipt_files_are_refused(edit):
    with pytest.raises(ReceiptError):
        Receipt.from_json({**make_receipt().to_json(), **edit})


def test_malformed_replies_are_refused():
    good = receipt_reply(make_receipt())
    for mutate in (
        lambda r: setattr(r, "status", fleet_pb2.RECEIPT_STATUS_PENDING),
        lambda r: setattr(r, "statement_signature", b"\x00" * 63),
        lambda r: setattr(r, "coordinator_public_key", b""),
        lambda r: setattr(r, "statement_json", "x" * 5000),
        lambda r: setattr(r.proof[0], "sibling", b"\x00" * 31),
        lambda r: setattr(r.proof[0], "side", fleet_pb2.PROOF_SIDE_UNSPECIFIED),
    ):
        bad = fleet_pb2.ReceiptReply()
        bad.CopyFrom(good)
        mutate(bad)
        with pytest.raises(ReceiptError):
            receipt_from_reply(bad)


# the site's book -------------------------------------------------------------------------
class Stub:
    """Answers GetReceipt with queued replies (or raises queued gRPC errors)."""

    def __init__(self, *replies: fleet_pb2.ReceiptReply | grpc.StatusCode):
        self.replies = list(replies)
        self.requests: list[fleet_pb2.ReceiptRequest] = []

    def GetReceipt(self, request, timeout):  # noqa: N802
        self.requests.append(request)
        reply = self.replies.pop(0)
        if isinstance(reply, grpc.StatusCode):
            error = grpc.RpcError()
            error.code = lambda: reply  # type: ignore[method-assign]
            raise error
        return reply


def test_the_site_checks_what_it_sent_and_its_pinned_key(tmp_path: Path):
    book = ReceiptBook(SITE, raw(KEY), tmp_path / "receipts.jsonl")
    owed = Owed("run-1", 2, {TREE[SITE]}, 0.0)
    assert book.check(make_receipt(), owed)["ledger_seq"] == 7
    for wrong in (
        Owed("run-2", 2, {TREE[SITE]}, 0.0),
        Owed("run-1", 3, {TREE[SITE]}, 0.0),
        Owed("run-1", 2, {digest(1)}, 0.0),
    ):
        with pytest.raises(ReceiptError):
            book.check(make_receipt(), wrong)
    with pytest.raises(ReceiptError, match="site_id"):
        ReceiptBook("site-1", raw(KEY)).check(make_receipt(), owed)
    with pytest.raises(ReceiptError, match="pinned"):
        ReceiptBook(SITE).check(make_receipt(), owed)


def test_trust_on_first_use_and_a_changed_key(caplog):
    book = ReceiptBook(SITE)
    book.pin(raw(KEY))
    assert book.pinned_key == raw(KEY)
    book.pin(raw(Ed25519PrivateKey.generate()))
    assert book.pinned_key == raw(KEY)
    assert "DIFFERENT SIGNING KEY" in caplog.text
    with pytest.raises(ValueError):
        ReceiptBook(SITE, b"short")


def test_a_pin_kept_in_a_file_outlives_the_process(tmp_path: Path, caplog):
    pin = tmp_path / "state" / "site-a.coordinator-key"
    ReceiptBook(SITE, pin_path=pin).pin(raw(KEY))
    assert pin.read_text() == raw(KEY).hex() + "\n"
    restarted = ReceiptBook(SITE, pin_path=pin)  # a new process: the same pin
    assert restarted.pinned_key == raw(KEY)
    restarted.pin(raw(Ed25519PrivateKey.generate()))  # a swapped coordinator key is caught
    assert restarted.pinned_key == raw(KEY) and "DIFFERENT SIGNING KEY" in caplog.text
    operator = raw(Ed25519PrivateKey.generate())
    assert ReceiptBook(SITE, operator, pin_path=pin).pinned_key == operator  # it wins
    assert pin.read_text() == raw(KEY).hex() + "\n"  # and is not written


@pytest.mark.parametrize("text", ["", "zz" * 32, "ab" * 31, "ab" * 33])
def test_a_damaged_pin_file_stops_the_site_naming_it(tmp_path: Path, text: str):
    pin = tmp_path / "site-a.coordinator-key"
    pin.write_text(text)
    with pytest.raises(SiteError, match=r"site-a\.coordinator-key does not hold a coordinator"):
        ReceiptBook(SITE, pin_path=pin)


def test_the_site_asks_until_committed_and_records_every_outcome(tmp_path: Path):
    path = tmp_path / "receipts.jsonl"
    book = ReceiptBook(SITE, raw(KEY), path)
    pending = fleet_pb2.ReceiptReply(status=fleet_pb2.RECEIPT_STATUS_PENDING)
    tampered = receipt_reply(make_receipt())
    tampered.statement_signature = b"\x00" * 64
    stub = Stub(
        pending, grpc.StatusCode.UNAVAILABLE, receipt_reply(make_receipt()), tampered, pending
    )
    book.expect("run-1", 2, TREE[SITE], now=100.0)
    book.poll(stub, now=100.0)  # not asked yet: the round has hardly had time to commit
    assert not stub.requests
    book.poll(stub, now=101.0)  # pending: asked again later, not before
    book.poll(stub, now=101.5)
    assert len(stub.requests) == 1 and not book.records
    book.poll(stub, now=102.0)  # the coordinator is down
    book.poll(stub, now=200.0)
    assert [r["outcome"] for r in book.records] == ["included"]
    book.expect("run-1", 3, TREE[SITE], now=300.0)
    book.saw_round("run-1", 4)  # round 3 committed: asked at once
    book.poll(stub, now=300.0)  # a forged signature: recorded as invalid, never raised
    book.expect("run-1", 4, TREE[SITE], now=400.0)
    book.saw_round("run-1", 5)
    book.poll(stub, now=400.0)  # still pending though round 5 started: given up
    assert [(r["round"], r["outcome"], r["verified"]) for r in book.records] == [
        (2, "included", True), (3, "invalid", False), (4, "unconfirmed", False),
    ]  # fmt: skip
    assert "signature" in book.records[1]["error"]
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines == json.loads(json.dumps(book.records))
    assert not book.owed


def test_a_coordinator_without_receipts_is_tolerated():
    book = ReceiptBook(SITE, raw(KEY))
    book.expect("run-1", 2, TREE[SITE], now=0.0)
    book.poll(Stub(grpc.StatusCode.UNIMPLEMENTED), now=1.0)
    assert [r["outcome"] for r in book.records] == ["unconfirmed"]
    book.expect("run-1", 3, TREE[SITE], now=2.0)
    assert not book.owed


# the coordinator's receipts and the auditor ----------------------------------------------
def commit(db: Database, round_no: int, tree: dict[str, str]) -> None:
    record = RoundRecord(round_no, digest(100 + round_no), digest(99 + round_no), {}, sorted(tree),
                         {})  # fmt: skip
    db.commit_round("run-1", record, {
        "run_id": "run-1", "round": round_no, "output_model": digest(100 + round_no),
        "update_digests": tree, "merkle_root": merkle_root(tree),
    })  # fmt: skip


def test_coordinator_receipts_verify_against_the_ledger(tmp_path: Path):
    db = Database(tmp_path / "data")
    try:
        assert build_receipt(db, SITE, "run-1", 1) is None
        reply = receipt_response(db, SITE, "run-1", 1)
        assert reply.status == fleet_pb2.RECEIPT_STATUS_PENDING and not reply.statement_json
        commit(db, 1, TREE)
        commit(db, 2, {k: v for k, v in TREE.items() if k != SITE})
        key = public_key_bytes(db)
        conn = sqlite3.connect(db.data_dir / "ledger.db")
        for round_no, included in ((1, True), (2, False)):
            receipt = build_receipt(db, SITE, "run-1", round_no)
            assert receipt is not None and receipt.included is included
            statement = verify_receipt(receipt, key)
            assert statement["update_digest"] == (TREE[SITE] if included else "")
            assert "site-1" not in receipt.statement_json  # nothing about other sites
            assert check_against_ledger(conn, key, as_receipt(receipt.to_json()))
        receipt = build_receipt(db, SITE, "run-1", 1)
        assert receipt is not None
        wrong_seq = json.loads(receipt.statement_json)
        wrong_seq["ledger_seq"] = 2  # re-signed by the coordinator key, yet not the entry
        text = canonical_json(wrong_seq)
        other = replace(receipt, statement_json=text,
                        statement_signature=db.signing_key.sign(text.encode()))  # fmt: skip
        with pytest.raises(LedgerError, match="entry 2"):
            check_against_ledger(conn, key, other)
        with pytest.raises(ReceiptError, match="no valid receipt"):
            as_receipt({"outcome": "invalid", "receipt": None, "error": "bad"})
        conn.close()
    finally:
        db.close()
