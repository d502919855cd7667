"""A ``synthetic`` model beyond gRPC's 2 GiB message limit through a whole round.

One round of ``fedcoord simulate`` with two sites: download, one training step per site,
upload, aggregation, commit. The coordinator (the simulating process; the sites run in
worker processes) must stay within a small constant times the model size: it holds the
global model, the round's float32 accumulator and one upload being assembled at a time
(:class:`coordinator.fleet.UploadBudget`), whatever the number of sites; everything else
(digests, the model file, validation, drift sketches, central evaluation) streams.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, fedcoord, rounds_committed

pytestmark = pytest.mark.slow

PARAMETERS = 545_000_000
"""float32 parameters: about 2.18 GB, past the 2**31 bytes of one gRPC message."""
MAX_MODELS_IN_COORDINATOR = 4
"""Peak coordinator memory in model sizes: model + accumulator + one upload (3), plus one
for the interpreter, torch and gRPC buffers (about 0.5 GB) and allocator slack."""

DRIVER = """
import resource, sys
from simulations.cli import main
rc = main(["simulate", sys.argv[1], "--out", sys.argv[2]])
print("peak_rss_bytes", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, flush=True)
sys.exit(rc)
"""
"""``fedcoord simulate`` reporting its own peak RSS (the coordinator runs in this process)."""

EXPERIMENT = f"""
name: large-model
seed: 3
rounds: 1
task:
  name: synthetic
  options: {{num_parameters: {PARAMETERS}, samples_per_site: 4, test_samples: 4}}
federation: {{sites: 2, sampling: {{min_sites: 2, timeout_s: 600}}}}
training: {{local_epochs: 1, batch_size: 4, optimizer: {{name: sgd, lr: 0.001}}}}
simulation: {{workers: 2}}
drift: {{updates: {{enabled: false}}}}
"""
"""Per-site update sketches are off: their memory is bounded in blocks too, but hashing
545M coordinates costs tens of seconds per update, and CI time is short."""


def _used_bytes() -> int:
    """Memory in use on this machine (total minus available)."""
    info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    return (int(info["MemTotal"].split()[0]) - int(info["MemAvailable"].split()[0])) * 1024


@pytest.mark.timeout(900)
def test_model_beyond_2_gib_goes_through_a_round_in_bounded_coordinator_memory(tmp_path):
    exp, out = tmp_path / "large.yaml", tmp_path / "run"
    exp.write_text(EXPERIMENT)
    baseline, peak_used = _used_bytes(), [0]
    done_flag = threading.Event()

    def sample() -> None:
        while not done_flag.wait(0.25):
            peak_used[0] = max(peak_used[0], _used_bytes() - baseline)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.time()
    try:
        done = subprocess.run(
            [sys.executable, "-c", DRIVER, str(exp), str(out)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=900,
        )
    finally:
        done_flag.set()
        sampler.join()
    wall = time.time() - t0
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    match = re.search(r"^peak_rss_bytes (\d+)$", done.stdout, re.MULTILINE)
    assert match, done.stdout
    coordinator_peak = int(match.group(1))

    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds_completed"] == 1
    digest = summary["final_model"].removeprefix("sha256:")
    model_file = out / "models" / "sha256" / digest[:2] / f"{digest}.safetensors"
    model_bytes = model_file.stat().st_size
    assert model_bytes > 1 << 31
    (committed,) = rounds_committed(out)
    assert len(committed["participants"]) == 2 and not committed["dropped"]
    assert committed["input_model"] != committed["output_model"]
    verify = fedcoord("ledger", "verify", str(out), timeout=300)
    assert verify.returncode == 0 and "ledger OK" in verify.stdout, verify.stderr

    print(
        f"\nlarge model: {model_bytes / 2**30:.2f} GiB, wall {wall:.0f}s, coordinator peak "
        f"{coordinator_peak / 2**30:.2f} GiB ({coordinator_peak / model_bytes:.2f} models), "
        f"machine peak +{peak_used[0] / 2**30:.2f} GiB"
    )
    assert coordinator_peak <= MAX_MODELS_IN_COORDINATOR * model_bytes
