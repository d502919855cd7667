"""Per-site limits on the gRPC server: concurrent streams, request rate, deadlines.

:class:`LimitsInterceptor` wraps every Fleet and Control RPC (the health service is
left alone: probes must not be refused by the load they measure). It names the caller
by the ``x-fedcoord-site`` metadata key, else by the request's ``site_id`` (for
``PushResult``: its first message's header); callers without one are anonymous. Limits
count per site *and caller address*: signatures are verified later, by the servicer,
so a caller that names another site uses up its own allowance, not that site's.

Refusals are ``RESOURCE_EXHAUSTED`` (too many streams, rate limit) and
``DEADLINE_EXCEEDED`` (past the RPC's server-side limit, a stalled or too slow client
stream). A refused or cut stream reaches the servicer either not at all or as an abort
in the middle of its reading, so nothing of it is kept.

The interceptor also counts bytes per method and refusals for an optional
:class:`CallObserver` (the metrics) and tags log records of the call with its site.
As it rebuilds each handler it installs the chunk streams' wire forms
(:mod:`protos.wire`): responses already encoded (``bytes``) are sent as they are, and
``PushResult``'s chunks reach the servicer as views of the received bytes.
"""

from __future__ import annotations

import argparse
import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import grpc

from coordinator.logs import LogThrottle, log_context
from protos.signing import SITE_HEADER, SITE_ID
from protos.wire import chunk_message_size, passing_bytes, reading_chunks

log = logging.getLogger("fedcoord.limits")

ANONYMOUS = ""
"""Bucket key of callers that name no (well-formed) site."""
EXEMPT_PREFIXES = ("/grpc.health.v1.Health/",)
SITE_STREAMS = frozenset({"/fedcoord.v1.Fleet/PullTask", "/fedcoord.v1.Fleet/PushResult"})
"""The streaming RPCs counted against ``max_streams_per_site``."""
CHUNK_UPLOADS = frozenset({"/fedcoord.v1.Fleet/PushResult"})
"""Client streams of chunk messages: their chunks reach the servicer as views of the
received bytes (:func:`protos.wire.reading_chunks`), not as parsed messages."""
MAX_TRACKED_BUCKETS = 10_000
LOG_EVERY_S = 10.0
WATCHDOG_INTERVAL_S = 0.25
WATCHDOG_SLACK_S = 1.0
"""How long after its limit the watchdog cancels a call the handler has not ended."""


@dataclass(frozen=True)
class Limits:
    """Server-side limits of a coordinator.

    Parameters
    ----------
    max_streams_per_site
        Concurrent ``PullTask`` + ``PushResult`` streams one site may hold.
    rate_per_s, burst
        Token bucket per site: sustained requests per second and the bucket size
        (``None``: twice the rate).
    rpc_timeout_s
        Server-side limit of a unary RPC.
    transfer_timeout_s
        Server-side limit of a streaming RPC (a model download, an update upload).
    stall_timeout_s
        The longest wait for the next message of a client stream, or for one message
        of a server stream to be taken by the client.
    min_bytes_per_s
        Slowest average upload accepted once the first ``stall_timeout_s`` are over.
    """

    max_streams_per_site: int = 4
    rate_per_s: float = 50.0
    burst: float | None = None
    rpc_timeout_s: float = 60.0
    transfer_timeout_s: float = 3600.0
    stall_timeout_s: float = 30.0
    min_bytes_per_s: float = 16 * 1024

    def __post_init__(self) -> None:
        if self.max_streams_per_site < 1:
            raise ValueError("max_streams_per_site must be at least 1")
        for name in ("rate_per_s", "rpc_timeout_s", "transfer_timeout_s", "stall_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive")
        if self.burst is not None and self.burst < 1:
            raise ValueError("burst must be at least 1")
        if self.min_bytes_per_s < 0:
            raise ValueError("min_bytes_per_s must not be negative")

    @property
    def bucket_size(self) -> float:
        return self.burst if self.burst is not None else max(1.0, 2 * self.rate_per_s)


DEFAULT_LIMITS = Limits()


def count_flag(text: str) -> int:
    """A whole number >= 1 (argparse type of ``--max-streams-per-site``)."""
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
    return int(text)


def rate_flag(text: str) -> float:
    """A finite number > 0 (argparse type of ``--rate-limit``, requests per second)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}")
    return value


class CallObserver(Protocol):
    """What the interceptor reports (implemented by :class:`coordinator.metrics.Metrics`)."""

    def refused(self, reason: str) -> None: ...

    def received(self, method: str, nbytes: int) -> None: ...

    def sent(self, method: str, nbytes: int) -> None: ...


class TokenBucket:
    """``rate`` tokens per second up to ``capacity``; one request takes one token."""

    def __init__(self, rate: float, capacity: float, now: float):
        self.rate = rate
        self.capacity = capacity
        self.tokens = capacity
        self.updated = now

    def _refill(self, now: float) -> None:
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = max(self.updated, now)

    def take(self, now: float) -> bool:
        self._refill(now)
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False

    def full(self, now: float) -> bool:
        self._refill(now)
        return self.tokens >= self.capacity


class RateLimiter:
    """Token buckets by key (thread-safe). Full buckets are forgotten when more than
    ``max_tracked`` keys are held; past that, new keys share the anonymous bucket."""

    def __init__(self, rate: float, capacity: float, max_tracked: int = MAX_TRACKED_BUCKETS):
        self.rate = rate
        self.capacity = capacity
        self.max_tracked = max_tracked
        self._buckets: dict[str, TokenBucket] = {}
        self._lock = threading.Lock()

    def allow(self, key: str, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        with self._lock:
            bucket = self._buckets.get(key)
            if bucket is None:
                if len(self._buckets) >= self.max_tracked:
                    self._buckets = {k: b for k, b in self._buckets.items() if not b.full(now)}
                if len(self._buckets) >= self.max_tracked:
                    key = ANONYMOUS
                bucket = self._buckets.get(key)
                if bucket is None:
                    bucket = self._buckets[key] = TokenBucket(self.rate, self.capacity, now)
            return bucket.take(now)

    def tracked(self) -> int:
        with self._lock:
            return len(self._buckets)


class StreamCounter:
    """Open streams by key, at most ``limit`` each (thread-safe)."""

    def __init__(self, limit: int):
        self.limit = limit
        self._open: dict[str, int] = {}
        self._lock = threading.Lock()

    def acquire(self, key: str) -> bool:
        with self._lock:
            n = self._open.get(key, 0)
            if n >= self.limit:
                return False
            self._open[key] = n + 1
            return True

    def release(self, key: str) -> None:
        with self._lock:
            n = self._open.get(key, 0) - 1
            if n > 0:
                self._open[key] = n
            else:
                self._open.pop(key, None)

    def open(self, key: str) -> int:
        with self._lock:
            return self._open.get(key, 0)


def site_of(message: Any) -> str:
    """The ``site_id`` a request names (a ``PushResult`` message: its header's)."""
    if message is None or isinstance(message, memoryview):  # none, or a chunk's data
        return ANONYMOUS
    fields = message.DESCRIPTOR.fields_by_name
    if "header" in fields and message.WhichOneof("kind") == "header":
        message = message.header
        fields = message.DESCRIPTOR.fields_by_name
    site = getattr(message, "site_id", "") if "site_id" in fields else ""
    return site if isinstance(site, str) and SITE_ID.match(site) else ANONYMOUS


def _size(message: Any) -> int:
    """A message's size on the wire: a pre-encoded one's length; a chunk message's from
    its data's length (``ByteSize`` would encode the whole megabyte again)."""
    if message is None:
        return 0
    if isinstance(message, bytes):
        return len(message)
    if isinstance(message, memoryview):  # a chunk's data (``reading_chunks``)
        return chunk_message_size(len(message))
    try:
        kind = message.WhichOneof("kind")
    except ValueError:  # a message without a ``kind``
        kind = None
    if kind == "chunk":
        return chunk_message_size(len(message.chunk.data))
    return int(message.ByteSize())


def peer_host(context: grpc.ServicerContext) -> str:
    """The caller's address without its port (``ipv4:10.0.0.7:5123`` -> ``10.0.0.7``)."""
    peer = context.peer() or ""
    kind, _, rest = peer.partition(":")
    return rest.rsplit(":", 1)[0] if kind in ("ipv4", "ipv6") else peer


def describe(site: str) -> str:
    return f"site {site!r}" if site else "anonymous callers"


class _Call:
    """The limits' view of one RPC in flight."""

    def __init__(self, method: str, context: grpc.ServicerContext, limit_s: float):
        self.method = method
        self.name = method.rsplit("/", 1)[-1]
        self.context = context
        self.started = time.monotonic()
        self.deadline = self.started + limit_s
        self.limit_s = limit_s
        self.site = ANONYMOUS
        self.key = ANONYMOUS
        """What the call is counted under: its site and the caller's address."""
        self.received = 0
        self.sending_since: float | None = None
        self.expired: str | None = None
        self.holds_stream = False

    def overdue(self, now: float, stall_s: float) -> str | None:
        """Why the watchdog must cancel the call now (``None``: not yet)."""
        if now > self.deadline + WATCHDOG_SLACK_S:
            return "deadline_exceeded"
        if self.sending_since is not None and now > self.sending_since + stall_s:
            return "stalled"
        return None


class _Watchdog:
    """One thread that cancels calls a handler cannot end itself: a unary handler past
    its limit, a server stream blocked on a client that does not read. It runs while
    calls are registered and exits when none are."""

    def __init__(self, stall_s: float, on_expire: Callable[[_Call, str], None]):
        self.stall_s = stall_s
        self.on_expire = on_expire
        self._calls: set[_Call] = set()
        self._lock = threading.Lock()
        self._running = False

    def add(self, call: _Call) -> None:
        with self._lock:
            self._calls.add(call)
            if not self._running:
                self._running = True
                threading.Thread(target=self._run, name="fedcoord-watchdog", daemon=True).start()

    def remove(self, call: _Call) -> None:
        with self._lock:
            self._calls.discard(call)

    def _run(self) -> None:
        while True:
            time.sleep(WATCHDOG_INTERVAL_S)
            now = time.monotonic()
            with self._lock:
                if not self._calls:
                    self._running = False
                    return
                due = [(c, r) for c in self._calls if (r := c.overdue(now, self.stall_s))]
                for c, _ in due:
                    self._calls.discard(c)
            for call, reason in due:
                self.on_expire(call, reason)


_MESSAGE, _END, _ERROR = "message", "end", "error"


class _RequestPump:
    """Reads a client stream on its own thread, so that the handler can wait for the
    next message with a timeout. Holds at most a couple of messages."""

    def __init__(self, source: Iterator[Any]):
        self._queue: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=2)
        self._closed = threading.Event()
        threading.Thread(
            target=self._run, args=(source,), name="fedcoord-pump", daemon=True
        ).start()

    def _run(self, source: Iterator[Any]) -> None:
        try:
            for message in source:
                if not self._offer((_MESSAGE, message)):
                    return
            self._offer((_END, None))
        except Exception as exc:  # the client went away (grpc.RpcError) or the call ended
            self._offer((_ERROR, exc))

    def _offer(self, item: tuple[str, Any]) -> bool:
        while not self._closed.is_set():
            try:
                self._queue.put(item, timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

    def get(self, timeout: float) -> tuple[str, Any]:
        """The next item; raises :class:`queue.Empty` after ``timeout`` seconds."""
        return self._queue.get(timeout=timeout)

    def close(self) -> None:
        self._closed.set()


class GuardedRequests(Iterator[Any]):
    """A client stream as the servicer reads it, cut with ``DEADLINE_EXCEEDED`` when
    the next message takes longer than the stall timeout, when a message arrives and the
    average rate is under ``min_bytes_per_s`` (after the first stall timeout) or when
    the RPC's limit passes."""

    def __init__(
        self,
        pump: _RequestPump,
        call: _Call,
        limits: Limits,
        cut: Callable[[_Call, str, str], None],
        observer: CallObserver | None,
    ):
        self._pump = pump
        self._call = call
        self._limits = limits
        self._cut = cut
        self._observer = observer
        self._pending: list[Any] = []
        self._ended = False
        self._idle_s = 0.0

    def idle(self, seconds: float) -> None:
        """Leave ``seconds`` the servicer spent not reading (e.g. waiting for memory) out
        of the average rate."""
        self._idle_s += max(0.0, seconds)

    def peek(self) -> Any:
        """The first message (``None`` for an empty stream), kept for the servicer."""
        if not self._pending:
            try:
                self._pending.append(next(self))
            except StopIteration:
                return None
        return self._pending[0]

    def _too_slow(self, now: float) -> bool:
        """Whether the stream so far averages under the minimum rate (after the grace of
        one stall timeout)."""
        limits, call = self._limits, self._call
        late = now - call.started - self._idle_s - limits.stall_timeout_s
        return (
            limits.min_bytes_per_s > 0
            and late > 0
            and call.received < (limits.min_bytes_per_s * late)
        )

    def __next__(self) -> Any:
        if self._pending:
            return self._pending.pop()
        if self._ended:
            raise StopIteration
        call = self._call
        now = time.monotonic()
        stall_at = now + self._limits.stall_timeout_s
        reason = "stalled" if stall_at < call.deadline else "deadline_exceeded"
        try:
            if now >= call.deadline:
                raise queue.Empty
            kind, value = self._pump.get(timeout=min(stall_at, call.deadline) - now)
        except queue.Empty:
            self._cut(call, reason, self._explain(reason))
            raise  # not reached: the cut aborts the RPC
        if kind == _END:
            self._ended = True
            raise StopIteration
        if kind == _ERROR:
            self._ended = True
            raise value
        size = _size(value)
        call.received += size
        if self._observer is not None:
            self._observer.received(call.name, size)
        if self._too_slow(time.monotonic()):
            self._cut(call, "too_slow", self._explain("too_slow"))
        return value

    def _explain(self, reason: str) -> str:
        limits, call = self._limits, self._call
        who = describe(call.site)
        if reason == "stalled":
            return (
                f"{call.name} stream of {who} stalled: no message for {limits.stall_timeout_s:g}s"
            )
        if reason == "too_slow":
            return (
                f"{call.name} stream of {who} too slow: {call.received} bytes in "
                f"{time.monotonic() - call.started:.1f}s, under {limits.min_bytes_per_s:g} bytes/s"
            )
        return f"{call.name} of {who} exceeded the server-side limit of {call.limit_s:g}s"


class LimitsInterceptor(grpc.ServerInterceptor):
    """Applies :class:`Limits` to every RPC but the health service's."""

    def __init__(self, limits: Limits | None = None, observer: CallObserver | None = None):
        self.limits = limits or Limits()
        self.observer = observer
        self.rates = RateLimiter(self.limits.rate_per_s, self.limits.bucket_size)
        self.streams = StreamCounter(self.limits.max_streams_per_site)
        self._watchdog = _Watchdog(self.limits.stall_timeout_s, self._expire)
        self._log_throttle = LogThrottle(LOG_EVERY_S, MAX_TRACKED_BUCKETS)

    # refusals -----------------------------------------------------------------------
    def _refuse(
        self, context: grpc.ServicerContext, reason: str, code: grpc.StatusCode, message: str
    ) -> None:
        if self.observer is not None:
            self.observer.refused(reason)
        self._log_once(reason, message)
        context.abort(code, message)

    def _log_once(self, reason: str, message: str) -> None:
        """Log a refusal, at most once per reason and message every
        :data:`LOG_EVERY_S` seconds (a flood must not flood the log too)."""
        if self._log_throttle.allow((reason, message)):
            log.warning("refused (%s): %s", reason, message)

    def _cut(self, call: _Call, reason: str, message: str) -> None:
        self._refuse(call.context, reason, grpc.StatusCode.DEADLINE_EXCEEDED, message)

    def _expire(self, call: _Call, reason: str) -> None:
        """Watchdog: the handler is stuck; cancel the call (it ends as ``CANCELLED`` if
        the handler cannot answer ``DEADLINE_EXCEEDED`` itself)."""
        call.expired = reason
        if self.observer is not None:
            self.observer.refused(reason)
        self._log_once(reason, f"cancelled {call.name} of {describe(call.site)}")
        call.context.cancel()

    def _admit(self, call: _Call, site: str) -> None:
        """Rate limit and stream count for ``site``; aborts the RPC when over either."""
        call.site = site
        call.key = f"{site}@{peer_host(call.context)}"
        if not self.rates.allow(call.key):
            lim = self.limits
            self._refuse(
                call.context, "rate_limited", grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"request rate limit exceeded for {describe(site)} ({lim.rate_per_s:g}/s, "
                f"burst {lim.bucket_size:g}); retry later",
            )  # fmt: skip
        if call.method in SITE_STREAMS:
            if not self.streams.acquire(call.key):
                self._refuse(
                    call.context, "too_many_streams", grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"too many concurrent streams for {describe(site)} "
                    f"(limit {self.limits.max_streams_per_site})",
                )  # fmt: skip
            call.holds_stream = True

    def _end(self, call: _Call, pump: _RequestPump | None = None) -> None:
        if pump is not None:
            pump.close()
        self._watchdog.remove(call)
        if call.holds_stream:
            call.holds_stream = False
            self.streams.release(call.key)

    def _check_expired(self, call: _Call) -> None:
        if call.expired is None and time.monotonic() > call.deadline:
            call.expired = "deadline_exceeded"
            if self.observer is not None:
                self.observer.refused(call.expired)
        if call.expired is not None:
            call.context.abort(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"{call.name} of {describe(call.site)} exceeded the server-side limit of "
                f"{call.limit_s:g}s",
            )

    def _sent(self, call: _Call, message: Any) -> None:
        if self.observer is not None:
            self.observer.sent(call.name, _size(message))

    # wrapping -----------------------------------------------------------------------
    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(EXEMPT_PREFIXES):
            return handler
        claimed = ANONYMOUS
        for key, value in handler_call_details.invocation_metadata or ():
            if key == SITE_HEADER and isinstance(value, str) and SITE_ID.match(value):
                claimed = value
        inner = (
            handler.unary_unary or handler.unary_stream or handler.stream_unary
            or handler.stream_stream
        )  # fmt: skip
        streams = (handler.request_streaming, handler.response_streaming)
        make = {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
        }[streams]
        deserialize, serialize = handler.request_deserializer, handler.response_serializer
        if deserialize is not None and method in CHUNK_UPLOADS:
            deserialize = reading_chunks(deserialize)
        return make(
            self._wrap(inner, method, claimed, *streams),
            request_deserializer=deserialize,
            response_serializer=serialize and passing_bytes(serialize),
        )

    def _wrap(
        self,
        inner: Callable[[Any, grpc.ServicerContext], Any],
        method: str,
        claimed: str,
        streams_in: bool,
        streams_out: bool,
    ) -> Callable[[Any, grpc.ServicerContext], Any]:
        """The handler's behaviour under the limits."""

        def start(
            arg: Any, context: grpc.ServicerContext
        ) -> tuple[_Call, Any, _RequestPump | None]:
            if streams_in:
                return self._open(method, context, claimed, arg)
            return (
                self._begin(method, context, claimed or site_of(arg), arg, streams_out),
                arg,
                None,
            )

        def unary(arg: Any, context: grpc.ServicerContext) -> Any:
            call, request, pump = start(arg, context)
            try:
                with log_context(site_id=call.site or None):
                    response = inner(request, context)
            finally:
                self._end(call, pump)
            self._check_expired(call)
            self._sent(call, response)
            return response

        def streaming(arg: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            call, request, pump = start(arg, context)
            try:
                yield from self._responses(call, inner(request, context))
            finally:
                self._end(call, pump)

        return streaming if streams_out else unary

    def _begin(
        self, method: str, context: grpc.ServicerContext, site: str, request: Any, streaming: bool
    ) -> _Call:
        """A unary request's call, admitted (aborts the RPC when refused)."""
        limits = self.limits
        call = _Call(
            method, context, limits.transfer_timeout_s if streaming else limits.rpc_timeout_s
        )
        call.received = _size(request)
        if self.observer is not None:
            self.observer.received(call.name, call.received)
        self._admit(call, site)
        self._watchdog.add(call)
        return call

    def _open(
        self, method: str, context: grpc.ServicerContext, claimed: str, source: Iterator[Any]
    ) -> tuple[_Call, GuardedRequests, _RequestPump]:
        """A client stream's call, admitted once its site is known: from the metadata at
        once, else from its first message (aborts the RPC when refused)."""
        call = _Call(method, context, self.limits.transfer_timeout_s)
        pump = _RequestPump(source)
        requests = GuardedRequests(pump, call, self.limits, self._cut, self.observer)
        try:
            self._admit(call, claimed or site_of(requests.peek()))
        except BaseException:
            pump.close()
            raise
        self._watchdog.add(call)
        return call, requests, pump

    def _responses(self, call: _Call, responses: Iterator[Any]) -> Iterator[Any]:
        """A server stream, checked against the call's limit before each message; the
        watchdog cancels it when a message waits too long for the client."""
        try:
            while True:
                with log_context(site_id=call.site or None):
                    try:
                        item = next(responses)
                    except StopIteration:
                        return
                self._check_expired(call)
                self._sent(call, item)
                call.sending_since = time.monotonic()
                yield item
                call.sending_since = None
        finally:
            close = getattr(responses, "close", None)
            if close is not None:
                close()
