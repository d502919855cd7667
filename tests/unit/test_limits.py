"""Server-side limits: token buckets, stream counting, who a request is from, and the
cut-offs of a client stream (stall, slow drip, deadline, too many bytes)."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

import grpc
import pytest

from coordinator.limits import (
    ANONYMOUS,
    GuardedRequests,
    Limits,
    LimitsInterceptor,
    RateLimiter,
    StreamCounter,
    TokenBucket,
    _Call,
    _RequestPump,
    site_of,
)
from protos.fedcoord.v1 import common_pb2, fleet_pb2
from protos.wire import chunk_view


class Aborted(Exception):
    pass


class FakeContext:
    """Stands in for the gRPC servicer context: records the abort and raises."""

    def __init__(self) -> None:
        self.status: tuple[grpc.StatusCode, str] | None = None
        self.cancelled = False

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.status = (code, details)
        raise Aborted(details)

    def cancel(self) -> None:
        self.cancelled = True

    def peer(self) -> str:
        return "ipv4:10.0.0.7:5123"


class Observer:
    def __init__(self) -> None:
        self.refusals: list[str] = []
        self.bytes_in = 0

    def refused(self, reason: str) -> None:
        self.refusals.append(reason)

    def received(self, method: str, nbytes: int) -> None:
        self.bytes_in += nbytes

    def sent(self, method: str, nbytes: int) -> None:
        pass


def test_token_bucket_allows_the_burst_then_the_rate():
    bucket = TokenBucket(rate=10, capacity=5, now=0.0)
    assert [bucket.take(0.0) for _ in range(6)] == [True] * 5 + [False]
    assert bucket.take(0.1)  # one token back after 1/rate seconds
    assert not bucket.take(0.1)
    assert bucket.full(10.0) and bucket.tokens == 5  # never more than the capacity


def test_rate_limiter_keeps_sites_apart_and_bounds_its_memory():
    limiter = RateLimiter(rate=1, capacity=2, max_tracked=3)
    assert limiter.allow("a", 0.0) and limiter.allow("a", 0.0)
    assert not limiter.allow("a", 0.0)
    assert limiter.allow("b", 0.0)  # another site has its own bucket
    limiter.allow("c", 0.0)
    # full: a new key finds no room; spent buckets are kept, so "d" shares the
    # anonymous bucket rather than resetting anyone's
    assert limiter.allow("d", 0.0) and limiter.allow("d", 0.0)
    assert not limiter.allow("f", 0.0)  # "d" and "f" share the one anonymous bucket
    assert limiter.tracked() == 4  # the three sites and the anonymous bucket
    assert not limiter.allow("a", 0.0)
    # once the buckets refill they are forgotten and new keys get their own again
    assert limiter.allow("e", 100.0) and limiter.tracked() == 1


def test_stream_counter_limits_each_site_and_releases():
    streams = StreamCounter(limit=2)
    assert streams.acquire("a") and streams.acquire("a")
    assert not streams.acquire("a")
    assert streams.acquire("b")
    streams.release("a")
    assert streams.open("a") == 1 and streams.acquire("a")
    for _ in range(3):
        streams.release("a")
    assert streams.open("a") == 0


def test_limits_refuse_nonsense():
    with pytest.raises(ValueError, match="max_streams_per_site"):
        Limits(max_streams_per_site=0)
    with pytest.raises(ValueError, match="rate_per_s"):
        Limits(rate_per_s=0)
    assert Limits(rate_per_s=7).bucket_size == 14
    assert Limits(rate_per_s=7, burst=3).bucket_size == 3


def test_site_of_reads_requests_and_result_headers():
    assert site_of(fleet_pb2.PullTaskRequest(site_id="hospital-a")) == "hospital-a"
    first = fleet_pb2.ResultMessage(header=fleet_pb2.ResultHeader(site_id="hospital-b"))
    assert site_of(first) == "hospital-b"
    assert site_of(fleet_pb2.ResultMessage(chunk=common_pb2.Chunk(data=b"x"))) == ANONYMOUS
    assert site_of(fleet_pb2.PullTaskRequest(site_id="../etc/passwd")) == ANONYMOUS
    assert site_of(fleet_pb2.PullTaskRequest(site_id="x" * 65)) == ANONYMOUS
    assert site_of(None) == ANONYMOUS


def chunk(n: int) -> fleet_pb2.ResultMessage:
    return fleet_pb2.ResultMessage(chunk=common_pb2.Chunk(data=bytes(n)))


def guarded(
    source: Iterator[fleet_pb2.ResultMessage], limits: Limits
) -> tuple[GuardedRequests, FakeContext, Observer]:
    context, observer = FakeContext(), Observer()
    interceptor = LimitsInterceptor(limits, observer)
    call = _Call("/fedcoord.v1.Fleet/PushResult", context, limits.transfer_timeout_s)  # type: ignore[arg-type]
    call.site = "s1"
    return (
        GuardedRequests(_RequestPump(source), call, limits, interceptor._cut, observer),
        context,
        observer,
    )


def test_a_complete_stream_passes_through_and_is_counted():
    messages = [fleet_pb2.ResultMessage(header=fleet_pb2.ResultHeader(site_id="s1"))]
    messages += [chunk(1000) for _ in range(5)]
    stream, context, observer = guarded(iter(messages), Limits(stall_timeout_s=2))
    assert stream.peek().header.site_id == "s1"
    assert list(stream) == messages
    assert context.status is None
    assert observer.bytes_in == sum(m.ByteSize() for m in messages)


def test_chunks_read_as_views_are_counted_at_their_wire_size():
    header = fleet_pb2.ResultMessage(header=fleet_pb2.ResultHeader(site_id="s1"))
    raw = [chunk(n).SerializeToString() for n in (0, 1000, 1 << 20)]
    views = [chunk_view(r) for r in raw]
    stream, _, observer = guarded(iter([header, *views]), Limits(stall_timeout_s=2))
    assert [bytes(v) for v in list(stream)[1:]] == [bytes(v) for v in views]
    assert observer.bytes_in == header.ByteSize() + sum(len(r) for r in raw)
    assert site_of(views[1]) == ANONYMOUS


def test_a_stalled_stream_is_cut_with_deadline_exceeded():
    release = threading.Event()

    def stalls() -> Iterator[fleet_pb2.ResultMessage]:
        yield chunk(10)
        release.wait(5)

    stream, context, observer = guarded(stalls(), Limits(stall_timeout_s=0.3))
    t0 = time.monotonic()
    next(stream)
    with pytest.raises(Aborted):
        next(stream)
    release.set()
    assert 0.25 < time.monotonic() - t0 < 2
    assert context.status is not None
    assert context.status[0] == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "stalled: no message for 0.3s" in context.status[1]
    assert observer.refusals == ["stalled"]


def test_a_slow_drip_is_cut_once_under_the_minimum_rate():
    stop = threading.Event()

    def drips() -> Iterator[fleet_pb2.ResultMessage]:
        while not stop.is_set():  # 100 bytes every 50 ms: ~2 KB/s, never a stall
            yield chunk(100)
            time.sleep(0.05)

    limits = Limits(stall_timeout_s=0.5, min_bytes_per_s=64 * 1024)
    stream, context, observer = guarded(drips(), limits)
    t0 = time.monotonic()
    with pytest.raises(Aborted):
        for _ in stream:
            pass
    stop.set()
    assert time.monotonic() - t0 < 2
    assert context.status is not None and "too slow" in context.status[1]
    assert observer.refusals == ["too_slow"]


def test_a_stream_past_its_server_side_limit_is_cut():
    stop = threading.Event()

    def endless() -> Iterator[fleet_pb2.ResultMessage]:
        while not stop.is_set():
            yield chunk(1 << 16)
            time.sleep(0.01)

    limits = Limits(transfer_timeout_s=0.4, stall_timeout_s=5, min_bytes_per_s=0)
    stream, context, observer = guarded(endless(), limits)
    with pytest.raises(Aborted):
        for _ in stream:
            pass
    stop.set()
    assert context.status is not None
    assert context.status[0] == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "exceeded the server-side limit of 0.4s" in context.status[1]
    assert observer.refusals == ["deadline_exceeded"]


def test_admission_refuses_floods_and_extra_streams_with_resource_exhausted():
    limits = Limits(max_streams_per_site=2, rate_per_s=1, burst=3)
    interceptor = LimitsInterceptor(limits, Observer())

    def admit(method: str, site: str) -> FakeContext:
        context = FakeContext()
        call = _Call(method, context, 1.0)  # type: ignore[arg-type]
        with contextlib.suppress(Aborted):
            interceptor._admit(call, site)
        return context

    push = "/fedcoord.v1.Fleet/PushResult"
    assert admit(push, "a").status is None and admit(push, "a").status is None
    status = admit(push, "a").status
    assert status == (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "too many concurrent streams for site 'a' (limit 2)",
    )
    status = admit("/fedcoord.v1.Fleet/Heartbeat", "a").status  # the 4th request: over burst 3
    assert status is not None and status[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "request rate limit exceeded for site 'a'" in status[1]
    assert admit("/fedcoord.v1.Fleet/Heartbeat", "b").status is None
    assert interceptor.streams.open("a@10.0.0.7") == 2
