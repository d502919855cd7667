"""Assembles a coordinator: database, dispatcher, round engine and the gRPC server."""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from coordinator.control import ControlServicer
from coordinator.dispatch import Dispatcher
from coordinator.engine import RoundEngine
from coordinator.fleet import FleetServicer
from coordinator.limits import DEFAULT_LIMITS, Limits, LimitsInterceptor
from coordinator.metrics import Metrics
from coordinator.state import Database
from coordinator.transport import ServerTLS
from protos.codec import CHUNK_SIZE
from protos.fedcoord.v1 import control_pb2_grpc, fleet_pb2_grpc

log = logging.getLogger("fedcoord.server")

MAX_MESSAGE_BYTES = 4 * CHUNK_SIZE
"""Largest single gRPC message either way: a chunk plus headroom for headers. Payloads
travel as many such messages; their sizes are derived from the model size (a result may
announce no more than the round's model layout, see ``Collector.payload_limit``)."""

GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    # clients ping every 30 s (keepalive_time_ms): accept that instead of answering
    # GOAWAY "too_many_pings" after the default 5-minute minimum interval
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
]
SERVICES = ("fedcoord.v1.Fleet", "fedcoord.v1.Control")


class Coordinator:
    """A running coordinator bound to ``address`` (``host:port``; port 0 picks a free one).

    Parameters
    ----------
    data_dir
        Where ``ledger.db``, ``models/`` and ``keys/`` live.
    open_enrollment
        Let any site join without a token (local experiments only).
    write_summary_to_data_dir
        Also write ``<data_dir>/summary.json`` at the end of each run.
    tls
        Serve over TLS (mutual TLS when it has a client CA); None: plaintext.
    limits
        Per-site streams, request rate and server-side deadlines of every RPC.
    metrics_address
        ``HOST:PORT`` to serve Prometheus metrics on (``/metrics``); None: not served.
    """

    def __init__(
        self,
        data_dir: Path,
        address: str = "127.0.0.1:0",
        *,
        open_enrollment: bool = False,
        write_summary_to_data_dir: bool = False,
        max_workers: int = 256,
        tls: ServerTLS | None = None,
        limits: Limits = DEFAULT_LIMITS,
        metrics_address: str | None = None,
    ):
        self.db = Database(data_dir)
        self.dispatcher = Dispatcher()
        self.engine = RoundEngine(
            self.db, self.dispatcher, write_summary_to_data_dir=write_summary_to_data_dir
        )
        self.metrics = Metrics(self.engine, self.dispatcher, metrics_address)
        self.server = grpc.server(
            ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grpc"),
            options=GRPC_OPTIONS,
            interceptors=[LimitsInterceptor(limits, self.metrics)],
        )
        fleet_pb2_grpc.add_FleetServicer_to_server(
            FleetServicer(self.db, self.dispatcher, open_enrollment=open_enrollment), self.server
        )
        control_pb2_grpc.add_ControlServicer_to_server(
            ControlServicer(self.engine, self.dispatcher), self.server
        )
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        if tls is None:
            self.port = self.server.add_insecure_port(address)
        else:
            self.port = self.server.add_secure_port(address, tls.credentials())
        if self.port == 0:
            raise OSError(f"cannot listen on {address}")
        self.address = f"{address.rsplit(':', 1)[0]}:{self.port}"
        self._engine_thread: threading.Thread | None = None
        self._stopped = False

    def start(self, *, run_engine: bool = True) -> None:
        """Start serving; with ``run_engine`` also run queued runs in a background thread."""
        self.server.start()
        self.metrics.start()
        for name in ("", *SERVICES):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if run_engine:
            self._engine_thread = threading.Thread(
                target=self.engine.serve_forever, name="round-engine", daemon=True
            )
            self._engine_thread.start()
        log.info("coordinator listening on %s (data dir %s)", self.address, self.db.data_dir)

    def stop(self, grace: float = 2.0) -> None:
        """Graceful stop: no new rounds, in-flight RPCs get ``grace`` seconds, state closed.
        Stopping again does nothing."""
        if self._stopped:
            return
        self._stopped = True
        for name in ("", *SERVICES):
            self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        self.engine.shutdown()
        if self._engine_thread is not None:
            self._engine_thread.join(timeout=30)
        self.dispatcher.close()  # long-polls return now instead of holding threads
        self.server.stop(grace).wait()
        self.metrics.close()
        self.db.close()
