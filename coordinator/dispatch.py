"""Hand-off between the round engine and the Fleet servicer.

The engine posts one :class:`Assignment` per site and waits on a :class:`Collector`;
sites long-poll :meth:`Dispatcher.take` for their assignment and push results, which the
collector checks and takes in on arrival. A :class:`RoundCollector` validates fit
results and folds them into the round's streaming aggregate; a :class:`StageCollector`
takes the replies of one secure-aggregation stage. Nothing here touches disk.
"""

from __future__ import annotations

import copy
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from protos.codec import EncodedPayload, plan_layout
from protos.fedcoord.v1 import fleet_pb2, secagg_pb2
from strategies.base import Aggregator
from strategies.drift import DataProfile, UpdateSketcher
from strategies.errors import InvalidUpdate
from strategies.histogram import HistogramSpec
from strategies.validation import ModelSpec, UpdateLimits, validate_update

Arrays = Mapping[str, np.ndarray]

MAX_WITHDRAWN = 10_000
"""Closed assignments remembered, so that their late results are recognised."""
MAX_LATE_PER_ENTRY = 1_000


@dataclass
class Assignment:
    """One site's task: a fit task of a round, or one stage of a secure round."""

    task_id: str
    site_id: str
    run_id: str
    round: int
    kind: int
    config_json: str
    model: EncodedPayload | None
    """The arrays the site receives (none for secure-aggregation stage tasks)."""
    deadline: float
    collector: Collector
    secagg: secagg_pb2.SecAggTask | None = None


@dataclass
class SiteOutcome:
    """What became of one site in a round (or a stage)."""

    status: str  # accepted | rejected | failed
    num_examples: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    digest: str = ""
    reason: str = ""
    norm: float | None = None
    """L2 norm of the update's delta (when the round sketches updates for drift checks)."""
    sketch: np.ndarray | None = None
    profile: DataProfile | None = None


@dataclass
class RoundOutcome:
    """A collected round, ready to commit: the aggregate, the accepted sites and what
    the ledger records of the others."""

    aggregator: Aggregator
    accepted: dict[str, SiteOutcome]
    participants: list[str]
    rejected: list[dict[str, str]]
    dropped: list[dict[str, str]]
    secure_aggregation: dict[str, Any] | None = None
    """The secure-aggregation record of the round (``None`` for a plain round)."""
    histogram: np.ndarray | None = None
    """The exact sum of the sites' pooled data histograms from the secure sum, if any."""


class Collector:
    """Outcomes of one set of tasks, one per expected site (thread-safe).

    Subclasses say which payload a result must carry (:meth:`payload_spec`) and what
    taking a result in means (:meth:`_take`, called under the lock for a site that is
    expected and has no outcome yet).
    """

    def __init__(self, expected: set[str]):
        self.expected = expected
        self.outcomes: dict[str, SiteOutcome] = {}
        self.closed = False
        self.closed_at: float | None = None
        self._cond = threading.Condition()

    def payload_spec(self) -> ModelSpec | None:
        """The tensors a result must carry (``None``: results carry no payload)."""
        return None

    def payload_limit(self) -> int:
        """The largest payload stream a result may announce."""
        spec = self.payload_spec()
        if spec is None:
            return 0
        specs = [(k, d.name, s) for k, (d, s) in spec.tensors.items()]
        return plan_layout(specs)[1]

    def receive(self, header: fleet_pb2.ResultHeader, arrays: Arrays | None) -> SiteOutcome:
        """Take in one result; its outcome (never raises on bad input)."""
        site_id = header.site_id
        with self._cond:
            if self.closed or site_id in self.outcomes or site_id not in self.expected:
                return SiteOutcome("rejected", reason="task_not_active")
            outcome = self._take(header, arrays)
            self.outcomes[site_id] = outcome
            self._cond.notify_all()
            return outcome

    def _take(self, header: fleet_pb2.ResultHeader, arrays: Arrays | None) -> SiteOutcome:
        raise NotImplementedError

    def fail(self, site_id: str, reason: str, status: str = "failed") -> None:
        """Record a site that did not deliver (``failed``: its own error, a dropout, lost
        contact) or whose result was refused before decoding (``rejected``)."""
        with self._cond:
            if not self.closed and site_id in self.expected and site_id not in self.outcomes:
                self.outcomes[site_id] = SiteOutcome(status, reason=reason)
                self._cond.notify_all()

    def complete(self) -> bool:
        with self._cond:
            return len(self.outcomes) >= len(self.expected)

    def wait_until(self, until: float, stop: threading.Event) -> None:
        """Block until every expected site has an outcome, ``until`` passes, or ``stop``."""
        with self._cond:
            while len(self.outcomes) < len(self.expected) and not stop.is_set():
                remaining = until - time.time()
                if remaining <= 0:
                    return
                self._cond.wait(min(remaining, 0.5))

    def close(self) -> None:
        """No more results are taken (late ones are refused as ``task_not_active``)."""
        with self._cond:
            if not self.closed:
                self.closed, self.closed_at = True, time.time()

    def accepted(self) -> dict[str, SiteOutcome]:
        return {s: o for s, o in self.outcomes.items() if o.status == "accepted"}

    def for_late_results(self) -> Collector:
        """What a closed assignment keeps to answer late results (itself by default)."""
        return self

    def rejections(self) -> dict[str, str]:
        """Reasons of the sites whose result was refused."""
        return {s: o.reason for s, o in self.outcomes.items() if o.status == "rejected"}


class RoundCollector(Collector):
    """Validates a round's fit results and folds them into its aggregate as they arrive."""

    def __init__(
        self,
        expected: set[str],
        reference: Arrays,
        aggregator: Aggregator,
        limits: UpdateLimits,
        sketcher: UpdateSketcher | None = None,
        profile_bins: int | None = None,
        histogram: HistogramSpec | None = None,
        late_results: str = "record",
    ):
        super().__init__(expected)
        self.reference = reference
        self.spec = ModelSpec.of(reference)
        self.aggregator = aggregator
        self.limits = limits
        self.sketcher = sketcher
        self.profile_bins = profile_bins
        self.histogram = histogram
        self.late_results = late_results
        """What a result after the round closed gets: ``record`` (received, its digest
        checked and recorded, not aggregated) or ``refuse`` (recorded unread)."""
        """The pooled histogram layout profiles must fit (DP: pooled data checks)."""
        """Bins per feature the round asked profiles for (``None``: labels only)."""

    def payload_spec(self) -> ModelSpec:
        return self.spec

    def for_late_results(self) -> RoundCollector:
        """A copy without the aggregate, the reference and the sketcher: a remembered
        closed assignment must not keep a model's worth of memory alive."""
        late = copy.copy(self)
        late.aggregator = _Released()
        late.reference, late.sketcher = {}, None
        return late

    def _take(self, header: fleet_pb2.ResultHeader, arrays: Arrays | None) -> SiteOutcome:
        assert arrays is not None
        num_examples, metrics = int(header.num_examples), dict(header.metrics)
        digest = header.update.digest
        try:
            validate_update(arrays, num_examples, metrics, self.reference, self.spec, self.limits)
            profile = self._profile(header)
        except InvalidUpdate as exc:
            return SiteOutcome("rejected", num_examples, {}, digest, str(exc))
        self.aggregator.add(arrays, float(num_examples))
        outcome = SiteOutcome("accepted", num_examples, metrics, digest, profile=profile)
        if self.sketcher is not None:
            outcome.norm, outcome.sketch = self.sketcher.sketch(arrays, self.reference)
        return outcome

    def _profile(self, header: fleet_pb2.ResultHeader) -> DataProfile | None:
        """The result's data profile, checked (raises :class:`InvalidUpdate`)."""
        if not header.HasField("profile"):
            return None
        p = header.profile
        bins = self.profile_bins
        if (p.bins or None) != bins:
            raise InvalidUpdate("bad_profile", f"profile has {p.bins} bins, the round asked {bins}")
        features = None
        if p.feature_counts:
            if bins is None or len(p.feature_counts) % bins:
                raise InvalidUpdate("bad_profile", "feature counts are not whole rows of bins")
            features = np.array(p.feature_counts, dtype=np.float64).reshape(-1, bins)
        profile = DataProfile(int(p.num_examples), np.array(p.label_counts, np.float64), features)
        try:
            profile.check(bins)
            if self.histogram is not None:
                self.histogram.check(profile)
        except ValueError as exc:
            raise InvalidUpdate("bad_profile", str(exc)) from None
        return profile

    def outcome(self) -> RoundOutcome:
        """The round as collected: participants, rejections and drop-outs."""
        missing = sorted(self.expected - self.outcomes.keys())
        items = sorted(self.outcomes.items())
        return RoundOutcome(
            aggregator=self.aggregator,
            accepted=self.accepted(),
            participants=sorted(self.accepted()),
            rejected=[{"site": s, "reason": o.reason} for s, o in items if o.status == "rejected"],
            dropped=[{"site": s, "reason": o.reason} for s, o in items if o.status == "failed"]
            + [{"site": s, "reason": "deadline"} for s in missing],
        )


class _Released:
    """Stands for the aggregate of a closed round (it takes no more updates)."""

    count = 0

    def add(self, arrays: Arrays, weight: float) -> None:
        raise RuntimeError("the round is closed")


StageHandler = Callable[[str, fleet_pb2.ResultHeader, Arrays | None], Any]
"""Turns one site's stage result into the stage's message; raises ``ValueError``
(e.g. :class:`strategies.secagg.SecAggError`) to reject it."""


class StageCollector(Collector):
    """Replies of one secure-aggregation stage of one attempt (``session``).

    Parameters
    ----------
    stage
        The protocol stage, for reasons and logs.
    handler
        Called under the collector's lock for each result of an expected site; what it
        returns is kept in :attr:`replies`.
    payload
        The tensors a result of this stage carries (the masked vector), if any.
    """

    def __init__(
        self,
        expected: set[str],
        stage: str,
        session: str,
        handler: StageHandler,
        payload: ModelSpec | None = None,
    ):
        super().__init__(expected)
        self.stage = stage
        self.session = session
        self.handler = handler
        self.payload = payload
        self.replies: dict[str, Any] = {}

    def payload_spec(self) -> ModelSpec | None:
        return self.payload

    def _take(self, header: fleet_pb2.ResultHeader, arrays: Arrays | None) -> SiteOutcome:
        site = header.site_id
        if not header.HasField("secagg") or header.secagg.session != self.session:
            return SiteOutcome("rejected", reason="wrong_session")
        try:
            self.replies[site] = self.handler(site, header, arrays)
        except ValueError as exc:
            return SiteOutcome("rejected", reason=f"invalid_message: {exc}"[:200])
        return SiteOutcome("accepted", digest=header.update.digest if arrays else "")


class Dispatcher:
    """Pending assignments by site, and live sites by last contact."""

    def __init__(self, online_window_s: float = 60.0):
        self.online_window_s = online_window_s
        self._cond = threading.Condition()
        self._by_site: dict[str, Assignment] = {}
        self._by_task: dict[str, Assignment] = {}
        self._last_seen: dict[str, float] = {}
        self._revoked: set[str] = set()
        self._closed = False
        self._withdrawn: OrderedDict[str, Assignment] = OrderedDict()
        self._late: dict[str, list[dict[str, Any]]] = {}

    def close(self) -> None:
        """Release every waiting long-poll now and answer later ones at once (shutdown)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    # liveness ----------------------------------------------------------------------
    def touch(self, site_id: str) -> None:
        with self._cond:
            if site_id not in self._revoked:
                self._last_seen[site_id] = time.time()

    def last_seen(self, site_id: str) -> float:
        with self._cond:
            return self._last_seen.get(site_id, 0.0)

    def online(self) -> list[str]:
        cutoff = time.time() - self.online_window_s
        with self._cond:
            return sorted(s for s, t in self._last_seen.items() if t >= cutoff)

    def forget(self, site_id: str) -> None:
        with self._cond:
            self._last_seen.pop(site_id, None)

    def revoke(self, site_id: str) -> None:
        """The site lost its access: fail its open assignment (reason ``revoked``), take
        it off the online list and offer it nothing more until :meth:`reinstate`."""
        with self._cond:
            self._revoked.add(site_id)
            self._last_seen.pop(site_id, None)
            a = self._by_site.pop(site_id, None)
            if a is not None:
                self._by_task.pop(a.task_id, None)
            self._cond.notify_all()
        if a is not None:
            a.collector.fail(site_id, "revoked")

    def reinstate(self, site_id: str) -> None:
        """A revoked site enrolled again (with a new token)."""
        with self._cond:
            self._revoked.discard(site_id)

    def is_revoked(self, site_id: str) -> bool:
        with self._cond:
            return site_id in self._revoked

    @property
    def closed(self) -> bool:
        with self._cond:
            return self._closed

    # assignments -------------------------------------------------------------------
    def post(self, assignments: list[Assignment]) -> None:
        with self._cond:
            refused = [a for a in assignments if a.site_id in self._revoked]
            for a in assignments:
                if a.site_id not in self._revoked:
                    self._by_site[a.site_id] = a
                    self._by_task[a.task_id] = a
            self._cond.notify_all()
        for a in refused:  # revoked after it was sampled
            a.collector.fail(a.site_id, "revoked")

    def withdraw(self, assignments: list[Assignment]) -> None:
        """Close the assignments; those still without an accepted result are remembered
        (the last :data:`MAX_WITHDRAWN`), so a result arriving late is known as late."""
        late_views: dict[int, Collector] = {}
        with self._cond:
            for a in assignments:
                self._by_task.pop(a.task_id, None)
                if self._by_site.get(a.site_id) is a:
                    del self._by_site[a.site_id]
                outcome = a.collector.outcomes.get(a.site_id)
                if outcome is None or outcome.status != "accepted":  # without the model
                    late = late_views.get(id(a.collector))
                    if late is None:
                        late = late_views[id(a.collector)] = a.collector.for_late_results()
                    self._withdrawn[a.task_id] = replace(a, model=None, collector=late)
            while len(self._withdrawn) > MAX_WITHDRAWN:
                self._withdrawn.popitem(last=False)

    def withdrawn(self, task_id: str, site_id: str) -> Assignment | None:
        """The closed assignment ``task_id`` of ``site_id``, once (a second late result
        for it is not recognised)."""
        with self._cond:
            a = self._withdrawn.get(task_id)
            if a is None or a.site_id != site_id:
                return None
            del self._withdrawn[task_id]
            return a

    def record_late(self, run_id: str, record: dict[str, Any]) -> None:
        """Keep what a late result was, for the run's next ledger entry."""
        with self._cond:
            late = self._late.setdefault(run_id, [])
            if len(late) < MAX_LATE_PER_ENTRY:
                late.append(record)

    def take_late(self, run_id: str) -> list[dict[str, Any]]:
        """The late results recorded for ``run_id`` since the last call."""
        with self._cond:
            return self._late.pop(run_id, [])

    def take(self, site_id: str, timeout: float) -> Assignment | None:
        """The site's open assignment, waiting up to ``timeout`` seconds for one.

        An assignment stays open until its result arrives, so a site that restarted
        mid-round gets the same task again.
        """
        end = time.time() + timeout
        with self._cond:
            while not self._closed and site_id not in self._revoked:
                a = self._by_site.get(site_id)
                if a is not None and site_id not in a.collector.outcomes and not a.collector.closed:
                    return a
                remaining = end - time.time()
                if remaining <= 0:
                    return None
                self._cond.wait(min(remaining, 1.0))
            return None

    def lookup(self, task_id: str, site_id: str) -> Assignment | None:
        """The open assignment ``task_id`` if it belongs to ``site_id``."""
        with self._cond:
            a = self._by_task.get(task_id)
            return a if a is not None and a.site_id == site_id else None

    def is_active(self, task_id: str) -> bool:
        with self._cond:
            a = self._by_task.get(task_id)
            return a is not None and not a.collector.closed
