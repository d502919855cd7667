"""Stragglers: a site slower than the round's deadline is dropped with reason
``deadline``, the round commits with the quorum, and its late result is recorded in the
run's next ledger entry (received and digest-checked, or refused unread), never
aggregated."""

from __future__ import annotations

import threading

import pytest

from tests.integration.clients import SlowSite, ledger_payloads, start_site_threads

pytestmark = pytest.mark.integration

EXPERIMENT = """
name: stragglers
seed: 2
rounds: 3
task: {name: digits}
federation:
  sites: 4
  sampling: {fraction: 1.0, method: fixed, min_sites: 3, timeout_s: 1.5, late_results: POLICY}
training: {local_epochs: 1, batch_size: 32}
"""


@pytest.mark.parametrize("policy", ["record", "refuse"])
def test_late_results_are_recorded_not_aggregated(coordinator, policy):
    sites = {f"site-{i}": SlowSite(i, 4) for i in range(4)}
    sites["site-3"].delay = 2.5  # always past the 1.5 s deadline
    stop = threading.Event()
    start_site_threads(coordinator.address, sites, stop)
    try:
        run = coordinator.engine.submit(EXPERIMENT.replace("POLICY", policy))
        final = coordinator.engine.execute(run.run_id)
    finally:
        stop.set()
    assert final.status == "finished", final.error
    rounds = ledger_payloads(coordinator, "round_committed")
    assert len(rounds) == 3
    for entry in rounds:
        assert entry["participants"] == ["site-0", "site-1", "site-2"]
        assert {"site": "site-3", "reason": "deadline"} in entry["dropped"]
        assert "site-3" not in entry["update_digests"]
    assert rounds[0]["late_results"] == []
    (finished,) = ledger_payloads(coordinator, "run_finished")
    late = [r for e in [*rounds[1:], finished] for r in e["late_results"]]
    assert late and all(r["site"] == "site-3" and r["policy"] == policy for r in late)
    assert {r["round"] for r in late} <= {1, 2, 3} and all(0 <= r["late_by_s"] < 5 for r in late)
    for r in late:  # recorded in a later entry than its own round's
        assert r["digest"].startswith("sha256:") if policy == "record" else "digest" not in r
    assert coordinator.db.verify_ledger() > 0
