"""Secure aggregation through a real coordinator on 127.0.0.1 and real site threads:
the committed model is the mean of the secure sum, dropouts at every stage are
survived, too few survivors abort without releasing anything, and nothing the
coordinator stores or logs holds a site's update."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from coordinator.tasks import load_task
from strategies.secagg import QuantizationConfig, error_bound
from strategies.secagg.quantize import max_levels
from tests.integration.clients import ShiftSite, ledger_payloads, run

pytestmark = pytest.mark.integration

EXPERIMENT = """
name: secagg-test
seed: 4
rounds: ROUNDS
task: {name: digits}
federation:
  sites: SITES
  sampling: {fraction: 1.0, method: fixed, min_sites: 3, timeout_s: 30}
privacy: {secure_aggregation: {enabled: true, stage_timeout_s: 10}}
"""


def experiment(sites: int, rounds: int = 1) -> str:
    return EXPERIMENT.replace("SITES", str(sites)).replace("ROUNDS", str(rounds))


def expected_mean(
    initial: dict[str, np.ndarray], sites: dict[str, ShiftSite], names: list[str]
) -> dict[str, np.ndarray]:
    """The example-weighted mean of the named sites' deltas, in float64."""
    total = sum(sites[s].num_examples for s in names)
    out = {k: np.zeros(v.shape) for k, v in initial.items()}
    for s in names:
        for k, d in sites[s].delta(initial).items():
            out[k] += sites[s].num_examples / total * d.astype(np.float64)
    return out


def check_model(coordinator, entry, sites, survivors, initial) -> None:
    model = coordinator.db.models.get(entry["output_model"])
    mean = expected_mean(initial, sites, survivors)
    n = entry["secure_aggregation"]["sampled"]
    config = QuantizationConfig(1.0, max_levels(n), 32)
    weight = sum(sites[s].num_examples for s in survivors) / 100_000
    bound = error_bound(n, config) / weight + 1e-6  # decoding, then float32 rounding
    for k, ref in initial.items():
        got = model[k].astype(np.float64) - ref
        assert np.abs(got - mean[k]).max() <= bound, k


def test_the_committed_model_is_the_weighted_mean_of_the_secure_sum(coordinator):
    sites = {f"site-{i}": ShiftSite(seed=10 + i, num_examples=40 + 25 * i) for i in range(5)}
    final = run(coordinator, sites, experiment(5, rounds=2))
    assert final.status == "finished", final.error
    rounds = ledger_payloads(coordinator, "round_committed")
    assert len(rounds) == 2
    initial = coordinator.db.models.get(rounds[0]["input_model"])
    entry = rounds[0]
    assert entry["participants"] == sorted(sites) and entry["dropped"] == []
    record = entry["secure_aggregation"]
    assert record["mode"] == "secagg" and record["complete_graph"]
    assert (record["k"], record["t"]) == (4, 3)
    assert [s["stage"] for s in record["stages"]] == [
        "advertise_keys", "share_keys", "masked_input", "unmask",
    ]  # fmt: skip
    assert all(s["survivors"] == sorted(sites) for s in record["stages"])
    assert record["clipped_fraction"] == 0.0 and record["weight_capped_sites"] == 0
    check_model(coordinator, entry, sites, sorted(sites), initial)
    summary = coordinator.engine.summary(final.run_id, final.status, "")
    assert summary["secure_aggregation"] is True


def test_dropouts_at_every_stage_are_survived(coordinator):
    drops = {"site-1": "share_keys", "site-2": "masked_input", "site-3": "unmask"}
    sites = {
        f"site-{i}": ShiftSite(
            seed=20 + i, num_examples=30 + 7 * i, drop_at=drops.get(f"site-{i}", "")
        )
        for i in range(8)
    }
    final = run(coordinator, sites, experiment(8))
    assert final.status == "finished", final.error
    (entry,) = ledger_payloads(coordinator, "round_committed")
    stages = {s["stage"]: s for s in entry["secure_aggregation"]["stages"]}
    assert [d["site"] for d in stages["share_keys"]["dropped"]] == ["site-1"]
    assert [d["site"] for d in stages["masked_input"]["dropped"]] == ["site-2"]
    assert [d["site"] for d in stages["unmask"]["dropped"]] == ["site-3"]
    # site-3 sent its masked input before vanishing: its update is in the sum (k = 7,
    # t = 4: every secret still has 4 shares among the 5 sites that answer the unmask)
    survivors = ["site-0", "site-3", "site-4", "site-5", "site-6", "site-7"]
    assert entry["participants"] == survivors
    assert {d["site"] for d in entry["dropped"]} == {"site-1", "site-2"}
    initial = coordinator.db.models.get(entry["input_model"])
    check_model(coordinator, entry, sites, survivors, initial)


def test_too_few_survivors_abort_without_releasing_a_sum(coordinator):
    sites = {
        f"site-{i}": ShiftSite(seed=i, num_examples=50, drop_at="masked_input" if i < 3 else "")
        for i in range(5)
    }
    final = run(coordinator, sites, experiment(5))
    assert final.status == "failed" and "round 1 failed 3 times" in final.error
    assert ledger_payloads(coordinator, "round_committed") == []
    aborted = ledger_payloads(coordinator, "round_aborted")
    assert len(aborted) == 3
    for entry in aborted:
        assert (entry["stage"], entry["reason"]) == ("masked_input", "below_threshold")
        stages = entry["secure_aggregation"]["stages"]
        assert stages[-1]["stage"] == "masked_input" and len(stages[-1]["survivors"]) == 2
    sessions = {entry["secure_aggregation"]["session"] for entry in aborted}
    assert len(sessions) == 3  # every attempt starts fresh


def test_the_coordinator_never_stores_or_logs_an_individual_update(coordinator, caplog):
    caplog.set_level(logging.DEBUG)
    sites = {f"site-{i}": ShiftSite(seed=40 + i, num_examples=60, scale=0.5) for i in range(4)}
    final = run(coordinator, sites, experiment(4))
    assert final.status == "finished", final.error
    (entry,) = ledger_payloads(coordinator, "round_committed")
    initial = coordinator.db.models.get(entry["input_model"])
    stored = b"".join(
        p.read_bytes() for p in Path(coordinator.db.data_dir).rglob("*") if p.is_file()
    )
    text = caplog.text + repr([e.payload for e in coordinator.db.ledger_entries()])
    for name, site in sites.items():
        delta = site.delta(initial)
        for k, d in delta.items():
            trained = (initial[k] + d).astype(initial[k].dtype)
            for tensor in (d, trained):
                window = tensor.reshape(-1)[:8].tobytes()
                assert window not in stored, (name, k)
            assert f"{float(d.reshape(-1)[0]):.6g}" not in text
    # the scan itself works: the aggregated model is stored
    model = coordinator.db.models.get(entry["output_model"])
    largest = max(model.values(), key=lambda a: a.size)
    assert largest.reshape(-1)[:8].tobytes() in stored


def test_client_side_dp_noises_the_secure_sum_for_its_real_sensitivity(coordinator):
    sites = {f"site-{i}": ShiftSite(seed=60 + i, num_examples=50, scale=0.05) for i in range(5)}
    dp = "dp: {mode: client, noise_multiplier: 0.5, clip_norm: 0.5, delta: 1.0e-3}"
    text = experiment(5).replace("method: fixed", "method: poisson")
    text = text.replace("stage_timeout_s: 10}", "stage_timeout_s: 10}, " + dp)
    final = run(coordinator, sites, text)
    assert final.status == "finished", final.error
    (entry,) = ledger_payloads(coordinator, "round_committed")
    dp = entry["dp"]
    record = entry["secure_aggregation"]
    initial = coordinator.db.models.get(entry["input_model"])
    size = sum(a.size for a in initial.values())
    step = 2 * 0.5 / (record["levels"] - 1)
    assert record["clip_range"] == 0.5 and record["weighting"] == "uniform"
    assert dp["sensitivity"] == pytest.approx(0.5 * (1 + 1e-12) + step * size**0.5, rel=1e-9)
    assert dp["sensitivity"] > dp["clip_norm"] == 0.5
    assert dp["noise_std"] == pytest.approx(0.5 * dp["sensitivity"] / 5)
    assert dp["epsilon"] > 0
    # the committed step is the mean of the L2-clipped deltas (over m = 5) plus that noise
    clipped = {k: np.zeros(v.shape) for k, v in initial.items()}
    for site in sites.values():
        delta = site.delta(initial)
        norm = float(np.sqrt(sum(float((d.astype(np.float64) ** 2).sum()) for d in delta.values())))
        assert norm > 0.5  # every site is clipped
        for k, d in delta.items():
            clipped[k] += d.astype(np.float64) * (0.5 / norm) / 5
    model = coordinator.db.models.get(entry["output_model"])
    noise = np.concatenate(
        [(model[k].astype(np.float64) - initial[k] - clipped[k]).ravel() for k in initial]
    )
    assert abs(noise.mean()) < 4 * dp["noise_std"] / size**0.5
    assert noise.std() == pytest.approx(dp["noise_std"], rel=0.1)


def test_scaffold_trains_under_secure_aggregation(coordinator):
    """SCAFFOLD's control-variate deltas ride in the same secure sum as the model's."""
    task = load_task("digits", None, {}, 0)
    sites = {f"site-{i}": task.make_client(i, 4, {"kind": "iid"}, 0) for i in range(4)}
    text = experiment(4, rounds=2) + "strategy: {name: scaffold}\n"
    final = run(coordinator, sites, text)
    assert final.status == "finished", final.error
    rounds = ledger_payloads(coordinator, "round_committed")
    assert [r["participants"] for r in rounds] == [sorted(sites)] * 2
    control = coordinator.db.models.get(rounds[-1]["strategy_state"])
    assert control and all(np.isfinite(c).all() and np.abs(c).max() > 0 for c in control.values())
    assert rounds[-1]["metrics"]["accuracy"] > rounds[0]["metrics"]["accuracy"] - 0.05


def test_a_dp_draw_too_small_for_a_secure_sum_releases_noise_only(coordinator):
    """Under DP the Poisson draw is never redrawn: a round that samples fewer than 3
    sites commits the noise alone (as the accountant assumes), recorded as skipped."""
    sites = {f"site-{i}": ShiftSite(seed=70 + i, num_examples=50) for i in range(4)}
    dp = "dp: {mode: client, noise_multiplier: 1.0, clip_norm: 0.5, delta: 1.0e-3}"
    text = experiment(4, rounds=6).replace("method: fixed", "method: poisson")
    text = text.replace("fraction: 1.0", "fraction: 0.3")
    text = text.replace("stage_timeout_s: 10}", "stage_timeout_s: 10}, " + dp)
    final = run(coordinator, sites, text)
    assert final.status == "finished", final.error
    rounds = ledger_payloads(coordinator, "round_committed")
    assert [r["round"] for r in rounds] == list(range(1, 7))
    skipped = [r for r in rounds if r["secure_aggregation"]["mode"] == "skipped"]
    assert skipped  # with q = 0.3 of 4 sites, most draws have fewer than 3
    for r in skipped:
        assert r["participants"] == [] and len(r["dropped"]) == len(r["sampled"]) < 3
        assert r["dp"]["epsilon"] > 0 and r["input_model"] != r["output_model"]
    assert [r["dp"]["steps"] for r in rounds] == list(range(1, 7))  # every round accounted
