"""Hand-off between the round engine and the Fleet servicer.

The engine posts one :class:`Assignment` per sampled site and waits on a
:class:`RoundCollector`; sites long-poll :meth:`Dispatcher.take` for their assignment
and push results, which the collector validates and folds into the round's streaming
aggregate on arrival. Nothing here touches disk.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from protos.codec import EncodedPayload
from strategies.base import Aggregator
from strategies.errors import InvalidUpdate
from strategies.validation import ModelSpec, UpdateLimits, validate_update


@dataclass
class Assignment:
    """One site's task in one round."""

    task_id: str
    site_id: str
    run_id: str
    round: int
    kind: int
    config_json: str
    model: EncodedPayload
    deadline: float
    collector: RoundCollector


@dataclass
class SiteOutcome:
    """What became of one sampled site in a round."""

    status: str  # accepted | rejected | failed
    num_examples: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    digest: str = ""
    reason: str = ""


class RoundCollector:
    """Validates and folds one round's results as they arrive (thread-safe)."""

    def __init__(
        self,
        expected: set[str],
        reference: Mapping[str, np.ndarray],
        aggregator: Aggregator,
        limits: UpdateLimits,
    ):
        self.expected = expected
        self.reference = reference
        self.spec = ModelSpec.of(reference)
        self.aggregator = aggregator
        self.limits = limits
        self.outcomes: dict[str, SiteOutcome] = {}
        self.closed = False
        self._cond = threading.Condition()

    def submit(
        self,
        site_id: str,
        arrays: Mapping[str, np.ndarray],
        num_examples: int,
        metrics: dict[str, float],
        digest: str,
    ) -> SiteOutcome:
        """Validate an update and fold it in; returns its outcome (never raises on bad input)."""
        with self._cond:
            if self.closed or site_id in self.outcomes or site_id not in self.expected:
                return SiteOutcome("rejected", reason="task_not_active")
            try:
                validate_update(
                    arrays, num_examples, metrics, self.reference, self.spec, self.limits
                )
            except InvalidUpdate as exc:
                outcome = SiteOutcome("rejected", num_examples, {}, digest, str(exc))
            else:
                self.aggregator.add(arrays, float(num_examples))
                outcome = SiteOutcome("accepted", num_examples, metrics, digest)
            self.outcomes[site_id] = outcome
            self._cond.notify_all()
            return outcome

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
            self.closed = True

    def accepted(self) -> dict[str, SiteOutcome]:
        return {s: o for s, o in self.outcomes.items() if o.status == "accepted"}

    def summary(self) -> dict[str, Any]:
        """Participants, rejections and drop-outs, for the ledger."""
        missing = sorted(self.expected - self.outcomes.keys())
        return {
            "participants": sorted(self.accepted()),
            "rejected": [
                {"site": s, "reason": o.reason}
                for s, o in sorted(self.outcomes.items())
                if o.status == "rejected"
            ],
            "dropped": [
                {"site": s, "reason": o.reason}
                for s, o in sorted(self.outcomes.items())
                if o.status == "failed"
            ]
            + [{"site": s, "reason": "deadline"} for s in missing],
        }


class Dispatcher:
    """Pending assignments by site, and live sites by last contact."""

    def __init__(self, online_window_s: float = 60.0):
        self.online_window_s = online_window_s
        self._cond = threading.Condition()
        self._by_site: dict[str, Assignment] = {}
        self._by_task: dict[str, Assignment] = {}
        self._last_seen: dict[str, float] = {}
        self._closed = False

    def close(self) -> None:
        """Release every waiting long-poll now and answer later ones at once (shutdown)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    # liveness ----------------------------------------------------------------------
    def touch(self, site_id: str) -> None:
        with self._cond:
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

    # assignments -------------------------------------------------------------------
    def post(self, assignments: list[Assignment]) -> None:
        with self._cond:
            for a in assignments:
                self._by_site[a.site_id] = a
                self._by_task[a.task_id] = a
            self._cond.notify_all()

    def withdraw(self, assignments: list[Assignment]) -> None:
        with self._cond:
            for a in assignments:
                self._by_task.pop(a.task_id, None)
                if self._by_site.get(a.site_id) is a:
                    del self._by_site[a.site_id]

    def take(self, site_id: str, timeout: float) -> Assignment | None:
        """The site's open assignment, waiting up to ``timeout`` seconds for one.

        An assignment stays open until its result arrives, so a site that restarted
        mid-round gets the same task again.
        """
        end = time.time() + timeout
        with self._cond:
            while not self._closed:
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
