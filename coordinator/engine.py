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
from coordinator.dispatch import Assignment, Collector, Dispatcher, RoundCollector, RoundOutcome
from coordinator.drift import DriftMonitor, SiteReport, site_evaluation, site_requests
from coordinator.errors import ConfigError, CoordinatorError, QuorumNotReached, UnknownRun
from coordinator.experiment import Experiment, parse_experiment
from coordinator.faults import crash_point
from coordinator.logs import log_context
from coordinator.mlflow_export import MlflowExporter
from coordinator.privacy import PrivacySession, privacy_summary
from coordinator.promotion import Decision, describe, promote
from coordinator.run_export import CLOSE_TIMEOUT_S, RunExport
from coordinator.secure_round import MIN_SITES, SecureRound, SecureRoundPlan
from coordinator.secure_round import headline as secure_headline
from coordinator.state import RUN_ACTIVE, Database, RoundRecord, RunRow
from coordinator.tasks import Task, load_task
from coordinator.versions import find_version
from protos.canonical import canonical_json
from protos.codec import EncodedPayload, encode
from protos.fedcoord.v1 import fleet_pb2
from protos.merkle import merkle_root
from strategies.base import Strategy
from strategies.drift import EVAL_PREFIX, UpdateSketcher
from strategies.errors import InsufficientUpdates
from strategies.privacy.accountant import LOCAL_DP_METRICS
from strategies.secagg import SecAggAborted
from strategies.secagg.vector import SecureMean, SecureSum, VectorLayout, quantized_sensitivity
from strategies.validation import UpdateLimits

log = logging.getLogger("fedcoord.engine")

MAX_ROUND_ATTEMPTS = 3
CLIENT_CLIP_TOLERANCE = 1e-3
"""Relative slack on the clip norm for updates sites clipped themselves (float32 rounding);
the coordinator clips them to exactly ``C`` again before summing."""
LOST_AFTER_S = 15.0
"""A sampled site silent (no poll, heartbeat or result) this long is counted as dropped."""


class AttemptFailed(Exception):
    """A round attempt that must be redone (too few updates, an aborted secure sum)."""


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
    privacy: PrivacySession | None = None
    drift: DriftMonitor | None = None
    export: RunExport | None = None
    stop_reason: str | None = None
    """Why the run ended before its last round without failing (e.g. budget spent)."""

    def halted(self, shutdown: threading.Event) -> bool:
        return self.stop.is_set() or shutdown.is_set()

    @property
    def quorum(self) -> int:
        """Accepted updates a round needs: ``min_sites``, raised to what the strategy's
        rule needs (e.g. Krum with ``f`` needs ``2f + 3``)."""
        need = max(self.exp.federation.sampling.min_sites, self.strategy.min_updates())
        return max(need, MIN_SITES) if self.secure else need

    @property
    def secure(self) -> bool:
        """Whether rounds run under secure aggregation."""
        return self.exp.privacy.secure_aggregation.enabled


@dataclass(frozen=True)
class RoundAttempt:
    """What one attempt at a round sends out."""

    number: int
    population: list[str]
    selected: list[str]
    config: str
    task_payload: EncodedPayload
    reference: Mapping[str, np.ndarray]
    deadline: float


@dataclass
class RoundState:
    """One attempt at a round, collected and ready to commit."""

    attempt: RoundAttempt
    outcome: RoundOutcome
    rng_state: dict[str, Any]
    started: float


def sample_sites(
    rng: np.random.Generator,
    population: list[str],
    fraction: float,
    method: str,
    min_sites: int,
    redraw: bool = True,
) -> list[str]:
    """Sites for one round: ``fixed`` draws round(fraction * n) without replacement;
    ``poisson`` includes each site independently with probability ``fraction``
    (redrawn while fewer than ``min_sites`` are included, unless ``redraw`` is off: DP
    accounting assumes the plain Poisson draw, whatever its size)."""
    n = len(population)
    if method == "fixed":
        k = min(n, max(min_sites, round(fraction * n)))
        picked = rng.choice(n, size=k, replace=False)
        return sorted(population[i] for i in picked)
    while True:
        mask = rng.random(n) < fraction
        if not redraw or mask.sum() >= min(min_sites, n):
            return sorted(p for p, m in zip(population, mask, strict=True) if m)


def weighted_site_metrics(outcomes: Mapping[str, Any]) -> dict[str, float]:
    """Example-weighted mean of the sites' training metrics, prefixed ``train_``."""
    totals: dict[str, float] = {}
    weights: dict[str, float] = {}
    for o in outcomes.values():
        for name, value in o.metrics.items():
            if name in LOCAL_DP_METRICS or name.startswith(EVAL_PREFIX):  # kept per site
                continue
            totals[name] = totals.get(name, 0.0) + value * o.num_examples
            weights[name] = weights.get(name, 0.0) + o.num_examples
    return {f"train_{k}": totals[k] / weights[k] for k in sorted(totals) if weights[k] > 0}


def local_dp_record(exp: Experiment, outcomes: Mapping[str, Any]) -> dict[str, Any] | None:
    """Local DP of a round: the example-level epsilon each site reports (its own claim,
    from its own accountant) and the largest, at the experiment's ``local_dp.delta``."""
    local = exp.privacy.local_dp
    if local is None:
        return None
    reported = {s: o.metrics["epsilon"] for s, o in outcomes.items() if "epsilon" in o.metrics}
    return {
        "noise_multiplier": local.noise_multiplier,
        "max_grad_norm": local.max_grad_norm,
        "delta": local.delta,
        "site_epsilons": dict(sorted(reported.items())),
        "max_epsilon": max(reported.values(), default=None),
    }


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
    for key, label in (("epsilon", "epsilon"), ("local_epsilon_max", "local epsilon <=")):
        if key in metrics:
            parts.append(f"{label} {metrics[key]:.3f}")
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
        self._exports: dict[str, RunExport] = {}

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
        if exp.mlflow is not None:
            MlflowExporter.check_available(exp.mlflow)
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
            with log_context(run_id=run_id):
                self._execute(run_id, stop)
        except (CoordinatorError, ValueError) as exc:
            self._finish(run_id, "failed", str(exc))
        except Exception as exc:
            log.exception("run %s crashed", run_id)
            self._finish(run_id, "failed", f"internal error: {exc!r}")
        row = self.db.run(run_id)
        assert row is not None
        export = self._exports.pop(run_id, None)
        if export is not None:
            if row.status in RUN_ACTIVE:  # shutting down: the run resumes, so does its export
                export.exporter.close(CLOSE_TIMEOUT_S)
            else:
                export.finish(row.status)
        return row

    def _execute(self, run_id: str, stop: threading.Event) -> None:
        row = self.db.run(run_id)
        if row is None:
            raise UnknownRun(f"no run {run_id!r}")
        exp = parse_experiment(row.experiment, run_id)
        task = load_task(exp.task.name, exp.task.model, exp.task.options, exp.seed)
        strategy = exp.make_strategy()
        privacy = PrivacySession.start(exp)
        rng = np.random.default_rng(exp.seed)
        resumed = self.db.last_round(run_id)
        if resumed is not None:
            start, digest = resumed.round, resumed.model_digest
            rng.bit_generator.state = resumed.rng_state
            if resumed.strategy_state:
                strategy.load_state(self.db.models.get(resumed.strategy_state))
            if privacy is not None and resumed.privacy_state is not None:
                privacy.load_state(resumed.privacy_state)
        else:
            start, digest = 0, row.model_digest if row.status == "running" else None
        if digest is None:
            model = task.initial_arrays()
            payload = encode(model)
            self._start(run_id, exp, model, payload, privacy)
        else:
            model = self.db.models.get(digest)
            payload = encode(model)
            self.emit(run_id, "run_resumed", f"resuming {run_id} after round {start}")
        drift = DriftMonitor(exp, self.db.models).replay(self.db.ledger_entries(), run_id)
        run = ActiveRun(run_id, exp, task, strategy, rng, stop, model, payload, privacy, drift)
        if exp.mlflow is not None:
            run.export = self._exports[run_id] = RunExport(self.db, run_id, exp)
        for round_no in range(start + 1, exp.rounds + 1):
            if run.halted(self._shutdown) or self._budget_spent(run, round_no):
                break
            self._round_with_retries(run, round_no)
        if self._shutdown.is_set() and not stop.is_set():
            return  # coordinator shutting down: the run stays "running" and resumes on restart
        if not stop.is_set():
            self._auto_promote(run)
        self._finish(run_id, "stopped" if stop.is_set() else "finished", None, run.stop_reason)

    def _auto_promote(self, run: ActiveRun) -> Decision | None:
        """With ``promotion.auto``, put the run's final version through the gate."""
        spec = run.exp.promotion
        if spec is None or not spec.auto or self.db.last_round(run.run_id) is None:
            return None
        version = find_version(self.db, run.payload.digest, run_id=run.run_id)
        decision = promote(self.db, version, spec, run.exp.drift.open_rounds, by="auto")
        message = describe(decision)
        if decision.reasons:
            more = len(decision.reasons) - 1
            message += f": {decision.reasons[0]}" + (f" (and {more} more)" if more else "")
        self.emit(run.run_id, decision.kind, message, decision.payload())
        return decision

    def _budget_spent(self, run: ActiveRun, round_no: int) -> bool:
        """Before round ``round_no``: when it would pass ``privacy.dp.epsilon_budget``,
        record ``budget_exhausted`` and end the run cleanly instead of starting it."""
        privacy = run.privacy
        projected = privacy.over_budget() if privacy is not None else None
        if privacy is None or projected is None:
            return False
        spent, budget = privacy.epsilon(), privacy.spec.epsilon_budget
        run.stop_reason = (
            f"privacy budget exhausted: round {round_no} would raise epsilon from "
            f"{spent:.3f} to {projected:.3f}, over the budget of {budget:g} "
            f"(delta {privacy.delta:.3g})"
        )
        self.db.append_ledger("budget_exhausted", {
            "run_id": run.run_id, "round": round_no, "epsilon": spent,
            "projected_epsilon": projected, "epsilon_budget": budget, "delta": privacy.delta,
            "accountant": privacy.spec.accountant,
        })  # fmt: skip
        self.emit(run.run_id, "budget_exhausted", run.stop_reason)
        return True

    def _start(
        self,
        run_id: str,
        exp: Experiment,
        model: dict[str, np.ndarray],
        payload: EncodedPayload,
        privacy: PrivacySession | None,
    ) -> None:
        """Store the initial model and record ``run_started``."""
        self.db.models.put(model, payload.digest)
        dp = None if privacy is None else privacy.describe()
        with self.db.transaction() as c:
            self.db.set_run_status(c, run_id, "running", model_digest=payload.digest)
            ledger.append(c, self.db.signing_key, "run_started", {
                "run_id": run_id, "name": exp.name, "config_digest": exp.config_digest(),
                "experiment": json.loads(exp.canonical_json()), "initial_model": payload.digest,
                "dp": dp,
            })  # fmt: skip
        message = (
            f"run {run_id} started: {exp.rounds} rounds of {exp.strategy.name} "
            f"on task {exp.task.name}"
        )
        if privacy is not None:
            message += f"; {privacy.headline()}"
        if exp.privacy.secure_aggregation.enabled:
            clip = privacy.clip_norm if privacy is not None else None
            message += f"; {secure_headline(exp.privacy.secure_aggregation, clip)}"
        self.emit(run_id, "run_started", message, {"initial_model": payload.digest, "dp": dp})

    def _round_with_retries(self, run: ActiveRun, round_no: int) -> None:
        reason = ""
        for attempt in range(1, MAX_ROUND_ATTEMPTS + 1):
            with log_context(round=round_no):
                reason = self._round(run, round_no, attempt_no=attempt)
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

    def _round(self, run: ActiveRun, round_no: int, attempt_no: int = 1) -> str:
        """Sample, collect and, at quorum, commit one round (its ``attempt_no``-th try); the
        reason it must be redone ("" when committed or halted). Under central DP every
        round commits with its plain Poisson draw, whatever its size: the noised mean
        needs no quorum."""
        t0 = time.time()
        sampling = run.exp.federation.sampling
        privacy = run.privacy
        population = self._await_population(run)
        if not population:
            return ""
        selected = sample_sites(
            run.rng, population, sampling.fraction, sampling.method, run.quorum,
            redraw=privacy is None,
        )  # fmt: skip
        rng_state = run.rng.bit_generator.state
        strategy = run.strategy
        strategy.begin_round(round_no, len(population))
        config = canonical_json({
            **run.exp.round_config(), **strategy.fit_config(round_no),
            **(privacy.round_config() if privacy else {}), **site_requests(run.exp),
            "round": round_no, "attempt": attempt_no,
        })  # fmt: skip
        deadline = time.time() + sampling.timeout_s
        reference = strategy.update_reference(run.model)
        task_arrays = strategy.task_arrays(run.model)
        task_payload = run.payload if task_arrays is run.model else encode(task_arrays)
        attempt = RoundAttempt(round_no, population, selected, config, task_payload, reference,
                               deadline)  # fmt: skip
        collect = self._collect_secure if run.secure else self._collect
        try:
            outcome = collect(run, attempt)
        except AttemptFailed as exc:
            return str(exc)
        if outcome is None or run.halted(self._shutdown):
            return ""
        state = RoundState(attempt, outcome, rng_state, t0)
        try:
            self._commit(run, state, time.time() - t0)
        except InsufficientUpdates as exc:
            return str(exc)
        return ""

    def _collect(self, run: ActiveRun, attempt: RoundAttempt) -> RoundOutcome | None:
        """Post the fit tasks and fold the results as they arrive (``None`` if halted)."""
        privacy = run.privacy
        aggregator = (
            privacy.aggregator(attempt.reference, len(attempt.population))
            if privacy is not None
            else run.strategy.aggregator(attempt.reference, len(attempt.selected))
        )
        data = run.exp.drift.data
        collector = RoundCollector(
            set(attempt.selected), attempt.reference, aggregator, self._limits(run),
            sketcher=UpdateSketcher(attempt.reference, run.exp.seed)
            if run.exp.site_checks()[0] else None,
            profile_bins=data.bins if data.feature_range else None,
            histogram=run.drift.histogram if run.drift is not None else None,
            late_results=run.exp.federation.sampling.late_results,
        )  # fmt: skip
        assignments = [
            Assignment(uuid.uuid4().hex, site, run.run_id, attempt.number,
                       fleet_pb2.TASK_KIND_FIT, attempt.config, attempt.task_payload,
                       attempt.deadline, collector)
            for site in attempt.selected
        ]  # fmt: skip
        self.dispatcher.post(assignments)
        try:
            self._wait_round(run, collector, attempt.deadline)
        finally:
            self.dispatcher.withdraw(assignments)
        if run.halted(self._shutdown):
            return None
        accepted = len(collector.accepted())
        if privacy is None and accepted < run.quorum:
            raise AttemptFailed(f"{accepted} accepted update(s), the quorum is {run.quorum}")
        return collector.outcome()

    def _collect_secure(self, run: ActiveRun, attempt: RoundAttempt) -> RoundOutcome | None:
        """Run the secure-aggregation stages; the round's outcome over the secure sum.

        An aborted attempt releases nothing: it is recorded (``round_aborted``) and
        redone. Under DP, a draw too small for a secure sum counts as a round without
        updates (the noise alone is released, as the accountant assumes).
        """
        privacy = run.privacy
        reference = attempt.reference
        if len(attempt.selected) < MIN_SITES:
            if privacy is None:  # sampling asks for the quorum; only a plain Poisson draw
                raise AttemptFailed(f"{len(attempt.selected)} site(s) sampled, fewer than 3")
            nothing = SecureMean(reference, SecureSum.zeros(VectorLayout.of(reference)))
            return RoundOutcome(
                privacy.aggregator(reference, len(attempt.population), summed=nothing),
                {}, [], [],
                [{"site": s, "reason": "too few sampled for a secure sum"}
                 for s in attempt.selected],
                {"mode": "skipped", "sampled": len(attempt.selected),
                 "reason": f"fewer than {MIN_SITES} sites sampled: only noise is released"},
            )  # fmt: skip
        settings = run.exp.privacy.secure_aggregation
        plan = SecureRoundPlan(
            run.run_id, attempt.number, attempt.selected, attempt.config,
            attempt.task_payload, reference, attempt.deadline, settings,
            quorum=MIN_SITES if privacy is not None else run.quorum,
            dp_clip=privacy.clip_norm if privacy is not None else None,
            histogram=run.drift.histogram if run.drift is not None else None,
        )  # fmt: skip
        secure = SecureRound(
            self.dispatcher,
            plan,
            wait=lambda collector, deadline: self._wait_round(run, collector, deadline),
            halted=lambda: run.halted(self._shutdown),
        )
        try:
            result = secure.run()
        except SecAggAborted as exc:
            if run.halted(self._shutdown):
                return None
            self.db.append_ledger("round_aborted", {
                "run_id": run.run_id, "round": attempt.number, "stage": exc.stage,
                "reason": exc.reason, "detail": exc.detail,
                "secure_aggregation": secure.record(),
            })  # fmt: skip
            raise AttemptFailed(str(exc)) from None
        outcome = result.outcome
        if privacy is not None:
            sensitivity = quantized_sensitivity(
                privacy.clip_norm, result.layout, result.quantization
            )
            outcome.aggregator = privacy.aggregator(
                reference, len(attempt.population), summed=outcome.aggregator,
                sensitivity=sensitivity,
            )  # fmt: skip
        return outcome

    @staticmethod
    def _limits(run: ActiveRun) -> UpdateLimits:
        """The experiment's update bounds; in client-side DP mode also the clip norm
        (sites clip before sending; a larger update breaks the protocol)."""
        validation = run.exp.validation
        max_norm = validation.max_update_norm
        privacy = run.privacy
        if privacy is not None and privacy.spec.mode == "client":
            bound = privacy.clip_norm * (1 + CLIENT_CLIP_TOLERANCE)
            max_norm = bound if max_norm is None else min(max_norm, bound)
        return UpdateLimits(validation.max_examples, max_norm)

    def _commit(self, run: ActiveRun, state: RoundState, t_collect: float) -> None:
        """Aggregate, evaluate, store the model, then commit round row + ledger entry."""
        outcome, round_no, selected = state.outcome, state.attempt.number, state.attempt.selected
        accepted = outcome.accepted
        new_model = run.strategy.apply(run.model, outcome.aggregator)
        dp = None
        if run.privacy is not None:  # the noised mean was drawn in apply: account for it
            dp = run.privacy.after_round(outcome.aggregator)  # type: ignore[arg-type]
        t_eval = time.time()
        metrics = run.task.central_evaluate(new_model)
        t_eval = time.time() - t_eval
        if dp is not None:
            metrics["epsilon"] = dp["epsilon"]
        elif run.exp.privacy.local_dp is None and not run.secure:  # not privatised
            metrics.update(weighted_site_metrics(accepted))
        local_dp = local_dp_record(run.exp, accepted)
        if local_dp is not None and local_dp["max_epsilon"] is not None:
            metrics["local_epsilon_max"] = local_dp["max_epsilon"]
        reports = {
            s: SiteReport(o.num_examples, o.metrics, o.norm, o.sketch, o.profile)
            for s, o in accepted.items()
        }
        assert run.drift is not None
        pooled = run.drift.pool(
            outcome.histogram, [o.profile for o in accepted.values()],
            len(outcome.participants), run.privacy,
        )  # fmt: skip
        drift = run.drift.check(round_no, reports, metrics, pooled)
        payload = encode(new_model)
        self.db.models.put(new_model, payload.digest)
        crash_point("before_commit")
        state_digest = self._store(run.strategy.state())
        updates = {s: o.digest for s, o in accepted.items()}
        seconds = time.time() - state.started
        record = RoundRecord(
            round_no, payload.digest, run.payload.digest, metrics, outcome.participants,
            state.rng_state, state_digest,
            None if run.privacy is None else run.privacy.state(),
        )  # fmt: skip
        entry = self.db.commit_round(
            run.run_id, record,
            {
                "run_id": run.run_id, "round": round_no, "input_model": run.payload.digest,
                "output_model": payload.digest, "config_digest": run.exp.config_digest(),
                "strategy": run.exp.strategy.name, "strategy_state": state_digest,
                "sampled": selected, "participants": outcome.participants,
                "rejected": outcome.rejected, "dropped": outcome.dropped,
                "update_digests": updates, "merkle_root": merkle_root(updates),
                "late_results": self.dispatcher.take_late(run.run_id),
                "metrics": metrics, "dp": dp, "local_dp": local_dp,
                "secure_aggregation": outcome.secure_aggregation or {"mode": "off"},
                "drift": drift.record, "site_evaluation": site_evaluation(reports),
                "timings": {"collect_s": round(t_collect, 4), "evaluate_s": round(t_eval, 4),
                            "total_s": round(seconds, 4)},
            },
            alerts=drift.alerts,
        )  # fmt: skip
        crash_point("after_commit")
        run.model, run.payload = new_model, payload
        self.emit(
            run.run_id,
            "round_committed",
            progress_line(run.exp, round_no, len(selected), len(accepted), metrics, seconds),
            {"round": round_no, "metrics": metrics, "model": payload.digest,
             "ledger_seq": entry.seq, "dropped": outcome.dropped,
             "rejected": outcome.rejected, "drift_alerts": len(drift.alerts),
             "seconds": round(seconds, 4)},
        )  # fmt: skip
        for alert in drift.alerts:
            self.emit(run.run_id, "drift_alert", f"drift alert: {alert['message']}", alert)
        if run.export is not None:
            run.export.round(round_no, metrics)

    def _store(self, arrays: dict[str, np.ndarray]) -> str | None:
        """Store arrays content-addressed (e.g. strategy state); their digest, or None."""
        return self.db.models.add(arrays) if arrays else None

    def _wait_round(self, run: ActiveRun, collector: Collector, deadline: float) -> None:
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

    def _finish(
        self, run_id: str, status: str, error: str | None, stop_reason: str | None = None
    ) -> None:
        row = self.db.run(run_id)
        if row is not None:
            self._conclude(row, status, error, stop_reason)

    def _conclude(
        self, row: RunRow, status: str, error: str | None, stop_reason: str | None = None
    ) -> None:
        """End a run: ledger entry, status, summary and the ``run_finished`` event commit
        together, so a reader never sees a finished run without its final event."""
        run_id = row.run_id
        message = f"run {run_id} {status} after {row.rounds_completed} round(s)"
        if error or stop_reason:
            message += f": {error or stop_reason}"
        data = {"status": status, "error": error, "stop_reason": stop_reason}
        with self.db.transaction() as c:
            entry = ledger.append(c, self.db.signing_key, "run_finished", {
                "run_id": run_id, "status": status, "error": error, "stop_reason": stop_reason,
                "rounds_completed": row.rounds_completed, "final_model": row.model_digest,
                "late_results": self.dispatcher.take_late(run_id),
            })  # fmt: skip
            summary = self.summary(run_id, status, entry.hash, stop_reason)
            text = json.dumps(summary, indent=2)
            self.db.set_run_status(c, run_id, status, error=error, summary=text)
            seq = self.db.add_event(run_id, "run_finished", message, data, conn=c)
        run_dir = self.db.data_dir / "runs" / run_id
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "summary.json").write_text(text + "\n")
        if self.write_summary_to_data_dir:
            (self.db.data_dir / "summary.json").write_text(text + "\n")
        self._announce(RunEvent(run_id, seq, "run_finished", message, data, time.time()))

    def summary(
        self, run_id: str, status: str, ledger_head: str, stop_reason: str | None = None
    ) -> dict[str, Any]:
        """The ``summary.json`` contract of DESIGN.md (plus ``status`` and
        ``stop_reason``)."""
        row = self.db.run(run_id)
        if row is None:
            raise UnknownRun(f"no run {run_id!r}")
        history = self.db.history(run_id)
        last = self.db.last_round(run_id)
        exp = parse_experiment(row.experiment, run_id)
        return {
            "run_id": run_id,
            "name": row.name,
            "status": status,
            "stop_reason": stop_reason,
            "rounds_completed": row.rounds_completed,
            "final_model": row.model_digest,
            "ledger_head": ledger_head,
            "metrics": {k: v for k, v in history[-1].items() if k != "round"} if history else {},
            "history": history,
            "privacy": privacy_summary(exp, last.privacy_state if last else None, history),
            "secure_aggregation": exp.privacy.secure_aggregation.enabled,
        }
