"""The round engine: runs submitted experiments round by round.

For each round it samples sites with the run's seeded RNG, posts their tasks, folds
validated results into a streaming aggregate until every sampled site answered or the
deadline passed, and commits the new model when at least ``min_sites`` updates were
accepted. A run resumes from its last committed round after a restart (same model and
sampling RNG state); an interrupted round is redone.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from coordinator import ledger
from coordinator.canonical import canonical_json
from coordinator.dispatch import Assignment, Dispatcher, RoundCollector
from coordinator.errors import ConfigError, CoordinatorError, QuorumNotReached, UnknownRun
from coordinator.experiment import Experiment, parse_experiment
from coordinator.merkle import merkle_root
from coordinator.state import Database, RunRow
from coordinator.tasks import Task, load_task
from protos.codec import EncodedPayload, encode
from protos.fedcoord.v1 import fleet_pb2
from strategies.base import Strategy
from strategies.errors import InsufficientUpdates
from strategies.validation import UpdateLimits

log = logging.getLogger("fedcoord.engine")

MAX_ROUND_ATTEMPTS = 3
LOST_AFTER_S = 15.0
"""A sampled site silent (no poll, heartbeat or result) this long is counted as dropped."""


@dataclass(frozen=True)
class RunEvent:
    run_id: str
    seq: int
    kind: str
    message: str
    data: dict[str, Any]
    time: float


@dataclass
class ActiveRun:
    """What the engine holds while a run executes: its setup and the current model."""

    run_id: str
    exp: Experiment
    task: Task
    strategy: Strategy
    rng: np.random.Generator
    stop: threading.Event
    model: dict[str, np.ndarray]
    payload: EncodedPayload

    def halted(self, shutdown: threading.Event) -> bool:
        return self.stop.is_set() or shutdown.is_set()

    @property
    def quorum(self) -> int:
        """Accepted updates a round needs: ``min_sites``, raised to what the strategy's
        rule needs (e.g. Krum with ``f`` needs ``2f + 3``)."""
        return max(self.exp.federation.sampling.min_sites, self.strategy.min_updates())


def sample_sites(
    rng: np.random.Generator, population: list[str], fraction: float, method: str, min_sites: int
) -> list[str]:
    """Sites for one round: ``fixed`` draws round(fraction * n) without replacement;
    ``poisson`` includes each site independently with probability ``fraction``
    (redrawn while fewer than ``min_sites`` are included)."""
    n = len(population)
    if method == "fixed":
        k = min(n, max(min_sites, round(fraction * n)))
        picked = rng.choice(n, size=k, replace=False)
        return sorted(population[i] for i in picked)
    while True:
        mask = rng.random(n) < fraction
        if mask.sum() >= min(min_sites, n):
            return sorted(p for p, m in zip(population, mask, strict=True) if m)


def weighted_site_metrics(outcomes: Mapping[str, Any]) -> dict[str, float]:
    """Example-weighted mean of the sites' training metrics, prefixed ``train_``."""
    totals: dict[str, float] = {}
    weights: dict[str, float] = {}
    for o in outcomes.values():
        for name, value in o.metrics.items():
            totals[name] = totals.get(name, 0.0) + value * o.num_examples
            weights[name] = weights.get(name, 0.0) + o.num_examples
    return {f"train_{k}": totals[k] / weights[k] for k in sorted(totals) if weights[k] > 0}


def progress_line(
    exp: Experiment,
    round_no: int,
    sampled: int,
    accepted: int,
    metrics: Mapping[str, float],
    seconds: float,
) -> str:
    parts = [
        f"round {round_no:>{len(str(exp.rounds))}}/{exp.rounds}",
        f"sites {accepted}/{sampled}",
    ]
    for key in ("loss", "accuracy"):
        if key in metrics:
            parts.append(f"{key} {metrics[key]:.4f}")
    parts.append(f"{seconds:.2f}s")
    return "  ".join(parts)


class RoundEngine:
    """Runs queued runs one at a time, in submission order.

    Parameters
    ----------
    db
        The data directory's database.
    dispatcher
        Shared with the Fleet servicer.
    write_summary_to_data_dir
        Also write ``<data-dir>/summary.json`` when a run ends (simulations do).
    """

    def __init__(
        self, db: Database, dispatcher: Dispatcher, *, write_summary_to_data_dir: bool = False
    ):
        self.db = db
        self.dispatcher = dispatcher
        self.write_summary_to_data_dir = write_summary_to_data_dir
        self._shutdown = threading.Event()
        self._wake = threading.Event()
        self._stops: dict[str, threading.Event] = {}
        self._events = threading.Condition()
        self._listeners: list[Callable[[RunEvent], None]] = []

    # submission and control ---------------------------------------------------------
    def submit(
        self, experiment_text: str, source: str = "<submitted>", *, simulated: bool = False
    ) -> RunRow:
        """Validate an experiment (raises :class:`ConfigError`) and queue it as a run.

        Unless ``simulated``, settings that only a simulation can honour are refused.
        """
        exp = parse_experiment(experiment_text, source)
        if not simulated and exp.simulated_behaviour():
            raise ConfigError(
                exp.simulated_behaviour()[0],
                "simulates behaviour of sites; only `fedcoord simulate` honours it",
            )
        load_task(exp.task.name, exp.task.model, exp.task.options, exp.seed)
        run_id = (
            f"{exp.name}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:6]}"
        )
        self.db.create_run(run_id, exp.name, exp.canonical_json(), exp.config_digest(), exp.rounds)
        self._wake.set()
        row = self.db.run(run_id)
        assert row is not None
        return row

    def stop_run(self, run_id: str) -> None:
        row = self.db.run(run_id)
        if row is None:
            raise UnknownRun(f"no run {run_id!r}")
        if row.status == "queued":
            self._conclude(row, "stopped", "stopped before it started")
        self._stops.setdefault(run_id, threading.Event()).set()

    def shutdown(self) -> None:
        """Stop after the current wait; the active run stays ``running`` and resumes on
        the next start (its interrupted round is redone)."""
        self._shutdown.set()
        self._wake.set()

    def add_listener(self, fn: Callable[[RunEvent], None]) -> None:
        self._listeners.append(fn)

    # events -------------------------------------------------------------------------
    def emit(
        self, run_id: str, kind: str, message: str, data: dict[str, Any] | None = None
    ) -> None:
        data = data or {}
        seq = self.db.add_event(run_id, kind, message, data)
        self._announce(RunEvent(run_id, seq, kind, message, data, time.time()))

    def _announce(self, event: RunEvent) -> None:
        """Tell listeners and ``StreamEvents`` waiters about an event already stored
        (call outside any database transaction: waiters hold the events lock first)."""
        log.info("%s [%s] %s", event.run_id, event.kind, event.message)
        for fn in self._listeners:
            fn(event)
        with self._events:
            self._events.notify_all()

    def wait_events(self, run_id: str, from_seq: int, timeout: float) -> list[RunEvent]:
        """Events of ``run_id`` with seq >= from_seq, waiting up to ``timeout`` for one."""
        end = time.time() + timeout
        with self._events:
            while True:
                rows = self.db.events(run_id, from_seq)
                if rows or time.time() >= end or self._shutdown.is_set():
                    return [RunEvent(run_id, s, k, m, json.loads(d), t) for s, k, m, d, t in rows]
                self._events.wait(min(0.5, end - time.time()))

    # the loop -----------------------------------------------------------------------
    def serve_forever(self) -> None:
        """Run queued runs until :meth:`shutdown`."""
        while not self._shutdown.is_set():
            row = self.db.next_queued_run()
            if row is None:
                self._wake.wait(1.0)
                self._wake.clear()
                continue
            self.execute(row.run_id)

    def execute(self, run_id: str) -> RunRow:
        """Run (or resume) one run to its end; never raises for run-level failures."""
        stop = self._stops.setdefault(run_id, threading.Event())
        try:
            self._execute(run_id, stop)
        except (CoordinatorError, ValueError) as exc:
            self._finish(run_id, "failed", str(exc))
        except Exception as exc:
            log.exception("run %s crashed", run_id)
            self._finish(run_id, "failed", f"internal error: {exc!r}")
        row = self.db.run(run_id)
        assert row is not None
        return row

    def _execute(self, run_id: str, stop: threading.Event) -> None:
        row = self.db.run(run_id)
        if row is None:
            raise UnknownRun(f"no run {run_id!r}")
        exp = parse_experiment(row.experiment, run_id)
        task = load_task(exp.task.name, exp.task.model, exp.task.options, exp.seed)
        strategy = exp.make_strategy()
        rng = np.random.default_rng(exp.seed)
        resumed = self.db.last_round(run_id)
        if resumed is not None:
            start, digest, rng_state, state_digest = resumed
            rng.bit_generator.state = rng_state
            if state_digest:
                strategy.load_state(self.db.models.get(state_digest))
        else:
            start, digest = 0, row.model_digest if row.status == "running" else None
        if digest is None:
            model = task.initial_arrays()
            payload = encode(model)
            self._start(run_id, exp, model, payload)
        else:
            model = self.db.models.get(digest)
            payload = encode(model)
            self.emit(run_id, "run_resumed", f"resuming {run_id} after round {start}")
        run = ActiveRun(run_id, exp, task, strategy, rng, stop, model, payload)
        for round_no in range(start + 1, exp.rounds + 1):
            if run.halted(self._shutdown):
                break
            self._round_with_retries(run, round_no)
        if self._shutdown.is_set() and not stop.is_set():
            return  # coordinator shutting down: the run stays "running" and resumes on restart
        self._finish(run_id, "stopped" if stop.is_set() else "finished", None)

    def _start(
        self, run_id: str, exp: Experiment, model: dict[str, np.ndarray], payload: EncodedPayload
    ) -> None:
        """Store the initial model and record ``run_started``."""
        self.db.models.put(model, payload.digest)
        with self.db.transaction() as c:
            self.db.set_run_status(c, run_id, "running", model_digest=payload.digest)
            ledger.append(c, self.db.signing_key, "run_started", {
                "run_id": run_id, "name": exp.name, "config_digest": exp.config_digest(),
                "experiment": json.loads(exp.canonical_json()), "initial_model": payload.digest,
            })  # fmt: skip
        self.emit(
            run_id,
            "run_started",
            f"run {run_id} started: {exp.rounds} rounds of {exp.strategy.name} "
            f"on task {exp.task.name}",
            {"initial_model": payload.digest},
        )

    def _round_with_retries(self, run: ActiveRun, round_no: int) -> None:
        reason = ""
        for attempt in range(1, MAX_ROUND_ATTEMPTS + 1):
            reason = self._round(run, round_no)
            if not reason or run.halted(self._shutdown):
                return
            self.emit(
                run.run_id,
                "round_failed",
                f"round {round_no} attempt {attempt}/{MAX_ROUND_ATTEMPTS} failed: {reason}",
            )
        raise QuorumNotReached(
            f"round {round_no} failed {MAX_ROUND_ATTEMPTS} times; last: {reason}"
        )

    def _await_population(self, run: ActiveRun) -> list[str]:
        """Online sites: all ``federation.sites`` of them, or at least the quorum once the
        round timeout has passed; fails after ``federation.sampling.wait_for_sites_s``."""
        sampling = run.exp.federation.sampling
        wanted, quorum = run.exp.federation.sites, run.quorum
        t0 = time.time()
        noted = -1
        while not run.halted(self._shutdown):
            online = self.dispatcher.online()
            waited = time.time() - t0
            if len(online) >= wanted or (len(online) >= quorum and waited >= sampling.timeout_s):
                return online
            if waited > sampling.wait_for_sites_s:
                raise QuorumNotReached(
                    f"only {len(online)} site(s) online after {waited:.0f}s; the run needs "
                    f"at least {quorum} (federation.sampling.min_sites, or what "
                    f"{run.exp.strategy.name} needs)"
                )
            if len(online) != noted:
                noted = len(online)
                log.info("waiting for sites: %d/%d online", noted, wanted)
            time.sleep(0.1)
        return []

    def _round(self, run: ActiveRun, round_no: int) -> str:
        """Sample, collect and, at quorum, commit one round; the reason it must be redone
        ("" when committed or halted)."""
        t0 = time.time()
        sampling = run.exp.federation.sampling
        population = self._await_population(run)
        if not population:
            return ""
        selected = sample_sites(run.rng, population, sampling.fraction, sampling.method, run.quorum)
        rng_state = run.rng.bit_generator.state
        strategy = run.strategy
        strategy.begin_round(round_no, len(population))
        config = canonical_json(
            {**run.exp.round_config(), **strategy.fit_config(round_no), "round": round_no}
        )
        deadline = time.time() + sampling.timeout_s
        reference = strategy.update_reference(run.model)
        collector = RoundCollector(
            set(selected),
            reference,
            strategy.aggregator(reference, len(selected)),
            UpdateLimits(run.exp.validation.max_examples, run.exp.validation.max_update_norm),
        )
        task_arrays = strategy.task_arrays(run.model)
        task_payload = run.payload if task_arrays is run.model else encode(task_arrays)
        assignments = [
            Assignment(uuid.uuid4().hex, site, run.run_id, round_no, fleet_pb2.TASK_KIND_FIT,
                       config, task_payload, deadline, collector)
            for site in selected
        ]  # fmt: skip
        self.dispatcher.post(assignments)
        try:
            self._wait_round(run, collector, deadline)
        finally:
            self.dispatcher.withdraw(assignments)
        if run.halted(self._shutdown):
            return ""
        accepted = len(collector.accepted())
        if accepted < run.quorum:
            return f"{accepted} accepted update(s), the quorum is {run.quorum}"
        try:
            self._commit(run, round_no, selected, collector, rng_state, t0, time.time() - t0)
        except InsufficientUpdates as exc:
            return str(exc)
        return ""

    def _commit(
        self,
        run: ActiveRun,
        round_no: int,
        selected: list[str],
        collector: RoundCollector,
        rng_state: dict[str, Any],
        t0: float,
        t_collect: float,
    ) -> None:
        """Aggregate, evaluate, store the model, then commit round row + ledger entry."""
        accepted = collector.accepted()
        new_model = run.strategy.apply(run.model, collector.aggregator)
        t_eval = time.time()
        metrics = {**run.task.central_evaluate(new_model), **weighted_site_metrics(accepted)}
        t_eval = time.time() - t_eval
        payload = encode(new_model)
        self.db.models.put(new_model, payload.digest)
        state_digest = self._store(run.strategy.state())
        outcome = collector.summary()
        updates = {s: o.digest for s, o in accepted.items()}
        seconds = time.time() - t0
        entry = self.db.commit_round(
            run.run_id, round_no, payload.digest, run.payload.digest, metrics,
            outcome["participants"], rng_state, state_digest,
            {
                "run_id": run.run_id, "round": round_no, "input_model": run.payload.digest,
                "output_model": payload.digest, "config_digest": run.exp.config_digest(),
                "strategy": run.exp.strategy.name, "strategy_state": state_digest,
                "sampled": selected, **outcome,
                "update_digests": updates, "merkle_root": merkle_root(updates),
                "metrics": metrics, "dp": None, "secure_aggregation": "off",
                "timings": {"collect_s": round(t_collect, 4), "evaluate_s": round(t_eval, 4),
                            "total_s": round(seconds, 4)},
            },
        )  # fmt: skip
        run.model, run.payload = new_model, payload
        self.emit(
            run.run_id,
            "round_committed",
            progress_line(run.exp, round_no, len(selected), len(accepted), metrics, seconds),
            {"round": round_no, "metrics": metrics, "model": payload.digest,
             "ledger_seq": entry.seq, "dropped": outcome["dropped"],
             "rejected": outcome["rejected"]},
        )  # fmt: skip

    def _store(self, arrays: dict[str, np.ndarray]) -> str | None:
        """Store arrays content-addressed (e.g. strategy state); their digest, or None."""
        if not arrays:
            return None
        digest = encode(arrays).digest
        self.db.models.put(arrays, digest)
        return digest

    def _wait_round(self, run: ActiveRun, collector: RoundCollector, deadline: float) -> None:
        """Wait for results; count sampled sites silent for too long as dropped."""
        while time.time() < deadline and not run.halted(self._shutdown):
            collector.wait_until(min(deadline, time.time() + 1.0), run.stop)
            cutoff = time.time() - LOST_AFTER_S
            for site in collector.expected - collector.outcomes.keys():
                if self.dispatcher.last_seen(site) < cutoff:
                    collector.fail(site, "lost_contact")
            if collector.complete():
                break
        collector.close()

    def _finish(self, run_id: str, status: str, error: str | None) -> None:
        row = self.db.run(run_id)
        if row is not None:
            self._conclude(row, status, error)

    def _conclude(self, row: RunRow, status: str, error: str | None) -> None:
        """End a run: ledger entry, status, summary and the ``run_finished`` event commit
        together, so a reader never sees a finished run without its final event."""
        run_id = row.run_id
        message = f"run {run_id} {status} after {row.rounds_completed} round(s)"
        if error:
            message += f": {error}"
        data = {"status": status, "error": error}
        with self.db.transaction() as c:
            entry = ledger.append(c, self.db.signing_key, "run_finished", {
                "run_id": run_id, "status": status, "error": error,
                "rounds_completed": row.rounds_completed, "final_model": row.model_digest,
            })  # fmt: skip
            text = json.dumps(self.summary(run_id, status, entry.hash), indent=2)
            self.db.set_run_status(c, run_id, status, error=error, summary=text)
            seq = self.db.add_event(run_id, "run_finished", message, data, conn=c)
        run_dir = self.db.data_dir / "runs" / run_id
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "summary.json").write_text(text + "\n")
        if self.write_summary_to_data_dir:
            (self.db.data_dir / "summary.json").write_text(text + "\n")
        self._announce(RunEvent(run_id, seq, "run_finished", message, data, time.time()))

    def summary(self, run_id: str, status: str, ledger_head: str) -> dict[str, Any]:
        """The ``summary.json`` contract of DESIGN.md (plus ``status``)."""
        row = self.db.run(run_id)
        if row is None:
            raise UnknownRun(f"no run {run_id!r}")
        history = self.db.history(run_id)
        return {
            "run_id": run_id,
            "name": row.name,
            "status": status,
            "rounds_completed": row.rounds_completed,
            "final_model": row.model_digest,
            "ledger_head": ledger_head,
            "metrics": {k: v for k, v in history[-1].items() if k != "round"} if history else {},
            "history": history,
            "privacy": None,
            "secure_aggregation": False,
        }
