"""Property-based fuzzing of a live Fleet server (hypothesis).

Random bytes, malformed and truncated protobuf messages, oversized announcements and
hostile chunk streams go to a real coordinator on 127.0.0.1, signed by an enrolled site
(so they reach the servicer's own checks) or not. The server must answer every one with
a deliberate status (never ``UNKNOWN``, which is what an exception escaping a handler
becomes), stay healthy, and, while a fuzzer keeps at it during a real run, commit only
the honest sites' updates.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from client_sdk.identity import SignedFleet, SiteIdentity
from coordinator.limits import Limits
from coordinator.server import Coordinator
from coordinator.tasks import load_task
from protos.codec import encode
from protos.fedcoord.v1 import common_pb2, fleet_pb2, fleet_pb2_grpc
from tests.integration.clients import start_site_threads

pytestmark = pytest.mark.integration

FUZZER = "fuzz-site"
DELIBERATE = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.CANCELLED,
}

EXPERIMENT = """
name: fuzz-test
seed: 5
rounds: 3
task: {name: digits}
federation:
  sites: 4
  sampling: {fraction: 1.0, method: fixed, min_sites: 3, timeout_s: 4}
training: {local_epochs: 1, batch_size: 32}
"""


@pytest.fixture(scope="module")
def live(tmp_path_factory) -> Iterator[tuple[Coordinator, SignedFleet, grpc.Channel]]:
    limits = Limits(rate_per_s=100_000.0, max_streams_per_site=64)
    c = Coordinator(tmp_path_factory.mktemp("fuzz") / "coord", open_enrollment=True, limits=limits)
    c.start(run_engine=False)
    channel = grpc.insecure_channel(c.address)
    fleet = SignedFleet(fleet_pb2_grpc.FleetStub(channel), SiteIdentity.generate(), FUZZER)
    enroll = fleet_pb2.EnrollRequest(site_id=FUZZER, public_key=fleet.identity.public_key)
    fleet.Enroll(enroll, timeout=10)
    yield c, fleet, channel
    channel.close()
    c.stop(grace=0.5)


def outcome(call) -> grpc.StatusCode:
    try:
        result = call()
        if isinstance(result, Iterator):
            for _ in result:
                pass
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def assert_deliberate(code: grpc.StatusCode, allow_internal: bool = False) -> None:
    allowed = (
        DELIBERATE
        | {grpc.StatusCode.OK}
        | ({grpc.StatusCode.INTERNAL} if allow_internal else set())
    )
    assert code in allowed, f"the server answered {code} (an exception escaped a handler?)"


def healthy(channel: grpc.Channel) -> bool:
    stub = health_pb2_grpc.HealthStub(channel)
    reply = stub.Check(health_pb2.HealthCheckRequest(service="fedcoord.v1.Fleet"), timeout=5)
    return reply.status == health_pb2.HealthCheckResponse.SERVING


# strategies -----------------------------------------------------------------------------
names = st.text(min_size=0, max_size=80)
digests = st.one_of(
    names, st.builds(lambda b: "sha256:" + b.hex(), st.binary(min_size=32, max_size=32))
)
tensor_specs = st.builds(
    lambda name, dtype, shape: common_pb2.TensorSpec(name=name, dtype=dtype, shape=shape),
    names,
    st.sampled_from(["float32", "float64", "int64", "uint8", "bool", "complex64", "", "<f4", "O"]),
    st.lists(st.integers(-(2**40), 2**40), max_size=5),
)
payload_headers = st.builds(
    lambda tensors, size, digest: common_pb2.PayloadHeader(
        tensors=tensors, total_bytes=size, digest=digest
    ),
    st.lists(tensor_specs, max_size=4),
    st.integers(0, 2**62),
    digests,
)
result_headers = st.builds(
    lambda task, n, metrics, update, error, site: fleet_pb2.ResultHeader(
        site_id=site, task_id=task, num_examples=n, metrics=metrics, update=update, error=error
    ),
    names,
    st.integers(0, 2**63),
    st.dictionaries(names, st.floats(allow_nan=True, allow_infinity=True), max_size=5),
    payload_headers,
    st.one_of(st.just(""), names),
    st.sampled_from([FUZZER, FUZZER, "", "someone-else"]),
)
chunks = st.lists(st.binary(max_size=4096), max_size=6).map(
    lambda parts: [fleet_pb2.ResultMessage(chunk=common_pb2.Chunk(data=b)) for b in parts]
)
streams = st.one_of(
    st.tuples(result_headers, chunks).map(lambda t: [fleet_pb2.ResultMessage(header=t[0]), *t[1]]),
    chunks,  # no header at all
    st.tuples(chunks, result_headers).map(lambda t: [*t[0], fleet_pb2.ResultMessage(header=t[1])]),
)


# properties ------------------------------------------------------------------------------
FUZZ_SETTINGS = settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@FUZZ_SETTINGS
@given(messages=streams)
def test_hostile_result_streams_get_a_deliberate_status(live, messages):
    _, fleet, _ = live
    if messages and messages[0].WhichOneof("kind") == "header":
        code = outcome(lambda: fleet.PushResult(iter(messages), timeout=10))
    else:
        code = outcome(lambda: fleet.stub.PushResult(iter(messages), timeout=10))
    assert_deliberate(code)


@FUZZ_SETTINGS
@given(
    method=st.sampled_from(["Enroll", "PullTask", "PushResult", "Heartbeat", "GetReceipt"]),
    data=st.binary(max_size=2048),
    signed=st.booleans(),
)
def test_random_bytes_to_every_method_get_a_deliberate_status(live, method, data, signed):
    _, fleet, channel = live
    path = f"/fedcoord.v1.Fleet/{method}"
    metadata = fleet.identity.sign(path, fleet_pb2.PullTaskRequest(), FUZZER) if signed else None
    identity = bytes
    if method == "PushResult":
        call = channel.stream_unary(
            path, request_serializer=identity, response_deserializer=identity
        )
        code = outcome(lambda: call(iter([data, data[::-1]]), timeout=10, metadata=metadata))
    elif method == "PullTask":
        call = channel.unary_stream(
            path, request_serializer=identity, response_deserializer=identity
        )
        code = outcome(lambda: call(data, timeout=10, metadata=metadata))
    else:
        call = channel.unary_unary(
            path, request_serializer=identity, response_deserializer=identity
        )
        code = outcome(lambda: call(data, timeout=10, metadata=metadata))
    assert_deliberate(code, allow_internal=True)  # INTERNAL: bytes that do not parse


@FUZZ_SETTINGS
@given(cached=digests, task=names, run=names, round_no=st.integers(0, 2**32 - 1))
def test_hostile_polls_heartbeats_and_receipt_requests(live, cached, task, run, round_no):
    _, fleet, _ = live
    poll = fleet_pb2.PullTaskRequest(site_id=FUZZER, cached_model_digest=cached, wait_s=0)
    assert_deliberate(outcome(lambda: fleet.PullTask(poll, timeout=10)))
    beat = fleet_pb2.HeartbeatRequest(site_id=FUZZER, task_id=task)
    assert_deliberate(outcome(lambda: fleet.Heartbeat(beat, timeout=10)))
    ask = fleet_pb2.ReceiptRequest(site_id=FUZZER, run_id=run, round=round_no)
    assert_deliberate(outcome(lambda: fleet.GetReceipt(ask, timeout=10)))


def fuzz_its_own_tasks(fleet: SignedFleet, stop: threading.Event, seed: int) -> None:
    """A sampled site that answers its real tasks with hostile streams: a valid header
    with a wrong digest, a truncated payload, a payload of another shape, NaNs."""
    rng = np.random.default_rng(seed)
    while not stop.is_set():
        try:
            first = next(iter(fleet.PullTask(fleet_pb2.PullTaskRequest(site_id=FUZZER, wait_s=1),
                                             timeout=10)))  # fmt: skip
        except (grpc.RpcError, StopIteration):
            continue
        if first.WhichOneof("kind") != "header":
            continue
        task = first.header
        arrays = {t.name: np.zeros(tuple(t.shape), t.dtype) for t in task.model.tensors}
        kind = int(rng.integers(4))
        if kind == 3:
            arrays = {k: np.full_like(v, np.nan) for k, v in arrays.items()}
        payload = encode(arrays)
        header = fleet_pb2.ResultHeader(site_id=FUZZER, task_id=task.task_id, num_examples=10)
        header.update.CopyFrom(payload.header())
        parts = list(payload.chunks())
        if kind == 0:
            header.update.digest = "sha256:" + "0" * 64
        elif kind == 1:
            parts = [p[: len(p) // 2] for p in parts]
        elif kind == 2:
            header.update.tensors[0].shape.append(2)
        messages = [fleet_pb2.ResultMessage(header=header)] + [
            fleet_pb2.ResultMessage(chunk=common_pb2.Chunk(data=p)) for p in parts
        ]
        outcome(lambda messages=messages: fleet.PushResult(iter(messages), timeout=10))


def test_a_fuzzed_site_in_a_real_run_changes_nothing_and_honest_sites_finish(live):
    coordinator, fleet, channel = live
    task = load_task("digits", None, {}, 0)
    honest = {f"honest-{i}": task.make_client(i, 3, {"kind": "iid"}, 0) for i in range(3)}
    stop = threading.Event()
    start_site_threads(coordinator.address, honest, stop)
    fuzzer = threading.Thread(target=fuzz_its_own_tasks, args=(fleet, stop, 7), daemon=True)
    fuzzer.start()
    try:
        run = coordinator.engine.submit(EXPERIMENT)
        final = coordinator.engine.execute(run.run_id)
    finally:
        stop.set()
        fuzzer.join(timeout=15)
    assert final.status == "finished", final.error
    rounds = [e.payload for e in coordinator.db.ledger_entries() if e.kind == "round_committed"]
    assert len(rounds) == 3
    for entry in rounds:
        assert entry["participants"] == sorted(honest)
        assert FUZZER not in entry["update_digests"]
        refused = {r["site"] for r in entry["rejected"]} | {d["site"] for d in entry["dropped"]}
        assert FUZZER in refused
    assert coordinator.db.verify_ledger() > 0
    assert healthy(channel)
