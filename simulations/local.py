"""``fedcoord simulate`` on this machine: a real coordinator on 127.0.0.1 and real sites.

The coordinator (gRPC server, round engine, SQLite ledger, model store) runs in this
process; the sites run in ``simulation.workers`` worker processes and talk gRPC to it
exactly as remote sites would. The workers are forked from a fork server started first,
which imports torch and the harness once while this process prepares the run.
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
from multiprocessing.context import BaseContext
from pathlib import Path
from typing import Any, TextIO

from coordinator.engine import RunEvent
from coordinator.errors import ConfigError
from coordinator.experiment import Experiment
from coordinator.server import Coordinator
from coordinator.tasks import load_task
from simulations.sites import worker_main

WORKER_PRELOAD = ["simulations.sites", "simulations.tasks.base", "torch._dynamo"]
"""Imported once by the fork server that starts the workers, so each worker does not
pay for torch, scikit-learn and torch's optimizer machinery again."""

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


def simulate(
    exp: Experiment,
    out_dir: Path,
    stream: TextIO = sys.stdout,
    listeners: Sequence[Callable[[RunEvent], None]] = (),
) -> dict[str, Any]:
    """Run the whole federation; returns the run's ``summary.json`` content.

    ``listeners`` are called with every run event, as the progress printer is (e.g. to
    measure the coordinator per round).
    """
    if (out_dir / "ledger.db").exists():
        raise ConfigError("--out", f"{out_dir} already holds a run; choose another directory")
    ctx = worker_context()
    preflight(exp)
    coordinator = Coordinator(
        out_dir,
        "127.0.0.1:0",
        open_enrollment=True,
        write_summary_to_data_dir=True,
        # every simulated site holds a long-poll open: one server thread each, plus spare
        max_workers=max(256, exp.federation.sites + 64),
    )
    for listener in (printer(stream), *listeners):
        coordinator.engine.add_listener(listener)
    stop = ctx.Event()
    workers = [
        ctx.Process(
            target=worker_main,
            name=f"fedcoord-worker-{w}",
            daemon=True,
            args=(w, exp.simulation.workers, exp.canonical_json(), coordinator.address, stop),
        )
        for w in range(min(exp.simulation.workers, exp.federation.sites))
    ]
    try:
        coordinator.start(run_engine=False)
        row = coordinator.engine.submit(exp.canonical_json(), "simulation", simulated=True)
        print(
            f"simulating {exp.federation.sites} sites in {len(workers)} worker process(es); "
            f"run {row.run_id}, output in {out_dir}",
            file=stream,
            flush=True,
        )
        for w in workers:
            w.start()
        final = coordinator.engine.execute(row.run_id)
    finally:
        stop.set()
        for w in workers:
            w.join(timeout=10)
            if w.is_alive():
                w.kill()
        coordinator.stop(grace=1.0)
    return json.loads(final.summary or "{}")
