"""Central DP end to end on a real coordinator with site threads speaking real gRPC:
the spend per round equals Opacus' accountant, the budget stops a run cleanly, the
spend survives a restart, and client-side clipping is enforced."""

from __future__ import annotations

import itertools
import json
import threading
import time

import grpc
import pytest

from client_sdk.connection import SiteSession, fleet_stub
from coordinator.server import Coordinator
from coordinator.tasks import load_task
from protos.codec import encode
from protos.fedcoord.v1 import fleet_pb2
from strategies.privacy.accountant import epsilon_of, noise_multiplier_for
from tests.integration.clients import ledger_payloads, start_site_threads

pytestmark = pytest.mark.integration

SITES = 6


def experiment(rounds: int, dp: str) -> str:
    return f"""
name: dp-test
seed: 5
rounds: {rounds}
task: {{name: digits}}
federation:
  sites: {SITES}
  sampling: {{fraction: 0.5, method: poisson, timeout_s: 30}}
training: {{local_epochs: 1, batch_size: 16, optimizer: {{name: sgd, lr: 0.1}}}}
privacy: {{dp: {{{dp}}}}}
"""


@pytest.fixture
def start(tmp_path):
    """Starts coordinators on ``tmp_path/coord`` (the same data directory each time);
    the ones still running are stopped at teardown."""
    running: list[Coordinator] = []

    def make() -> Coordinator:
        c = Coordinator(tmp_path / "coord", "127.0.0.1:0", open_enrollment=True)
        c.start(run_engine=False)
        running.append(c)
        return c

    yield make
    for c in running:
        c.stop(grace=0.5)


def sites(coordinator: Coordinator, stop: threading.Event, hostile: dict | None = None) -> None:
    task = load_task("digits", None, {}, 0)
    clients = {f"site-{i}": task.make_client(i, SITES, {"kind": "iid"}, 0) for i in range(SITES)}
    clients.update(hostile or {})
    start_site_threads(coordinator.address, clients, stop)


def test_every_round_reports_the_accountants_epsilon(start):
    coordinator = start()
    stop = threading.Event()
    sites(coordinator, stop)
    try:
        row = coordinator.engine.submit(experiment(4, "noise_multiplier: 1.0, clip_norm: 0.5"))
        final = coordinator.engine.execute(row.run_id)
    finally:
        stop.set()
    assert final.status == "finished", final.error
    started = ledger_payloads(coordinator, "run_started")[0]["dp"]
    assert started["noise_multiplier"] == 1.0 and started["delta"] == 1e-5
    rounds = ledger_payloads(coordinator, "round_committed")
    assert [r["round"] for r in rounds] == [1, 2, 3, 4]
    for k, r in enumerate(rounds, start=1):
        expected = epsilon_of("rdp", [(1.0, 0.5, k)], 1e-5)
        assert r["dp"]["epsilon"] == pytest.approx(expected, abs=1e-9)
        assert r["metrics"]["epsilon"] == r["dp"]["epsilon"]
        assert r["dp"]["denominator"] == pytest.approx(0.5 * SITES)
        assert r["dp"]["noise_std"] == pytest.approx(1.0 * 0.5 / (0.5 * SITES))
        assert not any(m.startswith("train_") for m in r["metrics"])  # not privatised
    summary = json.loads(final.summary or "{}")
    assert summary["privacy"]["epsilon"] == pytest.approx(rounds[-1]["dp"]["epsilon"])
    assert summary["privacy"]["delta"] == 1e-5 and summary["privacy"]["accountant"] == "rdp"
    assert summary["privacy"]["rounds_accounted"] == 4


def test_the_budget_ends_the_run_cleanly_before_the_round_that_would_pass_it(start):
    budget = epsilon_of("rdp", [(1.0, 0.5, 2)], 1e-5) + epsilon_of("rdp", [(1.0, 0.5, 3)], 1e-5)
    budget /= 2  # two rounds fit, the third would not
    coordinator = start()
    stop = threading.Event()
    sites(coordinator, stop)
    try:
        row = coordinator.engine.submit(
            experiment(10, f"noise_multiplier: 1.0, epsilon_budget: {budget}")
        )
        final = coordinator.engine.execute(row.run_id)
    finally:
        stop.set()
    assert final.status == "finished" and final.rounds_completed == 2
    exhausted = ledger_payloads(coordinator, "budget_exhausted")
    assert len(exhausted) == 1 and exhausted[0]["round"] == 3
    assert exhausted[0]["epsilon"] <= budget < exhausted[0]["projected_epsilon"]
    finished = ledger_payloads(coordinator, "run_finished")[0]
    assert finished["stop_reason"].startswith("privacy budget exhausted: round 3")
    assert coordinator.db.verify_ledger() > 0


def test_a_resumed_run_continues_the_same_spend(start):
    coordinator = start()
    stop = threading.Event()
    sites(coordinator, stop)
    row = coordinator.engine.submit(experiment(4, "noise_multiplier: 1.2"))
    runner = threading.Thread(target=coordinator.engine.execute, args=(row.run_id,))
    runner.start()
    deadline = time.time() + 120
    while coordinator.db.run(row.run_id).rounds_completed < 2 and time.time() < deadline:
        time.sleep(0.05)
    coordinator.engine.shutdown()
    runner.join(timeout=60)
    stop.set()
    done_before = coordinator.db.run(row.run_id).rounds_completed
    coordinator.stop(grace=0.5)
    assert 2 <= done_before < 4

    again = start()  # same data directory
    stop = threading.Event()
    sites(again, stop)
    try:
        final = again.engine.execute(row.run_id)
    finally:
        stop.set()
    assert final.status == "finished" and final.rounds_completed == 4
    rounds = ledger_payloads(again, "round_committed")
    assert [r["round"] for r in rounds] == [1, 2, 3, 4]
    assert [r["dp"]["steps"] for r in rounds] == [1, 2, 3, 4]  # no step lost or repeated
    assert rounds[-1]["dp"]["epsilon"] == pytest.approx(epsilon_of("rdp", [(1.2, 0.5, 4)], 1e-5))


def test_target_epsilon_picks_the_noise_before_the_run(start):
    coordinator = start()
    stop = threading.Event()
    sites(coordinator, stop)
    try:
        row = coordinator.engine.submit(experiment(3, "target_epsilon: 4.0"))
        final = coordinator.engine.execute(row.run_id)
    finally:
        stop.set()
    assert final.status == "finished", final.error
    z = ledger_payloads(coordinator, "run_started")[0]["dp"]["noise_multiplier"]
    assert z == pytest.approx(noise_multiplier_for(4.0, 1e-5, 0.5, 3))
    assert ledger_payloads(coordinator, "round_committed")[-1]["dp"]["epsilon"] <= 4.0


def cheat(address: str, stop: threading.Event) -> None:
    """A site that skips client-side clipping: it speaks the protocol itself and pushes
    a large (finite, well-formed) update."""
    session = SiteSession(
        None,  # type: ignore[arg-type] - no Client: the cheat answers tasks itself
        fleet_stub(grpc.insecure_channel(address)),
        "cheater",
        None,
        1,
    )
    session.enroll()
    while not stop.is_set():
        task = session.pull()
        if task is None:
            continue
        payload = encode({k: v + 10.0 for k, v in task.arrays.items()})
        header = fleet_pb2.ResultHeader(num_examples=100)
        header.update.CopyFrom(payload.header())
        session._push(task.header.task_id, header, payload.chunk_messages())


def test_client_mode_sites_clip_and_the_coordinator_enforces_it(start):
    coordinator = start()
    stop = threading.Event()
    sites(coordinator, stop)
    threading.Thread(target=cheat, args=(coordinator.address, stop), daemon=True).start()
    text = experiment(4, "noise_multiplier: 1.0, clip_norm: 0.3, mode: client")
    try:
        row = coordinator.engine.submit(text.replace(f"sites: {SITES}", f"sites: {SITES + 1}"))
        final = coordinator.engine.execute(row.run_id)
    finally:
        stop.set()
    assert final.status == "finished", final.error
    rounds = ledger_payloads(coordinator, "round_committed")
    assert all(entry["dp"]["mode"] == "client" for entry in rounds)
    cheated = [entry for entry in rounds if "cheater" in entry["sampled"]]
    assert cheated  # the seeded Poisson draws include it (else the test proves nothing)
    for entry in rounds:
        reasons = {r["site"]: r["reason"] for r in entry["rejected"]}
        if "cheater" in entry["sampled"]:
            assert reasons.pop("cheater").startswith("norm_bound")
        # honest sites clipped their updates to C themselves: none was refused
        assert reasons == {}
        honest = [s for s in entry["sampled"] if s != "cheater"]
        assert sorted(entry["participants"]) == sorted(
            s for s in honest if s not in {d["site"] for d in entry["dropped"]}
        )


def test_adaptive_clipping_moves_the_clip_norm_and_records_it(start):
    coordinator = start()
    stop = threading.Event()
    sites(coordinator, stop)
    # C starts far below the update norms: every update is clipped, so C must grow
    dp = "noise_multiplier: 0.5, clip_norm: 0.01, adaptive_clipping: {count_stddev: 0.3}"
    try:
        row = coordinator.engine.submit(experiment(4, dp))
        final = coordinator.engine.execute(row.run_id)
    finally:
        stop.set()
    assert final.status == "finished", final.error
    rounds = ledger_payloads(coordinator, "round_committed")
    clips = [r["dp"]["clip_norm"] for r in rounds]
    assert clips[0] == 0.01 and clips[-1] > 0.01
    for r, after in itertools.pairwise(rounds):  # each round uses the C it was given
        assert after["dp"]["clip_norm"] == r["dp"]["adaptive"]["next_clip_norm"]
    for r in rounds:  # the model's share of the noise leaves room for the count query
        assert r["dp"]["model_noise_multiplier"] > 0.5
    assert json.loads(final.summary or "{}")["privacy"]["clip_norm"] == pytest.approx(
        rounds[-1]["dp"]["adaptive"]["next_clip_norm"]
    )
