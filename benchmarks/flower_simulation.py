"""A whole simulation, fedcoord against Flower 1.41's simulation engine: digits, 100
sites, 10 rounds, the same model, data and local work.

fedcoord
    ``fedcoord simulate`` through its in-process API (:func:`simulations.local.simulate`):
    a real coordinator on 127.0.0.1 and the sites in 2 worker processes speaking gRPC,
    FedAvg, every site every round, central evaluation after every round.
Flower
    ``flwr.simulation.run_simulation`` (Flower's Simulation Runtime on Ray, one actor per
    CPU, ``client_resources = {"num_cpus": 1}``) with a ``ServerApp`` running Flower's
    ``FedAvg`` (``DefaultWorkflow``, every client every round, the same central
    evaluation after every round through ``evaluate_fn``) and a ``ClientApp`` whose
    client is fedcoord's own digits site for its ``partition-id``: the same torch MLP,
    the same Dirichlet partition, the same epochs, batch size, optimizer and shuffling
    seed (each Ray actor keeps its sites between rounds, as a fedcoord worker does; torch
    uses one thread per process on both sides). The same apps also run over Flower's
    API in this thread without Ray (:class:`benchmarks.flower_secagg.LoopbackGrid`):
    Flower's framework cost without its runtime.

Reported: wall time of each whole simulation (start-up included), seconds to the end of
round 1, median seconds per round after the first, final accuracy on the held-out set,
and the wall-time ratio. When Flower's simulation cannot run here (``ray`` missing, its
backend failing) its exact error is recorded instead of a time.

``--quick`` runs 5 sites x 2 rounds, fedcoord and Flower in-process only (for tests).
Writes ``benchmarks/results/flower_simulation.json`` and its section of
``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
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

NAME = "flower_simulation"
SITES, ROUNDS = 100, 10
QUICK_SITES, QUICK_ROUNDS = 5, 2
REPO_ROOT = Path(__file__).resolve().parent.parent

EXPERIMENT = """
name: digits-scale
seed: 7
rounds: {rounds}
task: {{name: digits, model: mlp}}
federation:
  sites: {sites}
  partition: {{kind: dirichlet, alpha: 0.5}}
  sampling: {{fraction: 1.0, method: fixed, min_sites: {sites}, timeout_s: 300}}
training:
  local_epochs: 2
  batch_size: 16
  optimizer: {{name: sgd, lr: 0.05, momentum: 0.9}}
strategy: {{name: fedavg}}
simulation: {{backend: local, workers: 2}}
"""


def experiment_text(sites: int, rounds: int) -> str:
    """The experiment both sides run (the demo's settings, ``sites`` sites)."""
    return EXPERIMENT.format(sites=sites, rounds=rounds)


# --- fedcoord --------------------------------------------------------------------------------
def run_fedcoord(text: str) -> dict[str, Any]:
    """One ``fedcoord simulate`` run: wall time, round times and the final accuracy."""
    from coordinator.engine import RunEvent
    from coordinator.experiment import parse_experiment

    exp = parse_experiment(text, NAME)
    committed: dict[int, float] = {}

    def mark(event: RunEvent) -> None:
        if event.kind == "round_committed":
            committed[int(event.data["round"])] = time.perf_counter()

    t0 = time.perf_counter()
    run = run_simulation(exp, "fedcoord", [mark])
    summary, entries, wall = run.summary, run.rounds, run.wall_s
    rounds = [e["timings"]["total_s"] for e in entries]
    return {
        "engine": "fedcoord simulate",
        "wall_s": wall,
        "to_round_1_s": committed[1] - t0,
        "round_s": rounds,
        "median_round_s": statistics.median(rounds[1:] if len(rounds) > 1 else rounds),
        "accuracy": float(summary["metrics"]["accuracy"]),
        "accuracy_history": [float(e["metrics"]["accuracy"]) for e in entries],
        "participants": [len(e["participants"]) for e in entries],
        "error": None,
    }


# --- Flower ----------------------------------------------------------------------------------
@functools.cache
def _task(text: str) -> Any:
    from coordinator.experiment import parse_experiment
    from coordinator.tasks import load_task

    exp = parse_experiment(text, NAME)
    return exp, load_task(exp.task.name, exp.task.model, exp.task.options, exp.seed)


@functools.cache
def _site(text: str, partition: int) -> Any:
    """fedcoord's digits site ``partition`` (kept for the process's life, as a fedcoord
    worker keeps its sites)."""
    import torch

    torch.set_num_threads(1)
    exp, task = _task(text)
    fed = exp.federation
    return task.make_client(partition, fed.sites, fed.partition.spec(), exp.seed)


def _names(text: str) -> list[str]:
    return list(_task(text)[1].initial_arrays())


def flower_client(text: str, partition: int) -> Any:
    """The Flower ``NumPyClient`` of ``partition``: fedcoord's site behind Flower's API."""
    from flwr.client import NumPyClient

    names = _names(text)
    site = _site(text, partition)

    class DigitsClient(NumPyClient):
        def fit(
            self, parameters: list[np.ndarray], config: dict[str, Any]
        ) -> tuple[list[np.ndarray], int, dict[str, Any]]:
            result = site.fit(dict(zip(names, parameters, strict=True)), dict(config))
            return [np.asarray(result.arrays[k]) for k in names], result.num_examples, {}

        def evaluate(
            self, parameters: list[np.ndarray], config: dict[str, Any]
        ) -> tuple[float, int, dict[str, Any]]:
            return 0.0, 1, {}

    return DigitsClient()


@dataclass(frozen=True)
class ClientFn:
    """Flower ``client_fn`` (picklable, for Ray): the client of the node's partition."""

    text: str

    def __call__(self, context: Any) -> Any:
        from flwr.common.constant import PARTITION_ID_KEY

        partition = int(context.node_config[PARTITION_ID_KEY])
        return flower_client(self.text, partition).to_client()


@dataclass
class FlowerRecord:
    """What Flower's ``evaluate_fn`` saw: (time, round, accuracy) after every round."""

    marks: list[tuple[float, int, float]] = field(default_factory=list)


def _server_app(text: str, record: FlowerRecord) -> Any:
    from flwr.common import ndarrays_to_parameters
    from flwr.server import LegacyContext, ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.server.workflow import DefaultWorkflow
    from flwr.serverapp import ServerApp

    exp, task = _task(text)
    names = _names(text)
    initial = list(task.initial_arrays().values())
    round_config = exp.round_config()

    def evaluate(
        server_round: int, parameters: list[np.ndarray], config: dict[str, Any]
    ) -> tuple[float, dict[str, Any]]:
        metrics = task.central_evaluate(dict(zip(names, parameters, strict=True)))
        record.marks.append((time.perf_counter(), server_round, float(metrics["accuracy"])))
        return float(metrics["loss"]), {"accuracy": float(metrics["accuracy"])}

    def fit_config(server_round: int) -> dict[str, Any]:
        return {**round_config, "round": server_round, "attempt": 1}

    app = ServerApp()

    @app.main()
    def main(grid: Any, context: Any) -> None:
        n = exp.federation.sites
        strategy = FedAvg(
            fraction_fit=1.0,
            fraction_evaluate=0.0,
            min_fit_clients=n,
            min_available_clients=n,
            initial_parameters=ndarrays_to_parameters(initial),
            evaluate_fn=evaluate,
            on_fit_config_fn=fit_config,
            fit_metrics_aggregation_fn=lambda metrics: {},
        )
        config = ServerConfig(num_rounds=exp.rounds)
        DefaultWorkflow()(grid, LegacyContext(context=context, config=config, strategy=strategy))

    return app


def run_flower(text: str, engine: str) -> dict[str, Any]:
    """Flower's simulation (``engine="simulation"``: Ray) or Flower's apps over an
    in-process grid (``"inprocess"``); the error text when it cannot run."""
    from flwr.clientapp import ClientApp

    from benchmarks import flower_secagg as fs

    exp, _ = _task(text)
    record = FlowerRecord()
    label = "flwr run_simulation (Ray)" if engine == "simulation" else "flwr in-process"
    t0 = time.perf_counter()
    try:
        server_app = _server_app(text, record)
        client_app = ClientApp(client_fn=ClientFn(text))
        with fs._quiet_flower():
            if engine == "inprocess":
                fs._run_inprocess(server_app, client_app, exp.federation.sites, 0, "copy")
            else:
                earlier = fs.descendant_processes()
                ray_processes: dict[int, str] = {}
                path = os.pathsep.join(
                    p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p
                )
                with (
                    tempfile.TemporaryDirectory(prefix="flwr-", ignore_cleanup_errors=True) as tmp,
                    fs._environment({"PYTHONPATH": path}),
                ):
                    watch = _RayWatch(earlier, ray_processes)
                    watch.start()
                    try:
                        fs._run_simulation(
                            server_app, client_app, exp.federation.sites, Path(tmp), ray_processes
                        )
                    finally:
                        watch.stop()
    except Exception as exc:
        return {
            "engine": label,
            "wall_s": None,
            "error": f"{type(exc).__name__}: {exc}",
            "traceback": traceback.format_exc(limit=8),
        }
    wall = time.perf_counter() - t0
    marks = record.marks
    ends = {r: t for t, r, _ in marks}
    rounds = [
        ends[r] - ends[r - 1] for r in range(1, exp.rounds + 1) if r in ends and r - 1 in ends
    ]
    if len(rounds) != exp.rounds:
        return {"engine": label, "wall_s": wall, "error": f"Flower ran {len(rounds)} rounds"}
    return {
        "engine": label,
        "wall_s": wall,
        "to_round_1_s": ends[1] - t0,
        "round_s": rounds,
        "median_round_s": statistics.median(rounds[1:] if len(rounds) > 1 else rounds),
        "accuracy": marks[-1][2],
        "accuracy_history": [a for _, r, a in marks if r >= 1],
        "error": None,
    }


class _RayWatch:
    """Notes Ray's processes while Flower's simulation runs (to wait for them after)."""

    def __init__(self, earlier: dict[int, str], found: dict[int, str]) -> None:
        import threading

        self.earlier, self.found = earlier, found
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        from benchmarks import flower_secagg as fs

        while not self._stop.wait(0.5):
            procs = fs.descendant_processes(marker=b"ray")
            self.found.update({p: t for p, t in procs.items() if self.earlier.get(p) != t})

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


# --- report ------------------------------------------------------------------------------------
HEADERS = (
    "engine",
    "sites x rounds",
    "wall s",
    "to end of round 1 s",
    "median round s",
    "final accuracy",
    "wall time / fedcoord's",
)


def _f(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def table_rows(result: dict[str, Any]) -> list[list[str]]:
    base = result["fedcoord"]["wall_s"]
    rows = []
    for r in [result["fedcoord"], *result["flower"]]:
        to_first = r.get("to_round_1_s")
        rows.append(
            [
                r["engine"],
                f"{result['sites']} x {result['rounds']}",
                _f(r.get("wall_s"), ".1f") if r.get("error") is None else "failed",
                _f(to_first, ".1f"),
                _f(r.get("median_round_s"), ".3f"),
                _f(r.get("accuracy"), ".3f"),
                _f(r["wall_s"] / base if r.get("wall_s") and not r.get("error") else None, ".2f")
                + ("x" if r.get("wall_s") and not r.get("error") else ""),
            ]
        )
    return rows


def markdown(result: dict[str, Any], machine_line: str, quick: bool) -> str:
    title = "## Whole simulation: fedcoord vs Flower's simulation engine"
    title += " (`benchmarks/flower_simulation.py`)" + (" (quick smoke run)" if quick else "")
    errors = [r for r in result["flower"] if r.get("error")]
    notes = "".join(f"\n\n{r['engine']} could not run here: `{r['error']}`" for r in errors)
    return (
        f"{title}\n\n"
        "`python -m benchmarks.flower_simulation`. The digits task (sklearn's 8x8 digits, "
        f"the MLP of `examples/digits.yaml`), {result['sites']} sites on a Dirichlet(0.5) "
        f"label split, {result['rounds']} rounds of FedAvg with every site, 2 local epochs, "
        "batch 16, SGD lr 0.05 momentum 0.9, central evaluation after every round. "
        "fedcoord: `fedcoord simulate` (coordinator + 2 worker processes over gRPC on "
        "loopback). flwr run_simulation: Flower 1.41's Simulation Runtime (Ray, one actor "
        "per CPU) running a `ServerApp` with Flower's `FedAvg` and a `ClientApp` whose client "
        "is fedcoord's own site for its partition (same model, data, optimizer and seeds). "
        "flwr in-process: the same apps over Flower's API in one thread without Ray (no "
        "polling, clients one after another). wall s: the whole simulation, start-up "
        "included; median round s: rounds after the first (fedcoord: the ledger's "
        "`total_s`; Flower: between its `evaluate_fn` calls). Both sides in the same "
        "process, one after the other."
        + notes
        + "\n\n"
        + markdown_table(HEADERS, table_rows(result))
        + f"\n\nMachine: {machine_line}\n"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="5 sites x 2 rounds, no Ray")
    parser.add_argument("--sites", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--no-ray", action="store_true", help="skip Flower's Ray runtime")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--results-md", type=Path, default=RESULTS_MD)
    args = parser.parse_args(argv)
    sites = args.sites or (QUICK_SITES if args.quick else SITES)
    rounds = args.rounds or (QUICK_ROUNDS if args.quick else ROUNDS)
    if sites < 2 or rounds < 1:
        parser.error("need at least 2 sites and 1 round")
    machine = describe_machine((*("numpy", "scipy", "torch", "flwr"), "ray"))
    print(f"machine: {machine.line()}", flush=True)
    text = experiment_text(sites, rounds)
    print(f"fedcoord simulate: {sites} sites x {rounds} rounds ...", flush=True)
    ours = run_fedcoord(text)
    print(f"  {ours['wall_s']:.1f} s, accuracy {ours['accuracy']:.3f}", flush=True)
    engines = ["inprocess"] if args.quick or args.no_ray else ["simulation", "inprocess"]
    flower = []
    for engine in engines:
        print(f"flwr ({engine}): {sites} clients x {rounds} rounds ...", flush=True)
        r = run_flower(text, engine)
        if r.get("error"):
            print(f"  failed: {r['error']}", file=sys.stderr, flush=True)
        else:
            print(f"  {r['wall_s']:.1f} s, accuracy {r['accuracy']:.3f}", flush=True)
        flower.append(r)
    result = {"sites": sites, "rounds": rounds, "fedcoord": ours, "flower": flower}
    print(text_table(HEADERS, table_rows(result)))
    payload = {
        "benchmark": NAME,
        "created_utc": utc_now(),
        "quick": args.quick,
        "machine": machine.as_dict(),
        "config": {"sites": sites, "rounds": rounds, "engines": engines},
        "experiment": text,
        **result,
    }
    path = write_json(NAME, payload, args.out_dir)
    print(f"wrote {path}")
    write_section(NAME, markdown(result, machine.line(), args.quick), args.results_md)
    print(f"updated {args.results_md}")
    return 0


if __name__ == "__main__":
    # Run the importable copy of this module, so Ray's workers can unpickle its clients.
    from benchmarks import flower_simulation

    raise SystemExit(flower_simulation.main())
