"""Operations and limits on a real coordinator with real sites: Prometheus metrics over
HTTP, the health service through a stop, structured logs, and the server-side limits
(floods, too many streams, oversized, lying and stalled uploads) that refuse hostile
callers with a clear status while honest sites finish their run."""

from __future__ import annotations

import io
import json
import logging
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from client_sdk.identity import SignedFleet, SiteIdentity
from coordinator.limits import Limits
from coordinator.logs import make_handler
from coordinator.server import Coordinator
from coordinator.tasks import load_task
from protos.codec import CHUNK_SIZE, encode
from protos.fedcoord.v1 import common_pb2, fleet_pb2, fleet_pb2_grpc
from tests.integration.clients import HostileSite, ledger_payloads, start_site_threads

pytestmark = pytest.mark.integration

EXPERIMENT = """
name: ops-test
seed: 3
rounds: {rounds}
task: {{name: digits}}
federation:
  sites: {sites}
  sampling: {{fraction: 1.0, method: fixed, min_sites: 2, timeout_s: 30}}
training: {{local_epochs: 1, batch_size: 32}}
"""

Make = Callable[..., Coordinator]


@pytest.fixture
def make_coordinator(tmp_path: Path) -> Iterator[Make]:
    """Real coordinators on 127.0.0.1 (open enrollment, engine driven by the test)."""
    made: list[Coordinator] = []

    def make(**settings: object) -> Coordinator:
        c = Coordinator(
            tmp_path / f"coord-{len(made)}", "127.0.0.1:0", open_enrollment=True, **settings
        )
        c.start(run_engine=False)
        made.append(c)
        return c

    yield make
    for c in made:
        c.stop(grace=0.5)


def honest_sites(n: int) -> dict:
    task = load_task("digits", None, {}, 0)
    return {f"honest-{i}": task.make_client(i, n, {"kind": "iid"}, 0) for i in range(n)}


def scrape(c: Coordinator) -> dict[tuple[str, frozenset], float]:
    """Every sample of ``/metrics``, by name and labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{c.metrics.port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def sample(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def signed(c: Coordinator, site_id: str, enroll: bool = True) -> SignedFleet:
    stub = SignedFleet(
        fleet_pb2_grpc.FleetStub(grpc.insecure_channel(c.address)), SiteIdentity.generate(), site_id
    )
    if enroll:
        request = fleet_pb2.EnrollRequest(site_id=site_id, public_key=stub.identity.public_key)
        stub.Enroll(request, timeout=5)
    return stub


def test_metrics_health_and_json_logs_of_a_real_run(make_coordinator):
    c = make_coordinator(metrics_address="127.0.0.1:0")
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(c.address))
    watch = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=60)
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING

    json_out, text_out = io.StringIO(), io.StringIO()
    handlers = [make_handler("json", json_out), make_handler("text", text_out)]
    logger = logging.getLogger("fedcoord")
    level = logger.level
    logger.setLevel(logging.INFO)
    for h in handlers:
        logger.addHandler(h)
    stop = threading.Event()
    start_site_threads(c.address, {**honest_sites(3), "nan-site": HostileSite("nan")}, stop)
    try:
        run = c.engine.submit(EXPERIMENT.format(rounds=2, sites=4))
        final = c.engine.execute(run.run_id)
        samples = scrape(c)
        online = len(c.dispatcher.online())
    finally:
        stop.set()
        for h in handlers:
            logger.removeHandler(h)
        logger.setLevel(level)
    assert final.status == "finished", final.error
    committed = ledger_payloads(c, "round_committed")
    assert len(committed) == 2

    assert sample(samples, "fedcoord_rounds_committed_total", run=run.run_id) == 2
    assert sample(samples, "fedcoord_round_duration_seconds_count") == 2
    assert sample(samples, "fedcoord_round_duration_seconds_sum") > 0
    model_bytes = encode(c.db.models.get(committed[0]["input_model"])).total_bytes
    # four sites push a model-sized update in each round; each downloads each model
    assert sample(samples, "fedcoord_bytes_received_total", method="PushResult") > (
        model_bytes * 4 * 2
    )
    assert sample(samples, "fedcoord_bytes_sent_total", method="PullTask") > model_bytes * 4 * 2
    assert sample(samples, "fedcoord_sites_online") == online == 4
    assert sample(samples, "fedcoord_updates_rejected_total", reason="non_finite") == 2
    assert sample(samples, "fedcoord_drift_alerts_total", run=run.run_id) == 0

    records = [json.loads(line) for line in json_out.getvalue().splitlines()]
    assert records and all({"time", "level", "logger", "message"} <= r.keys() for r in records)
    commits = [r for r in records if "[round_committed]" in r["message"]]
    assert [(r["run_id"], r["round"]) for r in commits] == [(run.run_id, 1), (run.run_id, 2)]
    rejected = [r for r in records if "result rejected" in r["message"]]
    assert rejected and all(r["site_id"] == "nan-site" for r in rejected)
    assert f"[{run.run_id} round 2] " in text_out.getvalue()

    c.stop(grace=0.5)
    assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
    with pytest.raises(OSError):
        scrape(c)


def test_floods_and_stream_hoarding_are_refused_while_honest_sites_finish(make_coordinator):
    c = make_coordinator(
        limits=Limits(max_streams_per_site=2, rate_per_s=10, stall_timeout_s=1.0),
        metrics_address="127.0.0.1:0",
    )
    stop = threading.Event()
    start_site_threads(c.address, honest_sites(2), stop)
    run = c.engine.submit(EXPERIMENT.format(rounds=2, sites=2))
    result: dict = {}
    worker = threading.Thread(target=lambda: result.update(row=c.engine.execute(run.run_id)))
    worker.start()

    flooder = signed(c, "flooder", enroll=False)
    codes: dict[grpc.StatusCode, int] = {}
    details = set()
    for _ in range(100):
        try:
            flooder.Heartbeat(fleet_pb2.HeartbeatRequest(site_id="flooder"), timeout=5)
        except grpc.RpcError as exc:
            codes[exc.code()] = codes.get(exc.code(), 0) + 1
            if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                details.add(exc.details())
    assert codes.get(grpc.StatusCode.RESOURCE_EXHAUSTED, 0) >= 70  # burst 20, then 10/s
    assert details == {
        "request rate limit exceeded for site 'flooder' (10/s, burst 20); retry later"
    }

    release = threading.Event()

    def hoard() -> Iterator[fleet_pb2.ResultMessage]:
        release.wait(10)
        yield from ()

    stub = fleet_pb2_grpc.FleetStub(grpc.insecure_channel(c.address))
    outcomes: list[tuple[grpc.StatusCode, str, float]] = []

    def open_stream() -> None:
        t0 = time.monotonic()
        try:
            stub.PushResult(hoard(), metadata=[("x-fedcoord-site", "greedy")], timeout=10)
        except grpc.RpcError as exc:
            outcomes.append((exc.code(), exc.details(), time.monotonic() - t0))

    streams = [threading.Thread(target=open_stream) for _ in range(3)]
    for t in streams:
        t.start()
        time.sleep(0.1)
    for t in streams:
        t.join(timeout=10)
    release.set()
    worker.join(timeout=60)
    stop.set()

    outcomes.sort(key=lambda o: o[2])
    assert outcomes[0][:2] == (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "too many concurrent streams for site 'greedy' (limit 2)",
    )
    for code, text, seconds in outcomes[1:]:  # the two it held were cut when they stalled
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert text == "PushResult stream of site 'greedy' stalled: no message for 1s"
        assert seconds < 5
    assert result["row"].status == "finished", result["row"].error
    entries = ledger_payloads(c, "round_committed")
    assert [e["participants"] for e in entries] == [["honest-0", "honest-1"]] * 2
    assert all(not e["rejected"] and not e["dropped"] for e in entries)
    samples = scrape(c)
    assert sample(samples, "fedcoord_requests_refused_total", reason="rate_limited") >= 70
    assert sample(samples, "fedcoord_requests_refused_total", reason="too_many_streams") == 1
    assert sample(samples, "fedcoord_requests_refused_total", reason="stalled") == 2


class Counted:
    """The messages of a result stream, counting how many the transport took."""

    def __init__(self, messages: Iterator[fleet_pb2.ResultMessage]):
        self.messages = messages
        self.taken = 0

    def __iter__(self) -> Iterator[fleet_pb2.ResultMessage]:
        for m in self.messages:
            self.taken += 1
            yield m


def chunks_of(data: Iterator[bytes]) -> Iterator[fleet_pb2.ResultMessage]:
    for d in data:
        yield fleet_pb2.ResultMessage(chunk=common_pb2.Chunk(data=d))


def test_oversized_lying_and_stalled_uploads_are_cut_and_leave_nothing(make_coordinator):
    c = make_coordinator(limits=Limits(stall_timeout_s=1.0), metrics_address="127.0.0.1:0")
    stop = threading.Event()
    start_site_threads(c.address, honest_sites(2), stop)
    hostile = {name: signed(c, name) for name in ("padder", "boaster", "staller")}
    run = c.engine.submit(EXPERIMENT.format(rounds=1, sites=5))
    result: dict = {}
    worker = threading.Thread(target=lambda: result.update(row=c.engine.execute(run.run_id)))
    worker.start()
    release = threading.Event()
    try:
        tasks = {}
        for name, stub in hostile.items():
            pull = stub.PullTask(fleet_pb2.PullTaskRequest(site_id=name, wait_s=30), timeout=60)
            tasks[name] = next(iter(pull)).header
        model = {t.name: np.zeros(tuple(t.shape), t.dtype) for t in tasks["padder"].model.tensors}
        payload = encode(model)
        extra = 200  # MiB sent past the announced size

        def header(name: str, total_bytes: int | None = None) -> fleet_pb2.ResultMessage:
            h = fleet_pb2.ResultHeader(site_id=name, task_id=tasks[name].task_id, num_examples=10)
            h.update.CopyFrom(payload.header())
            if total_bytes is not None:
                h.update.total_bytes = total_bytes
            return fleet_pb2.ResultMessage(header=h)

        def padded() -> Iterator[fleet_pb2.ResultMessage]:
            yield header("padder")
            yield from chunks_of(payload.chunks())
            yield from chunks_of(bytes(CHUNK_SIZE) for _ in range(extra))

        stream = Counted(padded())
        reply = hostile["padder"].PushResult(iter(stream), timeout=30)
        assert not reply.accepted
        assert reply.reason.startswith("bad_payload: payload stream longer than the announced")
        assert stream.taken < extra // 2  # cut as it passed the size, not read to the end

        def boasting() -> Iterator[fleet_pb2.ResultMessage]:
            yield header("boaster", total_bytes=1 << 40)
            yield from chunks_of(bytes(CHUNK_SIZE) for _ in range(extra))

        stream = Counted(boasting())
        reply = hostile["boaster"].PushResult(iter(stream), timeout=30)
        assert not reply.accepted
        assert reply.reason == (
            f"bad_payload: payload announces {1 << 40} bytes but its tensors need "
            f"{payload.total_bytes}"
        )
        assert stream.taken < extra // 2

        def stalling() -> Iterator[fleet_pb2.ResultMessage]:
            yield header("staller")
            yield from chunks_of(iter([next(payload.chunks())[:100]]))
            release.wait(10)

        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            hostile["staller"].PushResult(stalling(), timeout=30)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert info.value.details() == (
            "PushResult stream of site 'staller' stalled: no message for 1s"
        )
        assert time.monotonic() - t0 < 5
        gave_up = fleet_pb2.ResultHeader(
            site_id="staller", task_id=tasks["staller"].task_id, error="gave up"
        )
        reply = hostile["staller"].PushResult(iter([fleet_pb2.ResultMessage(header=gave_up)]))
        worker.join(timeout=60)
    finally:
        release.set()
        stop.set()
    assert result["row"].status == "finished", result["row"].error
    (entry,) = ledger_payloads(c, "round_committed")
    assert entry["participants"] == ["honest-0", "honest-1"]
    assert set(entry["update_digests"]) == {"honest-0", "honest-1"}
    reasons = {r["site"]: r["reason"] for r in entry["rejected"]}
    assert set(reasons) == {"padder", "boaster"}
    assert all(r.startswith("bad_payload") for r in reasons.values())
    assert {d["site"]: d["reason"] for d in entry["dropped"]} == {"staller": "site_error: gave up"}
    samples = scrape(c)
    assert sample(samples, "fedcoord_updates_rejected_total", reason="bad_payload") == 2
    assert sample(samples, "fedcoord_sites_dropped_total", reason="site_error") == 1
    assert sample(samples, "fedcoord_requests_refused_total", reason="stalled") == 1
