"""The Fleet gRPC service: what data sites call (they only ever dial out)."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator

import grpc
import numpy as np

from coordinator.dispatch import Collector, Dispatcher
from coordinator.state import Database
from protos.codec import PayloadAssembler
from protos.errors import PayloadError
from protos.fedcoord.v1 import common_pb2, fleet_pb2, fleet_pb2_grpc
from strategies.errors import InvalidUpdate
from strategies.validation import check_specs

log = logging.getLogger("fedcoord.fleet")

SITE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MAX_WAIT_S = 30
HEARTBEAT_INTERVAL_S = 5


class FleetServicer(fleet_pb2_grpc.FleetServicer):
    """Enrollment, long-polled tasks, streamed results, heartbeats.

    Parameters
    ----------
    open_enrollment
        Let any well-formed site id join without a token (local experiments only).
    """

    def __init__(self, db: Database, dispatcher: Dispatcher, *, open_enrollment: bool):
        self.db = db
        self.dispatcher = dispatcher
        self.open_enrollment = open_enrollment
        self._enrolled = {s for s, status in db.sites() if status == "enrolled"}

    def _require_site(self, site_id: str, context: grpc.ServicerContext) -> None:
        if site_id not in self._enrolled:
            context.abort(
                grpc.StatusCode.PERMISSION_DENIED, f"site {site_id[:64]!r} is not enrolled"
            )
        self.dispatcher.touch(site_id)

    def Enroll(self, request: fleet_pb2.EnrollRequest, context: grpc.ServicerContext):
        if not SITE_ID.match(request.site_id):
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "site_id must be 1-64 characters of letters, digits, '.', '_' or '-'",
            )
        if not self.open_enrollment:
            context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "enrollment tokens are not supported yet; start the coordinator with "
                "--open-enrollment",
            )
        if self.db.upsert_site(request.site_id, dict(request.properties)):
            log.info("site %s enrolled", request.site_id)
        self._enrolled.add(request.site_id)
        self.dispatcher.touch(request.site_id)
        return fleet_pb2.EnrollReply(
            site_id=request.site_id,
            coordinator_id=self.db.ledger_head(),
            heartbeat_interval_s=HEARTBEAT_INTERVAL_S,
        )

    def PullTask(
        self,
        request: fleet_pb2.PullTaskRequest,
        context: grpc.ServicerContext,
    ) -> Iterator[fleet_pb2.TaskMessage]:
        self._require_site(request.site_id, context)
        wait = min(max(request.wait_s, 0), MAX_WAIT_S)
        assignment = self.dispatcher.take(request.site_id, timeout=wait)
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
            for data in model.chunks():
                yield fleet_pb2.TaskMessage(chunk=common_pb2.Chunk(data=data))

    def PushResult(
        self,
        request_iterator: Iterator[fleet_pb2.ResultMessage],
        context: grpc.ServicerContext,
    ) -> fleet_pb2.PushReply:
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("kind") != "header":
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "a result stream must start with a header"
            )
        header = first.header
        self._require_site(header.site_id, context)
        assignment = self.dispatcher.lookup(header.task_id, header.site_id)
        if assignment is None:
            return fleet_pb2.PushReply(accepted=False, reason="task_not_active")
        collector = assignment.collector
        if header.error:
            collector.fail(header.site_id, f"site_error: {header.error[:200]}")
            return fleet_pb2.PushReply(accepted=False, reason="site reported an error")
        try:
            arrays = self._receive_payload(header, collector, request_iterator)
        except InvalidUpdate as exc:
            return self._reject(collector, header.site_id, str(exc))
        except PayloadError as exc:
            return self._reject(collector, header.site_id, f"bad_payload: {exc}")
        outcome = collector.receive(header, arrays)
        if outcome.status != "accepted":
            log.warning("site %s: result rejected: %s", header.site_id, outcome.reason)
        return fleet_pb2.PushReply(accepted=outcome.status == "accepted", reason=outcome.reason)

    @staticmethod
    def _receive_payload(
        header: fleet_pb2.ResultHeader,
        collector: Collector,
        request_iterator: Iterator[fleet_pb2.ResultMessage],
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
        for message in request_iterator:
            if message.WhichOneof("kind") != "chunk":
                raise PayloadError("unexpected message after the result header")
            assembler.add(message.chunk.data)
        return assembler.finish()

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
        self._require_site(request.site_id, context)
        return fleet_pb2.HeartbeatReply(task_active=self.dispatcher.is_active(request.task_id))
