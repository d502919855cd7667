"""Drift checks: profiles, PSI/KS, sketches, robust scores and the monitor's alerts."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.drift import DriftMonitor, SiteReport, site_evaluation, site_requests
from coordinator.experiment import parse_experiment
from coordinator.model_store import ModelStore
from coordinator.state import Database, RoundRecord
from strategies.drift import (
    SKETCH_DIM,
    DataProfile,
    UpdateSketcher,
    cosine,
    ks_from_counts,
    profile_of,
    profile_settings,
    psi,
    robust_score,
)

BASE = "name: t\nrounds: 30\ntask: {name: digits}\n"


def experiment(extra: str = ""):
    return parse_experiment(BASE + extra)


# numerics -------------------------------------------------------------------------------
def test_profile_counts_labels_and_feature_bins_with_end_bins_catching_outliers():
    x = np.array([[0.0, -5.0], [0.49, 0.5], [0.99, 7.0]], dtype=np.float32)
    p = profile_of(x, np.array([0, 2, 2]), bins=2, low=0.0, high=1.0)
    assert p.num_examples == 3 and p.labels.tolist() == [1.0, 0.0, 2.0]
    assert p.features.tolist() == [[2.0, 1.0], [1.0, 2.0]]
    p.check(2)
    assert profile_of(x, np.array([1, 1, 1]), bins=None).features is None


@pytest.mark.parametrize(
    "profile, bins, problem",
    [
        (DataProfile(3, np.array([1.0, 1.0])), None, "add up"),
        (DataProfile(2, np.array([1.0, -1.0, 2.0])), None, "non-negative"),
        (DataProfile(2, np.array([np.nan, 2.0])), None, "finite"),
        (DataProfile(2, np.array([2.0]), 3 * np.ones((3, 2))), 2, "each feature"),
        (DataProfile(2, np.array([2.0]), np.ones((3, 3))), 2, "2 bins"),
        (DataProfile(2, np.array([2.0]), np.ones((3, 2))), None, "None bins"),
    ],
)
def test_hostile_profiles_are_refused(profile, bins, problem):
    with pytest.raises(ValueError, match=problem):
        profile.check(bins)


def test_profile_settings_read_the_round_config():
    assert profile_settings({"profile_bins": 0}) == (None, 0.0, 1.0)
    assert profile_settings({"profile_bins": 8, "profile_low": -1, "profile_high": 2}) == (
        8,
        -1.0,
        2.0,
    )


def test_psi_is_zero_for_the_same_shape_and_large_for_a_moved_one():
    ref = np.array([50.0, 30.0, 20.0])
    assert psi(ref, ref * 3) == pytest.approx(0.0, abs=1e-12)
    assert psi(ref, np.array([20.0, 30.0, 50.0])) > 0.25
    assert psi(ref, np.array([50.0, 30.0, 20.0, 0.0])) == pytest.approx(0.0, abs=1e-9)


def test_ks_from_counts_matches_scipy_on_the_expanded_samples():
    ref, cur = np.array([10.0, 40.0, 50.0]), np.array([50.0, 40.0, 10.0])
    stat, p = ks_from_counts(ref, cur)
    assert stat == pytest.approx(0.4) and p < 1e-6
    assert ks_from_counts(ref, ref)[0] == 0.0
    assert ks_from_counts(ref, np.zeros(3)) == (0.0, 1.0)


def test_robust_score_uses_the_floor_on_a_flat_history():
    assert robust_score(1.0, [1.0, 1.0, 1.0], 0.5) == 0.0
    assert robust_score(3.0, [1.0, 1.0, 1.0], 0.5) == pytest.approx(4.0)
    assert robust_score(3.0, [1.0, 2.0, 3.0], 0.1) == pytest.approx(1 / 1.4826)


def test_small_models_are_sketched_exactly():
    ref = {"w": np.zeros((3, 2), np.float32), "n": np.zeros(1, np.int64)}
    new = {"w": np.arange(6, dtype=np.float32).reshape(3, 2), "n": np.ones(1, np.int64)}
    norm, sketch = UpdateSketcher(ref, seed=1).sketch(new, ref)
    assert norm == pytest.approx(np.sqrt(55.0)) and sketch.tolist() == list(range(6))


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_count_sketch_is_linear_and_keeps_inner_products(seed):
    rng = np.random.default_rng(seed)
    ref = {"a": np.zeros(30_000, np.float32), "b": np.zeros((10, 500), np.float32)}
    u = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in ref.items()}
    w = {
        k: (0.8 * u[k] + 0.6 * rng.standard_normal(v.shape)).astype(np.float32)
        for k, v in ref.items()
    }
    sketcher = UpdateSketcher(ref, seed=7, chunk=4096)
    nu, su = sketcher.sketch(u, ref)
    _, sw = sketcher.sketch(w, ref)
    assert not sketcher.exact and len(su) == SKETCH_DIM
    mean = {k: (u[k] + w[k]) / 2 for k in ref}
    _, sm = sketcher.sketch(mean, ref)
    np.testing.assert_allclose(sm, (su + sw) / 2, rtol=1e-4, atol=1e-3)
    true = sum(float(np.dot(u[k].ravel(), w[k].ravel())) for k in ref) / (
        nu * np.sqrt(sum(float(np.dot(w[k].ravel(), w[k].ravel())) for k in ref))
    )
    assert cosine(su, sw) == pytest.approx(true, abs=0.1)
    assert nu == pytest.approx(
        np.sqrt(sum(float(np.dot(v.ravel(), v.ravel())) for v in u.values()))
    )


# the monitor ----------------------------------------------------------------------------
def report(norm: float, loss: float, direction: np.ndarray, profile=None, n: int = 100):
    return SiteReport(n, {"loss": loss}, norm, direction * norm, profile)


def clean_round(rng: np.random.Generator, sites: int = 8) -> dict[str, SiteReport]:
    base = np.ones(16) / 4.0
    return {
        f"s{i}": report(
            float(rng.uniform(0.8, 1.2)),
            float(rng.uniform(0.2, 0.3)),
            base + 0.05 * rng.standard_normal(16),
            DataProfile(100, np.array([50.0, 50.0])),
        )
        for i in range(sites)
    }


def test_a_clean_federation_raises_nothing_and_a_drifting_site_is_named(tmp_path):
    monitor = DriftMonitor(experiment(), ModelStore(tmp_path)).replay([], "run")
    rng = np.random.default_rng(0)
    for r in range(1, 11):
        result = monitor.check(r, clean_round(rng), {"accuracy": 0.9})
        assert result.alerts == [], result.alerts
    assert set(result.record["sites"]) == {f"s{i}" for i in range(8)}
    assert result.record["checks"] == ["updates", "data", "evaluation"]
    reports = clean_round(rng)
    reports["s3"] = report(10.0, 2.5, -np.ones(16), DataProfile(100, np.array([5.0, 95.0])))
    alerts = monitor.check(11, reports, {"accuracy": 0.9}).alerts
    checks = {(a["check"], a["scope"]) for a in alerts}
    assert {a["site_id"] for a in alerts} == {"s3"}
    assert {
        ("update_norm", "site_history"),
        ("update_norm", "cross_site"),
        ("train_loss", "site_history"),
        ("update_cosine", "cross_site"),
        ("label_psi", "site_reference"),
    } <= checks
    assert all(a["round"] == 11 and a["run_id"] == "run" and a["message"] for a in alerts)


def test_feature_drift_fires_psi_and_ks_and_small_samples_are_not_checked(tmp_path):
    exp = experiment("drift: {data: {feature_range: [0, 1], bins: 4, min_samples: 50}}\n")
    monitor = DriftMonitor(exp, ModelStore(tmp_path)).replay([], "run")
    rng = np.random.default_rng(1)
    x, y = rng.uniform(0, 0.5, (200, 3)), rng.integers(0, 3, 200)
    before = profile_of(x, y, 4)
    after = profile_of(x + np.array([0, 0.5, 0]), y, 4)
    tiny = profile_of(x[:10] + 0.5, y[:10], 4)
    r1 = monitor.check(1, {"a": SiteReport(200, {}, profile=before)}, {})
    assert r1.record["data_skipped"] == {"a": "building reference"} and not r1.alerts
    alerts = monitor.check(2, {"a": SiteReport(200, {}, profile=after)}, {}).alerts
    assert {a["check"] for a in alerts} == {"feature_psi", "feature_ks"}
    assert all("feature 1 " in a["message"] for a in alerts)
    small = monitor.check(3, {"a": SiteReport(10, {}, profile=tiny)}, {})
    assert not small.alerts and "fewer than 50" in small.record["data_skipped"]["a"]


def test_evaluation_regression_against_the_best_version_so_far(tmp_path):
    monitor = DriftMonitor(experiment(), ModelStore(tmp_path)).replay([], "run")
    for r, acc in enumerate([0.80, 0.90, 0.87], start=1):
        assert not monitor.check(r, {}, {"accuracy": acc}).alerts
    (alert,) = monitor.check(4, {}, {"accuracy": 0.84}).alerts
    assert alert["check"] == "evaluation_regression" and alert["baseline"] == 0.90
    loss = DriftMonitor(
        experiment("drift: {evaluation: {metric: loss, higher_is_better: false, max_drop: 0.1}}\n"),
        ModelStore(tmp_path),
    ).replay([], "run")
    assert not loss.check(1, {}, {"loss": 0.5}).alerts
    assert loss.check(2, {}, {"loss": 0.65}).alerts


def test_the_monitor_is_rebuilt_from_the_ledger_after_a_restart(tmp_path):
    """A monitor replayed from committed rounds decides exactly as the one that ran."""
    exp = experiment()
    db = Database(tmp_path)
    live = DriftMonitor(exp, db.models).replay([], "run")
    rng = np.random.default_rng(2)
    for r in range(1, 6):
        result = live.check(r, clean_round(rng), {"accuracy": 0.9})
        record = RoundRecord(r, "sha256:" + "0" * 64, "sha256:" + "0" * 64, {}, [], {})
        db.commit_round(
            "run", record, {"run_id": "run", "round": r, "metrics": {"accuracy": 0.9},
                            "drift": result.record},
        )  # fmt: skip
    replayed = DriftMonitor(exp, db.models).replay(db.ledger_entries(), "run")
    reports = clean_round(rng)
    reports["s1"] = report(20.0, 5.0, -np.ones(16), DataProfile(100, np.array([90.0, 10.0])))
    a = live.check(6, reports, {"accuracy": 0.8})
    b = replayed.check(6, reports, {"accuracy": 0.8})
    assert a.alerts == b.alerts and len(a.alerts) >= 3


def test_site_evaluation_names_the_worst_site_and_the_spread():
    reports = {
        "a": SiteReport(10, {"eval_loss": 0.2, "eval_accuracy": 0.9, "eval_examples": 30.0}),
        "b": SiteReport(10, {"eval_loss": 0.9, "eval_accuracy": 0.6, "eval_examples": 10.0}),
        "c": SiteReport(10, {"loss": 0.1}),
    }
    record = site_evaluation(reports)
    assert record["worst"] == {"site": "b", "accuracy": 0.6}
    assert record["spread"] == pytest.approx(0.3)
    assert record["mean_accuracy"] == pytest.approx((0.9 * 30 + 0.6 * 10) / 40)
    assert set(record["sites"]) == {"a", "b"} and record["sites"]["a"]["num_examples"] == 30
    assert site_evaluation({"c": reports["c"]}) is None


def test_privatised_runs_ask_sites_for_nothing_and_refuse_explicit_site_checks():
    plain = experiment("drift: {data: {feature_range: [0, 16]}}\n")
    assert site_requests(plain) == {
        "site_evaluation": True, "profile_bins": 10, "profile_low": 0.0, "profile_high": 16.0,
    }  # fmt: skip
    secure = experiment("privacy: {secure_aggregation: {enabled: true}}\n")
    assert site_requests(secure) == {} and secure.site_checks() == (False, False)
    from coordinator.errors import ConfigError

    for key in ("drift: {updates: {enabled: true}}", "training: {site_evaluation: true}"):
        with pytest.raises(ConfigError) as err:
            experiment(f"privacy: {{secure_aggregation: {{enabled: true}}}}\n{key}\n")
        assert "privacy.secure_aggregation" in err.value.message


# pooled checks (secure aggregation, DP) -------------------------------------------------
SECURE = "privacy: {secure_aggregation: {enabled: true, max_examples: 1000}}\n"
POOLED = SECURE + "drift: {data: {labels: 3, feature_range: [0, 1], features: 2, bins: 4}}\n"


def site_data(
    rng: np.random.Generator, n: int, shift: float = 0.0, labels=(1, 1, 1), bins: int | None = 4
):
    """``n`` examples of 2 features in [0, 0.5) (moved by ``shift``), labels drawn with
    the given weights."""
    p = np.array(labels, dtype=np.float64)
    x, y = rng.uniform(0, 0.5, (n, 2)) + shift, rng.choice(3, n, p=p / p.sum())
    return profile_of(x, y, bins)


def secure_round(monitor: DriftMonitor, profiles: list[DataProfile]):
    """What the secure sum gives the monitor: the exact sum of the sites' tails."""
    spec = monitor.histogram
    total = sum(spec.encode(p) for p in profiles)
    return monitor.pool(total, [], len(profiles), None)


def test_pooled_checks_under_secure_aggregation_alert_without_naming_a_site(tmp_path):
    exp = experiment(POOLED)
    assert exp.data_check_scope() == "pooled" and exp.site_checks() == (False, False)
    monitor = DriftMonitor(exp, ModelStore(tmp_path)).replay([], "run")
    assert monitor.histogram.encoding == "counts" and monitor.histogram.cap == 1000
    rng = np.random.default_rng(3)
    for r in range(1, 4):
        pooled = secure_round(monitor, [site_data(rng, 100) for _ in range(6)])
        assert pooled.num_examples == 600 and pooled.noise_std is None
        result = monitor.check(r, {}, {}, pooled)
        assert result.alerts == [] and result.record["checks"] == ["pooled_data"]
        assert "profiles" not in result.record and "sites" not in result.record
        assert result.record["pooled"]["num_examples"] == 600
    assert monitor.check(1, {}, {}, None).record["pooled"] == {
        "skipped": "no pooled histogram this round"
    }
    drifted = [site_data(rng, 100) for _ in range(4)]
    drifted += [site_data(rng, 300, shift=0.5, labels=(0, 0, 1)) for _ in range(2)]
    alerts = monitor.check(4, {}, {}, secure_round(monitor, drifted)).alerts
    assert {a["check"] for a in alerts} == {"label_psi", "feature_psi", "feature_ks"}
    assert all(a["scope"] == "pooled" and a["site_id"] is None for a in alerts)
    assert all(a["message"].startswith("pooled ") for a in alerts)


def test_pooled_guards_reference_and_malformed_sums(tmp_path):
    exp = experiment(POOLED.replace("bins: 4}", "bins: 4, min_samples: 100}"))
    monitor = DriftMonitor(exp, ModelStore(tmp_path)).replay([], "run")
    rng = np.random.default_rng(4)
    small = monitor.check(1, {}, {}, secure_round(monitor, [site_data(rng, 30) for _ in range(3)]))
    assert small.record["pooled"]["skipped"] == "fewer than 100 examples"
    first = monitor.check(2, {}, {}, secure_round(monitor, [site_data(rng, 60) for _ in range(3)]))
    assert first.record["pooled"]["skipped"] == "building reference"  # round 1 is too small
    total = sum(monitor.histogram.encode(site_data(rng, 60)) for _ in range(3))
    total[0] += 7  # a site sent a tail whose rows do not add up
    bad = monitor.pool(total, [], 3, None)
    assert isinstance(bad, str) and "do not add up" in bad
    assert monitor.check(3, {}, {}, bad).record["pooled"] == {"skipped": bad}
    ok = monitor.check(4, {}, {}, secure_round(monitor, [site_data(rng, 60) for _ in range(3)]))
    assert "skipped" not in ok.record["pooled"] and not ok.alerts


def test_the_pooled_reference_is_rebuilt_from_the_ledger_after_a_restart(tmp_path):
    """A monitor replayed from committed rounds decides exactly as the one that ran."""
    exp = experiment(POOLED.replace("bins: 4}", "bins: 4, reference_rounds: 2}"))
    db = Database(tmp_path)
    live = DriftMonitor(exp, db.models).replay([], "run")
    rng = np.random.default_rng(5)
    for r in range(1, 5):
        result = live.check(r, {}, {}, secure_round(live, [site_data(rng, 80) for _ in range(5)]))
        record = RoundRecord(r, "sha256:" + "0" * 64, "sha256:" + "0" * 64, {}, [], {})
        db.commit_round(
            "run", record, {"run_id": "run", "round": r, "metrics": {}, "drift": result.record},
        )  # fmt: skip
    assert db.verify_ledger() > 0  # the pooled profiles are verified files
    replayed = DriftMonitor(exp, db.models).replay(db.ledger_entries(), "run")
    profiles = [site_data(rng, 80) for _ in range(3)]
    profiles += [site_data(rng, 80, shift=0.3, labels=(1, 0, 3)) for _ in range(2)]
    a = live.check(5, {}, {}, secure_round(live, profiles))
    b = replayed.check(5, {}, {}, secure_round(replayed, profiles))
    assert a.alerts == b.alerts and len(a.alerts) >= 2
    assert a.record == b.record


DP = (
    "federation: {sites: 20, sampling: {fraction: 1.0, method: poisson}}\n"
    "privacy: {dp: {noise_multiplier: 1.0}}\n"
)


class NoNoise:
    """A stand-in for the privacy session that records what it was asked to noise."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    def noise_histogram(self, vector: np.ndarray, sensitivity: float) -> float:
        self.calls.append(sensitivity)
        return 0.0


def test_under_dp_the_coordinator_pools_proportions_and_guards_on_the_capped_count(tmp_path):
    exp = experiment(DP + "drift: {data: {labels: 3, noise_multiplier: 0.5}}\n")
    monitor = DriftMonitor(exp, ModelStore(tmp_path)).replay([], "run")
    spec = monitor.histogram
    assert (spec.encoding, spec.cap, spec.features) == ("proportions", 50, 0)
    assert spec.sensitivity == pytest.approx(np.sqrt(2))
    rng = np.random.default_rng(6)
    big = site_data(rng, 400, labels=(1, 0, 0), bins=None)
    small = site_data(rng, 20, labels=(0, 1, 0), bins=None)
    noise = NoNoise()
    pooled = monitor.pool(None, [big, small, None], 3, noise)
    assert noise.calls == [spec.sensitivity]  # drawn once, for this sensitivity
    # each site weighs as one site whatever its size; each counts at most 50 examples
    assert pooled.labels.tolist() == pytest.approx([0.5, 0.5, 0.0])
    assert pooled.num_examples == 70
    tiny = [site_data(rng, 10, bins=None) for _ in range(4)]
    assert monitor.pool(None, tiny, 4, noise).num_examples == 40
    result = monitor.check(1, {}, {}, monitor.pool(None, tiny, 4, noise))
    assert result.record["pooled"]["skipped"] == "fewer than 50 examples"


def test_pooled_settings_are_required_and_local_dp_keeps_data_checks_off():
    from coordinator.errors import ConfigError

    secure = experiment(POOLED)
    config = site_requests(secure)
    assert config["profile_labels"] == 3 and config["profile_features"] == 2
    assert config["profile_encoding"] == "counts" and config["profile_bins"] == 4
    dp = experiment(DP + "drift: {data: {labels: 3, noise_multiplier: 0.5}}\n")
    assert site_requests(dp)["profile_encoding"] == "proportions"
    assert experiment(DP + "drift: {data: {labels: 3}}\n").data_check_scope() is None
    local = "privacy: {local_dp: {noise_multiplier: 1.0}}\n"
    assert experiment(local + "drift: {data: {labels: 3}}\n").data_check_scope() is None
    refused = {
        SECURE + "drift: {data: {enabled: true}}": "drift.data.labels",
        SECURE + "drift: {data: {enabled: true, labels: 3, feature_range: [0, 1]}}":
            "drift.data.features",
        DP + "drift: {data: {enabled: true, labels: 3}}": "drift.data.noise_multiplier",
        local + "drift: {data: {enabled: true, labels: 3}}": "drift.data.enabled",
        "privacy: {secure_aggregation: {enabled: true, max_examples: null}}\n"
        "drift: {data: {enabled: true, labels: 3}}": "privacy.secure_aggregation.max_examples",
        "privacy: {secure_aggregation: {enabled: true, max_examples: 1000000000}}\n"
        "drift: {data: {labels: 3}}": "privacy.secure_aggregation.max_examples",
        "drift: {data: {noise_multiplier: 1.0}}": "drift.data.noise_multiplier",
        "drift: {data: {features: 3}}": "drift.data.features",
    }  # fmt: skip
    for text, key in refused.items():
        with pytest.raises(ConfigError) as err:
            experiment(text + "\n")
        assert err.value.key == key, text
