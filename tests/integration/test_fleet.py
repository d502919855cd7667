"""A real coordinator on 127.0.0.1 with site threads speaking real gRPC: poisoned and
malformed results are rejected, recorded, and change nothing else."""

from __future__ import annotations

import json
import threading

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client_sdk.identity import SignedFleet, SiteIdentity
from coordinator.server import Coordinator
from coordinator.tasks import load_task
from protos.codec import encode
from protos.fedcoord.v1 import common_pb2, control_pb2, control_pb2_grpc, fleet_pb2, fleet_pb2_grpc
from strategies.registry import STRATEGIES
from tests.integration.clients import HostileSite, start_site_threads

pytestmark = pytest.mark.integration

EXPERIMENT = """
name: fleet-test
seed: 1
rounds: 2
task: {name: digits}
federation:
  sites: 5
  sampling: {fraction: 1.0, method: fixed, min_sites: 2, timeout_s: 30}
training: {local_epochs: 1, batch_size: 16}
"""


def start_sites(coordinator: Coordinator, clients: dict, stop: threading.Event) -> None:
    start_site_threads(coordinator.address, clients, stop)


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_poisoned_updates_are_rejected_and_recorded(coordinator, strategy):
    """Under every strategy, validation rejects NaN and misshapen updates before they
    reach the aggregate (robust rules never even see them)."""
    task = load_task("digits", None, {}, 0)
    honest = {f"honest-{i}": task.make_client(i, 3, {"kind": "iid"}, 0) for i in range(3)}
    hostile = {"nan-site": HostileSite("nan"), "shape-site": HostileSite("shape")}
    stop = threading.Event()
    start_sites(coordinator, {**honest, **hostile}, stop)
    try:
        run = coordinator.engine.submit(EXPERIMENT + f"strategy: {{name: {strategy}}}\n")
        final = coordinator.engine.execute(run.run_id)
    finally:
        stop.set()
    assert final.status == "finished", final.error
    rounds = [e.payload for e in coordinator.db.ledger_entries() if e.kind == "round_committed"]
    assert all(entry["strategy"] == strategy for entry in rounds)
    assert len(rounds) == 2
    for entry in rounds:
        assert entry["participants"] == sorted(honest)
        reasons = {r["site"]: r["reason"] for r in entry["rejected"]}
        assert reasons["nan-site"].startswith("non_finite")
        assert reasons["shape-site"].startswith("shape_mismatch")
        assert set(entry["update_digests"]) == set(honest)
    # the committed model is finite: nothing of the poisoned updates reached it
    model = coordinator.db.models.get(rounds[-1]["output_model"])
    assert all(np.isfinite(a).all() for a in model.values())
    assert coordinator.db.verify_ledger() > 0


def fleet(coordinator: Coordinator) -> fleet_pb2_grpc.FleetStub:
    return fleet_pb2_grpc.FleetStub(grpc.insecure_channel(coordinator.address))


def signed_fleet(coordinator: Coordinator, site_id: str, enroll: bool = True) -> SignedFleet:
    """A Fleet stub signing as ``site_id`` with a fresh key (enrolled, by default)."""
    stub = SignedFleet(fleet(coordinator), SiteIdentity.generate(), site_id)
    if enroll:
        request = fleet_pb2.EnrollRequest(site_id=site_id, public_key=stub.identity.public_key)
        stub.Enroll(request, timeout=5)
    return stub


def test_health_service_reports_serving(coordinator):
    stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(coordinator.address))
    for service in ("", "fedcoord.v1.Fleet", "fedcoord.v1.Control"):
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_unenrolled_sites_and_bad_ids_are_refused(coordinator):
    stub = signed_fleet(coordinator, "stranger", enroll=False)
    with pytest.raises(grpc.RpcError) as info:
        list(stub.PullTask(fleet_pb2.PullTaskRequest(site_id="stranger", wait_s=0), timeout=5))
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert info.value.details().startswith("unknown_site")
    with pytest.raises(grpc.RpcError) as info:
        fleet(coordinator).Enroll(fleet_pb2.EnrollRequest(site_id="../etc/passwd"), timeout=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_results_for_unknown_tasks_and_headerless_streams_are_refused(coordinator):
    stub = signed_fleet(coordinator, "s1")
    payload = encode({"w": np.zeros(3, np.float32)})

    def push(*messages):
        return stub.PushResult(iter(messages), timeout=5)

    header = fleet_pb2.ResultHeader(site_id="s1", task_id="no-such-task", num_examples=5)
    header.update.CopyFrom(payload.header())
    reply = push(
        fleet_pb2.ResultMessage(header=header),
        *(fleet_pb2.ResultMessage(chunk=common_pb2.Chunk(data=c)) for c in payload.chunks()),
    )
    assert not reply.accepted and reply.reason == "task_not_active"
    with pytest.raises(grpc.RpcError) as info:
        push(fleet_pb2.ResultMessage(chunk=common_pb2.Chunk(data=b"x")))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_corrupted_upload_is_refused_and_the_round_goes_on(coordinator):
    """A site whose chunks do not match its digest is dropped; the honest ones commit."""
    task = load_task("digits", None, {}, 0)
    stop = threading.Event()
    start_sites(
        coordinator,
        {f"honest-{i}": task.make_client(i, 2, {"kind": "iid"}, 0) for i in range(2)},
        stop,
    )
    raw = signed_fleet(coordinator, "forger")
    experiment = EXPERIMENT.replace("rounds: 2", "rounds: 1").replace("sites: 5", "sites: 3")
    run = coordinator.engine.submit(experiment)
    result: dict = {}
    worker = threading.Thread(
        target=lambda: result.update(row=coordinator.engine.execute(run.run_id))
    )
    worker.start()
    try:
        messages = iter(
            raw.PullTask(fleet_pb2.PullTaskRequest(site_id="forger", wait_s=30), timeout=60)
        )
        header = next(messages).header
        assert header.round == 1
        model = {t.name: np.zeros(tuple(t.shape), t.dtype) for t in header.model.tensors}
        forged = encode(model)
        result_header = fleet_pb2.ResultHeader(
            site_id="forger", task_id=header.task_id, num_examples=10
        )
        result_header.update.CopyFrom(forged.header())
        chunks = [bytearray(c) for c in forged.chunks()]
        chunks[0][0] ^= 0xFF
        reply = raw.PushResult(
            iter(
                [fleet_pb2.ResultMessage(header=result_header)]
                + [fleet_pb2.ResultMessage(chunk=common_pb2.Chunk(data=bytes(c))) for c in chunks]
            ),
            timeout=30,
        )
        assert not reply.accepted and "digest mismatch" in reply.reason
        worker.join(timeout=60)
    finally:
        stop.set()
    assert result["row"].status == "finished"
    entry = next(e.payload for e in coordinator.db.ledger_entries() if e.kind == "round_committed")
    assert entry["participants"] == ["honest-0", "honest-1"]
    assert entry["rejected"][0]["site"] == "forger"
    assert entry["rejected"][0]["reason"].startswith("bad_payload")
    events = coordinator.db.events(run.run_id)
    assert any(
        json.loads(data).get("rejected")
        for _, kind, _, data, _ in events
        if kind == "round_committed"
    )


def test_simulation_only_settings_are_refused_by_a_coordinator(coordinator):
    stub = control_pb2_grpc.ControlStub(grpc.insecure_channel(coordinator.address))
    for setting, key in (
        ("dropout: 0.2", "federation.dropout"),
        ("byzantine: {sites: 1}", "federation.byzantine.sites"),
    ):
        text = EXPERIMENT.replace("  sites: 5\n", f"  sites: 5\n  {setting}\n")
        with pytest.raises(grpc.RpcError) as info:
            stub.SubmitRun(control_pb2.SubmitRunRequest(experiment_yaml=text), timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details().startswith(key)
    assert coordinator.db.runs() == []
