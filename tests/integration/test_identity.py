"""Enrollment tokens and signed Fleet requests against a real coordinator over gRPC:
hostile requests are refused and leave no trace, a site revoked mid-round is failed
and never sampled again, and honest sites finish the run."""

from __future__ import annotations

import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from client_sdk import run_site
from client_sdk.api import Client
from client_sdk.identity import SignedFleet, SiteIdentity
from coordinator import enrollment
from coordinator.server import Coordinator
from protos.codec import encode
from protos.fedcoord.v1 import common_pb2, control_pb2, control_pb2_grpc, fleet_pb2, fleet_pb2_grpc
from protos.signing import fleet_method, key_fingerprint
from tests.conftest import Processes, fedcoord, wait_for
from tests.integration.clients import ShiftSite, ledger_payloads

pytestmark = pytest.mark.integration

EXPERIMENT = """
name: identity-test
seed: 5
rounds: 2
task: {name: digits}
federation:
  sites: 3
  sampling: {fraction: 1.0, method: fixed, min_sites: 3, timeout_s: 20}
training: {local_epochs: 1, batch_size: 16}
"""
HONEST = {f"honest-{i}": ShiftSite(seed=10 + i, num_examples=40 + 20 * i) for i in range(3)}


@pytest.fixture
def coordinator(tmp_path: Path) -> Iterator[Coordinator]:
    """A real coordinator that admits sites by token only (no open enrollment)."""
    c = Coordinator(tmp_path / "coord", "127.0.0.1:0")
    c.start(run_engine=False)
    yield c
    c.stop(grace=0.5)


class Recorder(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Keeps the method, metadata and request of every call made through it."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any, Any]] = []

    def _record(self, continuation: Callable, details: Any, request: Any) -> Any:
        self.calls.append((details.method, details.metadata, request))
        return continuation(details, request)

    intercept_unary_unary = _record
    intercept_unary_stream = _record


def channel(c: Coordinator) -> grpc.Channel:
    return grpc.insecure_channel(c.address)


def control(c: Coordinator) -> control_pb2_grpc.ControlStub:
    return control_pb2_grpc.ControlStub(channel(c))


def token_for(c: Coordinator, site_id: str) -> str:
    reply = control(c).EnrollSite(control_pb2.EnrollSiteRequest(site_id=site_id), timeout=5)
    assert reply.status == "pending" and reply.expires_unix > time.time() + 6 * 86400
    return reply.token


def refused(call: Callable[[], Any], reason: str, code=grpc.StatusCode.UNAUTHENTICATED) -> None:
    with pytest.raises(grpc.RpcError) as info:
        result = call()
        if isinstance(result, Iterator):
            list(result)
    assert info.value.code() == code, info.value.details()
    assert info.value.details().startswith(reason), info.value.details()


def enroll(stub: SignedFleet, token: str = "") -> fleet_pb2.EnrollReply:
    request = fleet_pb2.EnrollRequest(
        site_id=stub.site_id, token=token, public_key=stub.identity.public_key
    )
    return stub.Enroll(request, timeout=5)


def start_honest_sites(c: Coordinator, stop: threading.Event) -> None:
    for name, client in HONEST.items():
        token = token_for(c, name)
        threading.Thread(
            target=run_site,
            args=(client, c.address, name, token),
            kwargs={"insecure": True, "stop": stop, "poll_wait_s": 1},
            daemon=True,
        ).start()


def hostile_requests(
    c: Coordinator, victim: SignedFleet, victim_token: str, recorded: Recorder
) -> None:
    """Every way in that must fail, tried while round 1 is open."""
    raw = fleet_pb2_grpc.FleetStub(channel(c))
    stranger = SignedFleet(raw, SiteIdentity.generate(), "stranger")
    pull = fleet_pb2.PullTaskRequest(site_id="stranger", wait_s=0)
    refused(lambda: stranger.PullTask(pull, timeout=5), "unknown_site")  # never enrolled
    refused(lambda: raw.PullTask(pull, timeout=5), "unsigned")
    refused(lambda: enroll(stranger), "invalid_token")  # no token
    refused(lambda: enroll(stranger, "A" * 43), "invalid_token")  # a wrong token
    expired = enrollment.invite(c.db, "latecomer", ttl_s=10, now=time.time() - 11)
    refused(lambda: enroll(SignedFleet(raw, SiteIdentity.generate(), "latecomer"),
                           expired.token), "expired_token")  # fmt: skip
    reused = SignedFleet(raw, SiteIdentity.generate(), "victim")  # the victim's used token
    refused(lambda: enroll(reused, victim_token), "key_mismatch")
    low_order = fleet_pb2.EnrollRequest(site_id="stranger", public_key=(1).to_bytes(32, "little"))
    refused(lambda: stranger.Enroll(low_order, timeout=5), "public_key",
            grpc.StatusCode.INVALID_ARGUMENT)  # fmt: skip

    # a captured real request, sent again as it was
    method, metadata, request = next(call for call in recorded.calls if "PullTask" in call[0])
    assert method == fleet_method("PullTask")
    refused(lambda: raw.PullTask(request, metadata=metadata, timeout=5), "replayed_nonce")
    beat = fleet_pb2.HeartbeatRequest(site_id="victim")
    forged = SiteIdentity.generate().sign(fleet_method("Heartbeat"), beat, "victim")
    refused(lambda: raw.Heartbeat(beat, metadata=forged, timeout=5), "bad_signature")
    stale = victim.identity.sign(fleet_method("Heartbeat"), beat, "victim", time.time() - 120)
    refused(lambda: raw.Heartbeat(beat, metadata=stale, timeout=5), "stale_timestamp")
    other = fleet_pb2.PullTaskRequest(site_id="honest-0", wait_s=0)
    refused(lambda: victim.PullTask(other, timeout=5), "site_mismatch")  # another's tasks


def test_hostile_requests_and_a_revoked_site_leave_no_trace(coordinator):
    c = coordinator
    recorded = Recorder()
    victim = SignedFleet(
        fleet_pb2_grpc.FleetStub(grpc.intercept_channel(channel(c), recorded)),
        SiteIdentity.generate(),
        "victim",
    )
    victim_token = token_for(c, "victim")
    reply = enroll(victim, victim_token)
    assert reply.coordinator_public_key == c.db.signing_key.public_key().public_bytes_raw()
    assert enroll(victim).site_id == "victim"  # the same key again: already enrolled
    stop = threading.Event()
    start_honest_sites(c, stop)
    wait_for(lambda: len(c.dispatcher.online()) == 4, 20, "three honest sites and the victim")
    run = c.engine.submit(EXPERIMENT)
    result: dict = {}
    engine = threading.Thread(target=lambda: result.update(row=c.engine.execute(run.run_id)))
    engine.start()
    try:
        messages = list(victim.PullTask(
            fleet_pb2.PullTaskRequest(site_id="victim", wait_s=20), timeout=30
        ))  # fmt: skip
        header = messages[0].header
        assert header.round == 1
        hostile_requests(c, victim, victim_token, recorded)
        model = {t.name: np.zeros(tuple(t.shape), t.dtype) for t in header.model.tensors}
        payload = encode({k: v + 1.0 for k, v in model.items()})

        def push(site_id: str) -> fleet_pb2.PushReply:
            result_header = fleet_pb2.ResultHeader(
                site_id=site_id, task_id=header.task_id, num_examples=1000
            )
            result_header.update.CopyFrom(payload.header())
            stream = [fleet_pb2.ResultMessage(header=result_header)] + [
                fleet_pb2.ResultMessage(chunk=common_pb2.Chunk(data=d)) for d in payload.chunks()
            ]
            return victim.PushResult(iter(stream), timeout=10)

        refused(lambda: push("honest-0"), "site_mismatch")  # a result under another's name
        revoked = control(c).RevokeSite(control_pb2.RevokeSiteRequest(site_id="victim"), timeout=5)
        assert revoked.changed and revoked.site.status == "revoked" and not revoked.site.online
        refused(lambda: push("victim"), "revoked")  # too late: refused before it is folded
        beat = fleet_pb2.HeartbeatRequest(site_id="victim", task_id=header.task_id)
        refused(lambda: victim.Heartbeat(beat, timeout=5), "revoked")
        engine.join(timeout=60)
    finally:
        stop.set()
    assert result["row"].status == "finished", result["row"].error

    first, second = ledger_payloads(c, "round_committed")
    honest = sorted(HONEST)
    assert first["sampled"] == [*honest, "victim"]
    assert first["participants"] == honest and sorted(first["update_digests"]) == honest
    assert first["dropped"] == [{"site": "victim", "reason": "revoked"}]
    assert first["rejected"] == []
    assert second["sampled"] == honest and second["participants"] == honest  # not sampled again
    # the committed model is the honest sites' FedAvg, nothing else
    start = c.db.models.get(first["input_model"])
    weights = {name: HONEST[name].num_examples for name in honest}
    deltas = {name: HONEST[name].delta(start) for name in honest}
    expected = {
        k: v + sum(weights[s] * deltas[s][k].astype(np.float64) for s in honest) / sum(
            weights.values()
        ) if k in deltas[honest[0]] else v
        for k, v in start.items()
    }  # fmt: skip
    output = c.db.models.get(first["output_model"])
    for name, value in expected.items():
        np.testing.assert_allclose(output[name], value, rtol=1e-5, atol=1e-6)

    enrolled = {p["site_id"]: p for p in ledger_payloads(c, "site_enrolled")}
    assert sorted(enrolled) == [*honest, "victim"]  # no stranger, latecomer or thief
    assert enrolled["victim"]["public_key_fingerprint"] == key_fingerprint(
        victim.identity.public_key
    )
    assert [p["site_id"] for p in ledger_payloads(c, "site_revoked")] == ["victim"]
    assert {s for s, _ in c.db.sites()} == {*honest, "victim", "latecomer"}
    assert c.db.verify_ledger() > 0


class Idle(Client):
    """A site that never gets a task in these tests."""

    def fit(self, arrays, config):  # pragma: no cover - never called
        raise AssertionError("no task expected")

    def evaluate(self, arrays, config):  # pragma: no cover
        raise AssertionError("no task expected")


def idle_site() -> Idle:
    return Idle()


def together(*commands: tuple[str, ...]) -> list[subprocess.CompletedProcess[str]]:
    """Run ``fedcoord`` commands side by side (each one start-up is the slow part)."""
    with ThreadPoolExecutor(len(commands)) as pool:
        return list(pool.map(lambda args: fedcoord(*args, timeout=60), commands))


def test_sites_commands_and_a_token_enrolled_site_process(coordinator, tmp_path):
    """``fedcoord sites add|list|revoke`` on the data directory of a running coordinator
    and through its Control service; ``fedcoord site --token --state-dir`` keeps its key
    and re-enrolls after a restart without a new token."""
    c = coordinator
    data, address = str(c.db.data_dir), c.address
    added, via_rpc = together(
        ("sites", "add", "hospital-1", "--data-dir", data),
        ("sites", "add", "hospital-2", "--coordinator", address, "--insecure", "--ttl", "1h"),
    )
    assert added.returncode == 0 and via_rpc.returncode == 0, added.stderr + via_rpc.stderr
    token = added.stdout.strip()
    assert len(token) >= 43 and "shown only this once" in added.stderr
    second = SignedFleet(
        fleet_pb2_grpc.FleetStub(channel(c)), SiteIdentity.generate(), "hospital-2"
    )
    enroll(second, via_rpc.stdout.strip())

    state = tmp_path / "site-state"
    procs = Processes(tmp_path)
    site_args = ("site", "--coordinator", address, "--site-id", "hospital-1", "--client",
                 "tests.integration.test_identity:idle_site", "--state-dir", str(state),
                 "--insecure")  # fmt: skip
    try:
        site = procs.start("site", *site_args, "--token", token)
        procs.wait_for_log(site, "site hospital-1 enrolled", "the site to enroll")
        key_file = state / "hospital-1.ed25519.pem"
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        pinned = (state / "hospital-1.coordinator-key").read_text().strip()
        assert pinned == c.db.signing_key.public_key().public_bytes_raw().hex()
        row = c.db.site("hospital-1")
        assert (
            row is not None and row.public_key == SiteIdentity.load_or_create(key_file).public_key
        )
        listed = fedcoord("sites", "list", "--coordinator", address, "--insecure")
        assert listed.returncode == 0, listed.stderr
        lines = {ln.split("\t")[0]: ln.split("\t") for ln in listed.stdout.splitlines()}
        assert lines["hospital-1"][1:3] == ["enrolled", "online"]
        assert lines["hospital-1"][3] == key_fingerprint(row.public_key)[:23]
        site.kill()
        site.wait(timeout=10)
        again = procs.start("site-again", *site_args)  # no token: the kept key is enrolled
        procs.wait_for_log(again, "enrolled", "the site to re-enroll")
        assert again.poll() is None
        assert "trust on first use" not in procs.log(again)  # it started from its kept pin

        revokes = together(
            ("sites", "revoke", "hospital-1", "--data-dir", data),  # while the coordinator runs
            ("sites", "revoke", "hospital-2", "--coordinator", address, "--insecure"),
        )
        for done in revokes:
            assert done.returncode == 0 and "revoked" in done.stdout, done.stderr
        assert again.wait(timeout=30) == 1  # its next request is refused: it stops
        assert "revoked" in procs.log(again) and "Traceback" not in procs.log(again)
    finally:
        procs.stop_all()
    refused(lambda: second.Heartbeat(fleet_pb2.HeartbeatRequest(site_id="hospital-2"), 5),
            "revoked")  # fmt: skip
    listed, verified = together(("sites", "list", "--data-dir", data), ("ledger", "verify", data))
    assert [ln.split("\t")[:3] for ln in listed.stdout.splitlines()] == [
        ["hospital-1", "revoked", "-"], ["hospital-2", "revoked", "-"],
    ]  # fmt: skip
    kinds = [e.kind for e in c.db.ledger_entries()]
    assert kinds[:2] == ["site_invited"] * 2 and kinds[-2:] == ["site_revoked"] * 2
    assert sorted(kinds[2:-2]) == ["site_enrolled"] * 2
    assert verified.returncode == 0, verified.stderr


@pytest.mark.parametrize(
    "args, key",
    [
        (["sites", "add", "../etc", "--data-dir", "{data}"], "NAME"),
        (["sites", "add", "s1", "--data-dir", "{data}", "--ttl", "0"], "--ttl"),
        (["sites", "add", "s1", "--data-dir", "{data}", "--ttl", "soon"], "--ttl"),
        (["sites", "revoke", "nobody", "--data-dir", "{data}"], "NAME"),
        (["sites", "revoke", "nobody", "--coordinator", "{address}", "--insecure"], "NAME"),
        (["sites", "list", "--data-dir", "{tmp}"], "--data-dir"),
    ],
)
def test_sites_command_errors_are_one_line(coordinator, tmp_path, capsys, args, key):
    from simulations.cli import main

    values = {"data": str(coordinator.db.data_dir), "address": coordinator.address,
              "tmp": str(tmp_path / "none")}  # fmt: skip
    try:
        code = main([a.format(**values) for a in args])
    except SystemExit as exc:  # argparse refuses a malformed flag value itself
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("fedcoord: error:"), err
    assert key in err
    assert coordinator.db.ledger_entries() == [] and coordinator.db.sites() == []


def test_open_enrollment_sites_sign_too(tmp_path):
    """Under ``--open-enrollment`` any well-formed name joins without a token, but its
    requests are signed all the same, by the key it enrolled last."""
    c = Coordinator(tmp_path / "open", "127.0.0.1:0", open_enrollment=True)
    c.start(run_engine=False)
    try:
        raw = fleet_pb2_grpc.FleetStub(channel(c))
        first = SignedFleet(raw, SiteIdentity.generate(), "lab")
        enroll(first)
        beat = fleet_pb2.HeartbeatRequest(site_id="lab")
        assert not first.Heartbeat(beat, timeout=5).task_active
        refused(lambda: raw.Heartbeat(beat, timeout=5), "unsigned")
        restarted = SignedFleet(raw, SiteIdentity.generate(), "lab")
        enroll(restarted)  # a new key for the name: the old one signs no more
        refused(lambda: first.Heartbeat(beat, timeout=5), "bad_signature")
        assert not restarted.Heartbeat(beat, timeout=5).task_active
        entries = ledger_payloads(c, "site_enrolled")
        assert [e["via"] for e in entries] == ["open_enrollment"] * 2
        assert entries[1]["replaces"] is not None
    finally:
        c.stop(grace=0.5)
