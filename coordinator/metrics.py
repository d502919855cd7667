"""Prometheus metrics of one coordinator, served over HTTP at ``/metrics`` on request.

Each :class:`Metrics` has its own registry (several coordinators may share a process).
Round metrics come from the engine's events, byte counts and refusals from the
:class:`~coordinator.limits.LimitsInterceptor`, ``fedcoord_sites_online`` from the
dispatcher at scrape time.
"""

from __future__ import annotations

import argparse
import logging
import re
import threading
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from coordinator.dispatch import Dispatcher
from coordinator.engine import RoundEngine, RunEvent

log = logging.getLogger("fedcoord.metrics")

ROUND_BUCKETS = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
REASON = re.compile(r"^[a-z][a-z0-9_]{0,39}$")


def reason_label(reason: str) -> str:
    """The part of a rejection reason before ``:`` (``other`` when it is not a short
    snake_case code, so labels stay few whatever a site sends)."""
    code = reason.split(":", 1)[0].strip()
    return code if REASON.match(code) else "other"


def parse_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:9464`` for IPv6) as ``(host, port)``; raises ``ValueError``."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT, got {address!r}")
    return host.strip("[]"), int(port)


def address_flag(text: str) -> str:
    """argparse type of ``--metrics-address``."""
    try:
        parse_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


class Metrics:
    """The coordinator's metrics (and the ``CallObserver`` of its limits).

    Parameters
    ----------
    address
        ``HOST:PORT`` to serve ``/metrics`` on from :meth:`start` (port 0 picks a free
        one, see :attr:`port`); ``None``: collect without serving.
    """

    def __init__(self, engine: RoundEngine, dispatcher: Dispatcher, address: str | None = None):
        self.address = address
        if address is not None:
            parse_address(address)
        self.registry = CollectorRegistry()
        r = self.registry
        self.rounds = Counter("fedcoord_rounds_committed", "Rounds committed.", ["run"], registry=r)
        self.round_seconds = Histogram(
            "fedcoord_round_duration_seconds",
            "Wall time of a committed round, sampling to commit.",
            buckets=ROUND_BUCKETS,
            registry=r,
        )
        self.sites_online = Gauge(
            "fedcoord_sites_online", "Sites heard from within the online window.", registry=r
        )
        self.sites_online.set_function(lambda: len(dispatcher.online()))
        self.bytes_received = Counter(
            "fedcoord_bytes_received", "Message bytes received, by RPC.", ["method"], registry=r
        )
        self.bytes_sent = Counter(
            "fedcoord_bytes_sent", "Message bytes sent, by RPC.", ["method"], registry=r
        )
        self.rejected = Counter(
            "fedcoord_updates_rejected",
            "Results refused in committed rounds, by reason code.",
            ["reason"],
            registry=r,
        )
        self.dropped = Counter(
            "fedcoord_sites_dropped",
            "Sampled sites without a result in committed rounds, by reason code.",
            ["reason"],
            registry=r,
        )
        self.drift_alerts = Counter(
            "fedcoord_drift_alerts", "Drift alerts raised.", ["run"], registry=r
        )
        self.refusals = Counter(
            "fedcoord_requests_refused",
            "Requests refused or cut by the server-side limits, by reason.",
            ["reason"],
            registry=r,
        )
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self.port: int | None = None
        engine.add_listener(self.on_event)

    # engine events ------------------------------------------------------------------
    def on_event(self, event: RunEvent) -> None:
        """Count what an engine event says (never raises into the engine)."""
        try:
            if event.kind == "round_committed":
                data = event.data
                self.rounds.labels(run=event.run_id).inc()
                if "seconds" in data:
                    self.round_seconds.observe(float(data["seconds"]))
                for item in data.get("rejected") or ():
                    self.rejected.labels(reason=reason_label(str(item.get("reason", "")))).inc()
                for item in data.get("dropped") or ():
                    self.dropped.labels(reason=reason_label(str(item.get("reason", "")))).inc()
            elif event.kind == "drift_alert":
                self.drift_alerts.labels(run=event.run_id).inc()
        except Exception:
            log.exception("metrics: could not count event %s", event.kind)

    # CallObserver -------------------------------------------------------------------
    def refused(self, reason: str) -> None:
        self.refusals.labels(reason=reason).inc()

    def received(self, method: str, nbytes: int) -> None:
        self.bytes_received.labels(method=method).inc(nbytes)

    def sent(self, method: str, nbytes: int) -> None:
        self.bytes_sent.labels(method=method).inc(nbytes)

    # HTTP ---------------------------------------------------------------------------
    def start(self) -> None:
        """Serve ``/metrics`` on :attr:`address` (if one was given)."""
        if self.address is None or self._server is not None:
            return
        host, port = parse_address(self.address)
        self._server, self._thread = start_http_server(port, host, registry=self.registry)
        self.port = self._server.server_port
        log.info("metrics on http://%s:%d/metrics", host, self.port)

    def close(self) -> None:
        """Stop serving (idempotent)."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
