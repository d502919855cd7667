"""The Control gRPC service: what operators and the ``fedcoord`` CLI call."""

from __future__ import annotations

import json
from collections.abc import Iterator

import grpc

from coordinator.dispatch import Dispatcher
from coordinator.engine import RoundEngine
from coordinator.errors import ConfigError, UnknownRun
from coordinator.state import RunRow
from protos.fedcoord.v1 import control_pb2, control_pb2_grpc

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
        try:
            row = self.engine.submit(request.experiment_yaml)
        except ConfigError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return run_info(row)

    def GetRun(self, request, context):
        return run_info(self._row(request.run_id, context))

    def ListRuns(self, request, context):
        return control_pb2.ListRunsReply(runs=[run_info(r) for r in self.db.runs()])

    def StopRun(self, request, context):
        try:
            self.engine.stop_run(request.run_id)
        except UnknownRun as exc:
            context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        return run_info(self._row(request.run_id, context))

    def StreamEvents(self, request, context) -> Iterator[control_pb2.RunEvent]:
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

    def ListSites(self, request, context):
        online = set(self.dispatcher.online())
        return control_pb2.ListSitesReply(
            sites=[
                control_pb2.SiteInfo(
                    site_id=s,
                    status=status,
                    online=s in online,
                    last_seen_unix=self.dispatcher.last_seen(s),
                )
                for s, status in self.db.sites()
            ]
        )
