"""FedAvg and Krum: fedcoord against Flower 1.41's own aggregation code, on the same inputs.

FedAvg
    fedcoord's :class:`~strategies.fedavg.FedAvg` as a round uses it (an aggregator over
    the reference, one ``add`` per update with its example count, then ``apply``) against
    ``flwr.server.strategy.aggregate.aggregate(results)``. The same updates are laid out
    as one tensor and as a model of many tensors. Throughput is update bytes
    (updates x parameters x 4) per second. Both results are checked against each other
    and against a float64 computation.
Krum
    fedcoord's :class:`~strategies.robust.Krum` (``StackedDeltas`` + ``apply``) against
    ``flwr.server.strategy.aggregate.aggregate_krum(results, f, to_keep=0)``, on honest
    updates of distinct noise levels plus ``f`` shifted attackers; both must pick the
    same update.

``python -m benchmarks.aggregation`` runs 50 x 10M FedAvg and 20 x 1M Krum (about 4.5 GB
of RAM at peak); ``--quick`` runs a small smoke version. The exit status is 1 when the
two sides disagree (the JSON is still written, ``RESULTS.md`` is not touched).
"""

from __future__ import annotations

import argparse
import gc
import math
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import (
    RESULTS_DIR,
    RESULTS_MD,
    Machine,
    best_of,
    describe_machine,
    markdown_table,
    peak_allocated,
    text_table,
    utc_now,
    write_json,
    write_section,
)
from strategies.accumulator import WeightedDeltaMean
from strategies.base import Arrays
from strategies.fedavg import FedAvg
from strategies.robust import Krum

NAME = "aggregation"

FULL = {"fedavg_updates": 50, "fedavg_params": 10_000_000, "krum_updates": 20}
FULL |= {"krum_params": 1_000_000, "krum_f": 4}
QUICK = {"fedavg_updates": 5, "fedavg_params": 100_000, "krum_updates": 7}
QUICK |= {"krum_params": 20_000, "krum_f": 2}

RTOL, ATOL = 1e-5, 1e-5
"""Agreement between the two sides' float32 results (values are of order 1)."""

HEADERS = (
    "rule",
    "model",
    "updates x params",
    "fedcoord ms",
    "flwr ms",
    "fedcoord GB/s",
    "flwr GB/s",
    "fedcoord/flwr",
    "fedcoord peak MiB",
    "flwr peak MiB",
    "agree",
)


class Layout:
    """How a flat parameter vector is cut into named tensors (views, no copies)."""

    def __init__(self, label: str, shapes: Sequence[tuple[str, tuple[int, ...]]]):
        self.label = label
        self.shapes = list(shapes)
        self.size = sum(math.prod(shape) for _, shape in self.shapes)

    def model(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        """The named tensors of ``flat`` (views)."""
        if flat.size != self.size:
            raise ValueError(f"layout of {self.size} parameters, vector of {flat.size}")
        out: dict[str, np.ndarray] = {}
        offset = 0
        for name, shape in self.shapes:
            n = math.prod(shape)
            out[name] = flat[offset : offset + n].reshape(shape)
            offset += n
        return out


def single_tensor(d: int) -> Layout:
    """The whole model as one tensor of ``d`` parameters."""
    return Layout("1 tensor", [("w", (d,))])


def layered(d: int, layers: int = 40) -> Layout:
    """A network-like model of ``d`` parameters: ``layers`` blocks of a ``k x k`` weight
    and three length-``k`` vectors (bias, norm scale and shift), then a head tensor with
    the rest (161 tensors at the default size)."""
    layers = min(layers, d // 4)
    k = int((math.sqrt(9 + 4 * d / layers) - 3) / 2) if layers else 0
    while k > 1 and layers * (k * k + 3 * k) > d:
        k -= 1
    shapes: list[tuple[str, tuple[int, ...]]] = []
    for i in range(layers):
        shapes.append((f"layer{i}.weight", (k, k)))
        shapes += [(f"layer{i}.{part}", (k,)) for part in ("bias", "scale", "shift")]
    shapes.append(("head", (d - layers * (k * k + 3 * k),)))
    return Layout(f"{len(shapes)} tensors", shapes)


# --- FedAvg --------------------------------------------------------------------------------


def fedcoord_fedavg(
    reference: Arrays, updates: Sequence[Arrays], weights: Sequence[int]
) -> dict[str, np.ndarray]:
    """A FedAvg round as fedcoord runs it: stream every update into the aggregator."""
    strategy = FedAvg()
    aggregator = strategy.aggregator(reference, len(updates))
    for update, weight in zip(updates, weights, strict=True):
        aggregator.add(update, weight)
    return strategy.apply(reference, aggregator)


def fedcoord_fold(
    aggregator: WeightedDeltaMean, updates: Sequence[Arrays], weights: Sequence[int]
) -> int:
    """Only the folding: ``add`` every update to an existing aggregator."""
    for update, weight in zip(updates, weights, strict=True):
        aggregator.add(update, weight)
    return aggregator.count


def flwr_fedavg(results: list[tuple[list[np.ndarray], int]]) -> list[np.ndarray]:
    """Flower 1.41's weighted average (``flwr.server.strategy.aggregate.aggregate``)."""
    from flwr.server.strategy.aggregate import aggregate

    return aggregate(results)


def float64_fedavg(
    reference: np.ndarray, updates: Sequence[np.ndarray], weights: Sequence[int]
) -> np.ndarray:
    """The weighted mean of flat updates, computed in float64 (the ground truth)."""
    acc = np.zeros(reference.size, dtype=np.float64)
    for update, weight in zip(updates, weights, strict=True):
        acc += float(weight) * (update.astype(np.float64) - reference)
    acc /= float(sum(weights))
    acc += reference
    return acc


def run_fedavg(
    n: int, d: int, repeats: int, warmup: int, rng: np.random.Generator
) -> list[dict[str, Any]]:
    """Time both FedAvg implementations on ``n`` updates of ``d`` float32 parameters,
    for a one-tensor and a many-tensor layout of the same numbers."""
    reference = rng.standard_normal(d, dtype=np.float32)
    updates = [reference + 0.01 * rng.standard_normal(d, dtype=np.float32) for _ in range(n)]
    weights = [int(w) for w in rng.integers(50, 5_000, n)]
    truth = float64_fedavg(reference, updates, weights)
    update_bytes = n * d * 4
    rows: list[dict[str, Any]] = []
    for layout in (single_tensor(d), layered(d)):
        ref_model = layout.model(reference)
        models = [layout.model(u) for u in updates]
        results = [(list(m.values()), w) for m, w in zip(models, weights, strict=True)]
        ours_t, ours = best_of(
            partial(fedcoord_fedavg, ref_model, models, weights), repeats, warmup
        )
        theirs_t, theirs = best_of(partial(flwr_fedavg, results), repeats, warmup)
        ours_peak = peak_allocated(partial(fedcoord_fedavg, ref_model, models, weights))
        theirs_peak = peak_allocated(partial(flwr_fedavg, results))
        fold = partial(fedcoord_fold, WeightedDeltaMean(ref_model), models, weights)
        fold_t, _ = best_of(fold, repeats, warmup)
        ours_flat = np.concatenate([ours[name].ravel() for name in ref_model])
        theirs_flat = np.concatenate([a.ravel() for a in theirs])
        dtypes = {str(a.dtype) for a in theirs}
        agree = bool(
            np.allclose(ours_flat, theirs_flat, rtol=RTOL, atol=ATOL)
            and all(ours[name].dtype == np.float32 for name in ref_model)
            and all(ours[name].shape == a.shape for name, a in zip(ref_model, theirs, strict=True))
        )
        rows.append(
            {
                "rule": "FedAvg",
                "model": layout.label,
                "tensors": len(layout.shapes),
                "updates": n,
                "params": d,
                "update_bytes": update_bytes,
                "fedcoord_s": ours_t.best,
                "flwr_s": theirs_t.best,
                "fedcoord_runs_s": list(ours_t.runs),
                "flwr_runs_s": list(theirs_t.runs),
                "fedcoord_gb_s": update_bytes / ours_t.best / 1e9,
                "flwr_gb_s": update_bytes / theirs_t.best / 1e9,
                "speedup": theirs_t.best / ours_t.best,
                "fedcoord_peak_bytes": ours_peak,
                "flwr_peak_bytes": theirs_peak,
                "fedcoord_fold_s": fold_t.best,
                "fedcoord_fold_gb_s": update_bytes / fold_t.best / 1e9,
                "fedcoord_dtype": str(ours_flat.dtype),
                "flwr_dtype": ",".join(sorted(dtypes)),
                "max_abs_diff": float(np.max(np.abs(ours_flat - theirs_flat), initial=0.0)),
                "fedcoord_max_err_vs_float64": float(
                    np.max(np.abs(ours_flat - truth), initial=0.0)
                ),
                "flwr_max_err_vs_float64": float(np.max(np.abs(theirs_flat - truth), initial=0.0)),
                "agree": agree,
            }
        )
        del ours, theirs, ours_flat, theirs_flat, results, models
        gc.collect()
    return rows


# --- Krum ----------------------------------------------------------------------------------


def krum_inputs(
    n: int, d: int, f: int, rng: np.random.Generator
) -> tuple[np.ndarray, list[np.ndarray], int]:
    """A reference, ``n`` flat updates and the index Krum should pick.

    ``n - f`` honest updates add noise of distinct scales (the least noisy has the lowest
    Krum score); ``f`` attackers add large, shifted noise. Positions are shuffled.
    """
    reference = rng.standard_normal(d, dtype=np.float32)
    scales: list[float | None] = [*np.linspace(0.01, 0.02, n - f).tolist(), *([None] * f)]
    order = rng.permutation(n)
    updates: list[np.ndarray] = [np.empty(0, np.float32)] * n
    for slot, scale in zip(order, scales, strict=True):
        noise = rng.standard_normal(d, dtype=np.float32)
        if scale is None:  # attacker
            updates[slot] = reference + (noise + np.float32(1.0))
        else:
            updates[slot] = reference + np.float32(scale) * noise
    return reference, updates, int(order[0])


def fedcoord_krum(reference: Arrays, updates: Sequence[Arrays], f: int) -> dict[str, np.ndarray]:
    """A Krum round as fedcoord runs it: stack the deltas, then apply the rule."""
    strategy = Krum(Krum.Params(f=f))
    aggregator = strategy.aggregator(reference, len(updates))
    for update in updates:
        aggregator.add(update, 1.0)
    return strategy.apply(reference, aggregator)


def flwr_krum(results: list[tuple[list[np.ndarray], int]], f: int) -> list[np.ndarray]:
    """Flower 1.41's Krum (``aggregate_krum`` with ``to_keep=0``)."""
    from flwr.server.strategy.aggregate import aggregate_krum

    return aggregate_krum(results, num_malicious=f, to_keep=0)


def nearest(result: np.ndarray, updates: Sequence[np.ndarray]) -> int:
    """The index of the update closest to ``result`` (largest coordinate difference)."""
    return int(np.argmin([np.max(np.abs(result - u), initial=0.0) for u in updates]))


def run_krum(
    n: int, d: int, f: int, repeats: int, warmup: int, rng: np.random.Generator
) -> dict[str, Any]:
    """Time both Krum implementations on ``n`` updates of ``d`` float32 parameters."""
    reference, updates, expected = krum_inputs(n, d, f, rng)
    ref_model = {"w": reference}
    models = [{"w": u} for u in updates]
    results = [([u], 1) for u in updates]
    ours_t, ours = best_of(partial(fedcoord_krum, ref_model, models, f), repeats, warmup)
    theirs_t, theirs = best_of(partial(flwr_krum, results, f), repeats, warmup)
    ours_pick, theirs_pick = nearest(ours["w"], updates), nearest(theirs[0], updates)
    ours_peak = peak_allocated(partial(fedcoord_krum, ref_model, models, f))
    theirs_peak = peak_allocated(partial(flwr_krum, results, f))
    update_bytes = n * d * 4
    return {
        "rule": "Krum",
        "model": "1 tensor",
        "tensors": 1,
        "updates": n,
        "params": d,
        "f": f,
        "update_bytes": update_bytes,
        "fedcoord_s": ours_t.best,
        "flwr_s": theirs_t.best,
        "fedcoord_runs_s": list(ours_t.runs),
        "flwr_runs_s": list(theirs_t.runs),
        "fedcoord_gb_s": update_bytes / ours_t.best / 1e9,
        "flwr_gb_s": update_bytes / theirs_t.best / 1e9,
        "speedup": theirs_t.best / ours_t.best,
        "fedcoord_peak_bytes": ours_peak,
        "flwr_peak_bytes": theirs_peak,
        "fedcoord_pick": ours_pick,
        "flwr_pick": theirs_pick,
        "expected_pick": expected,
        "max_abs_diff": float(np.max(np.abs(ours["w"] - theirs[0]), initial=0.0)),
        "agree": bool(
            ours_pick == theirs_pick and np.allclose(ours["w"], theirs[0], rtol=RTOL, atol=ATOL)
        ),
    }


# --- reporting -----------------------------------------------------------------------------


def table_rows(rows: Sequence[dict[str, Any]]) -> list[list[str]]:
    """One table row per measurement, formatted for :data:`HEADERS`."""
    return [
        [
            row["rule"] + (f" (f={row['f']})" if "f" in row else ""),
            row["model"],
            f"{row['updates']} x {row['params']:,}",
            f"{row['fedcoord_s'] * 1e3:.1f}",
            f"{row['flwr_s'] * 1e3:.1f}",
            f"{row['fedcoord_gb_s']:.2f}",
            f"{row['flwr_gb_s']:.2f}",
            f"{row['speedup']:.2f}x",
            f"{row['fedcoord_peak_bytes'] / 2**20:,.0f}",
            f"{row['flwr_peak_bytes'] / 2**20:,.0f}",
            "yes" if row["agree"] else "NO",
        ]
        for row in rows
    ]


def fold_note(rows: Sequence[dict[str, Any]]) -> str:
    """One line on fedcoord's folding alone (its ``add`` calls, no set-up or apply)."""
    parts = [f"{row['fedcoord_fold_gb_s']:.2f} GB/s ({row['model']})" for row in rows]
    return "fedcoord folding alone (`WeightedDeltaMean.add` calls): " + ", ".join(parts) + "."


def section(payload: dict[str, Any], machine: Machine) -> str:
    """The Markdown section of ``RESULTS.md`` for one run."""
    config = payload["config"]
    krum = payload["krum"]
    title = "## Aggregation: fedcoord vs Flower 1.41"
    if payload["quick"]:
        title += " (quick smoke run: sizes too small to mean much)"
    return "\n".join(
        [
            title,
            "",
            "`python -m benchmarks.aggregation`. FedAvg: fedcoord's `FedAvg` (streaming "
            "`WeightedDeltaMean`: aggregator, one `add` per update, `apply`) vs "
            "`flwr.server.strategy.aggregate.aggregate`; the same numbers as one tensor and as "
            "a many-tensor model. Krum: fedcoord's `Krum` (`StackedDeltas` + `apply`) vs "
            "`aggregate_krum(results, f, to_keep=0)`. Same inputs, same process; times are "
            f"the best of {config['repeats']} runs after {config['warmup']} warm-up. GB/s: "
            "update bytes (updates x params x 4) per second. fedcoord/flwr: flwr time / "
            "fedcoord time (above 1: fedcoord is faster). peak MiB: memory the aggregation "
            "allocates beyond its inputs (tracemalloc). agree: results allclose "
            f"(rtol={RTOL:g}, atol={ATOL:g}) and, for Krum, the same update picked.",
            "",
            markdown_table(HEADERS, table_rows([*payload["fedavg"], krum])),
            "",
            fold_note(payload["fedavg"]),
            "",
            f"Krum picked update #{krum['fedcoord_pick']} (fedcoord) and "
            f"#{krum['flwr_pick']} (flwr); the least noisy honest update is "
            f"#{krum['expected_pick']}.",
            "",
            f"Machine: {machine.line()}. Run {payload['created_utc']}.",
        ]
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.aggregation", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--quick", action="store_true", help="small smoke run")
    for key, value in FULL.items():
        flag = "--" + key.replace("_", "-")
        parser.add_argument(flag, type=int, default=None, help=f"default {value:,}")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs (best is kept)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs first")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR, help="for the JSON")
    parser.add_argument("--results-md", type=Path, default=RESULTS_MD, help="summary file")
    args = parser.parse_args(argv)
    defaults = QUICK if args.quick else FULL
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for key in FULL:
        if getattr(args, key) < (0 if key == "krum_f" else 1):
            parser.error(f"--{key.replace('_', '-')} must be positive")
    if args.krum_updates < 2 * args.krum_f + 3:
        parser.error(f"Krum with f={args.krum_f} needs --krum-updates >= {2 * args.krum_f + 3}")
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be at least 1 and --warmup at least 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; 0 when both sides agree everywhere, 1 otherwise."""
    args = parse_args(argv)
    machine = describe_machine()
    rng = np.random.default_rng(args.seed)
    print(f"machine: {machine.line()}", flush=True)
    fedavg = run_fedavg(args.fedavg_updates, args.fedavg_params, args.repeats, args.warmup, rng)
    gc.collect()
    krum = run_krum(
        args.krum_updates, args.krum_params, args.krum_f, args.repeats, args.warmup, rng
    )
    agree = all(row["agree"] for row in fedavg) and krum["agree"]
    payload: dict[str, Any] = {
        "benchmark": NAME,
        "created_utc": utc_now(),
        "quick": args.quick,
        "machine": machine.as_dict(),
        "config": {key: getattr(args, key) for key in (*FULL, "repeats", "warmup", "seed")},
        "fedavg": fedavg,
        "krum": krum,
        "agree": agree,
    }
    print(text_table(HEADERS, table_rows([*fedavg, krum])))
    print(fold_note(fedavg))
    print(
        f"Krum picks: fedcoord #{krum['fedcoord_pick']}, flwr #{krum['flwr_pick']} "
        f"(least noisy honest update: #{krum['expected_pick']})"
    )
    path = write_json(NAME, payload, args.out_dir)
    print(f"wrote {path}")
    if not agree:
        bad = [f"{r['rule']} {r['model']}" for r in [*fedavg, krum] if not r["agree"]]
        print(f"MISMATCH: fedcoord and flwr disagree on {', '.join(bad)}", file=sys.stderr)
        return 1
    write_section(NAME, section(payload, machine), args.results_md)
    print(f"updated {args.results_md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
