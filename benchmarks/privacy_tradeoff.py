"""Accuracy against epsilon on digits: central (user-level) DP and local DP-SGD.

Each point is a whole ``fedcoord`` simulation (real coordinator, real site processes):

central DP
    500 sites holding about 3 digits each, Poisson sampling q = 0.1, 30 rounds, clip
    norm 1, one run per noise multiplier. epsilon is user-level: it protects everything
    one site holds.
local DP-SGD
    10 sites holding about 144 digits each, all sites every round, 30 rounds, Opacus at
    every site (max grad norm 1, batch 16), one run per noise multiplier. epsilon is
    example-level (one record of one site), as each site reports it.

Both sides use delta = 1e-5. The two epsilons protect different units, so read the
plot as "what each mode buys at its own guarantee", not as one curve. A run without DP
of each setup gives the ceiling. ``--quick`` runs 2 noise levels, 5 rounds.

Writes ``benchmarks/results/privacy_tradeoff.json``, its section of
``benchmarks/RESULTS.md`` and the plot ``docs/privacy_tradeoff.svg``.
"""

from __future__ import annotations

import argparse
import io
import math
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import (
    BENCH_DIR,
    RESULTS_DIR,
    RESULTS_MD,
    describe_machine,
    markdown_table,
    text_table,
    utc_now,
    write_json,
    write_section,
)
from coordinator.experiment import parse_experiment
from simulations.local import simulate

NAME = "privacy_tradeoff"
PLOT = BENCH_DIR.parent / "docs" / "privacy_tradeoff.svg"
NOISE = (0.7, 1.0, 1.5, 2.5)
DELTA = 1e-5

CENTRAL = """
name: tradeoff-central
seed: 1
rounds: {rounds}
task: {{name: digits}}
federation:
  sites: 500
  sampling: {{fraction: 0.1, method: poisson, timeout_s: 60}}
training: {{local_epochs: 5, batch_size: 8, optimizer: {{name: sgd, lr: 0.1}}}}
"""
LOCAL = """
name: tradeoff-local
seed: 1
rounds: {rounds}
task: {{name: digits}}
federation: {{sites: 10, partition: {{kind: iid}}}}
training: {{local_epochs: 1, batch_size: 16, optimizer: {{name: sgd, lr: 0.1}}}}
"""


def run(text: str) -> dict[str, Any]:
    """Simulate one experiment quietly; its summary."""
    exp = parse_experiment(text)
    with tempfile.TemporaryDirectory() as tmp:
        return simulate(exp, Path(tmp) / "run", stream=io.StringIO())


def point(mode: str, noise: float | None, summary: dict[str, Any]) -> dict[str, Any]:
    privacy = summary.get("privacy") or {}
    row = {
        "mode": mode,
        "noise_multiplier": noise,
        "epsilon": privacy.get("epsilon"),
        "accuracy": summary["metrics"]["accuracy"],
        "rounds": summary["rounds_completed"],
    }
    print(
        f"{mode:>7}  z={noise if noise is not None else '-':>4}  "
        f"epsilon={row['epsilon'] if row['epsilon'] is not None else '-'}  "
        f"accuracy={row['accuracy']:.4f}",
        flush=True,
    )
    return row


def measure(noise_levels: Sequence[float], rounds: int) -> list[dict[str, Any]]:
    central = CENTRAL.format(rounds=rounds)
    local = LOCAL.format(rounds=rounds)
    rows = [point("central", None, run(central)), point("local", None, run(local))]
    for z in noise_levels:
        dp = f"privacy: {{dp: {{noise_multiplier: {z}, clip_norm: 1.0, delta: {DELTA}}}}}\n"
        rows.append(point("central", z, run(central + dp)))
        ldp = (
            f"privacy: {{local_dp: {{noise_multiplier: {z}, max_grad_norm: 1.0, "
            f"delta: {DELTA}}}}}\n"
        )
        rows.append(point("local", z, run(local + ldp)))
    return rows


def svg_plot(rows: Sequence[dict[str, Any]]) -> str:
    """Accuracy (y) against epsilon (x, log scale), one polyline per mode, dashed lines
    for the runs without DP. Hand-written SVG: no plotting dependency."""
    width, height, left, right, top, bottom = 640, 400, 70, 150, 40, 60
    dp_rows = [r for r in rows if r["epsilon"]]
    eps = [r["epsilon"] for r in dp_rows] or [1.0]
    lo, hi = math.log10(min(eps) / 1.5), math.log10(max(eps) * 1.5)
    plot_w, plot_h = width - left - right, height - top - bottom

    def x(e: float) -> float:
        return left + (math.log10(e) - lo) / (hi - lo) * plot_w

    def y(a: float) -> float:
        return top + (1.0 - a) * plot_h

    colours = {"central": "#1f6feb", "local": "#d9480f"}
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'font-family="sans-serif" font-size="12">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{left}" y="22" font-size="14">Digits: accuracy against epsilon '
        f"(delta {DELTA:g})</text>",
        f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" '
        'stroke="black"/>',
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}" stroke="black"/>',
    ]
    for a in (0.0, 0.2, 0.4, 0.6, 0.8, 1.0):
        out.append(f'<text x="{left - 8}" y="{y(a) + 4:.1f}" text-anchor="end">{a:.1f}</text>')
        out.append(
            f'<line x1="{left}" y1="{y(a):.1f}" x2="{left + plot_w}" y2="{y(a):.1f}" '
            'stroke="#ddd"/>'
        )
    for decade in range(math.floor(lo), math.ceil(hi) + 1):
        for m in (1, 2, 5):
            e = m * 10.0**decade
            if lo <= math.log10(e) <= hi:
                out.append(
                    f'<text x="{x(e):.1f}" y="{top + plot_h + 16}" text-anchor="middle">{e:g}'
                    "</text>"
                )
    out.append(
        f'<text x="{left + plot_w / 2}" y="{height - 18}" text-anchor="middle">epsilon '
        "(log scale; central: per site, local: per example)</text>"
    )
    out.append(
        f'<text x="18" y="{top + plot_h / 2}" text-anchor="middle" '
        f'transform="rotate(-90 18 {top + plot_h / 2})">test accuracy</text>'
    )
    for i, (mode, colour) in enumerate(colours.items()):
        pts = sorted((r["epsilon"], r["accuracy"]) for r in dp_rows if r["mode"] == mode)
        if pts:
            path = " ".join(f"{x(e):.1f},{y(a):.1f}" for e, a in pts)
            out.append(
                f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"/>'
            )
            out += [
                f'<circle cx="{x(e):.1f}" cy="{y(a):.1f}" r="4" fill="{colour}"/>' for e, a in pts
            ]
        base = [r["accuracy"] for r in rows if r["mode"] == mode and r["epsilon"] is None]
        if base:
            out.append(
                f'<line x1="{left}" y1="{y(base[0]):.1f}" x2="{left + plot_w}" '
                f'y2="{y(base[0]):.1f}" stroke="{colour}" stroke-dasharray="5,4"/>'
            )
        ly = top + 20 + 36 * i
        out.append(f'<rect x="{width - right + 14}" y="{ly - 9}" width="12" height="12" '
                   f'fill="{colour}"/>')  # fmt: skip
        label = "central DP (500 sites)" if mode == "central" else "local DP-SGD (10 sites)"
        out.append(f'<text x="{width - right + 32}" y="{ly + 1}">{label}</text>')
        out.append(f'<text x="{width - right + 32}" y="{ly + 15}" fill="#555">dashed: no DP</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def table_rows(rows: Sequence[dict[str, Any]]) -> list[list[str]]:
    return [
        [
            r["mode"],
            "no DP" if r["noise_multiplier"] is None else f"{r['noise_multiplier']:g}",
            "-" if r["epsilon"] is None else f"{r['epsilon']:.2f}",
            f"{r['accuracy']:.3f}",
            str(r["rounds"]),
        ]
        for r in rows
    ]


HEADERS = ("mode", "noise multiplier", "epsilon", "accuracy", "rounds")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.privacy_tradeoff")
    parser.add_argument("--quick", action="store_true", help="2 noise levels, 5 rounds")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--results-md", type=Path, default=RESULTS_MD)
    parser.add_argument("--plot", type=Path, default=PLOT)
    args = parser.parse_args(argv)
    machine = describe_machine()
    noise, rounds = ((1.0, 2.5), 5) if args.quick else (NOISE, 30)
    rows = measure(noise, rounds)
    payload = {"benchmark": NAME, "created_utc": utc_now(), "quick": args.quick,
               "machine": machine.as_dict(), "delta": DELTA, "rows": rows}  # fmt: skip
    print(text_table(HEADERS, table_rows(rows)))
    print(f"wrote {write_json(NAME, payload, args.out_dir)}")
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    args.plot.write_text(svg_plot(rows))
    print(f"wrote {args.plot}")
    body = "\n".join(
        [
            "## Privacy: accuracy against epsilon on digits"
            + (" (quick smoke run)" if args.quick else ""),
            "",
            "`python -m benchmarks.privacy_tradeoff`. Central DP: 500 sites, Poisson q = 0.1, "
            f"{rounds} rounds, clip 1, user-level epsilon. Local DP-SGD: 10 sites, all every "
            f"round, {rounds} rounds, Opacus with max grad norm 1, example-level epsilon as "
            f"the sites report it. delta = {DELTA:g}. Plot: `docs/privacy_tradeoff.svg`.",
            "",
            markdown_table(HEADERS, table_rows(rows)),
            "",
            f"Machine: {machine.line()}. Run {payload['created_utc']}.",
        ]
    )
    write_section(NAME, body, args.results_md)
    print(f"updated {args.results_md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
