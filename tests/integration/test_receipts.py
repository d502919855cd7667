"""Inclusion receipts end to end: a real coordinator and real sites over gRPC; every
site that took part holds a verified receipt per round, which the auditor command
accepts against the ledger, while forged receipts and snooping requests get nothing."""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from client_sdk import Client, run_site
from client_sdk.identity import SignedFleet, SiteIdentity
from coordinator.server import Coordinator
from protos.fedcoord.v1 import fleet_pb2, fleet_pb2_grpc
from protos.receipts import Receipt, verify_receipt
from simulations.cli import main as fedcoord
from tests.integration.clients import ShiftSite, ledger_payloads

pytestmark = pytest.mark.integration

EXPERIMENT = """
name: receipts-test
seed: 3
rounds: ROUNDS
task: {name: digits}
federation:
  sites: SITES
  sampling: {fraction: FRACTION, method: fixed, min_sites: 2, timeout_s: 30}
"""


def experiment(sites: int, rounds: int, fraction: float, extra: str = "") -> str:
    text = EXPERIMENT.replace("SITES", str(sites)).replace("ROUNDS", str(rounds))
    return text.replace("FRACTION", str(fraction)) + extra


def start_sites(
    coordinator: Coordinator,
    clients: dict[str, Client],
    out: Path,
    stop: threading.Event,
    pinned: dict[str, bytes] | None = None,
) -> None:
    for name, client in clients.items():
        threading.Thread(
            target=run_site,
            args=(client, coordinator.address, name),
            kwargs={
                "insecure": True, "stop": stop, "poll_wait_s": 1,
                "receipts_path": out / f"{name}.jsonl",
                "coordinator_public_key": (pinned or {}).get(name),
            },
            daemon=True,
        ).start()  # fmt: skip


def records(out: Path, site: str) -> list[dict]:
    path = out / f"{site}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def wait_for_records(out: Path, expected: dict[str, int], timeout: float = 20.0) -> None:
    """Until each site has recorded ``expected[site]`` receipt outcomes."""
    end = time.time() + timeout
    while time.time() < end:
        if all(len(records(out, s)) >= n for s, n in expected.items()):
            return
        time.sleep(0.2)
    got = {s: len(records(out, s)) for s in expected}
    raise AssertionError(f"receipts did not arrive: {got}, expected {expected}")


def fleet(coordinator: Coordinator) -> fleet_pb2_grpc.FleetStub:
    return fleet_pb2_grpc.FleetStub(grpc.insecure_channel(coordinator.address))


def coordinator_key(coordinator: Coordinator) -> bytes:
    return coordinator.db.signing_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def test_sites_hold_verified_receipts_that_the_auditor_accepts(
    coordinator, tmp_path, caplog, capsys
):
    caplog.set_level(logging.INFO, logger="fedcoord.site.receipts")
    sites = {f"site-{i}": ShiftSite(seed=i, num_examples=30 + i) for i in range(4)}
    out = tmp_path / "receipts"
    out.mkdir()
    stop = threading.Event()
    start_sites(coordinator, sites, out, stop)
    try:
        row = coordinator.engine.submit(experiment(4, 3, 0.5))
        final = coordinator.engine.execute(row.run_id)
        assert final.status == "finished", final.error
        rounds = ledger_payloads(coordinator, "round_committed")
        owed = {s: sum(s in r["update_digests"] for r in rounds) for s in sites}
        assert sorted(owed.values()) != [3, 3, 3, 3]  # sampling left some sites out
        wait_for_records(out, owed)
        snoop_checks(coordinator, row.run_id, rounds)
    finally:
        stop.set()
    seqs = {e.payload.get("round"): e.seq for e in coordinator.db.ledger_entries()
            if e.kind == "round_committed"}  # fmt: skip
    for site in sites:
        mine = records(out, site)
        # one receipt per round it took part in; a pending receipt may be verified
        # after a later round's, so the file is in verification order, not round order
        assert sorted(r["round"] for r in mine) == [
            r["round"] for r in rounds if site in r["update_digests"]
        ]
        for record in mine:
            assert record["outcome"] == "included" and record["verified"], record
            entry = rounds[record["round"] - 1]
            statement = json.loads(record["receipt"]["statement_json"])
            assert statement["update_digest"] == entry["update_digests"][site]
            assert statement["output_model"] == entry["output_model"]
            assert statement["ledger_seq"] == seqs[record["round"]]
            others = set(sites) - {site}
            assert not any(o in json.dumps(record) for o in others)  # nobody else is named
    assert "inclusion in model sha256:" in caplog.text and "verified (ledger entry" in caplog.text

    data_dir = str(coordinator.db.data_dir)
    capsys.readouterr()
    for site in sites:
        if owed[site]:
            assert fedcoord(["ledger", "verify-receipt", data_dir, str(out / f"{site}.jsonl")]) == 0
    assert "receipt OK" in capsys.readouterr().out

    # a forged or edited receipt fails, one line of error and exit code 1
    site = next(s for s in sites if owed[s])
    receipt = records(out, site)[0]["receipt"]
    statement = json.loads(receipt["statement_json"])
    forged = {**receipt, "statement_json": receipt["statement_json"].replace(
        statement["output_model"], "sha256:" + "0" * 64)}  # fmt: skip
    sibling, side = receipt["proof"][0]
    rerouted = {**receipt, "proof": [[sibling[::-1], side], *receipt["proof"][1:]]}
    attacker = Ed25519PrivateKey.generate()
    text = receipt["statement_json"]
    resigned = Receipt.from_json(receipt).to_json() | {
        "statement_signature": attacker.sign(text.encode()).hex(),
        "coordinator_public_key": attacker.public_key().public_bytes(
            Encoding.Raw, PublicFormat.Raw).hex(),
    }  # fmt: skip
    for bad in (forged, rerouted, resigned):
        path = tmp_path / "bad.json"
        path.write_text(json.dumps(bad))
        assert fedcoord(["ledger", "verify-receipt", data_dir, str(path)]) == 1
        assert "fedcoord: error:" in capsys.readouterr().err
    assert fedcoord(["ledger", "verify-receipt", data_dir, str(tmp_path / "none.json")]) == 2


def snoop_checks(coordinator: Coordinator, run_id: str, rounds: list[dict]) -> None:
    """What a site that asks about others' updates, or sends garbage, gets."""
    stub = SignedFleet(fleet(coordinator), SiteIdentity.generate(), "snoop")
    request = fleet_pb2.EnrollRequest(site_id="snoop", public_key=stub.identity.public_key)
    reply = stub.Enroll(request, timeout=5)
    assert reply.coordinator_public_key == coordinator_key(coordinator)
    for entry in rounds:
        got = stub.GetReceipt(
            fleet_pb2.ReceiptRequest(site_id="snoop", run_id=run_id, round=entry["round"]),
            timeout=5,
        )  # only ever a statement about the asking site itself: its exclusion
        assert got.status == fleet_pb2.RECEIPT_STATUS_NOT_INCLUDED and not got.proof
        statement = json.loads(got.statement_json)
        assert statement["site_id"] == "snoop" and statement["update_digest"] == ""
        assert not any(s in got.statement_json for s in entry["update_digests"])
    pending = stub.GetReceipt(
        fleet_pb2.ReceiptRequest(site_id="snoop", run_id=run_id, round=99), timeout=5
    )
    assert pending.status == fleet_pb2.RECEIPT_STATUS_PENDING and not pending.statement_json
    for request, code in (
        (fleet_pb2.ReceiptRequest(site_id="stranger", run_id=run_id, round=1),
         grpc.StatusCode.UNAUTHENTICATED),  # signed as snoop: site_mismatch
        (fleet_pb2.ReceiptRequest(site_id="snoop", run_id=run_id, round=0),
         grpc.StatusCode.INVALID_ARGUMENT),
        (fleet_pb2.ReceiptRequest(site_id="snoop", run_id="r" * 300, round=1),
         grpc.StatusCode.INVALID_ARGUMENT),
        (fleet_pb2.ReceiptRequest(site_id="snoop", run_id="", round=1),
         grpc.StatusCode.INVALID_ARGUMENT),
    ):  # fmt: skip
        with pytest.raises(grpc.RpcError) as info:
            stub.GetReceipt(request, timeout=5)
        assert info.value.code() == code


def test_secure_rounds_prove_the_masked_input_and_a_wrong_pin_is_refused(coordinator, tmp_path):
    """Under secure aggregation the ledger holds each survivor's masked-vector digest:
    the receipt proves that vector went into the sum. A site pinned to another key
    records the receipt as invalid and keeps running."""
    sites = {f"site-{i}": ShiftSite(seed=20 + i, num_examples=50) for i in range(4)}
    wrong = Ed25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    out = tmp_path / "receipts"
    out.mkdir()
    stop = threading.Event()
    start_sites(coordinator, sites, out, stop, pinned={"site-3": wrong})
    secure = "privacy: {secure_aggregation: {enabled: true, stage_timeout_s: 10}}\n"
    try:
        row = coordinator.engine.submit(
            experiment(4, 1, 1.0, secure).replace("min_sites: 2", "min_sites: 3")
        )
        final = coordinator.engine.execute(row.run_id)
        assert final.status == "finished", final.error
        wait_for_records(out, dict.fromkeys(sites, 1))
    finally:
        stop.set()
    (entry,) = ledger_payloads(coordinator, "round_committed")
    assert entry["secure_aggregation"]["mode"] != "off"
    assert set(entry["update_digests"]) == set(sites)
    for site in ("site-0", "site-1", "site-2"):
        (record,) = records(out, site)
        assert record["outcome"] == "included", record
        assert record["sent_digests"] == [entry["update_digests"][site]]
        statement = verify_receipt(
            Receipt.from_json(record["receipt"]), coordinator_key(coordinator)
        )
        assert statement["merkle_root"] == entry["merkle_root"]
    (refused,) = records(out, "site-3")
    assert refused["outcome"] == "invalid" and "different coordinator key" in refused["error"]
