"""Real deployment mode: `fedcoord serve`, `fedcoord site` and `fedcoord run` as separate
processes talking gRPC on 127.0.0.1, with real SQLite, real torch training."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import grpc
import pytest

from coordinator.model_store import ModelStore
from protos.fedcoord.v1 import control_pb2, control_pb2_grpc
from tests.conftest import Processes, fedcoord, free_port, rounds_committed, wait_for

pytestmark = pytest.mark.integration


def experiment(
    tmp_path: Path,
    rounds: int,
    timeout_s: float,
    min_sites: int = 2,
    strategy: str = "fedavg",
    secure: bool = False,
) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(
        f"""
name: deploy-test
seed: 3
rounds: {rounds}
task: {{name: digits}}
federation:
  sites: 3
  sampling: {{fraction: 1.0, method: fixed, min_sites: {min_sites}, timeout_s: {timeout_s}}}
training: {{local_epochs: 1, batch_size: 16, optimizer: {{name: sgd, lr: 0.05, momentum: 0.9}}}}
strategy: {{name: {strategy}}}
privacy: {{secure_aggregation: {{enabled: {str(secure).lower()}, stage_timeout_s: 10}}}}
"""
    )
    return path


def serve(
    processes: Processes,
    data: Path,
    port: int,
    name: str = "serve",
    env: dict[str, str] | None = None,
):
    proc = processes.start(
        name,
        "serve",
        "--data-dir",
        str(data),
        "--address",
        f"127.0.0.1:{port}",
        "--insecure",
        "--open-enrollment",
        env=env,
    )
    processes.wait_for_log(proc, "serving on", "the coordinator to listen")
    return proc


def control(port: int) -> control_pb2_grpc.ControlStub:
    return control_pb2_grpc.ControlStub(grpc.insecure_channel(f"127.0.0.1:{port}"))


def verify_ledger(data: Path) -> subprocess.CompletedProcess[str]:
    return fedcoord("ledger", "verify", str(data), timeout=60)


def test_coordinator_and_three_site_processes_complete_a_run(tmp_path, processes):
    port = free_port()
    data = tmp_path / "coord"
    serve(processes, data, port)
    for i in (1, 2, 3):
        processes.start(
            f"site{i}",
            "site",
            "--coordinator",
            f"127.0.0.1:{port}",
            "--site-id",
            f"hospital-{i}",
            "--task",
            "digits",
            "--partition",
            f"{i}/3",
            "--insecure",
        )
    run = processes.start(
        "run",
        "run",
        str(experiment(tmp_path, rounds=3, timeout_s=30)),
        "--coordinator",
        f"127.0.0.1:{port}",
        "--wait",
        "--insecure",
    )
    assert run.wait(timeout=120) == 0, processes.log(run)
    log = processes.log(run)
    assert "round 3/3" in log and "finished after 3 round(s)" in log
    committed = rounds_committed(data)
    assert [c["round"] for c in committed] == [1, 2, 3]
    assert all(c["participants"] == ["hospital-1", "hospital-2", "hospital-3"] for c in committed)
    assert committed[-1]["metrics"]["accuracy"] > 0.5
    assert verify_ledger(data).returncode == 0


def test_site_killed_mid_round_does_not_stall_the_round(tmp_path, processes):
    port = free_port()
    data = tmp_path / "coord"
    serve(processes, data, port)
    address = f"127.0.0.1:{port}"
    for i in (1, 2):
        processes.start(
            f"site{i}",
            "site",
            "--coordinator",
            address,
            "--site-id",
            f"site-{i}",
            "--task",
            "digits",
            "--partition",
            f"{i}/3",
            "--insecure",
        )
    marker = tmp_path / "victim-training"
    victim = processes.start(
        "victim",
        "site",
        "--coordinator",
        address,
        "--site-id",
        "site-3",
        "--client",
        "tests.integration.clients:slow_site",
        "--insecure",
        env={
            "FEDCOORD_TEST_PARTITION": "3/3",
            "FEDCOORD_TEST_FIT_S": "60",
            "FEDCOORD_TEST_MARKER": str(marker),
        },
    )
    timeout_s = 6.0
    run = processes.start(
        "run",
        "run",
        str(experiment(tmp_path, rounds=2, timeout_s=timeout_s)),
        "--coordinator",
        address,
        "--wait",
        "--insecure",
    )
    wait_for(marker.exists, 60, "the victim site to start training")
    victim.send_signal(signal.SIGKILL)
    assert run.wait(timeout=120) == 0, processes.log(run)
    first = rounds_committed(data)[0]
    assert first["participants"] == ["site-1", "site-2"]
    assert [d["site"] for d in first["dropped"]] == ["site-3"]
    assert first["timings"]["total_s"] < timeout_s + 5  # committed at the deadline, not later


@pytest.mark.parametrize(
    "stop_signal, secure",
    [(signal.SIGKILL, True), (signal.SIGTERM, False)],
    ids=["kill-secure-aggregation", "term"],
)
def test_run_survives_a_coordinator_kill_and_restart(tmp_path, processes, stop_signal, secure):
    """Also under secure aggregation: the protocol's state dies with the coordinator, and
    the interrupted round is redone with fresh keys (sites drop the attempt they held)."""
    port = free_port()
    data = tmp_path / "coord"
    coordinator = serve(processes, data, port)
    address = f"127.0.0.1:{port}"
    sites = [
        processes.start(
            f"site{i}",
            "site",
            "--coordinator",
            address,
            "--site-id",
            f"site-{i}",
            "--client",
            "tests.integration.clients:slow_site",
            "--insecure",
            env={"FEDCOORD_TEST_PARTITION": f"{i}/3", "FEDCOORD_TEST_FIT_S": "0.5"},
        )
        for i in (1, 2, 3)
    ]
    rounds = 5
    follower = processes.start(
        "run",
        "run",
        str(experiment(tmp_path, rounds=rounds, timeout_s=30, strategy="fedadam", secure=secure)),
        "--coordinator",
        address,
        "--wait",
        "--insecure",
    )
    submitted = wait_for(
        lambda: [ln for ln in processes.log(follower).splitlines() if ln.startswith("submitted")],
        60,
        "the run to be submitted",
    )
    run_id = submitted[0].split()[-1]

    def completed() -> control_pb2.RunInfo:
        return control(port).GetRun(control_pb2.GetRunRequest(run_id=run_id), timeout=5)

    wait_for(lambda: completed().rounds_completed >= 2, 90, "two committed rounds")
    coordinator.send_signal(stop_signal)
    coordinator.wait(timeout=30)
    time.sleep(1.0)
    serve(processes, data, port, name="serve-again")
    final = wait_for(
        lambda: (r := completed()).status in ("finished", "failed") and r, 180, "the run to end"
    )
    assert final.status == "finished", final.error
    committed = rounds_committed(data)
    assert [c["round"] for c in committed] == list(range(1, rounds + 1))  # no gaps, no repeats
    store = ModelStore(data / "models")
    for c in committed:  # FedAdam's moments were restored, not restarted, after the crash
        assert int(store.get(c["strategy_state"])["step"]) == c["round"]
        assert c["secure_aggregation"]["mode"] == ("secagg" if secure else "off")
    if secure:  # every round was its own attempt with its own keys
        assert len({c["secure_aggregation"]["session"] for c in committed}) == rounds
    assert all(s.poll() is None for s in sites)  # sites reconnected by themselves
    assert follower.wait(timeout=60) == 0, processes.log(follower)  # `run --wait` rode it out
    assert f"round {rounds}/{rounds}" in processes.log(follower)
    assert verify_ledger(data).returncode == 0


def test_site_stops_cleanly_on_ctrl_c(tmp_path, processes):
    port = free_port()
    serve(processes, tmp_path / "coord", port)
    site = processes.start(
        "site",
        "site",
        "--coordinator",
        f"127.0.0.1:{port}",
        "--site-id",
        "s1",
        "--task",
        "digits",
        "--partition",
        "1/2",
        "--insecure",
    )
    processes.wait_for_log(site, "enrolled", "the site to enroll")
    site.send_signal(signal.SIGINT)
    assert site.wait(timeout=30) == 0
    assert "Traceback" not in processes.log(site)


def test_serve_stops_gracefully_on_sigterm(tmp_path, processes):
    port = free_port()
    coordinator = serve(processes, tmp_path / "coord", port)
    coordinator.send_signal(signal.SIGTERM)
    assert coordinator.wait(timeout=30) == 0
    assert "Traceback" not in processes.log(coordinator)
