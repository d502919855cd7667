"""Drift acceptance: a drifting simulated site raises alerts within a few rounds of its
drift, naming it, while a clean 30-round run of the demo raises none."""

from __future__ import annotations

import pytest

from tests.conftest import fedcoord, ledger_entries

pytestmark = pytest.mark.slow


def committed(entries: list[dict]) -> list[dict]:
    return [e["payload"] for e in entries if e["kind"] == "round_committed"]


def test_a_clean_30_round_run_raises_no_drift_alert(tmp_path):
    out = tmp_path / "clean"
    done = fedcoord(
        "simulate", "examples/digits.yaml", "--out", str(out), "--set", "rounds=30",
        "--set", "drift.data.feature_range=[0, 1]",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "drift alert" not in done.stdout
    entries = ledger_entries(out)
    assert not [e for e in entries if e["kind"] == "drift_alert"]
    rounds = committed(entries)
    assert len(rounds) == 30
    for p in rounds:
        drift = p["drift"]
        assert drift["checks"] == ["updates", "data", "evaluation"] and drift["alerts"] == 0
        assert set(drift["sites"]) == set(p["participants"]) == set(drift["profiles"])
        fairness = p["site_evaluation"]
        assert set(fairness["sites"]) == set(p["participants"])
        worst = min(v["accuracy"] for v in fairness["sites"].values())
        assert fairness["worst"]["accuracy"] == worst and fairness["spread"] >= 0
    assert rounds[-1]["site_evaluation"]["mean_accuracy"] > 0.9


@pytest.mark.parametrize("kind", ["label_shift", "feature_shift"])
def test_a_drifting_site_raises_alerts_within_a_few_rounds(tmp_path, kind):
    out = tmp_path / kind
    done = fedcoord(
        "simulate", "examples/digits.yaml", "--out", str(out), "--set", "rounds=9",
        "--set", "federation.drift.sites=1", "--set", "federation.drift.from_round=6",
        "--set", f"federation.drift.kind={kind}", "--set", "drift.data.feature_range=[0, 1]",
        "--set", "promotion.threshold=0.5", "--set", "promotion.auto=true",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    entries = ledger_entries(out)
    alerts = [e["payload"] for e in entries if e["kind"] == "drift_alert"]
    assert alerts, "no drift alert"
    assert min(a["round"] for a in alerts) <= 7 and all(a["round"] >= 6 for a in alerts)
    (drifter,) = {a["site_id"] for a in alerts}  # one site drifted, only it is named
    checks = {a["check"] for a in alerts}
    expected = {"label_psi"} if kind == "label_shift" else {"feature_psi", "feature_ks"}
    assert expected <= checks
    assert f"drift alert: {drifter}" in done.stdout
    # the alert stays open, so the gate refuses the final version and says why
    (decision,) = [e for e in entries if e["kind"] in ("model_promoted", "promotion_refused")]
    assert decision["kind"] == "promotion_refused"
    assert decision["payload"]["open_alerts"] and "promotion refused" not in done.stderr
    assert fedcoord("ledger", "verify", str(out)).returncode == 0
