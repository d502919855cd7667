"""Pooled data-drift checks through a real coordinator and real site threads: under
secure aggregation the sites' histograms ride in the masked vector and a drifting site
raises a pooled alert while the ledger holds no site's histogram; under central DP the
pooled histogram is noised and its release is in the epsilon the ledger records."""

from __future__ import annotations

import json

import numpy as np
import pytest

from client_sdk.api import Config
from strategies.drift import DataProfile, profile_of, profile_settings
from strategies.privacy.accountant import epsilon_of
from tests.integration.clients import ShiftSite, ledger_payloads, run

pytestmark = pytest.mark.integration


class DriftingSite(ShiftSite):
    """A :class:`ShiftSite` with data: 2 features in [0, 0.5) and labels 0..3 drawn
    uniformly; from round ``from_round`` on every label is 3 and the features move by
    0.5 (``from_round`` 0: never)."""

    def __init__(self, seed: int, num_examples: int, from_round: int = 0):
        super().__init__(seed, num_examples)
        self.from_round = from_round

    def profile(self, config: Config) -> DataProfile:
        rng = np.random.default_rng([self.seed, 7])
        n = self.num_examples
        x, y = rng.uniform(0, 0.5, (n, 2)), rng.integers(0, 4, n)
        if self.from_round and int(config["round"]) >= self.from_round:
            x, y = x + 0.5, np.full(n, 3)
        return profile_of(x, y, *profile_settings(config))


def test_a_drifting_site_raises_a_pooled_alert_under_secure_aggregation(coordinator):
    text = """
name: pooled-secagg
seed: 3
rounds: 4
task: {name: digits}
federation:
  sites: 5
  sampling: {fraction: 1.0, method: fixed, min_sites: 3, timeout_s: 30}
privacy: {secure_aggregation: {enabled: true, stage_timeout_s: 10, max_examples: 1000}}
drift: {data: {labels: 4, feature_range: [0, 1], features: 2, bins: 4}}
"""
    sites = {f"site-{i}": DriftingSite(30 + i, 100) for i in range(4)}
    sites["site-4"] = DriftingSite(34, 400, from_round=3)
    final = run(coordinator, sites, text)
    assert final.status == "finished", final.error
    rounds = ledger_payloads(coordinator, "round_committed")
    assert [r["participants"] for r in rounds] == [sorted(sites)] * 4
    for r in rounds:
        drift = r["drift"]
        assert drift["checks"] == ["pooled_data", "evaluation"]
        assert "profiles" not in drift and "sites" not in drift  # nothing per site
        assert drift["pooled"]["num_examples"] == 800  # the exact sum of the counts
        assert drift["pooled"]["encoding"] == "counts" and drift["pooled"]["sites"] == 5
        assert r["secure_aggregation"]["histogram"]["coordinates"] == 4 + 2 * 4 + 1
    assert rounds[0]["drift"]["pooled"]["skipped"] == "building reference"
    assert "skipped" not in rounds[1]["drift"]["pooled"] and rounds[1]["drift"]["alerts"] == 0
    alerts = [a for a in ledger_payloads(coordinator, "drift_alert") if a["scope"] == "pooled"]
    assert {a["round"] for a in alerts} == {3, 4}
    assert {"label_psi", "feature_psi", "feature_ks"} <= {a["check"] for a in alerts}
    assert all(a["site_id"] is None for a in alerts)
    entries = repr([e.payload for e in coordinator.db.ledger_entries()])
    assert "site-4" not in json.dumps(alerts) and "label_counts" not in entries
    assert coordinator.db.verify_ledger() > 0


def test_central_dp_noises_the_pooled_histogram_and_accounts_for_it(coordinator):
    z, sigma_h = 1.0, 0.1
    text = f"""
name: pooled-dp
seed: 5
rounds: 4
task: {{name: digits}}
federation:
  sites: 6
  sampling: {{fraction: 1.0, method: poisson, timeout_s: 30}}
privacy: {{dp: {{noise_multiplier: {z}, clip_norm: 0.5, delta: 1.0e-3}}}}
drift: {{data: {{labels: 4, noise_multiplier: {sigma_h}, reference_rounds: 2}}}}
"""
    sites = {f"site-{i}": DriftingSite(50 + i, 100, from_round=4 if i < 3 else 0) for i in range(6)}
    final = run(coordinator, sites, text)
    assert final.status == "finished", final.error
    started = ledger_payloads(coordinator, "run_started")[0]["dp"]
    effective = (z**-2 + sigma_h**-2) ** -0.5
    assert started["accounted_noise_multiplier"] == pytest.approx(effective)
    rounds = ledger_payloads(coordinator, "round_committed")
    assert [r["round"] for r in rounds] == [1, 2, 3, 4]
    for k, r in enumerate(rounds, start=1):
        assert r["dp"]["epsilon"] == pytest.approx(
            epsilon_of("rdp", [(effective, 1.0, k)], 1e-3), rel=1e-9
        )
        assert r["dp"]["epsilon"] > epsilon_of("rdp", [(z, 1.0, k)], 1e-3)
        assert r["metrics"]["epsilon"] == r["dp"]["epsilon"]
        pooled = r["drift"]["pooled"]
        assert pooled["encoding"] == "proportions" and "profiles" not in r["drift"]
        assert pooled["noise_std"] == pytest.approx(sigma_h * 2**0.5)
        assert abs(pooled["num_examples"] - 6 * 50) < 50  # noised, each site capped at 50
    assert [r["drift"]["pooled"].get("skipped") for r in rounds] == [
        "building reference", "building reference", None, None,
    ]  # fmt: skip
    alerts = ledger_payloads(coordinator, "drift_alert")
    pooled_alerts = [a for a in alerts if a["scope"] == "pooled"]
    assert {a["round"] for a in pooled_alerts} == {4}
    assert {a["check"] for a in pooled_alerts} == {"label_psi"}
    summary = json.loads(final.summary or "{}")
    assert summary["privacy"]["epsilon"] == pytest.approx(rounds[-1]["dp"]["epsilon"])
    assert summary["privacy"]["histogram_noise_multiplier"] == sigma_h


def test_client_mode_dp_noises_the_pooled_proportions_from_the_secure_sum(coordinator):
    """Secure aggregation with client-side DP: the sites put their proportions into the
    masked vector, the coordinator noises the secure sum's histogram."""
    text = """
name: pooled-secagg-dp
seed: 6
rounds: 2
task: {name: digits}
federation:
  sites: 4
  sampling: {fraction: 1.0, method: poisson, timeout_s: 30}
privacy:
  dp: {mode: client, noise_multiplier: 1.0, clip_norm: 0.5, delta: 1.0e-3}
  secure_aggregation: {enabled: true, stage_timeout_s: 10}
drift: {data: {labels: 4, feature_range: [0, 1], features: 2, bins: 4, noise_multiplier: 0.5}}
"""
    sites = {f"site-{i}": DriftingSite(70 + i, 100) for i in range(4)}
    final = run(coordinator, sites, text)
    assert final.status == "finished", final.error
    effective = (1.0**-2 + 0.5**-2) ** -0.5
    for k, r in enumerate(ledger_payloads(coordinator, "round_committed"), start=1):
        assert r["participants"] == sorted(sites)
        histogram = r["secure_aggregation"]["histogram"]
        assert histogram["encoding"] == "proportions" and histogram["scale"] == 1 << 16
        pooled = r["drift"]["pooled"]
        assert pooled["noise_std"] == pytest.approx(0.5 * (2 + 2) ** 0.5)
        if k > 1:  # 4 sites' rows against noise of std 1: too small a sample for KS
            assert pooled["ks_skipped"].startswith("sample size")
        assert "profiles" not in r["drift"]
        assert r["dp"]["epsilon"] == pytest.approx(
            epsilon_of("rdp", [(effective, 1.0, k)], 1e-3), rel=1e-9
        )
