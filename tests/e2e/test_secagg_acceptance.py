"""The secure aggregation issue's acceptance, run as a user would: ``fedcoord simulate``
on digits with secure aggregation, 20 sites and 20 % random dropout per round (at every
stage of the protocol) reaches the accuracy of the same federation without it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import ROOT, fedcoord, rounds_committed

pytestmark = pytest.mark.slow

STAGES = {"advertise_keys", "share_keys", "masked_input", "unmask"}


def simulate(tmp_path: Path, name: str, *extra: str) -> dict:
    out = tmp_path / name
    done = fedcoord(
        "simulate", str(ROOT / "examples" / "digits.yaml"), "--out", str(out),
        "--set", "federation.sites=20", "--set", "federation.dropout=0.2", *extra,
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    summary["out"], summary["stdout"] = out, done.stdout
    return summary


def test_secure_aggregation_with_dropouts_learns_like_plain_aggregation(tmp_path):
    plain = simulate(tmp_path, "plain")
    secure = simulate(
        tmp_path, "secure", "--set", "privacy.secure_aggregation.enabled=true",
        "--set", "privacy.secure_aggregation.dropout_rate=0.2",  # k and t for that dropout
    )  # fmt: skip
    assert plain["secure_aggregation"] is False and secure["secure_aggregation"] is True
    assert secure["rounds_completed"] == plain["rounds_completed"] == 20
    accuracy = secure["metrics"]["accuracy"]
    assert accuracy >= 0.9 and abs(accuracy - plain["metrics"]["accuracy"]) <= 0.03
    assert "secure aggregation (SecAgg+)" in secure["stdout"]

    entries = rounds_committed(secure["out"])
    assert len(entries) == 20
    dropped_at = set()
    for entry in entries:
        record = entry["secure_aggregation"]
        assert record["mode"] == "secagg" and record["sampled"] == 20
        assert [s["stage"] for s in record["stages"]] == [
            "advertise_keys", "share_keys", "masked_input", "unmask",
        ]  # fmt: skip
        dropped_at |= {s["stage"] for s in record["stages"] if s["dropped"]}
        assert "train_loss" not in entry["metrics"]  # site metrics stay private
    assert dropped_at == STAGES  # the run survived dropouts at every stage
    done = fedcoord("ledger", "verify", str(secure["out"]), timeout=60)
    assert done.returncode == 0, done.stderr
