"""Bad input reaches the user as exit code 2 and one line naming the key; no traceback."""

from __future__ import annotations

import subprocess

import pytest

from tests.conftest import fedcoord

BASE = "name: t\nrounds: 2\ntask: {name: digits}\n"


def simulate(tmp_path, text: str, *extra: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    return fedcoord("simulate", str(path), "--out", str(tmp_path / "out"), *extra, timeout=120)


@pytest.mark.parametrize(
    "text, extra, key",
    [
        (BASE + "trainig: {local_epochs: 1}\n", (), "trainig: unknown key"),
        (BASE + "training: {optimizer: {lr: -1}}\n", (), "training.optimizer.lr: must be > 0"),
        (BASE + "federation: {sampling: {fraction: 1.5}}\n", (), "federation.sampling.fraction"),
        (BASE + "federation: {partition: {kind: random}}\n", (), "federation.partition.kind"),
        (BASE.replace("rounds: 2", "rounds: many"), (), "rounds:"),
        ("name: t\ntask: {name: digits}\n", (), "rounds: required key is missing"),
        (
            BASE + "privacy: {dp: {noise_multiplier: 1.0}}\n",
            (),
            "federation.sampling.method: privacy.dp needs poisson sampling",
        ),
        (
            BASE + "privacy: {secure_aggregation: {enabled: true}}\nstrategy: {name: krum}\n",
            (),
            "strategy.name: krum cannot run under secure aggregation",
        ),
        (
            BASE + "federation: {sites: 3, byzantine: {sites: 4}}\n",
            (),
            "federation.byzantine.sites: must not exceed federation.sites",
        ),
        (BASE + "strategy: {name: krum, f: -1}\n", (), "strategy.f: must be >= 0"),
        (BASE + "strategy: {name: fedadam, beta_3: 0.5}\n", (), "strategy.beta_3: unknown key"),
        (BASE + "simulation: {ray_address: auto}\n", (), "simulation.ray_address: only the ray"),
        (BASE.replace("digits", "mnist"), (), "task.name: unknown task 'mnist'"),
        (BASE.replace("{name: digits}", "{name: digits, model: resnet}"), (), "task.model"),
        (BASE + "task_extra: 1\n", (), "task_extra: unknown key"),
        ("name: t\nrounds: [\n", (), "YAML syntax error at line"),
        ("- a\n- b\n", (), "must be a mapping"),
        (BASE, ("--set", "rounds"), "--set: expected KEY.PATH=VALUE"),
        (BASE, ("--set", "federation.sites=0"), "federation.sites: must be >= 1"),
        (
            BASE + "federation: {sites: 4000, partition: {kind: shards, labels_per_site: 2}}\n",
            (),
            "federation",
        ),
    ],
)
def test_bad_configuration_exits_2_with_one_line(tmp_path, text, extra, key):
    done = simulate(tmp_path, text, *extra)
    assert done.returncode == 2, (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert key in lines[0]
    assert "Traceback" not in done.stderr + done.stdout
    assert not (tmp_path / "out" / "ledger.db").exists()  # nothing was started


def test_missing_file_and_bad_flags_exit_2(tmp_path):
    missing = fedcoord("simulate", str(tmp_path / "nope.yaml"), timeout=60)
    assert missing.returncode == 2 and "cannot read experiment file" in missing.stderr
    bad_flag = fedcoord("simulate", "x.yaml", "--rounds", "3", timeout=60)
    assert bad_flag.returncode == 2 and len(bad_flag.stderr.strip().splitlines()) == 1
    assert "--rounds" in bad_flag.stderr
    no_tls = fedcoord("serve", "--data-dir", str(tmp_path / "d"), timeout=60)
    assert no_tls.returncode == 2 and "--insecure" in no_tls.stderr


def test_ledger_verify_on_a_non_data_dir_exits_2(tmp_path):
    done = fedcoord("ledger", "verify", str(tmp_path), timeout=60)
    assert done.returncode == 2 and "not a fedcoord data directory" in done.stderr
