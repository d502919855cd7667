"""The DP issue's acceptance, run as a user would: ``fedcoord simulate`` from YAML.

- (z, q, rounds, delta) = (1.1, 0.1, 100, 1e-5): the run's reported RDP epsilon is
  Opacus' own accountant's for the same parameters.
- ``epsilon_budget: 3`` on digits stops at the round that would pass it, with the
  ledger entry, exit code 0 and a message that says why.
- 500 simulated sites (Poisson q = 0.1) on digits learn at epsilon <= 8.
- Local DP-SGD: every site reports its own epsilon, recorded in the ledger.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import fedcoord, ledger_entries, rounds_committed

pytestmark = pytest.mark.slow


def simulate(tmp_path: Path, text: str, *extra: str, timeout: float = 600) -> tuple[dict, str]:
    path = tmp_path / "experiment.yaml"
    path.write_text(text)
    out = tmp_path / "run"
    done = fedcoord("simulate", str(path), "--out", str(out), *extra, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads((out / "summary.json").read_text()), done.stdout


def test_reported_epsilon_is_opacus_for_the_acceptance_parameters(tmp_path):
    from opacus.accountants import RDPAccountant

    summary, _ = simulate(
        tmp_path,
        """
name: accountant-check
rounds: 100
task: {name: synthetic, model: logreg, options: {num_features: 8, samples_per_site: 20}}
federation:
  sites: 30
  sampling: {fraction: 0.1, method: poisson, timeout_s: 30}
training: {local_epochs: 1, batch_size: 20, optimizer: {name: sgd, lr: 0.1}}
privacy: {dp: {noise_multiplier: 1.1, clip_norm: 1.0, delta: 1.0e-5}}
""",
    )
    opacus = RDPAccountant()
    for _ in range(100):
        opacus.step(noise_multiplier=1.1, sample_rate=0.1)
    expected = opacus.get_epsilon(delta=1e-5)
    assert summary["rounds_completed"] == 100
    assert summary["privacy"]["epsilon"] == pytest.approx(expected, abs=1e-3)
    assert summary["privacy"]["delta"] == 1e-5 and summary["privacy"]["accountant"] == "rdp"
    epsilons = [h["epsilon"] for h in summary["history"]]
    assert epsilons == sorted(epsilons) and epsilons[-1] == summary["privacy"]["epsilon"]


def test_a_budget_of_3_stops_the_run_cleanly(tmp_path):
    summary, stdout = simulate(
        tmp_path,
        """
name: budget
rounds: 40
task: {name: digits}
federation:
  sites: 20
  sampling: {fraction: 0.2, method: poisson, timeout_s: 30}
training: {local_epochs: 1, batch_size: 16, optimizer: {name: sgd, lr: 0.1}}
privacy: {dp: {noise_multiplier: 1.0, clip_norm: 1.0, epsilon_budget: 3}}
""",
    )
    assert summary["status"] == "finished"
    assert 0 < summary["rounds_completed"] < 40
    assert summary["privacy"]["epsilon"] <= 3
    assert summary["stop_reason"].startswith("privacy budget exhausted")
    assert "privacy budget exhausted" in stdout
    exhausted = [e["payload"] for e in ledger_entries(tmp_path / "run")
                 if e["kind"] == "budget_exhausted"]  # fmt: skip
    assert len(exhausted) == 1 and exhausted[0]["round"] == summary["rounds_completed"] + 1
    assert exhausted[0]["projected_epsilon"] > 3 >= exhausted[0]["epsilon"]


def test_five_hundred_sites_learn_under_user_level_dp(tmp_path):
    summary, _ = simulate(
        tmp_path,
        """
name: dp500
seed: 1
rounds: 30
task: {name: digits}
federation:
  sites: 500
  sampling: {fraction: 0.1, method: poisson, timeout_s: 60}
training: {local_epochs: 5, batch_size: 8, optimizer: {name: sgd, lr: 0.1}}
privacy: {dp: {noise_multiplier: 1.0, clip_norm: 1.0}}
""",
    )
    assert summary["privacy"]["epsilon"] <= 8
    assert summary["metrics"]["accuracy"] >= 0.5  # chance is 0.1


def test_local_dp_sites_report_their_own_epsilon(tmp_path):
    summary, stdout = simulate(
        tmp_path,
        """
name: local-dp
rounds: 3
task: {name: digits}
federation: {sites: 4, partition: {kind: iid}}
training: {local_epochs: 1, batch_size: 32, optimizer: {name: sgd, lr: 0.1}}
privacy: {local_dp: {noise_multiplier: 1.0, max_grad_norm: 1.0, delta: 1.0e-5}}
""",
    )
    assert summary["privacy"]["mode"] == "local" and summary["privacy"]["reported_by"] == "sites"
    rounds = rounds_committed(tmp_path / "run")
    spent = [r["local_dp"]["max_epsilon"] for r in rounds]
    assert spent == sorted(spent) and spent[0] > 0
    assert all(len(r["local_dp"]["site_epsilons"]) == 4 for r in rounds)
    assert summary["privacy"]["epsilon"] == spent[-1]
    assert not any(k.startswith("train_") for k in summary["metrics"])
    assert "local epsilon <=" in stdout
