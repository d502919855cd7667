"""``simulation.backend: ray``: ``fedcoord simulate`` with the sites in Ray actors on a
local Ray instance (2 CPUs, no dashboard) learns as the local backend does with the
same seed, and its ledger verifies; Ray missing or too small is a configuration error."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from coordinator.errors import ConfigError
from coordinator.experiment import parse_experiment
from simulations.ray_backend import RayWorkers, import_ray
from tests.conftest import fedcoord, rounds_committed

pytestmark = pytest.mark.integration

EXPERIMENT = """\
name: digits-ray
seed: 7
rounds: 3
task: {name: digits, model: mlp}
federation:
  sites: 4
  partition: {kind: dirichlet, alpha: 0.5}
  sampling: {fraction: 1.0, method: fixed, min_sites: 2, timeout_s: 60}
training: {local_epochs: 1, batch_size: 16, optimizer: {name: sgd, lr: 0.05, momentum: 0.9}}
simulation: {backend: BACKEND, workers: 2}
"""


def simulate(tmp_path: Path, backend: str) -> dict:
    path = tmp_path / f"{backend}.yaml"
    path.write_text(EXPERIMENT.replace("BACKEND", backend))
    out = tmp_path / backend
    done = fedcoord("simulate", str(path), "--out", str(out), timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    verified = fedcoord("ledger", "verify", str(out), timeout=60)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    summary = json.loads((out / "summary.json").read_text())
    summary["stdout"], summary["out"] = done.stdout, out
    return summary


def test_ray_backend_runs_the_federation_like_the_local_backend(tmp_path):
    ray = simulate(tmp_path, "ray")
    assert "in 2 Ray actor(s)" in ray["stdout"]
    assert ray["status"] == "finished" and ray["rounds_completed"] == 3
    assert all(len(r["participants"]) == 4 for r in rounds_committed(ray["out"]))
    used = ray["resources"]
    assert used["backend"] == "ray" and used["workers"] == 2
    assert used["clients_built"] == 4 and used["peak_rss_mib"]["worker_max"] > 0
    assert "peak memory: coordinator" in ray["stdout"]
    local = simulate(tmp_path, "local")
    # same data, same sampling, same seeded training: only the order in which updates
    # are summed may differ
    assert ray["metrics"]["accuracy"] == pytest.approx(local["metrics"]["accuracy"], abs=0.02)
    assert ray["metrics"]["loss"] == pytest.approx(local["metrics"]["loss"], rel=0.05)


def test_a_missing_ray_is_a_configuration_error_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError
    with pytest.raises(ConfigError) as err:
        import_ray()
    assert err.value.key == "simulation.backend" and "fedcoord[ray]" in str(err.value)


def test_actors_that_do_not_fit_the_cluster_are_refused():
    exp = parse_experiment(EXPERIMENT.replace("BACKEND", "ray"))
    workers = RayWorkers(exp)
    workers._check_fits({"CPU": 2.0})
    with pytest.raises(ConfigError) as err:
        workers._check_fits({"CPU": 1.0})
    assert err.value.key == "simulation.cpus_per_site" and "need 2 CPUs" in str(err.value)
