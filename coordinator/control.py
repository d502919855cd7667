"""The Control gRPC service: what operators and the ``fedcoord`` CLI call."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import grpc

from coordinator import enrollment
from coordinator.dispatch import Dispatcher
from coordinator.engine import RoundEngine
from coordinator.errors import ConfigError, UnknownRun, UnknownSite
from coordinator.state import RunRow, SiteRow
from coordinator.transport import require_operator
from protos.fedcoord.v1 import control_pb2, control_pb2_grpc
from protos.signing import key_fingerprint

log = logging.getLogger("fedcoord.control")

TERMINAL = frozenset({"finished", "failed", "stopped"})


def run_info(row: RunRow) -> control_pb2.RunInfo:
    return control_pb2.RunInfo(
        run_id=row.run_id,
        name=row.name,
        status=row.status,
        rounds_completed=row.rounds_completed,
        rounds_total=row.rounds_total,
        summary_json=row.summary or "",
        error=row.error or "",
    )


class ControlServicer(control_pb2_grpc.ControlServicer):
    def __init__(self, engine: RoundEngine, dispatcher: Dispatcher):
        self.engine = engine
        self.db = engine.db
        self.dispatcher = dispatcher

    def _row(self, run_id: str, context: grpc.ServicerContext) -> RunRow:
        row = self.db.run(run_id)
        if row is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no run {run_id[:80]!r}")
        return row

    def SubmitRun(self, request, context):
        require_operator(context)
        try:
            row = self.engine.submit(request.experiment_yaml)
        except ConfigError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return run_info(row)

    def GetRun(self, request, context):
        require_operator(context)
        return run_info(self._row(request.run_id, context))

    def ListRuns(self, request, context):
        require_operator(context)
        return control_pb2.ListRunsReply(runs=[run_info(r) for r in self.db.runs()])

    def StopRun(self, request, context):
        require_operator(context)
        try:
            self.engine.stop_run(request.run_id)
        except UnknownRun as exc:
            context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        return run_info(self._row(request.run_id, context))

    def StreamEvents(self, request, context) -> Iterator[control_pb2.RunEvent]:
        require_operator(context)
        self._row(request.run_id, context)
        seq = request.from_seq
        while context.is_active():
            for ev in self.engine.wait_events(request.run_id, seq, timeout=1.0):
                yield control_pb2.RunEvent(
                    run_id=ev.run_id,
                    seq=ev.seq,
                    kind=ev.kind,
                    message=ev.message,
                    data_json=json.dumps(ev.data),
                    time_unix=ev.time,
                )
                seq = ev.seq + 1
                if ev.kind == "run_finished":
                    return
            row = self.db.run(request.run_id)
            if (
                row is not None
                and row.status in TERMINAL
                and not self.db.events(request.run_id, seq)
            ):
                return

    def _site_info(self, row: SiteRow, online: set[str]) -> control_pb2.SiteInfo:
        return control_pb2.SiteInfo(
            site_id=row.site_id,
            status=row.status,
            online=row.site_id in online,
            last_seen_unix=self.dispatcher.last_seen(row.site_id),
            key_fingerprint="" if row.public_key is None else key_fingerprint(row.public_key),
            token_expires_unix=row.token_expires or 0.0,
        )

    def ListSites(self, request, context):
        require_operator(context)
        online = set(self.dispatcher.online())
        return control_pb2.ListSitesReply(
            sites=[self._site_info(row, online) for row in self.db.site_rows()]
        )

    def EnrollSite(self, request, context):
        """A one-time token for ``site_id`` (any earlier outstanding one stops working)."""
        require_operator(context)
        try:
            ttl = enrollment.check_ttl(request.ttl_s or enrollment.DEFAULT_TTL_S)
        except ValueError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"ttl_s: {exc}")
        try:
            invitation = enrollment.invite(self.db, request.site_id, ttl)
        except ValueError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"site_id: {exc}")
        log.info("issued an enrollment token for site %s", invitation.site_id)
        return control_pb2.EnrollSiteReply(
            site_id=invitation.site_id,
            token=invitation.token,
            expires_unix=invitation.expires,
            status=invitation.status,
        )

    def RevokeSite(self, request, context):
        """Revoke at once: the site's open task fails as ``revoked`` and its requests
        are refused from now on."""
        require_operator(context)
        try:
            row, changed = enrollment.revoke(self.db, request.site_id)
        except UnknownSite as exc:
            context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        self.dispatcher.revoke(row.site_id)
        if changed:
            log.warning("site %s revoked", row.site_id)
        site = self._site_info(row, set(self.dispatcher.online()))
        return control_pb2.RevokeSiteReply(site=site, changed=changed)
