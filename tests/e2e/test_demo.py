"""The demo a new user runs: `fedcoord simulate examples/digits.yaml`, checked end to end."""

from __future__ import annotations

import json

import pytest

from tests.conftest import fedcoord, ledger_entries, rounds_committed

pytestmark = pytest.mark.slow


def test_digits_demo_reaches_93_percent_and_writes_the_contract(tmp_path):
    out = tmp_path / "run"
    done = fedcoord("simulate", "examples/digits.yaml", "--out", str(out))
    assert done.returncode == 0, done.stderr
    progress = [line for line in done.stdout.splitlines() if line.startswith("round ")]
    assert len(progress) == 20 and "accuracy" in progress[-1]

    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) >= {
        "run_id",
        "name",
        "rounds_completed",
        "final_model",
        "ledger_head",
        "metrics",
        "history",
        "privacy",
        "secure_aggregation",
    }
    assert summary["name"] == "digits-fedavg" and summary["rounds_completed"] == 20
    assert summary["metrics"]["accuracy"] >= 0.93
    assert [h["round"] for h in summary["history"]] == list(range(1, 21))
    assert summary["privacy"] is None and summary["secure_aggregation"] is False
    digest = summary["final_model"].removeprefix("sha256:")
    assert (out / "models" / "sha256" / digest[:2] / f"{digest}.safetensors").is_file()
    assert (out / "runs" / summary["run_id"] / "summary.json").is_file()

    entries = ledger_entries(out)
    assert all(
        set(e) == {"seq", "kind", "payload", "prev_hash", "hash", "signature"} for e in entries
    )
    committed = [e for e in entries if e["kind"] == "round_committed"]
    assert [e["payload"]["round"] for e in committed] == list(range(1, 21))
    assert committed[-1]["payload"]["output_model"] == summary["final_model"]
    assert entries[-1]["hash"] == summary["ledger_head"]
    verify = fedcoord("ledger", "verify", str(out))
    assert verify.returncode == 0 and "ledger OK" in verify.stdout


def test_simulation_with_dropouts_commits_with_the_survivors(tmp_path):
    out = tmp_path / "run"
    done = fedcoord(
        "simulate",
        "examples/digits.yaml",
        "--out",
        str(out),
        "--set",
        "rounds=4",
        "--set",
        "federation.dropout=0.3",
        "--set",
        "federation.sampling.min_sites=3",
    )
    assert done.returncode == 0, done.stderr
    committed = rounds_committed(out)
    assert len(committed) == 4
    dropped = [d for c in committed for d in c["dropped"]]
    assert dropped and all("simulated dropout" in d["reason"] for d in dropped)
    assert all(len(c["participants"]) + len(c["dropped"]) == 10 for c in committed)


def test_synthetic_model_of_several_mib_travels_in_chunks(tmp_path):
    """A 2M-parameter model (8 MiB, 8+ chunks each way) through a real simulation."""
    out = tmp_path / "run"
    exp = tmp_path / "synthetic.yaml"
    exp.write_text(
        "name: synthetic-chunks\nrounds: 2\n"
        "task: {name: synthetic, options: {num_parameters: 2000000, samples_per_site: 64}}\n"
        "federation: {sites: 4, sampling: {min_sites: 4}}\n"
        "training: {local_epochs: 1, batch_size: 32, optimizer: {name: sgd, lr: 0.001}}\n"
    )
    done = fedcoord("simulate", str(exp), "--out", str(out))
    assert done.returncode == 0, done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds_completed"] == 2
    digest = summary["final_model"].removeprefix("sha256:")
    model_file = out / "models" / "sha256" / digest[:2] / f"{digest}.safetensors"
    assert model_file.stat().st_size > 8_000_000
    assert fedcoord("ledger", "verify", str(out)).returncode == 0
