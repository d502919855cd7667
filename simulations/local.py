"""``fedcoord simulate`` on this machine: a real coordinator and real sites over gRPC.

The coordinator (gRPC server, round engine, SQLite ledger, model store) runs in this
process; the sites run in ``simulation.workers`` workers and talk gRPC to it exactly as
remote sites would. :func:`launcher` picks the workers by ``simulation.backend``: local
processes (:class:`LocalWorkers`, forked from a fork server started first, which imports
torch and the harness once while this process prepares the run) or Ray actors
(:mod:`simulations.ray_backend`).
"""

from __future__ import annotations

import atexit
import contextlib
import inspect
import json
import multiprocessing as mp
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from multiprocessing import forkserver
from multiprocessing.connection import Connection
from multiprocessing.context import BaseContext
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any, Protocol, TextIO

from coordinator.engine import RunEvent
from coordinator.errors import ConfigError
from coordinator.experiment import Experiment
from coordinator.server import Coordinator
from coordinator.tasks import load_task
from simulations.sites import peak_rss_bytes, worker_main

WORKER_PRELOAD = ["simulations.sites", "simulations.tasks.base", "torch._dynamo"]
"""Imported once by the fork server that starts the workers, so each worker does not
pay for torch, scikit-learn and torch's optimizer machinery again."""

MIB = 1 << 20
STATS_TIMEOUT_S = 10.0
"""How long to wait for a stopping worker's statistics."""

PRINTED = frozenset(
    {
        "run_started",
        "run_resumed",
        "round_committed",
        "round_failed",
        "drift_alert",
        "model_promoted",
        "promotion_refused",
        "run_finished",
    }
)


def default_out_dir(exp: Experiment) -> Path:
    return Path("runs") / f"{exp.name}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"


def printer(stream: TextIO) -> Callable[[RunEvent], None]:
    def show(event: RunEvent) -> None:
        if event.kind in PRINTED:
            print(event.message, file=stream, flush=True)

    return show


def preflight(exp: Experiment) -> None:
    """Fail fast, before any process starts, on what the sites would trip over.

    Builds the task and the first site's partition (as an attacker would, when
    ``label_flip`` is configured), so a bad task option, an infeasible split or a task
    that cannot flip labels is a configuration error, not a failed run.
    """
    task = load_task(exp.task.name, exp.task.model, exp.task.options, exp.seed)
    fed = exp.federation
    flip = fed.byzantine.sites > 0 and fed.byzantine.attack == "label_flip"
    if flip and "flip_labels" not in inspect.signature(task.make_client).parameters:
        raise ConfigError(
            "federation.byzantine.attack",
            f"task {exp.task.name!r} cannot simulate label_flip (its make_client takes no "
            "flip_labels)",
        )
    extra: dict[str, Any] = {"flip_labels": True} if flip else {}
    if fed.drift.sites > 0:
        if "shift" not in inspect.signature(task.make_client).parameters:
            raise ConfigError(
                "federation.drift.sites",
                f"task {exp.task.name!r} cannot simulate drift (its make_client takes no shift)",
            )
        extra["shift"] = fed.drift.kind
    task.make_client(0, fed.sites, fed.partition.spec(), exp.seed, **extra)


def worker_context() -> BaseContext:
    """The context that starts the worker processes: a fork server, started now so that
    it imports what the workers need while this process prepares the run (workers forked
    from it start at once, and no gRPC state of this process is inherited)."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(WORKER_PRELOAD)
    forkserver.ensure_running()  # kept for later simulations of this process
    return ctx


def stop_fork_server() -> None:
    """End the fork server at once (at exit): it holds no state, and left alone its
    interpreter takes seconds to tear torch down after this process has exited, keeping
    this process's output pipes open meanwhile."""
    pid = getattr(forkserver._forkserver, "_forkserver_pid", None)
    if pid is not None:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGTERM)


atexit.register(stop_fork_server)  # once per process, however many simulations it runs


class Workers(Protocol):
    """The processes that host the simulated sites, for one backend."""

    kind: str
    """How the progress line names them ("worker process", "Ray actor")."""
    listen_address: str
    """Where the coordinator listens (``host:port``; port 0 picks one)."""

    def prepare(self) -> None:
        """Before the coordinator starts: get ready, or raise ConfigError."""

    def start(self, port: int, on_failure: Callable[[str], None]) -> int:
        """Start the sites against the coordinator on ``port``; the number of workers.
        ``on_failure`` hears of workers that could not start, where the backend can tell."""

    def stop(self) -> list[dict[str, int]]:
        """End the workers (idempotent); the :meth:`SiteHost.stats` that they sent."""


class LocalWorkers:
    """``simulation.workers`` processes on this machine, on 127.0.0.1."""

    kind = "worker process(es)"
    listen_address = "127.0.0.1:0"

    def __init__(self, exp: Experiment):
        self.exp = exp
        self.ctx = worker_context()  # first: the fork server imports while we prepare
        self.stop_event = self.ctx.Event()
        self.procs: list[tuple[BaseProcess, Connection]] = []
        self.stats: list[dict[str, int]] = []

    def prepare(self) -> None:
        pass

    def start(self, port: int, on_failure: Callable[[str], None]) -> int:
        sim, address = self.exp.simulation, f"127.0.0.1:{port}"
        for w in range(min(sim.workers, self.exp.federation.sites)):
            receive, send = self.ctx.Pipe(duplex=False)
            args = (w, sim.workers, self.exp.canonical_json(), address, self.stop_event, send)
            proc = self.ctx.Process(
                target=worker_main, name=f"fedcoord-worker-{w}", daemon=True, args=args
            )
            proc.start()
            send.close()
            self.procs.append((proc, receive))
        return len(self.procs)

    def stop(self) -> list[dict[str, int]]:
        self.stop_event.set()
        for proc, receive in self.procs:
            with contextlib.suppress(EOFError, OSError):
                if receive.poll(STATS_TIMEOUT_S):
                    self.stats.append(receive.recv())
            receive.close()
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
        self.procs = []
        return self.stats


def launcher(exp: Experiment) -> Workers:
    """The workers of ``simulation.backend``: the one place the backend is chosen."""
    if exp.simulation.backend == "ray":
        from simulations.ray_backend import RayWorkers  # imports ray lazily itself

        return RayWorkers(exp)
    return LocalWorkers(exp)


def resources(exp: Experiment, stats: Sequence[dict[str, int]]) -> dict[str, Any]:
    """The ``resources`` of the summary: peak resident memory of the coordinator (this
    process) and of the workers (each its own peak; ``null`` for none reported), and
    how many site clients the workers built."""
    peaks = [s["peak_rss_bytes"] / MIB for s in stats]
    return {
        "backend": exp.simulation.backend,
        "workers": len(stats),
        "peak_rss_mib": {
            "coordinator": round(peak_rss_bytes() / MIB, 1),
            "worker_max": round(max(peaks), 1) if peaks else None,
            "workers_total": round(sum(peaks), 1) if peaks else None,
        },
        "clients_built": sum(s["builds"] for s in stats),
    }


def simulate(
    exp: Experiment,
    out_dir: Path,
    stream: TextIO = sys.stdout,
    listeners: Sequence[Callable[[RunEvent], None]] = (),
) -> dict[str, Any]:
    """Run the whole federation; returns the run's ``summary.json`` content (with the
    ``resources`` it used, also written to ``<out_dir>/summary.json``).

    ``listeners`` are called with every run event, as the progress printer is (e.g. to
    measure the coordinator per round).
    """
    if (out_dir / "ledger.db").exists():
        raise ConfigError("--out", f"{out_dir} already holds a run; choose another directory")
    workers = launcher(exp)
    preflight(exp)
    workers.prepare()
    try:
        coordinator = Coordinator(
            out_dir,
            workers.listen_address,
            open_enrollment=True,
            write_summary_to_data_dir=True,
            # every simulated site holds a long-poll open: one server thread each, plus spare
            max_workers=max(256, exp.federation.sites + 64),
        )
    except BaseException:
        workers.stop()
        raise
    for listener in (printer(stream), *listeners):
        coordinator.engine.add_listener(listener)
    try:
        coordinator.start(run_engine=False)
        row = coordinator.engine.submit(exp.canonical_json(), "simulation", simulated=True)

        def failed(reason: str) -> None:
            print(f"fedcoord: error: {reason}", file=sys.stderr, flush=True)
            coordinator.engine.stop_run(row.run_id)

        started = workers.start(coordinator.port, failed)
        print(
            f"simulating {exp.federation.sites} sites in {started} {workers.kind}; "
            f"run {row.run_id}, output in {out_dir}",
            file=stream,
            flush=True,
        )
        final = coordinator.engine.execute(row.run_id)
    finally:
        stats = workers.stop()
        coordinator.stop(grace=1.0)
    summary: dict[str, Any] = json.loads(final.summary or "{}")
    if summary:
        summary["resources"] = used = resources(exp, stats)
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        peak = used["peak_rss_mib"]
        print(
            f"peak memory: coordinator {peak['coordinator']} MiB, workers "
            f"{peak['worker_max']} MiB (max of one)",
            file=stream,
            flush=True,
        )
    return summary
