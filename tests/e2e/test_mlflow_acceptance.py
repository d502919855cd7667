"""MLflow acceptance: a simulated run with ``mlflow:`` leaves its parameters, per-round
metrics (epsilon included) and its promoted model, registered with alias ``champion``
and provenance tags, in a real local MLflow store."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from tests.conftest import fedcoord

pytestmark = pytest.mark.slow


def test_a_run_with_mlflow_shows_metrics_and_a_registered_champion(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp = tmp_path / "exp.yaml"
    exp.write_text(
        Path("examples/digits.yaml").read_text()
        + f"mlflow: {{tracking_uri: '{uri}', experiment: hospitals, register_as: digits-mlp}}\n"
        + "promotion: {metric: accuracy, threshold: 0.2, auto: true}\n"
        + "privacy: {dp: {noise_multiplier: 0.5, clip_norm: 1.0, delta: 1.0e-3}}\n"
        # the DP noise makes accuracy dip by more than the regression check's max_drop in
        # about one run in four, and an open alert rightly blocks promotion; that gate has
        # tests of its own (tests/unit/test_drift.py, test_versions_and_promotion.py)
        + "drift: {evaluation: {enabled: false}}\n"
    )
    out = tmp_path / "run"
    done = fedcoord(
        "simulate", str(exp), "--out", str(out), "--set", "rounds=4",
        "--set", "federation.sampling.method=poisson", "--set", "federation.sampling.fraction=0.8",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert "promoted" in done.stdout

    from mlflow.tracking import MlflowClient  # the dev extra installs mlflow-skinny

    warnings.filterwarnings("ignore", category=DeprecationWarning)
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("hospitals").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.tags["fedcoord.run_id"] == summary["run_id"]
    assert run.data.params["federation.sampling.method"] == "poisson"
    assert run.data.params["privacy.dp.noise_multiplier"] == "0.5"
    accuracy = client.get_metric_history(run.info.run_id, "accuracy")
    epsilon = client.get_metric_history(run.info.run_id, "epsilon")
    history = summary["history"]
    assert [(m.step, m.value) for m in accuracy] == [(h["round"], h["accuracy"]) for h in history]
    assert [m.value for m in epsilon] == [h["epsilon"] for h in history]
    assert epsilon[-1].value > epsilon[0].value > 0

    version = client.get_model_version_by_alias("digits-mlp", "champion")
    assert version.run_id == run.info.run_id
    tags = version.tags
    assert tags["fedcoord.ledger_head"] == summary["ledger_head"]
    assert tags["fedcoord.model_digest"] == summary["final_model"]
    assert tags["fedcoord.rounds"] == "4" and tags["fedcoord.secure_aggregation"] == "off"
    assert float(tags["fedcoord.epsilon"]) == pytest.approx(summary["privacy"]["epsilon"], 1e-5)
    assert 0 < int(tags["fedcoord.sites"]) <= 10
    client.download_artifacts(run.info.run_id, "model", str(tmp_path / "dl"))
    digest = summary["final_model"].removeprefix("sha256:")
    downloaded = list((tmp_path / "dl" / "model").glob("*.safetensors"))
    stored = out / "models" / "sha256" / digest[:2] / f"{digest}.safetensors"
    assert [p.read_bytes() for p in downloaded] == [stored.read_bytes()]
