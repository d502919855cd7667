"""Crash safety: the coordinator is killed with SIGKILL again and again during one run,
at named points (mid-upload, before, inside and after a round's commit) and at random
moments; after every restart the run goes on, and in the end it has every round exactly
once, a ledger that verifies and strategy state that was never reset."""

from __future__ import annotations

import itertools
import random
import signal
import sqlite3
import time
from pathlib import Path

import pytest

from coordinator.model_store import ModelStore
from protos.fedcoord.v1 import control_pb2
from tests.conftest import free_port, rounds_committed, wait_for
from tests.integration.test_deployment import control, experiment, serve, verify_ledger

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROUNDS = 8
LIVES = ["upload:2", "before_commit:1", "in_commit:1", "after_commit:1", "random", "random"]
"""How each life of the coordinator ends but the last: at a crash point, or by a SIGKILL
at a random moment (seeded)."""


def committed_count(data: Path) -> int:
    with sqlite3.connect(data / "ledger.db") as db:
        return db.execute("SELECT COUNT(*) FROM ledger WHERE kind='round_committed'").fetchone()[0]


def test_run_survives_sigkill_at_many_points(tmp_path, processes):
    rng = random.Random(20261201)
    port = free_port()
    address = f"127.0.0.1:{port}"
    data = tmp_path / "coord"
    coordinator = serve(processes, data, port, name="serve-0")
    sites = [
        processes.start(
            f"site{i}", "site", "--coordinator", address, "--site-id", f"site-{i}",
            "--client", "tests.integration.clients:slow_site", "--insecure",
            env={"FEDCOORD_TEST_PARTITION": f"{i}/3", "FEDCOORD_TEST_FIT_S": "0.3"},
        )
        for i in (1, 2, 3)
    ]  # fmt: skip
    exp = experiment(tmp_path, rounds=ROUNDS, timeout_s=30, strategy="fedadam")
    follower = processes.start("run", "run", str(exp), "--coordinator", address, "--wait",
                               "--insecure")  # fmt: skip
    processes.wait_for_log(follower, "submitted", "the run to be submitted")
    run_id = processes.log(follower).split("submitted run ")[1].split()[0]

    def run_info() -> control_pb2.RunInfo:
        return control(port).GetRun(control_pb2.GetRunRequest(run_id=run_id), timeout=5)

    coordinator.send_signal(signal.SIGKILL)  # the first life only took the submission
    coordinator.wait(timeout=30)
    for life, how in enumerate(LIVES, start=1):
        before = committed_count(data)
        env = {} if how == "random" else {"FEDCOORD_CRASH_AT": how}
        coordinator = serve(processes, data, port, name=f"serve-{life}", env=env)
        if how == "random":
            time.sleep(rng.uniform(0.3, 2.5))
            coordinator.send_signal(signal.SIGKILL)
        assert coordinator.wait(timeout=120) == -signal.SIGKILL, f"life {life} ({how})"
        assert committed_count(data) >= before  # nothing committed was lost
    serve(processes, data, port, name="serve-last")
    final = wait_for(
        lambda: (r := run_info()).status in ("finished", "failed") and r, 240, "the run to end"
    )
    assert final.status == "finished", final.error
    committed = rounds_committed(data)
    assert [c["round"] for c in committed] == list(range(1, ROUNDS + 1))  # no gaps, no repeats
    store = ModelStore(data / "models")
    for prev, c in itertools.pairwise(committed):
        assert c["input_model"] == prev["output_model"]  # each round resumed from the last
    for c in committed:  # FedAdam's moments were restored, never restarted
        assert int(store.get(c["strategy_state"])["step"]) == c["round"]
    assert verify_ledger(data).returncode == 0
    assert all(s.poll() is None for s in sites)  # sites reconnected by themselves
    assert follower.wait(timeout=120) == 0, processes.log(follower)
