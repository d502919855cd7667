"""Model versions, lineage and the promotion gate over a real ledger in a tmp data dir
(no simulation: the entries are written the way the round engine writes them)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.numpy import save_file
from torch import nn

from client_sdk.errors import ClientError
from client_sdk.torch import arrays_from_module, load_model_file
from coordinator.errors import ConfigError
from coordinator.experiment import Experiment, Promotion
from coordinator.promotion import decide, open_alerts, promote, run_gate_settings
from coordinator.state import Database, RoundRecord
from coordinator.versions import ModelVersion, find_version, list_versions
from protos.codec import digest_arrays
from simulations.models import build_model
from tests.conftest import fedcoord

NAME = "digits-test"
RUN_A, RUN_B = "digits-test-a", "digits-test-b"
ACCURACY = [0.5, 0.85, 0.9, 0.95, 0.93]  # rounds 1..5 of run A
LOSS = [1.5, 0.6, 0.5, 0.4, 0.45]
ALERT_ROUND, OPEN_ROUNDS = 3, 2  # the alert blocks rounds 3 and 4


def digits_mlp(seed: int | None) -> nn.Module:
    """The digits task's default model: 64 pixels, one hidden layer of 64, 10 classes."""
    return build_model("mlp", 64, 10, seed=seed, hidden=[64])


def experiment(promotion: dict[str, Any] | None) -> dict[str, Any]:
    exp = Experiment.model_validate(
        {
            "name": NAME,
            "rounds": 5,
            "task": {"name": "digits"},
            "promotion": promotion,
            "drift": {"open_rounds": OPEN_ROUNDS},
        }
    )
    return json.loads(exp.canonical_json())


@dataclass
class Built:
    path: Path
    db: Database
    digests: dict[tuple[str, int], str]  # (run, round) -> model digest
    alert_seq: int


def store(db: Database, seed: int) -> str:
    arrays = arrays_from_module(digits_mlp(seed))
    digest = digest_arrays(arrays)
    db.models.put(arrays, digest)
    return digest


def start_run(db: Database, run_id: str, exp: dict[str, Any], initial: str) -> None:
    db.append_ledger(
        "run_started",
        {
            "run_id": run_id,
            "name": NAME,
            "config_digest": "sha256:" + "0" * 64,
            "experiment": exp,
            "initial_model": initial,
            "dp": None,
        },
    )


def commit(db: Database, run_id: str, round_no: int, parent: str, seed: int, metrics: dict) -> str:
    digest = store(db, seed)
    record = RoundRecord(round_no, digest, parent, metrics, ["site-0", "site-1"], {})
    db.commit_round(
        run_id,
        record,
        {
            "run_id": run_id,
            "round": round_no,
            "input_model": parent,
            "output_model": digest,
            "config_digest": "sha256:" + "0" * 64,
            "metrics": metrics,
            "dp": None,
            "participants": ["site-0", "site-1"],
        },
    )
    return digest


def build(path: Path) -> Built:
    """Run A: 5 rounds, a promotion block, a drift alert at round 3. Run B (same
    experiment name, same initial model): 1 DP round, no promotion block."""
    db = Database(path)
    initial = store(db, 0)
    digests = {(RUN_A, 0): initial, (RUN_B, 0): initial}
    start_run(db, RUN_A, experiment({"threshold": 0.8}), initial)
    parent, alert_seq = initial, 0
    for round_no, (acc, loss) in enumerate(zip(ACCURACY, LOSS, strict=True), start=1):
        metrics = {"accuracy": acc, "loss": loss}
        parent = digests[(RUN_A, round_no)] = commit(db, RUN_A, round_no, parent, round_no, metrics)
        if round_no == ALERT_ROUND:
            alert_seq = db.append_ledger(
                "drift_alert",
                {
                    "run_id": RUN_A, "round": round_no, "check": "data.label_psi",
                    "scope": "site", "site_id": "site-1", "value": 0.9, "baseline": 0.0,
                    "threshold": 0.25, "message": "label histogram moved (PSI 0.9 > 0.25)",
                },
            ).seq  # fmt: skip
    start_run(db, RUN_B, experiment(None), initial)
    metrics = {"accuracy": 0.88, "loss": 0.55, "epsilon": 1.25}
    digests[(RUN_B, 1)] = commit(db, RUN_B, 1, initial, 100, metrics)
    return Built(path, db, digests, alert_seq)


@pytest.fixture
def built(tmp_path: Path) -> Iterator[Built]:
    b = build(tmp_path / "data")
    yield b
    b.db.close()


def version(b: Built, run_id: str, round_no: int) -> ModelVersion:
    return find_version(b.db, b.digests[(run_id, round_no)], run_id=run_id)


GATE = Promotion(threshold=0.8)


# versions ------------------------------------------------------------------------------
def test_versions_follow_the_lineage_with_metrics_and_epsilon(built: Built) -> None:
    versions = list_versions(built.db, RUN_A)
    assert [v.round for v in versions] == [0, 1, 2, 3, 4, 5]
    assert versions[0].parent is None and versions[0].metrics == {}
    for earlier, later in pairwise(versions):
        assert later.parent == earlier.digest
    assert [v.metrics["accuracy"] for v in versions[1:]] == ACCURACY
    assert all(v.epsilon is None and not v.champion and v.name == NAME for v in versions)
    assert [v.digest for v in versions] == [built.digests[(RUN_A, r)] for r in range(6)]
    seqs = {e.seq: e for e in built.db.ledger_entries()}
    assert seqs[versions[3].ledger_seq].payload["output_model"] == versions[3].digest
    (b0, b1) = list_versions(built.db, RUN_B)
    assert (b1.parent, b1.epsilon, b0.digest) == (b0.digest, 1.25, versions[0].digest)
    assert len(list_versions(built.db)) == 8


def test_find_version_by_digest_or_unique_prefix(built: Built) -> None:
    digest = built.digests[(RUN_A, 2)]
    hexd = digest.removeprefix("sha256:")
    for ref in (digest, hexd, hexd[:8], "sha256:" + hexd[:10], hexd[:12].upper()):
        found = find_version(built.db, ref)
        assert (found.run_id, found.round, found.digest) == (RUN_A, 2, digest)
    bad = {hexd[:7]: "too short", "zz" + hexd[:10]: "not a sha256", "0123abcd0123": "no model"}
    for ref, text in bad.items():
        with pytest.raises(ConfigError, match=text) as info:
            find_version(built.db, ref)
        assert info.value.key == "DIGEST"
    shared = built.digests[(RUN_A, 0)]  # both runs start from the same initial model
    with pytest.raises(ConfigError, match=f"runs {RUN_A}, {RUN_B}") as info:
        find_version(built.db, shared)
    assert info.value.key == "--run"
    assert find_version(built.db, shared, run_id=RUN_B).run_id == RUN_B


def test_an_ambiguous_prefix_is_refused(tmp_path: Path) -> None:
    db = Database(tmp_path)  # only the ledger is read: these digests need no files
    for run_id, tail in (("r1", "0"), ("r2", "1")):
        start_run(db, run_id, experiment(None), "sha256:abcdef12" + tail * 56)
    with pytest.raises(ConfigError, match="ambiguous: abcdef1200000000, abcdef1211111111"):
        find_version(db, "abcdef12")
    assert find_version(db, "abcdef121").run_id == "r2"
    db.close()


# the gate ------------------------------------------------------------------------------
def test_the_gate_applies_the_threshold_and_the_open_alert_window(built: Built) -> None:
    outcome = {r: decide(built.db, version(built, RUN_A, r), GATE, OPEN_ROUNDS, "t") for r in
               range(6)}  # fmt: skip
    assert {r: d.promoted for r, d in outcome.items()} == {
        0: False, 1: False, 2: True, 3: False, 4: False, 5: True,
    }  # fmt: skip
    assert outcome[0].reasons == ["metric 'accuracy' is missing from this version's metrics (none)"]
    assert outcome[1].reasons == ["accuracy 0.5 is below the threshold 0.8"]
    assert (outcome[1].value, outcome[2].value, outcome[2].reasons) == (0.5, 0.85, [])
    for r in (3, 4):  # open in the alert's round and the next; not in round 5
        assert outcome[r].open_alerts == [built.alert_seq]
        (reason,) = outcome[r].reasons
        assert f"ledger entry {built.alert_seq}, round 3, open through round 4" in reason
        assert "data.label_psi (site site-1): label histogram moved" in reason
    assert outcome[5].open_alerts == []
    entries = built.db.ledger_entries()
    assert open_alerts(entries, RUN_A, 5, 3)[0].seq == built.alert_seq  # a wider window
    assert open_alerts(entries, RUN_A, 2, 5) == [] and open_alerts(entries, RUN_B, 3, 5) == []


def test_lower_is_better_and_missing_metrics(built: Built) -> None:
    gate = Promotion(metric="loss", threshold=0.55, higher_is_better=False)
    refused = decide(built.db, version(built, RUN_A, 2), gate, OPEN_ROUNDS, "t")
    assert refused.reasons == ["loss 0.6 is above the threshold 0.55"]
    assert decide(built.db, version(built, RUN_A, 5), gate, OPEN_ROUNDS, "t").promoted
    gate = Promotion(metric="f1", threshold=0.5)
    (reason,) = decide(built.db, version(built, RUN_A, 5), gate, OPEN_ROUNDS, "t").reasons
    assert reason == "metric 'f1' is missing from this version's metrics (accuracy, loss)"


def test_promote_records_decisions_and_moves_the_champion(built: Built) -> None:
    entries = built.db.ledger_entries()
    assert run_gate_settings(entries, RUN_A) == (GATE, OPEN_ROUNDS)
    assert run_gate_settings(entries, RUN_B) == (None, OPEN_ROUNDS)
    done = promote(built.db, version(built, RUN_A, 2), GATE, OPEN_ROUNDS, "alice")
    refused = promote(built.db, version(built, RUN_A, 4), GATE, OPEN_ROUNDS, "bob")
    last = built.db.ledger_entries()[-2:]
    assert [(e.seq, e.kind) for e in last] == [
        (done.ledger_seq, "model_promoted"), (refused.ledger_seq, "promotion_refused"),
    ]  # fmt: skip
    assert last[0].payload == {
        "run_id": RUN_A, "round": 2, "model": built.digests[(RUN_A, 2)], "metric": "accuracy",
        "value": 0.85, "threshold": 0.8, "higher_is_better": True, "by": "alice",
        "open_alerts": [], "reasons": [],
    }  # fmt: skip
    assert last[1].payload["open_alerts"] == [built.alert_seq]
    assert last[1].payload["reasons"] == refused.reasons and refused.value == 0.95
    champions = [(v.run_id, v.round) for v in list_versions(built.db) if v.champion]
    assert champions == [(RUN_A, 2)]  # a refusal leaves the champion alone
    promote(built.db, version(built, RUN_B, 1), GATE, OPEN_ROUNDS, "carol")
    champions = [(v.run_id, v.round) for v in list_versions(built.db) if v.champion]
    assert champions == [(RUN_B, 1)]  # one champion per experiment name, the latest wins
    again = promote(built.db, version(built, RUN_B, 1), GATE, OPEN_ROUNDS, "carol")
    assert again.promoted  # re-promoting the champion records a new entry
    assert built.db.verify_ledger() == again.ledger_seq


def test_a_model_file_that_does_not_verify_is_refused(built: Built) -> None:
    target = built.db.models.path(built.digests[(RUN_A, 5)])
    save_file(arrays_from_module(digits_mlp(99)), str(target))
    (reason,) = decide(built.db, version(built, RUN_A, 5), GATE, OPEN_ROUNDS, "t").reasons
    assert reason.startswith("model file does not verify:") and "file edited" in reason


def test_load_model_file_checks_the_digest(built: Built) -> None:
    path = built.db.models.path(built.digests[(RUN_A, 1)])
    module = load_model_file(digits_mlp(None), path, expected_digest=built.digests[(RUN_A, 1)])
    torch.testing.assert_close(module.state_dict(), digits_mlp(1).state_dict())
    with pytest.raises(ClientError, match=r"has digest sha256:\w+, not sha256:0000"):
        load_model_file(digits_mlp(None), path, expected_digest="sha256:" + "0" * 64)
    with pytest.raises(ClientError, match="cannot read model file"):
        load_model_file(digits_mlp(None), path.with_name("missing.safetensors"))


# the CLI -------------------------------------------------------------------------------
def one_error_line(done: Any, code: int, text: str) -> None:
    assert done.returncode == code, done.stdout + done.stderr
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("fedcoord: error: ")
    assert text in done.stderr


def test_cli_promote_and_list(built: Built) -> None:
    data = str(built.path)
    hexd = {k: d.removeprefix("sha256:") for k, d in built.digests.items()}
    done = fedcoord("models", "promote", data, hexd[(RUN_A, 2)][:10], "--by", "ops")
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith(f"promoted {hexd[(RUN_A, 2)][:12]} (run {RUN_A}, round 2)")
    assert "accuracy 0.85 >= 0.8" in done.stdout and "(model_promoted)" in done.stdout

    done = fedcoord("models", "promote", data, hexd[(RUN_A, 4)])
    assert (done.returncode, done.stderr) == (1, ""), done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == f"refused {hexd[(RUN_A, 4)][:12]} (run {RUN_A}, round 4): 1 reason(s)"
    assert lines[1].startswith(f"  - drift alert open (ledger entry {built.alert_seq}")
    assert lines[2].endswith("(promotion_refused)")

    done = fedcoord("models", "promote", data, hexd[(RUN_B, 1)])
    one_error_line(done, 2, f"--threshold: required: the experiment of run {RUN_B} has no")

    done = fedcoord("models", "list", data)
    assert done.returncode == 0, done.stderr
    header, *rows = done.stdout.splitlines()
    assert header.split() == ["DIGEST", "RUN", "ROUND", "PARENT", "ACCURACY", "LOSS", "EPSILON"]
    assert len(rows) == 8 and [r for r in rows if r.endswith("champion")] == [rows[2]]
    assert rows[2].split() == [
        hexd[(RUN_A, 2)][:12], RUN_A, "2", hexd[(RUN_A, 1)][:12], "0.8500", "0.6000", "-",
        "champion",
    ]  # fmt: skip
    assert rows[7].split()[-1] == "1.2500"

    done = fedcoord("models", "list", data, "--run", RUN_B, "--json")
    assert done.returncode == 0, done.stderr
    listed = [json.loads(line) for line in done.stdout.splitlines()]
    assert [(v["round"], v["parent"], v["epsilon"]) for v in listed] == [
        (0, None, None), (1, built.digests[(RUN_B, 0)], 1.25),
    ]  # fmt: skip


def test_cli_export_verifies_and_reloads(built: Built, tmp_path: Path) -> None:
    data, out = str(built.path), tmp_path / "model.safetensors"
    digest = built.digests[(RUN_A, 5)]
    done = fedcoord("models", "export", data, digest[:20], "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"wrote {out} (") and digest in done.stdout
    module = load_model_file(digits_mlp(None), out, expected_digest=digest)
    torch.testing.assert_close(module.state_dict(), digits_mlp(5).state_dict(), rtol=0, atol=0)

    one_error_line(fedcoord("models", "export", data, digest, "--out", str(out)), 2, "--out")

    save_file(arrays_from_module(digits_mlp(99)), str(built.db.models.path(digest)))
    done = fedcoord("models", "export", data, digest, "--out", str(out), "--force")
    one_error_line(done, 1, "file edited")
    assert load_model_file(digits_mlp(None), out, expected_digest=digest)  # left unchanged

    one_error_line(fedcoord("models", "export", data, "deadbeef00", "--out", "x"), 2, "DIGEST:")
