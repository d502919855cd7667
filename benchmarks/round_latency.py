"""Round latency and transfer throughput over gRPC on loopback, 10-100 sites x 1M-100M
parameters.

Each cell is one ``fedcoord simulate`` run (:func:`simulations.local.simulate`): a real
:class:`coordinator.server.Coordinator` in this process (gRPC server, round engine,
SQLite ledger, model store on disk) and the sites in 2 worker processes, each site a
thread running :func:`client_sdk.run_site` over its own channel to 127.0.0.1. A site
does no training: its ``fit`` returns the received model with a cheap deterministic
change (its small tensor shifted by a per-site constant; the big tensor is the received,
read-only array itself, so the site allocates nothing for it). Every round therefore
moves the whole model down to every site and a whole model up from every site, and
costs only the network path: chunked streaming, digests, validation, FedAvg folding,
the commit (model hashed and stored, ledger entry). Rounds after the first are timed
(the ledger's ``total_s``, sampling to commit) and ``collect_s`` (tasks posted to the
last result folded) is reported too.

Bytes moved: ``sites x model bytes`` each way per round (each round's model is new, so
no site can use its cached copy). MB/s: both directions over the round time.

Memory
    A site keeps the model it received (its cache) while the next one arrives, and the
    coordinator assembles every upload in flight before folding it, so a cell needs
    about ``3 x sites x model bytes``. 50 or 100 sites x 100M parameters (400 MB) would
    need 60-120 GB, which one machine cannot hold (a deployment spreads it over the
    sites' machines); cells over ``--memory-budget-gib`` (default 14) are skipped and
    listed as such, not estimated.
Single transfer
    One site and the 100M model: both directions over ``collect_s`` (download, the
    site's digest check, upload, the coordinator's check and fold), the rate one
    site's transfer reaches. It runs first, so the grid's gigabytes of model files
    still being written back to disk do not run against it.

``--quick`` runs 4 sites x 10k parameters and a 1-site 100k transfer (for tests).
Writes ``benchmarks/results/round_latency.json`` and its section of
``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import statistics
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import (
    RESULTS_DIR,
    RESULTS_MD,
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

NAME = "round_latency"
SITES = (10, 50, 100)
PARAMS = (1_000_000, 10_000_000, 100_000_000)
SINGLE_PARAMS = 100_000_000
SINGLE_ROUNDS = 10
"""Rounds of the single-transfer cell: the rates it reports are medians of 9 streams."""
QUICK_SITES = (4,)
QUICK_PARAMS = (10_000,)
QUICK_SINGLE_PARAMS = 100_000
ROUNDS = 3
SMALL = "layer.bias"
BIG = "layer.weight"
SMALL_SIZE = 1000

EXPERIMENT = """
name: round-latency
seed: 5
rounds: {rounds}
task: {{name: "benchmarks.round_latency:build_task", options: {{num_params: {params}}}}}
federation:
  sites: {sites}
  sampling: {{fraction: 1.0, method: fixed, min_sites: {sites}, timeout_s: 600}}
training: {{local_epochs: 1, batch_size: 32}}
simulation: {{workers: 2}}
"""


class EchoSite(Client):
    """Returns the received model with its small tensor shifted by a per-site constant
    (the big tensor is the received read-only array: no copy, no training)."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.shift = np.float32(1e-3 * (index + 1))

    def fit(self, arrays: Arrays, config: Config) -> FitResult:
        out = dict(arrays)
        out[SMALL] = arrays[SMALL] + self.shift
        return FitResult(out, num_examples=10 + self.index % 7, metrics={})

    def evaluate(self, arrays: Arrays, config: Config) -> EvaluateResult:
        return EvaluateResult(loss=0.0, num_examples=1)


class EchoTask:
    """``num_params`` float32 parameters (one big tensor and a small one), no data."""

    name = "round-latency"

    def __init__(self, num_params: int, seed: int) -> None:
        if num_params <= SMALL_SIZE:
            raise ValueError(f"num_params must exceed {SMALL_SIZE}, got {num_params}")
        self.num_params = num_params
        self.seed = seed

    def initial_arrays(self) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(self.seed)
        return {
            SMALL: rng.standard_normal(SMALL_SIZE, dtype=np.float32),
            BIG: rng.standard_normal(self.num_params - SMALL_SIZE, dtype=np.float32),
        }

    def central_evaluate(self, arrays: Mapping[str, np.ndarray]) -> dict[str, float]:
        return {}

    def make_client(
        self, site_index: int, num_sites: int, partition: Mapping[str, Any], seed: int
    ) -> EchoSite:
        return EchoSite(site_index)


def build_task(model: str | None, options: Mapping[str, Any], seed: int) -> EchoTask:
    """``task.name: benchmarks.round_latency:build_task`` of the benchmark's runs."""
    return EchoTask(int(options.get("num_params", 1_000_000)), seed)


def needed_bytes(sites: int, params: int) -> int:
    """Rough peak memory of a cell: see the module docstring."""
    return 3 * sites * params * 4 + 4 * params * 4


class TransferRecords(logging.Handler):
    """Collects the coordinator's per-stream transfer records
    (:func:`coordinator.fleet.log_transfer`): ``(direction, bytes, seconds)``."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.items: list[tuple[str, int, float]] = []

    def emit(self, record: logging.LogRecord) -> None:
        from coordinator.fleet import TRANSFER_RECORD

        item = getattr(record, TRANSFER_RECORD, None)
        if item is not None:
            self.items.append(item)

    def rates(self, direction: str, skip: int) -> list[float]:
        """MB/s of each stream of ``direction`` after the first ``skip`` (round 1)."""
        mine = [(n, s) for d, n, s in self.items if d == direction][skip:]
        return [n / max(s, 1e-9) / 1e6 for n, s in mine]


@contextlib.contextmanager
def transfer_records() -> Iterator[TransferRecords]:
    logger = logging.getLogger("fedcoord.fleet")
    handler, level, propagate = TransferRecords(), logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False  # the DEBUG records are for this handler only
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


def run_cell(sites: int, params: int, rounds: int) -> dict[str, Any]:
    """One ``fedcoord simulate`` run; its rounds' timings, the bytes they moved and the
    per-stream transfer rates the coordinator saw."""
    from coordinator.experiment import parse_experiment

    exp = parse_experiment(EXPERIMENT.format(rounds=rounds, sites=sites, params=params), NAME)
    with transfer_records() as transfers:
        run = run_simulation(exp, f"{sites} x {params:,}")
    entries, wall = run.rounds, run.wall_s
    timed = entries[1:] if len(entries) > 1 else entries
    if any(len(e["participants"]) != sites for e in entries):
        raise RuntimeError(f"{sites} x {params:,}: a round lost sites: {entries[-1]['dropped']}")
    total = statistics.median(e["timings"]["total_s"] for e in timed)
    collect = statistics.median(e["timings"]["collect_s"] for e in timed)
    model_bytes = params * 4
    each_way = sites * model_bytes
    skip = sites if rounds > 1 else 0
    down, up = transfers.rates("download", skip), transfers.rates("upload", skip)
    return {
        "sites": sites,
        "params": params,
        "model_bytes": model_bytes,
        "rounds": len(entries),
        "round_s": total,
        "collect_s": collect,
        "round_s_all": [e["timings"]["total_s"] for e in entries],
        "bytes_down": each_way,
        "bytes_up": each_way,
        "mb_s": 2 * each_way / total / 1e6,
        "collect_mb_s": 2 * each_way / collect / 1e6,
        "sites_per_s": sites / total,
        "wall_s": wall,
        "download_mb_s": statistics.median(down) if down else None,
        "upload_mb_s": statistics.median(up) if up else None,
        "download_mb_s_all": down,
        "upload_mb_s_all": up,
    }


def run(
    sites_grid: Sequence[int],
    params_grid: Sequence[int],
    single_params: int,
    rounds: int,
    budget: int,
) -> dict[str, Any]:
    single_rounds = max(rounds, SINGLE_ROUNDS)
    print(f"single transfer: 1 site x {single_params:,}, {single_rounds} rounds ...", flush=True)
    single = run_cell(1, single_params, single_rounds)
    print(
        f"  download {_rate(single['download_mb_s'])} MB/s, upload "
        f"{_rate(single['upload_mb_s'])} MB/s per stream; {single['collect_mb_s']:.0f} MB/s "
        f"over collect_s {single['collect_s']:.3f} s"
    )
    cells: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    for params in params_grid:
        for sites in sites_grid:
            need = needed_bytes(sites, params)
            if need > budget:
                print(f"skip {sites} sites x {params:,}: needs ~{need / 2**30:.0f} GiB", flush=True)
                skipped.append({"sites": sites, "params": params, "needed_bytes": need})
                continue
            print(f"{sites} sites x {params:,} parameters, {rounds} rounds ...", flush=True)
            cell = run_cell(sites, params, rounds)
            print(
                f"  round {cell['round_s']:.3f} s, collect {cell['collect_s']:.3f} s, "
                f"{cell['mb_s']:.0f} MB/s",
                flush=True,
            )
            cells.append(cell)
    return {"cells": cells, "skipped": skipped, "single": single}


HEADERS = (
    "sites",
    "params",
    "round s",
    "collect s",
    "MB down / up per round",
    "MB/s (both ways / round s)",
    "MB/s (both ways / collect s)",
    "download MB/s per stream",
    "upload MB/s per stream",
)


def _spread(rates: Sequence[float]) -> str:
    """``"n streams, lo-hi MB/s"`` of per-stream rates."""
    if not rates:
        return "no streams"
    return f"{len(rates)} streams, {min(rates):.0f}-{max(rates):.0f} MB/s"


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def table_rows(result: dict[str, Any]) -> list[list[str]]:
    rows = [
        [
            str(c["sites"]),
            f"{c['params']:,}",
            f"{c['round_s']:.3f}",
            f"{c['collect_s']:.3f}",
            f"{c['bytes_down'] / 1e6:,.0f} / {c['bytes_up'] / 1e6:,.0f}",
            f"{c['mb_s']:,.0f}",
            f"{c['collect_mb_s']:,.0f}",
            _rate(c["download_mb_s"]),
            _rate(c["upload_mb_s"]),
        ]
        for c in result["cells"]
    ]
    rows += [
        [str(s["sites"]), f"{s['params']:,}", "skipped", "-",
         f"needs ~{s['needed_bytes'] / 2**30:.0f} GiB", "-", "-", "-", "-"]
        for s in result["skipped"]
    ]  # fmt: skip
    return rows


def skipped_note(result: dict[str, Any]) -> str:
    """Why cells were skipped (empty when none was)."""
    if not result["skipped"]:
        return ""
    cells = ", ".join(f"{c['sites']} x {c['params']:,}" for c in result["skipped"])
    return (
        f"Skipped cells ({cells}): every site keeps the model it received while the next "
        "one arrives (up to 2 x model bytes per site, all sites on this one machine) and "
        "the coordinator assembles uploads in flight before folding them, so a cell is "
        "budgeted at 3 x sites x model bytes (for 50 or 100 sites x 100M parameters, "
        "57-113 GiB; a deployment spreads it over the sites' own machines). They are left "
        "out, not estimated.\n\n"
    )


def markdown(result: dict[str, Any], machine_line: str, rounds: int, quick: bool) -> str:
    s = result["single"]
    title = "## Round latency over gRPC on loopback (`benchmarks/round_latency.py`)"
    if quick:
        title += " (quick smoke run)"
    return (
        f"{title}\n\n"
        "`python -m benchmarks.round_latency`. Each cell is a `fedcoord simulate` run: a "
        "real coordinator in the benchmark's process and the sites in 2 worker processes "
        "running `client_sdk.run_site` over gRPC on 127.0.0.1. Sites do no training: they "
        "return the received model with its small tensor shifted (the network, codec, "
        "validation, aggregation and commit path only). FedAvg, all sites every round, "
        f"{rounds} rounds; round s is the ledger's `total_s` (sampling to commit) and "
        "collect s its `collect_s` (tasks posted to last update folded), medians of the "
        "rounds after the first. Every round moves the whole model to every site and back "
        "(MB = 10^6 bytes); MB/s counts both directions. Per stream: the median rate of "
        "one model download (the coordinator's first chunk to its last taken by gRPC) and "
        "of one update upload (first chunk received to the payload assembled and its "
        "SHA-256 digest checked), as the coordinator logs them, rounds after the first; "
        "concurrent streams share the cores.\n\n"
        + markdown_table(HEADERS, table_rows(result))
        + "\n\n"
        f"Single transfer (1 site, {s['params']:,} float32 = {s['model_bytes'] / 1e6:,.0f} "
        f"MB each way, {s['rounds']} rounds, run before the grid): download "
        f"{_rate(s['download_mb_s'])} MB/s "
        f"({_spread(s['download_mb_s_all'])}) and upload {_rate(s['upload_mb_s'])} MB/s "
        f"({_spread(s['upload_mb_s_all'])}) per stream, medians of the rounds after the "
        f"first; {s['collect_mb_s']:,.0f} MB/s over "
        "the collect time "
        f"({s['collect_s']:.3f} s for download, the site's digest check, upload, the "
        f"coordinator's check and fold); {s['mb_s']:,.0f} MB/s over the whole round "
        f"({s['round_s']:.3f} s, with the commit: hashing and storing the new model).\n\n"
        + skipped_note(result)
        + f"All processes share the machine's cores. Machine: {machine_line}\n"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="4 sites x 10k (for tests)")
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--memory-budget-gib", type=float, default=14.0)
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--results-md", type=Path, default=RESULTS_MD)
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    machine = describe_machine()
    print(f"machine: {machine.line()}", flush=True)
    sites_grid = QUICK_SITES if args.quick else SITES
    params_grid = QUICK_PARAMS if args.quick else PARAMS
    single = QUICK_SINGLE_PARAMS if args.quick else SINGLE_PARAMS
    budget = int(args.memory_budget_gib * 2**30)
    result = run(sites_grid, params_grid, single, args.rounds, budget)
    print(text_table(HEADERS, table_rows(result)))
    payload = {
        "benchmark": NAME,
        "created_utc": utc_now(),
        "quick": args.quick,
        "machine": machine.as_dict(),
        "config": {
            "sites": list(sites_grid),
            "params": list(params_grid),
            "single_params": single,
            "rounds": args.rounds,
            "memory_budget_gib": args.memory_budget_gib,
        },
        **result,
    }
    path = write_json(NAME, payload, args.out_dir)
    print(f"wrote {path}")
    write_section(NAME, markdown(result, machine.line(), args.rounds, args.quick), args.results_md)
    print(f"updated {args.results_md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
