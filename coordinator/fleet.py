"""The Fleet gRPC service: what data sites call (they only ever dial out).

Every call is signed by the site's Ed25519 key (:mod:`coordinator.auth`); the site id a
method acts for is the authenticated one, so a site only ever pulls its own tasks,
pushes results for tasks assigned to it and reads its own receipts.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import numpy as np
from google.protobuf.message import Message

from coordinator.auth import AuthError, RequestVerifier, check_public_key, refuse
from coordinator.dispatch import Assignment, Collector, Dispatcher, RoundCollector
from coordinator.enrollment import ALREADY_ENROLLED, enroll
from coordinator.errors import LedgerError
from coordinator.faults import crash_point
from coordinator.receipts import public_key_bytes, receipt_response
from coordinator.state import Database
from coordinator.transport import check_peer_site
from protos.codec import PayloadAssembler
from protos.errors import PayloadError
from protos.fedcoord.v1 import fleet_pb2, fleet_pb2_grpc
from protos.receipts import MAX_ID_CHARS
from protos.signing import SITE_ID, SITE_ID_RULE, fleet_method, key_fingerprint
from protos.wire import chunk_data
from strategies.errors import InvalidUpdate
from strategies.validation import check_specs

log = logging.getLogger("fedcoord.fleet")

__all__ = ["SITE_ID", "FleetServicer"]

MAX_WAIT_S = 30
HEARTBEAT_INTERVAL_S = 5
REVOCATION_CHECK_S = 1.0
MAX_ROUND = 2**31 - 1
MAX_PROPERTIES = 32
"""Enrollment properties a site may declare (keys up to 64, values up to 256 characters)."""
METHODS = {name: fleet_method(name) for name in ("Enroll", "PullTask", "PushResult",
                                                  "Heartbeat", "GetReceipt")}  # fmt: skip


UPLOAD_MEMORY_BYTES = 1 << 30
"""Default bound on the bytes of updates being assembled at once (see :class:`UploadBudget`)."""
TOUCH_EVERY_S = 2.0
"""How often a long upload, or one waiting for memory, counts as contact with its site."""
TRANSFER_RECORD = "transfer"
"""Attribute of the log records of :func:`log_transfer`."""


class UploadBudget:
    """Bounds the memory of the uploads being assembled at once, whatever the number of
    sites: an upload takes its payload's size before its first chunk is read and gives
    it back once its update is folded in; one that does not fit waits. An upload larger
    than the whole budget runs alone, so coordinator memory for uploads is at most
    ``max(limit, largest payload)``.
    """

    def __init__(self, limit: int = UPLOAD_MEMORY_BYTES):
        self.limit = limit
        self.in_use = 0
        self._cond = threading.Condition()

    @contextlib.contextmanager
    def hold(self, nbytes: int, keep_waiting: Callable[[], bool]) -> Iterator[bool]:
        """Hold ``nbytes`` for the duration of the block; yields ``False`` (holding
        nothing) when ``keep_waiting()`` turned false before they fitted."""
        if nbytes <= 0:  # a result without a payload never waits
            yield True
            return
        if not self._acquire(nbytes, keep_waiting):
            yield False
            return
        try:
            yield True
        finally:
            with self._cond:
                self.in_use -= nbytes
                self._cond.notify_all()

    def _acquire(self, nbytes: int, keep_waiting: Callable[[], bool]) -> bool:
        with self._cond:
            while self.in_use and self.in_use + nbytes > self.limit:
                if not keep_waiting():
                    return False
                self._cond.wait(1.0)
            self.in_use += nbytes
            return True


def properties_problem(properties: dict[str, str]) -> str | None:
    """What is wrong with a site's declared properties, if anything."""
    if len(properties) > MAX_PROPERTIES:
        return f"at most {MAX_PROPERTIES} properties"
    if any(not 0 < len(k) <= 64 or len(v) > 256 for k, v in properties.items()):
        return "property keys must be 1-64 characters and values at most 256"
    return None


def log_transfer(site_id: str, direction: str, nbytes: int, seconds: float) -> None:
    """Log (DEBUG) one model download or update upload, the chunks streamed and the
    digest checked; the record's ``transfer`` attribute holds ``(direction, bytes,
    seconds)`` for tools that measure throughput (``benchmarks/round_latency.py``)."""
    rate = nbytes / max(seconds, 1e-9) / 1e6
    log.debug(
        "site %s: %s of %d bytes in %.3fs (%.0f MB/s)", site_id, direction, nbytes, seconds,
        rate, extra={TRANSFER_RECORD: (direction, nbytes, seconds)},
    )  # fmt: skip


class FleetServicer(fleet_pb2_grpc.FleetServicer):
    """Enrollment, long-polled tasks, streamed results, heartbeats.

    ``PullTask`` streams a model's chunks as pre-encoded ``TaskMessage`` bytes
    (:meth:`protos.codec.EncodedPayload.chunk_messages`): serve it behind
    :class:`coordinator.limits.LimitsInterceptor`, whose serializer passes bytes through
    (:class:`coordinator.server.Coordinator` does).

    Parameters
    ----------
    open_enrollment
        Let any well-formed site id join without a token (local experiments only); its
        requests are signed all the same.
    verifier
        Checks every call's signature (default: one over ``db`` that passes revocations
        on to ``dispatcher``).
    uploads
        Bounds the memory of updates assembled at once (default :data:`UPLOAD_MEMORY_BYTES`).
    """

    def __init__(
        self,
        db: Database,
        dispatcher: Dispatcher,
        *,
        open_enrollment: bool,
        verifier: RequestVerifier | None = None,
        uploads: UploadBudget | None = None,
    ):
        self.db = db
        self.dispatcher = dispatcher
        self.open_enrollment = open_enrollment
        self.uploads = uploads or UploadBudget()
        self.verifier = verifier or RequestVerifier(db, on_revoked=dispatcher.revoke)
        self._public_key = public_key_bytes(db)

    def _authenticate(
        self, name: str, message: Message, site_id: str, context: grpc.ServicerContext
    ) -> None:
        """Refuse the call unless enrolled ``site_id`` signed it; then the site is live."""
        check_peer_site(site_id, context)
        try:
            self.verifier.verify(context.invocation_metadata(), METHODS[name], message, site_id)
        except AuthError as exc:
            refuse(context, name, site_id, exc)
        self.dispatcher.touch(site_id)

    def Enroll(self, request: fleet_pb2.EnrollRequest, context: grpc.ServicerContext):
        """Admit a site's key: with a valid one-time token, or on first contact under open
        enrollment; the same key again is "already enrolled". Signed by the presented key
        (proof of possession); an enrolled site's Enroll is replay-checked too."""
        site_id, key = request.site_id, bytes(request.public_key)
        if not SITE_ID.match(site_id):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"site_id must be {SITE_ID_RULE}")
        check_peer_site(site_id, context)
        properties = dict(request.properties)
        problem = properties_problem(properties)
        if problem:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"properties: {problem}")
        try:
            check_public_key(key)
        except ValueError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"public_key: {exc}")
        metadata = context.invocation_metadata()
        try:
            signature = self.verifier.check(metadata, METHODS["Enroll"], request, site_id, key)
            row = self.db.site(site_id)
            if row is not None and row.status == "enrolled" and row.public_key == key:
                self.verifier.remember(signature)
            how = enroll(
                self.db, site_id, key, request.token, properties,
                open_enrollment=self.open_enrollment,
            )  # fmt: skip
        except AuthError as exc:
            refuse(context, "Enroll", site_id, exc)
        if how != ALREADY_ENROLLED:
            log.info("site %s enrolled (%s) with key %s", site_id, how, key_fingerprint(key))
            self.verifier.reinstate(site_id)
            self.dispatcher.reinstate(site_id)
        self.dispatcher.touch(site_id)
        return fleet_pb2.EnrollReply(
            site_id=site_id,
            coordinator_id=self.db.ledger_head(),
            heartbeat_interval_s=HEARTBEAT_INTERVAL_S,
            coordinator_public_key=self._public_key,
        )

    def PullTask(
        self,
        request: fleet_pb2.PullTaskRequest,
        context: grpc.ServicerContext,
    ) -> Iterator[fleet_pb2.TaskMessage]:
        self._authenticate("PullTask", request, request.site_id, context)
        wait = min(max(request.wait_s, 0), MAX_WAIT_S)
        assignment = self._wait_for_task(request.site_id, wait, context)
        self.dispatcher.touch(request.site_id)
        if assignment is None or not context.is_active():
            yield fleet_pb2.TaskMessage(none=fleet_pb2.NoTask(retry_after_ms=0))
            return
        model = assignment.model
        send_model = model is not None and request.cached_model_digest != model.digest
        header = fleet_pb2.TaskHeader(
            task_id=assignment.task_id,
            run_id=assignment.run_id,
            round=assignment.round,
            kind=assignment.kind,
            config_json=assignment.config_json,
            model_digest=model.digest if model is not None else "",
            deadline_unix=assignment.deadline,
        )
        if assignment.secagg is not None:
            header.secagg.CopyFrom(assignment.secagg)
        if send_model:
            header.model.CopyFrom(model.header())
        yield fleet_pb2.TaskMessage(header=header)
        if send_model:
            touch = self._toucher(request.site_id)  # a long download is contact too
            t0 = time.perf_counter()
            for message in model.chunk_messages():  # bytes: see the class docstring
                yield message  # type: ignore[misc]
                touch()
            log_transfer(request.site_id, "download", model.total_bytes, time.perf_counter() - t0)

    def _wait_for_task(
        self, site_id: str, wait: float, context: grpc.ServicerContext
    ) -> Assignment | None:
        """Long-poll in slices; between them pick up revocations made by another process
        (``fedcoord sites revoke --data-dir``), so a revoked site's poll ends within a
        slice, refused."""
        end = time.monotonic() + wait
        while True:
            slice_s = min(REVOCATION_CHECK_S, max(0.0, end - time.monotonic()))
            assignment = self.dispatcher.take(site_id, timeout=slice_s)
            if self.dispatcher.is_revoked(site_id):
                error = AuthError("revoked", f"site {site_id!r} was revoked by the operator")
                refuse(context, "PullTask", site_id, error)
            done = time.monotonic() >= end or self.dispatcher.closed or not context.is_active()
            if assignment is not None or done:
                return assignment
            self.verifier.sync()

    def PushResult(
        self,
        request_iterator: Iterator[fleet_pb2.ResultMessage],
        context: grpc.ServicerContext,
    ) -> fleet_pb2.PushReply:
        first = next(request_iterator, None)
        if not isinstance(first, fleet_pb2.ResultMessage) or first.WhichOneof("kind") != "header":
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "a result stream must start with a header"
            )
        header = first.header
        self._authenticate("PushResult", first, header.site_id, context)
        assignment = self.dispatcher.lookup(header.task_id, header.site_id)
        if assignment is None:
            return self._late(header, request_iterator, context)
        collector = assignment.collector
        touch = self._toucher(header.site_id)
        if header.error:
            collector.fail(header.site_id, f"site_error: {header.error[:200]}")
            return fleet_pb2.PushReply(accepted=False, reason="site reported an error")
        try:
            with self._upload_memory(header, collector, request_iterator, context) as held:
                if not held:  # the round closed while the upload waited for memory
                    return self._late(header, request_iterator, context)
                arrays = self._receive_payload(header, collector, request_iterator, touch)
                outcome = collector.receive(header, arrays)
                del arrays  # folded in: the memory goes back to the budget with the block
        except InvalidUpdate as exc:
            return self._reject(collector, header.site_id, str(exc))
        except PayloadError as exc:
            return self._reject(collector, header.site_id, f"bad_payload: {exc}")
        if outcome.status != "accepted":
            log.warning("site %s: result rejected: %s", header.site_id, outcome.reason)
        return fleet_pb2.PushReply(accepted=outcome.status == "accepted", reason=outcome.reason)

    def _toucher(self, site_id: str) -> Callable[[], None]:
        """Counts as contact with the site, at most every :data:`TOUCH_EVERY_S` seconds
        (a long upload must not look like a lost site)."""
        last = time.monotonic()

        def touch() -> None:
            nonlocal last
            now = time.monotonic()
            if now - last >= TOUCH_EVERY_S:
                last = now
                self.dispatcher.touch(site_id)

        return touch

    @contextlib.contextmanager
    def _upload_memory(
        self,
        header: fleet_pb2.ResultHeader,
        collector: Collector,
        request_iterator: Iterator[fleet_pb2.ResultMessage],
        context: grpc.ServicerContext,
    ) -> Iterator[bool]:
        """Hold the upload's size in :attr:`uploads`, waiting (the site kept live) while
        the call is active and, unless already closed, the collector is open; yields
        whether it is held. The wait does not count against the stream's minimum rate."""
        nbytes = 0
        if header.HasField("update"):
            nbytes = min(max(int(header.update.total_bytes), 0), collector.payload_limit())
        was_closed = collector.closed

        def keep_waiting() -> bool:
            self.dispatcher.touch(header.site_id)
            return context.is_active() and (was_closed or not collector.closed)

        t0 = time.monotonic()
        with self.uploads.hold(nbytes, keep_waiting) as held:
            idle = getattr(request_iterator, "idle", None)
            if idle is not None:
                idle(time.monotonic() - t0)
            yield held

    def _late(
        self,
        header: fleet_pb2.ResultHeader,
        request_iterator: Iterator[fleet_pb2.ResultMessage],
        context: grpc.ServicerContext,
    ) -> fleet_pb2.PushReply:
        """A result for a fit task whose round has closed: recorded (for the run's next
        ledger entry), never aggregated; under ``late_results: record`` its payload is
        received and its digest checked first."""
        a = self.dispatcher.withdrawn(header.task_id, header.site_id)
        collector = a.collector if a is not None else None
        if a is None or not isinstance(collector, RoundCollector) or header.error:
            return fleet_pb2.PushReply(accepted=False, reason="task_not_active")
        closed = collector.closed_at or a.deadline
        record: dict[str, Any] = {
            "site": header.site_id, "round": a.round, "policy": collector.late_results,
            "late_by_s": round(max(0.0, time.time() - closed), 3),
        }  # fmt: skip
        if collector.late_results == "record":
            try:
                with self._upload_memory(header, collector, request_iterator, context) as held:
                    if not held:
                        return fleet_pb2.PushReply(accepted=False, reason="task_not_active")
                    self._receive_payload(header, collector, request_iterator)
                record.update(digest=header.update.digest, num_examples=int(header.num_examples))
            except (InvalidUpdate, PayloadError) as exc:
                record["invalid"] = str(exc)[:200]
        self.dispatcher.record_late(a.run_id, record)
        log.info("site %s: late result for round %d: %s", header.site_id, a.round, record)
        return fleet_pb2.PushReply(accepted=False, reason="late: recorded, not aggregated")

    @staticmethod
    def _receive_payload(
        header: fleet_pb2.ResultHeader,
        collector: Collector,
        request_iterator: Iterator[fleet_pb2.ResultMessage],
        touch: Callable[[], None] | None = None,
    ) -> dict[str, np.ndarray] | None:
        """The result's payload, checked against what the collector expects before any
        chunk is read (``None`` for results that carry none)."""
        spec = collector.payload_spec()
        if spec is None:
            if header.HasField("update"):
                raise InvalidUpdate("unexpected_payload", "this result carries no payload")
            if next(request_iterator, None) is not None:
                raise PayloadError("unexpected message after the result header")
            return None
        check_specs({t.name: (t.dtype, tuple(t.shape)) for t in header.update.tensors}, spec)
        assembler = PayloadAssembler(header.update, max_bytes=collector.payload_limit())
        t0 = time.perf_counter()
        for message in request_iterator:
            assembler.add(chunk_data(message))
            crash_point("upload")
            if touch is not None:
                touch()
        arrays = assembler.finish()
        log_transfer(header.site_id, "upload", assembler.total_bytes, time.perf_counter() - t0)
        return arrays

    @staticmethod
    def _reject(collector: Collector, site_id: str, reason: str) -> fleet_pb2.PushReply:
        collector.fail(site_id, reason, status="rejected")
        log.warning("site %s: result rejected: %s", site_id, reason)
        return fleet_pb2.PushReply(accepted=False, reason=reason)

    def Heartbeat(
        self,
        request: fleet_pb2.HeartbeatRequest,
        context: grpc.ServicerContext,
    ) -> fleet_pb2.HeartbeatReply:
        self._authenticate("Heartbeat", request, request.site_id, context)
        assignment = self.dispatcher.lookup(request.task_id, request.site_id)
        active = assignment is not None and not assignment.collector.closed
        return fleet_pb2.HeartbeatReply(task_active=active)

    def GetReceipt(
        self,
        request: fleet_pb2.ReceiptRequest,
        context: grpc.ServicerContext,
    ) -> fleet_pb2.ReceiptReply:
        """The asking site's own receipt for one round (PENDING until it commits)."""
        self._authenticate("GetReceipt", request, request.site_id, context)
        if not 0 < len(request.run_id) <= MAX_ID_CHARS:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"run_id must be 1-{MAX_ID_CHARS} characters"
            )
        if not 1 <= request.round <= MAX_ROUND:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"round must be 1-{MAX_ROUND}")
        try:
            return receipt_response(self.db, request.site_id, request.run_id, request.round)
        except LedgerError as exc:
            log.error("receipt for site %s: %s", request.site_id, exc)
            context.abort(grpc.StatusCode.DATA_LOSS, "the round's ledger entry does not verify")
