"""``fedcoord report``: one self-contained HTML page about a run, read from its ledger.

The page has no scripts, no external resources and no network access (a Content
Security Policy forbids them); plots are inline SVG drawn here. Everything taken from the
ledger is untrusted input and is escaped before it reaches the page.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from coordinator.errors import ConfigError, LedgerError
from coordinator.ledger import Entry
from coordinator.report_html import (
    Series,
    as_dict,
    as_int,
    as_list,
    brief,
    digest_html,
    esc,
    fmt,
    line_chart,
    number,
    path_number,
    table,
)
from coordinator.state import Database

PROMOTION_KINDS = ("model_promoted", "promotion_refused")
MISSING = object()
"""Marks a ``site_evaluation`` key absent from a payload (ledgers of older versions)."""


# reading the ledger ----------------------------------------------------------------------
@dataclass
class RunData:
    """The ledger entries of one run, sorted by kind."""

    run_id: str
    started: dict[str, Any]
    rounds: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    alerts: list[dict[str, Any]] = field(default_factory=list)
    promotions: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    finished: dict[str, Any] | None = None
    budget: dict[str, Any] | None = None
    status: str | None = None


@dataclass(frozen=True)
class Report:
    """A rendered page and what the ledger check said (None when it verified)."""

    html: str
    verify_error: str | None


def check_run_dir(run_dir: Path) -> None:
    """A ConfigError naming DIR unless ``run_dir`` holds a ledger and keys."""
    if not (run_dir / "ledger.db").is_file() or not (run_dir / "keys").is_dir():
        raise ConfigError(
            "DIR", f"{run_dir} is not a fedcoord data directory (no ledger.db or keys/)"
        )


def open_run_dir(run_dir: Path) -> Database:
    check_run_dir(run_dir)
    return Database(run_dir)


def read_entries(db: Database) -> tuple[list[Entry], list[int]]:
    """All entries, and the seqs of any whose payload is not even JSON (edited rows are
    skipped rather than stopping the report)."""
    try:
        entries = db.ledger_entries()
    except ValueError:
        pass
    else:  # a payload edited into JSON that is not an object reads as an empty one
        return [e if isinstance(e.payload, dict) else replace(e, payload={}) for e in entries], []
    good: list[Entry] = []
    bad: list[int] = []
    rows = db.query(
        "SELECT seq, kind, payload, prev_hash, hash, signature FROM ledger ORDER BY seq"
    )
    for seq, kind, text, prev, h, sig in rows:
        try:
            payload = json.loads(text)
        except ValueError:
            bad.append(seq)
            continue
        good.append(Entry(seq, kind, as_dict(payload), prev, h, sig))
    return good, bad


def select_run(entries: Sequence[Entry], run_id: str | None, where: Path) -> RunData:
    """The run ``run_id`` (default: the latest with a ``run_started`` entry) and its entries."""
    started = [e for e in entries if e.kind == "run_started"]
    if not started:
        raise ConfigError("DIR", f"{where} holds no run (no run_started ledger entry)")
    if run_id is None:
        chosen = started[-1]
    else:
        matching = [e for e in started if e.payload.get("run_id") == run_id]
        if not matching:
            known = ", ".join(str(e.payload.get("run_id")) for e in started[-5:])
            raise ConfigError("--run", f"no run {run_id!r} in {where} (latest runs: {known})")
        chosen = matching[-1]
    rid = str(chosen.payload.get("run_id"))
    run = RunData(rid, chosen.payload)
    for e in entries:
        if e.seq < chosen.seq or e.payload.get("run_id") != rid:
            continue
        if e.kind == "round_committed" and (round_no := as_int(e.payload.get("round"))) is not None:
            run.rounds.append((round_no, e.payload))
        elif e.kind == "drift_alert":
            run.alerts.append(e.payload)
        elif e.kind in PROMOTION_KINDS:
            run.promotions.append((e.kind, e.payload))
        elif e.kind == "run_finished":
            run.finished = e.payload
        elif e.kind == "budget_exhausted":
            run.budget = e.payload
    return run


def metric_series(
    run: RunData, name: str, color: str, key: str = "metrics", label: str | None = None
) -> Series:
    """Round-by-round values of ``payload[key][name]``."""
    points = [(r, number(as_dict(p.get(key)).get(name))) for r, p in run.rounds]
    return Series(label or name, points, color)


# sections ----------------------------------------------------------------------------------
def section(section_id: str, title: str, body: str) -> str:
    return f'<section id="{section_id}"><h2>{esc(title)}</h2>{body}</section>'


def privacy_text(run: RunData) -> str:
    """Epsilon and delta from the last round's ``dp`` / ``local_dp`` records."""
    last = run.rounds[-1][1] if run.rounds else {}
    parts = []
    dp = as_dict(last.get("dp"))
    if dp:
        parts.append(
            f"central DP ({esc(dp.get('mode', '?'))}, {esc(dp.get('accountant', '?'))}): "
            f"&epsilon; = {fmt(dp.get('epsilon'), 3)}, &delta; = {fmt(dp.get('delta'))}"
        )
    local = as_dict(last.get("local_dp"))
    if local:
        parts.append(
            f"local DP: &epsilon; &le; {fmt(local.get('max_epsilon'), 3)} (reported by sites), "
            f"&delta; = {fmt(local.get('delta'))}"
        )
    if run.budget:
        parts.append(
            f'<span class="warn">budget exhausted before round {fmt(run.budget.get("round"))}'
            f" (budget {fmt(run.budget.get('epsilon_budget'), 3)})</span>"
        )
    if not parts and as_dict(run.started.get("dp")):
        parts.append("DP configured; no round committed yet")
    return "<br>".join(parts) or "none"


def summary_section(run: RunData, db: Database, verify_error: str | None, checked: int) -> str:
    exp = as_dict(run.started.get("experiment"))
    finished = run.finished or {}
    status = finished.get("status") or run.status or "unknown"
    note = finished.get("error") or finished.get("stop_reason")
    status_html = f'<span class="badge status-{esc(status)}">{esc(status)}</span>'
    if note:
        status_html += f" {esc(note)}"
    final = finished.get("final_model") or (
        run.rounds[-1][1].get("output_model") if run.rounds else None
    )
    if verify_error is None:
        verified = (
            f'<span class="ok">verified: {checked} entries, signatures and model files</span>'
        )
    else:
        verified = f'<span class="verify-failed">DOES NOT VERIFY: {esc(verify_error)}</span>'
    modes = sorted(
        {str(as_dict(p.get("secure_aggregation")).get("mode", "off")) for _, p in run.rounds}
    )
    task = as_dict(exp.get("task"))
    rows = [
        ("Run", f"<code>{esc(run.run_id)}</code>"),
        ("Name", esc(run.started.get("name", "?"))),
        ("Status", status_html),
        ("Rounds", f"{len(run.rounds)} committed of {fmt(exp.get('rounds'))}"),
        (
            "Strategy / task",
            f"{esc(as_dict(exp.get('strategy')).get('name', '?'))} / "
            f"{esc(task.get('name', '?'))} ({esc(task.get('model', '?'))})",
        ),
        ("Final model", f'<code class="full">{esc(final)}</code>' if final else "&mdash;"),
        ("Ledger head", f'<code class="full">{esc(db.ledger_head())}</code>'),
        ("Ledger", verified),
        ("Privacy", privacy_text(run)),
        ("Secure aggregation", esc(", ".join(modes)) if modes else "&mdash;"),
        ("Config digest", f'<code class="full">{esc(run.started.get("config_digest"))}</code>'),
    ]
    body = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows)
    return section("summary", "Summary", f'<table class="kv">{body}</table>')


def alert_markers(run: RunData) -> dict[int, str]:
    """Round -> tooltip text naming the drift alerts of that round."""
    by_round: dict[int, list[str]] = {}
    for a in run.alerts:
        r = as_int(a.get("round"))
        if r is not None:
            site = a.get("site_id")
            by_round.setdefault(r, []).append(f"{a.get('check')}" + (f" ({site})" if site else ""))
    return {r: f"drift alert, round {r}: " + ", ".join(v) for r, v in by_round.items()}


def accuracy_section(run: RunData) -> str:
    markers = alert_markers(run)
    charts = [
        line_chart(
            "chart-accuracy",
            "Central accuracy",
            [metric_series(run, "accuracy", "#2563eb")],
            markers,
        ),
        line_chart("chart-loss", "Central loss", [metric_series(run, "loss", "#d97706")], markers),
    ]
    note = '<p class="muted">Dashed red lines mark rounds with drift alerts.</p>' if markers else ""
    return section(
        "accuracy-loss", "Accuracy and loss", f'<div class="charts">{"".join(charts)}</div>{note}'
    )


def epsilon_section(run: RunData) -> str:
    central = metric_series(run, "epsilon", "#7c3aed", label="epsilon")
    local = metric_series(run, "local_epsilon_max", "#db2777", label="local epsilon (max)")
    shown = [s for s in (central, local) if any(v is not None for _, v in s.points)]
    if not shown:
        return section("epsilon", "Privacy spend", "<p>No differential privacy in this run.</p>")
    dp = as_dict(as_dict(as_dict(run.started.get("experiment")).get("privacy")).get("dp"))
    budget = number(dp.get("epsilon_budget"))
    hlines = [(budget, f"budget {budget:g}")] if budget is not None else []
    return section(
        "epsilon",
        "Privacy spend",
        line_chart("chart-epsilon", "Epsilon per round", shown, hlines=hlines),
    )


def _site_rows(evaluation: dict[str, Any]) -> list[list[str]]:
    worst = as_dict(evaluation.get("worst")).get("site")
    rows = []
    for site, values in sorted(as_dict(evaluation.get("sites")).items()):
        v = as_dict(values)
        mark = ' <span class="badge warn">worst</span>' if site == worst else ""
        rows.append(
            [
                esc(site) + mark,
                fmt(v.get("accuracy")),
                fmt(v.get("loss")),
                fmt(v.get("num_examples")),
            ]
        )
    return rows


def _reasons(items: list[Any]) -> str:
    parts = [
        f"{esc(as_dict(i).get('site', '?'))}: {esc(as_dict(i).get('reason', '?'))}" for i in items
    ]
    return f'<span class="reasons">{"<br>".join(parts)}</span>' if parts else ""


def fairness_html(evals: list[tuple[int, Any]]) -> str:
    """Worst site, mean and spread per round, and the last evaluated round's sites. The
    evaluated ``metric`` is accuracy, or loss for tasks without one."""
    if all(e is MISSING for _, e in evals):
        return '<p class="muted">This ledger records no per-site evaluation.</p>'
    evaluated = [(r, e) for r, e in evals if isinstance(e, dict)]
    if not evaluated:
        return (
            '<p class="muted">Per-site evaluation was withheld in every round '
            "(e.g. under privacy).</p>"
        )
    last_round, last = evaluated[-1]
    metric = str(last.get("metric", "accuracy"))

    def values(*path: str) -> list[tuple[int, float | None]]:
        return [
            (r, path_number(e, *path) if as_dict(e).get("metric", "accuracy") == metric else None)
            for r, e in evals
        ]

    series = [
        Series(f"worst-site {metric}", values("worst", metric), "#dc2626"),
        Series(f"mean {metric}", values(f"mean_{metric}"), "#2563eb"),
        Series("spread", values("spread"), "#059669"),
    ]
    parts = [line_chart("chart-sites", "Per-site evaluation of each round's input model", series)]
    withheld = [str(r) for r, e in evals if e is None]
    if withheld:
        parts.append(f'<p class="muted">Withheld in round(s) {", ".join(withheld)}.</p>')
    parts.append(f"<h3>Sites in round {last_round}</h3>")
    parts.append(table(["site", "accuracy", "loss", "examples"], _site_rows(last), "sites"))
    return "".join(parts)


def site_section(run: RunData) -> str:
    parts = [fairness_html([(r, p.get("site_evaluation", MISSING)) for r, p in run.rounds])]
    rows = []
    for r, p in run.rounds:
        dropped, rejected = as_list(p.get("dropped")), as_list(p.get("rejected"))
        rows.append(
            [
                str(r),
                str(len(as_list(p.get("sampled")))),
                str(len(as_list(p.get("participants")))),
                f"{len(dropped)} {_reasons(dropped)}",
                f"{len(rejected)} {_reasons(rejected)}",
            ]
        )
    parts.append("<h3>Participation per round</h3>")
    parts.append(
        table(["round", "sampled", "participants", "dropped", "rejected"], rows, "participation")
    )
    return section("site-metrics", "Sites", "".join(parts))


def drift_section(run: RunData) -> str:
    if not run.alerts:
        return section("drift", "Drift alerts", "<p>No drift alerts.</p>")
    rows = [
        [
            fmt(a.get("round")),
            esc(a.get("check", "?")),
            esc(a.get("scope", "?")),
            esc(a.get("site_id")) if a.get("site_id") is not None else "&mdash;",
            fmt(a.get("value")),
            fmt(a.get("baseline")),
            fmt(a.get("threshold")),
            esc(a.get("message", "")),
        ]
        for a in run.alerts
    ]
    headers = ["round", "check", "scope", "site", "value", "baseline", "threshold", "message"]
    return section("drift", f"Drift alerts ({len(rows)})", table(headers, rows, "drift"))


def _decision(kind: str, p: dict[str, Any]) -> str:
    if kind == "model_promoted":
        return f'<span class="badge ok">promoted</span> by {esc(p.get("by", "?"))}'
    return '<span class="badge bad">promotion refused</span>'


def _gate(p: dict[str, Any]) -> str:
    """``metric value >= threshold`` (``<=`` when lower is better)."""
    sign = "&le;" if p.get("higher_is_better") is False else "&ge;"
    metric, value, threshold = p.get("metric", "?"), p.get("value"), p.get("threshold")
    return f"{esc(metric)} {fmt(value)} (needs {sign} {fmt(threshold)})"


def _alert_ref(alert: Any) -> str:
    """An open alert: a ledger seq, or whatever else the entry holds."""
    return f"entry {alert}" if as_int(alert) is not None else brief(alert)


def lineage_section(run: RunData) -> str:
    decisions: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for kind, p in run.promotions:
        decisions.setdefault(str(p.get("model")), []).append((kind, p))
    rows = [["start", "&mdash;", digest_html(run.started.get("initial_model")), "&mdash;", ""]]
    previous = run.started.get("initial_model")
    for r, p in run.rounds:
        out_model = p.get("output_model")
        notes = [_decision(k, d) for k, d in decisions.get(str(out_model), [])]
        if p.get("input_model") != previous:
            notes.append('<span class="badge bad">input is not the previous output</span>')
        rows.append(
            [
                str(r),
                digest_html(p.get("input_model")),
                "&rarr; " + digest_html(out_model),
                fmt(as_dict(p.get("metrics")).get("accuracy")),
                " ".join(notes),
            ]
        )
        previous = out_model
    parts = [
        table(["round", "input model", "output model", "accuracy", "promotion"], rows, "lineage")
    ]
    if run.promotions:
        detail = [
            [
                fmt(p.get("round")),
                digest_html(p.get("model")),
                _decision(kind, p),
                _gate(p),
                ", ".join(_alert_ref(a) for a in as_list(p.get("open_alerts"))) or "&mdash;",
                brief(as_list(p.get("reasons"))) or "&mdash;",
            ]
            for kind, p in run.promotions
        ]
        parts.append("<h3>Promotion decisions</h3>")
        headers = ["round", "model", "decision", "metric", "open alerts", "reasons"]
        parts.append(table(headers, detail, "promotions"))
    else:
        parts.append('<p class="muted">No promotion decisions recorded.</p>')
    return section("lineage", "Model lineage", "".join(parts))


STYLE = """
:root { color-scheme: light; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1f2937;
  background: #f3f4f6; margin: 0; }
header { background: #111827; color: #f9fafb; padding: 18px 32px; }
header h1 { margin: 0; font-size: 20px; } header p { margin: 4px 0 0; color: #9ca3af; }
main { max-width: 1160px; margin: 0 auto; padding: 16px 24px 32px; }
section { background: #fff; border: 1px solid #e5e7eb; border-radius: 8px; padding: 14px 20px;
  margin: 16px 0; }
h2 { font-size: 17px; margin: 0 0 10px; } h3 { font-size: 14px; margin: 16px 0 6px; }
table { border-collapse: collapse; width: 100%; font-size: 13px; }
th, td { text-align: left; padding: 5px 8px; border-bottom: 1px solid #e5e7eb;
  vertical-align: top; }
thead th { background: #f9fafb; font-weight: 600; }
table.kv th { width: 170px; color: #4b5563; font-weight: 600; }
code { font: 12px ui-monospace, "SFMono-Regular", Menlo, monospace; }
code.full { word-break: break-all; }
.charts { display: flex; flex-wrap: wrap; gap: 12px; }
svg.chart { width: 540px; max-width: 100%; height: auto; background: #fff; }
.chart-title { font-size: 13px; font-weight: 600; fill: #111827; }
.tick, .axis-label, .legend { font-size: 11px; fill: #4b5563; }
.grid { stroke: #e5e7eb; } .axis { stroke: #9ca3af; }
.series { stroke-width: 2; stroke-linejoin: round; }
.hline { stroke: #7c3aed; stroke-dasharray: 6 3; } .hline-label { font-size: 11px; fill: #7c3aed; }
.alert-marker line { stroke: #dc2626; stroke-dasharray: 4 3; } .alert-marker path { fill: #dc2626; }
.badge { display: inline-block; padding: 0 7px; border-radius: 9px; font-size: 12px;
  background: #e5e7eb; }
.badge.ok, .status-finished { background: #dcfce7; color: #166534; }
.badge.bad, .status-failed { background: #fee2e2; color: #991b1b; }
.badge.warn, .status-stopped, .status-running { background: #fef3c7; color: #92400e; }
.ok { color: #166534; } .warn { color: #92400e; }
.verify-failed { color: #b91c1c; font-weight: 700; }
.muted { color: #6b7280; } .reasons { color: #6b7280; font-size: 12px; }
footer { color: #6b7280; font-size: 12px; text-align: center; padding-bottom: 24px; }
"""

CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"


def render(db: Database, run: RunData, verify_error: str | None, checked: int) -> str:
    """The whole page."""
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    body = "".join(
        [
            summary_section(run, db, verify_error, checked),
            accuracy_section(run),
            epsilon_section(run),
            site_section(run),
            drift_section(run),
            lineage_section(run),
        ]
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>fedcoord report: {esc(run.run_id)}</title><style>{STYLE}</style></head><body>"
        f"<header><h1>fedcoord run report</h1><p>{esc(run.started.get('name', '?'))} &middot; "
        f"{esc(run.run_id)}</p></header><main>{body}</main>"
        f"<footer>Generated from {esc(db.data_dir)} at {when} by fedcoord report.</footer>"
        "</body></html>\n"
    )


def build_report(run_dir: Path, run_id: str | None = None) -> Report:
    """Read ``run_dir``, check its ledger and render the page of one run."""
    db = open_run_dir(run_dir)
    try:
        entries, unreadable = read_entries(db)
        try:
            checked, error = db.verify_ledger(), None
        except (LedgerError, ValueError, TypeError, AttributeError) as exc:
            # besides LedgerError: a payload that is not JSON, or (in a ledger re-signed
            # with this directory's key) a digest that is not a digest
            checked, error = 0, str(exc)
        if unreadable:
            error = f"{error or 'ledger edited'}; unreadable entries skipped: {unreadable}"
        run = select_run(entries, run_id, run_dir)
        row = db.run(run.run_id)
        run.status = row.status if row else None
        return Report(render(db, run, error, checked), error)
    finally:
        db.close()


def write_report(run_dir: Path, out: Path | None = None, run_id: str | None = None) -> Path:
    """Write the HTML report of a run (default ``<run_dir>/report.html``); its path."""
    return _write(run_dir, out, run_id)[0]


def _write(run_dir: Path, out: Path | None, run_id: str | None) -> tuple[Path, Report]:
    check_run_dir(run_dir)
    target = out if out is not None else run_dir / "report.html"
    if target.is_dir():
        raise ConfigError("--out", f"{target} is a directory; give a file name")
    if not target.parent.is_dir():
        raise ConfigError("--out", f"directory {target.parent} does not exist")
    report = build_report(run_dir, run_id)
    target.write_text(report.html, encoding="utf-8")
    return target, report


def cmd_report(args: argparse.Namespace) -> int:
    path, report = _write(Path(args.dir), Path(args.out) if args.out else None, args.run)
    if report.verify_error:
        print(f"fedcoord: warning: ledger does not verify: {report.verify_error}", file=sys.stderr)
    print(f"report written to {path}")
    return 0


def add_report_command(sub: argparse._SubParsersAction) -> None:
    """``fedcoord report RUN_DIR [--out FILE] [--run RUN_ID]``."""
    p = sub.add_parser("report", help="write a self-contained HTML report of a run")
    p.add_argument("dir", metavar="RUN_DIR", help="a run directory or coordinator data directory")
    p.add_argument("--out", metavar="FILE", help="where to write (default RUN_DIR/report.html)")
    p.add_argument(
        "--run", metavar="RUN_ID", help="which run of a data directory (default: latest)"
    )
    p.set_defaults(func=cmd_report)
