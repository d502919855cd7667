"""What secure aggregation costs: a SecAgg+ round against a plain round, and against
Flower's SecAgg+, on the same workload in the same run.

fedcoord
    ``fedcoord simulate`` as a user runs it: a real coordinator on 127.0.0.1 and the sites
    in 2 worker processes speaking gRPC, FedAvg, all sites every round; the same sites
    and model with and without ``privacy.secure_aggregation``. Two workloads: ``fixed``,
    where every site returns the global model plus a fixed, seeded delta (no training,
    so the round costs only the protocol and the transport), and ``training``, where
    every site trains the ``synthetic`` task's 1M-parameter MLP for one epoch on 100
    local examples. Round time is the ledger's ``total_s`` (sampling to commit), the
    median over the rounds after the first; coordinator CPU is the CPU time of the
    coordinator's process per round (the share a deployment's coordinator pays: here
    the sites' masking and encoding run on the same 2 cores, which a deployment spreads
    over the sites' own machines).
Flower
    The same number of clients and parameters through Flower 1.41's SecAgg+ workflow and
    its plain workflow (:mod:`benchmarks.flower_secagg`), in process with Flower's own
    protobuf encoding of every message, and the same neighbourhoods (``num_shares = k +
    1``, since Flower counts the client itself, and threshold ``t``). Flower's rounds are
    checked against the exact mean.
Kernels
    The vectorised Shamir reconstruction of 100 secrets from 100 shares each and the
    AES-256-CTR mask expansion of 1M words into a reused buffer.

``--quick`` runs 10 sites x 100k parameters and skips Flower (for tests).

Writes ``benchmarks/results/secagg.json`` and its section of ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import itertools
import math
import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import (
    RESULTS_DIR,
    RESULTS_MD,
    best_of,
    describe_machine,
    markdown_table,
    run_simulation,
    text_table,
    utc_now,
    write_json,
    write_section,
)
from client_sdk import Client, EvaluateResult, FitResult
from client_sdk.api import Arrays, Config

NAME = "secagg"
WORKLOADS = ((10, 1_000_000, "fixed"), (50, 1_000_000, "fixed"), (50, 1_000_000, "training"))
QUICK_WORKLOADS = ((10, 100_000, "fixed"),)
ROUNDS = 4

TASKS = {
    "fixed": '{{name: "benchmarks.secagg:build_task", options: {{num_params: {params}}}}}',
    "training": (
        "{{name: synthetic, options: {{num_parameters: {params}, samples_per_site: 100, "
        "test_samples: 200}}}}"
    ),
}
EXPERIMENT = """
name: secagg-bench
seed: 3
rounds: {rounds}
task: TASK
federation:
  sites: {sites}
  sampling: {{fraction: 1.0, method: fixed, min_sites: {sites}, timeout_s: 300}}
training: {{local_epochs: 1, batch_size: 32}}
privacy: {{secure_aggregation: {{enabled: {secure}}}}}
simulation: {{workers: 2}}
"""


# the workload: a model of one big and one small tensor, and sites that send fixed updates
class FixedUpdateSite(Client):
    """A site whose "training" adds a fixed, seeded delta to the global model."""

    def __init__(self, seed: int):
        self.seed = seed
        self._delta: dict[str, np.ndarray] | None = None

    def fit(self, arrays: Arrays, config: Config) -> FitResult:
        if self._delta is None:
            rng = np.random.default_rng(self.seed)
            self._delta = {
                k: (0.01 * rng.standard_normal(v.shape)).astype(v.dtype) for k, v in arrays.items()
            }
        trained = {k: v + self._delta[k] for k, v in arrays.items()}
        return FitResult(trained, num_examples=100, metrics={})

    def evaluate(self, arrays: Arrays, config: Config) -> EvaluateResult:
        return EvaluateResult(loss=0.0, num_examples=1)


class BenchTask:
    """The benchmark's task: ``num_params`` float32 parameters, no data."""

    name = "secagg-bench"

    def __init__(self, num_params: int, seed: int):
        self.num_params = num_params
        self.seed = seed

    def initial_arrays(self) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(self.seed)
        bias = min(1000, self.num_params // 2)
        return {
            "layer.bias": rng.standard_normal(bias).astype(np.float32),
            "layer.weight": rng.standard_normal(self.num_params - bias).astype(np.float32),
        }

    def central_evaluate(self, arrays: Mapping[str, np.ndarray]) -> dict[str, float]:
        return {}

    def make_client(
        self, site_index: int, num_sites: int, partition: Mapping[str, Any], seed: int
    ) -> FixedUpdateSite:
        return FixedUpdateSite(seed * 100_003 + site_index)


def build_task(model: str | None, options: Mapping[str, Any], seed: int) -> BenchTask:
    """The ``task.name: benchmarks.secagg:build_task`` of the benchmark's experiment."""
    return BenchTask(int(options.get("num_params", 1_000_000)), seed)


# fedcoord ----------------------------------------------------------------------------------
def fedcoord_round_seconds(
    sites: int, params: int, workload: str, secure: bool, rounds: int
) -> dict[str, Any]:
    """One ``fedcoord simulate`` run; the median round time after the first and more."""
    from coordinator.engine import RunEvent
    from coordinator.experiment import parse_experiment

    text = EXPERIMENT.replace("TASK", TASKS[workload]).format(
        rounds=rounds, sites=sites, params=params, secure="true" if secure else "false"
    )
    exp = parse_experiment(text, "benchmark")
    cpu_marks: list[float] = []

    def mark(event: RunEvent) -> None:
        if event.kind in ("run_started", "run_resumed", "round_committed"):
            cpu_marks.append(time.process_time())

    run = run_simulation(exp, "benchmark", [mark])
    entries, wall = run.rounds, run.wall_s
    times = [e["timings"]["total_s"] for e in entries]
    cpu = [b - a for a, b in itertools.pairwise(cpu_marks)]
    record = entries[-1].get("secure_aggregation") or {}
    return {
        "round_s": statistics.median(times[1:]) if len(times) > 1 else times[0],
        "coordinator_cpu_s": statistics.median(cpu[1:]) if len(cpu) > 1 else cpu[0],
        "first_round_s": times[0],
        "rounds": len(times),
        "wall_s": wall,
        "mode": record.get("mode", "off"),
        "k": record.get("k"),
        "t": record.get("t"),
    }


# kernels -------------------------------------------------------------------------------------
def kernels(repeats: int) -> dict[str, Any]:
    """Shamir reconstruction (100 secrets x 100 shares) and the mask PRG (1M words)."""
    import os

    from strategies.secagg.prg import add_masks, stream_context
    from strategies.secagg.shamir import reconstruct_many, split

    secrets = [os.urandom(32) for _ in range(100)]
    xs = list(range(1, 101))
    share_sets = [split(s, 51, xs) for s in secrets]
    shamir, rebuilt = best_of(lambda: reconstruct_many(share_sets, 51), repeats=repeats)
    if rebuilt != secrets:
        raise RuntimeError("Shamir reconstruction disagrees with the secrets")
    acc = np.zeros(1_000_000, dtype=np.uint32)
    context = stream_context("bench", 1, "pairwise-mask")
    seeds = [(os.urandom(32), 1) for _ in range(10)]
    prg, _ = best_of(lambda: add_masks(acc, seeds, context), repeats=repeats)
    return {
        "shamir_100x100_ms": shamir.best * 1e3,
        "masks_10x1M_ms": prg.best * 1e3,
        "mask_gb_s": 10 * acc.nbytes / prg.best / 1e9,
    }


# report ---------------------------------------------------------------------------------------
def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b <= 0 else a / b


def _fmt(x: float | None, spec: str = ".2f") -> str:
    return "-" if x is None or not math.isfinite(x) else format(x, spec)


def run(
    workloads: Sequence[tuple[int, int]], rounds: int, with_flower: bool, repeats: int
) -> dict[str, Any]:
    rows = []
    for sites, params, workload in workloads:
        print(f"fedcoord: {sites} sites x {params:,} parameters, {workload}, plain and SecAgg+")
        plain = fedcoord_round_seconds(sites, params, workload, secure=False, rounds=rounds)
        secure = fedcoord_round_seconds(sites, params, workload, secure=True, rounds=rounds)
        row: dict[str, Any] = {
            "sites": sites,
            "params": params,
            "workload": workload,
            "fedcoord_plain_s": plain["round_s"],
            "fedcoord_secagg_s": secure["round_s"],
            "fedcoord_overhead": _ratio(secure["round_s"], plain["round_s"]),
            "coordinator_cpu_plain_s": plain["coordinator_cpu_s"],
            "coordinator_cpu_secagg_s": secure["coordinator_cpu_s"],
            "mode": secure["mode"],
            "k": secure["k"],
            "t": secure["t"],
            "fedcoord_runs": {"plain": plain, "secagg": secure},
        }
        if with_flower and workload == "fixed":
            from benchmarks.flower_secagg import flower_round_seconds

            print(f"flwr:     {sites} clients x {params:,} parameters, plain and SecAgg+ ...")
            # the same neighbourhoods: Flower counts the client itself among its shares
            shares, threshold = secure["k"] + 1, secure["t"]
            fl_plain = flower_round_seconds(
                sites, params, secagg=False, rounds=rounds, transport="protobuf"
            )
            fl_secure = flower_round_seconds(
                sites, params, secagg=True, rounds=rounds, transport="protobuf",
                num_shares=shares, reconstruction_threshold=threshold,
            )  # fmt: skip
            if not (fl_plain.correct and fl_secure.correct):
                raise RuntimeError("Flower's aggregate disagrees with the exact mean")
            row.update(
                flwr_plain_s=fl_plain.seconds,
                flwr_secagg_s=fl_secure.seconds,
                flwr_overhead=_ratio(fl_secure.seconds, fl_plain.seconds),
                flwr_shares=shares,
                flwr_threshold=threshold,
                secagg_speedup_vs_flwr=_ratio(fl_secure.seconds, secure["round_s"]),
            )
        rows.append(row)
    return {"rows": rows, "kernels": kernels(repeats)}


HEADERS = (
    "workload",
    "sites",
    "params",
    "fedcoord plain s",
    "fedcoord SecAgg+ s",
    "overhead",
    "coordinator CPU s plain / SecAgg+",
    "k / t",
    "flwr plain s",
    "flwr SecAgg+ s",
    "flwr overhead",
    "SecAgg+ speedup vs flwr",
)


def table_rows(result: dict[str, Any]) -> list[list[str]]:
    return [
        [
            r["workload"],
            str(r["sites"]),
            f"{r['params']:,}",
            _fmt(r["fedcoord_plain_s"], ".3f"),
            _fmt(r["fedcoord_secagg_s"], ".3f"),
            f"{_fmt(r['fedcoord_overhead'])}x",
            f"{_fmt(r['coordinator_cpu_plain_s'])} / {_fmt(r['coordinator_cpu_secagg_s'])}",
            f"{r['k']} / {r['t']}",
            _fmt(r.get("flwr_plain_s"), ".3f"),
            _fmt(r.get("flwr_secagg_s"), ".3f"),
            f"{_fmt(r.get('flwr_overhead'))}x" if r.get("flwr_overhead") else "-",
            f"{_fmt(r.get('secagg_speedup_vs_flwr'), '.1f')}x"
            if r.get("secagg_speedup_vs_flwr")
            else "-",
        ]
        for r in result["rows"]
    ]


def markdown(result: dict[str, Any], machine_line: str, quick: bool) -> str:
    k = result["kernels"]
    return (
        "## Secure aggregation (`benchmarks/secagg.py`)\n\n"
        "One round, sampling to commit, median of the rounds after the first. Workload "
        "`fixed`: every site sends a fixed update (no training: the protocol and the "
        "transport alone); `training`: every site trains the synthetic task's 1M-parameter "
        "MLP for an epoch on 100 examples. fedcoord: `fedcoord simulate` (coordinator + 2 "
        "worker processes over gRPC on loopback: the 50 sites' masking shares the same 2 "
        "cores), FedAvg, with and without `privacy.secure_aggregation`; coordinator CPU is "
        "its process's CPU time per round. flwr: the same clients and parameters through "
        "Flower's "
        "SecAgg+ and plain workflows in the same run, in process with Flower's own message "
        "encoding and the same neighbourhoods (`num_shares = k + 1`, threshold `t`).\n\n"
        + markdown_table(HEADERS, table_rows(result))
        + "\n\n"
        f"Kernels: Shamir reconstruction of 100 secrets from 100 shares each "
        f"{k['shamir_100x100_ms']:.1f} ms; 10 AES-256-CTR masks of 1M words added into one "
        f"accumulator {k['masks_10x1M_ms']:.1f} ms ({k['mask_gb_s']:.1f} GB/s).\n\n"
        f"Machine: {machine_line}{' (quick run)' if quick else ''}\n"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="10 sites x 100k, no Flower")
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--results-md", type=Path, default=RESULTS_MD)
    args = parser.parse_args(argv)
    machine = describe_machine()
    workloads = QUICK_WORKLOADS if args.quick else WORKLOADS
    result = run(workloads, args.rounds, with_flower=not args.quick, repeats=args.repeats)
    print(text_table(HEADERS, table_rows(result)))
    payload = {
        "benchmark": NAME,
        "created_utc": utc_now(),
        "quick": args.quick,
        "machine": machine.as_dict(),
        "config": {"workloads": [list(w) for w in workloads], "rounds": args.rounds},
        **result,
    }
    write_json(NAME, payload, args.out_dir)
    write_section(NAME, markdown(result, machine.line(), args.quick), args.results_md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
