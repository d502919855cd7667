"""The promotion gate: a model version becomes its experiment's champion when its central
``metric`` passes the threshold (``>=``, or ``<=`` when lower is better), its file
verifies, and no drift alert of its run is open at its round.

A ``drift_alert`` raised in round ``r`` stays open for ``open_rounds`` rounds, ``r`` to
``r + open_rounds - 1``; the version of round ``n`` is blocked by the alerts of rounds
``n - open_rounds + 1`` to ``n``. Alerts of later rounds do not block it. Every decision
is recorded: ``model_promoted`` or ``promotion_refused``. Promoting the current champion
again is allowed and records a new entry (it re-confirms the gate, e.g. under another
threshold).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

from coordinator import ledger
from coordinator.errors import LedgerError
from coordinator.experiment import Drift, Promotion
from coordinator.ledger import Entry
from coordinator.state import Database
from coordinator.versions import ModelVersion, short_digest


@dataclass(frozen=True)
class Decision:
    """The gate's verdict on one version; ``ledger_seq`` is set once it is recorded."""

    version: ModelVersion
    spec: Promotion
    by: str
    promoted: bool
    reasons: list[str]
    value: float | None
    open_alerts: list[int]
    ledger_seq: int | None = None

    @property
    def kind(self) -> str:
        """The ledger entry kind that records this decision."""
        return "model_promoted" if self.promoted else "promotion_refused"

    def payload(self) -> dict[str, Any]:
        """The ledger payload."""
        return {
            "run_id": self.version.run_id,
            "round": self.version.round,
            "model": self.version.digest,
            "metric": self.spec.metric,
            "value": self.value,
            "threshold": self.spec.threshold,
            "higher_is_better": self.spec.higher_is_better,
            "by": self.by,
            "open_alerts": list(self.open_alerts),
            "reasons": list(self.reasons),
        }


def run_gate_settings(entries: Iterable[Entry], run_id: str) -> tuple[Promotion | None, int]:
    """The run's ``promotion:`` block (None when it has none) and its ``drift.open_rounds``,
    from its ``run_started`` entry (defaults when the run has none)."""
    default_open = Drift().open_rounds
    for e in entries:
        if e.kind == "run_started" and e.payload["run_id"] == run_id:
            experiment = e.payload.get("experiment") or {}
            block = experiment.get("promotion")
            drift = experiment.get("drift") or {}
            spec = None if block is None else Promotion.model_validate(block)
            return spec, int(drift.get("open_rounds", default_open))
    return None, default_open


def open_alerts(
    entries: Iterable[Entry], run_id: str, round_no: int, open_rounds: int
) -> list[Entry]:
    """The run's ``drift_alert`` entries still open at round ``round_no``."""
    first = round_no - open_rounds + 1
    return [
        e
        for e in entries
        if e.kind == "drift_alert"
        and e.payload.get("run_id") == run_id
        and first <= int(e.payload.get("round", -1)) <= round_no
    ]


def _alert_reason(alert: Entry, open_rounds: int) -> str:
    p = alert.payload
    where = p.get("scope", "run") + (f" {p['site_id']}" if p.get("site_id") else "")
    until = int(p["round"]) + open_rounds - 1
    text = (
        f"drift alert open (ledger entry {alert.seq}, round {p['round']}, open through round "
        f"{until}): {p.get('check', '?')} ({where})"
    )
    return f"{text}: {p['message']}" if p.get("message") else text


def _metric_reasons(version: ModelVersion, spec: Promotion) -> tuple[float | None, list[str]]:
    raw = version.metrics.get(spec.metric)
    if isinstance(raw, bool) or not isinstance(raw, int | float) or not math.isfinite(raw):
        have = ", ".join(sorted(version.metrics)) or "none"
        return None, [f"metric {spec.metric!r} is missing from this version's metrics ({have})"]
    value = float(raw)
    passes = value >= spec.threshold if spec.higher_is_better else value <= spec.threshold
    if passes:
        return value, []
    side = "below" if spec.higher_is_better else "above"
    return value, [f"{spec.metric} {value:.6g} is {side} the threshold {spec.threshold:.6g}"]


def _file_reasons(db: Database, version: ModelVersion) -> list[str]:
    try:
        db.models.verify(version.digest)
    except LedgerError as exc:
        return [f"model file does not verify: {exc}"]
    return []


def _judge(
    entries: list[Entry],
    version: ModelVersion,
    spec: Promotion,
    open_rounds: int,
    by: str,
    file_reasons: list[str],
) -> Decision:
    value, reasons = _metric_reasons(version, spec)
    alerts = open_alerts(entries, version.run_id, version.round, open_rounds)
    reasons += file_reasons + [_alert_reason(a, open_rounds) for a in alerts]
    return Decision(
        version=version,
        spec=spec,
        by=by,
        promoted=not reasons,
        reasons=reasons,
        value=value,
        open_alerts=[a.seq for a in alerts],
    )


def decide(
    db: Database, version: ModelVersion, spec: Promotion, open_rounds: int, by: str
) -> Decision:
    """Put ``version`` through the gate without recording anything."""
    file_reasons = _file_reasons(db, version)
    return _judge(db.ledger_entries(), version, spec, open_rounds, by, file_reasons)


def promote(
    db: Database, version: ModelVersion, spec: Promotion, open_rounds: int, by: str
) -> Decision:
    """Decide and record the decision (``model_promoted`` or ``promotion_refused``). The
    alerts are read and the entry appended in one transaction, so no alert lands between."""
    file_reasons = _file_reasons(db, version)  # outside the write lock: hashing takes time
    with db.transaction() as conn:
        decision = _judge(db.ledger_entries(), version, spec, open_rounds, by, file_reasons)
        entry = ledger.append(conn, db.signing_key, decision.kind, decision.payload())
    return replace(decision, ledger_seq=entry.seq)


def describe(decision: Decision) -> str:
    """One line naming the version and the verdict."""
    v, spec = decision.version, decision.spec
    what = f"{short_digest(v.digest)} (run {v.run_id}, round {v.round})"
    if not decision.promoted:
        return f"refused {what}: {len(decision.reasons)} reason(s)"
    op = ">=" if spec.higher_is_better else "<="
    return (
        f"promoted {what} to champion of {v.name}: "
        f"{spec.metric} {decision.value:.6g} {op} {spec.threshold:.6g}, no drift alert open"
    )
