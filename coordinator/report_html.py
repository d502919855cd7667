"""HTML pieces of ``fedcoord report``: escaping, number formatting, tables and inline
SVG line charts (no scripts, no external resources)."""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


# small helpers -----------------------------------------------------------------------------
def esc(value: Any) -> str:
    """Any ledger value as escaped text."""
    return html.escape(str(value), quote=True)


def as_dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def number(value: Any) -> float | None:
    """A finite number, or None (ledger content may be anything)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    x = float(value)
    return x if math.isfinite(x) else None


def path_number(value: Any, *path: str) -> float | None:
    """``value[path[0]][path[1]]...`` when that is a finite number, else None."""
    for key in path:
        value = as_dict(value).get(key)
    return number(value)


def as_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def fmt(value: Any, digits: int = 4) -> str:
    """A number for a table cell; anything else escaped, absent values as a dash."""
    if value is None:
        return "&mdash;"
    if as_int(value) is not None:
        return str(value)
    x = number(value)
    if x is None:
        return esc(value)
    if x != 0 and not 1e-3 <= abs(x) < 1e5:
        return f"{x:.3e}"
    return f"{x:.{digits}f}"


def digest_html(value: Any) -> str:
    """A digest in its short 12-hex form, the full digest in the title."""
    if not isinstance(value, str) or not value:
        return "&mdash;"
    short = value.removeprefix("sha256:")[:12]
    return f'<code class="digest" title="{esc(value)}">{esc(short)}</code>'


def brief(value: Any) -> str:
    """A compact escaped rendering of a nested ledger value (alerts, reasons)."""
    if isinstance(value, dict):
        return ", ".join(f"{esc(k)}={brief(v)}" for k, v in value.items())
    if isinstance(value, list):
        return "; ".join(brief(v) for v in value)
    return fmt(value)


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], css: str = "") -> str:
    """An HTML table; cells are already escaped HTML."""
    head = "".join(f"<th>{h}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{css}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


# SVG line charts ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Series:
    """One line: ``(round, value)`` points; a None value breaks the line."""

    name: str
    points: list[tuple[int, float | None]]
    color: str


WIDTH, HEIGHT = 560, 260
LEFT, RIGHT, TOP, BOTTOM = 58, 18, 52, 40
INSET = 10
"""Gap between the y axis (and the right edge) and the first (last) round."""


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values covering ``[lo, hi]``."""
    if hi - lo < 1e-12:
        pad = abs(lo) * 0.1 or 0.5
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / (count - 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.floor(lo / step + 1e-9)
    last = math.ceil(hi / step - 1e-9)
    return [i * step for i in range(first, last + 1)]


def _tick_label(value: float, step: float) -> str:
    decimals = max(0, -math.floor(math.log10(step)))
    if abs(round(step * 10**decimals) - step * 10**decimals) > 1e-6:
        decimals += 1
    return f"{value:.{decimals}f}"


def line_chart(
    chart_id: str,
    title: str,
    series: Sequence[Series],
    markers: Mapping[int, str] | None = None,
    hlines: Sequence[tuple[float, str]] = (),
) -> str:
    """An inline SVG line chart over rounds, with dashed markers at ``markers`` rounds
    (their text as tooltip) and labelled horizontal reference lines."""
    values = [v for s in series for _, v in s.points if v is not None]
    rounds = sorted({r for s in series for r, v in s.points if v is not None})
    if not values:
        return f'<p class="muted">{esc(title)}: nothing to plot.</p>'
    extent = [*values, *(y for y, _ in hlines)]
    if not math.isfinite(max(extent) - min(extent)):  # near the float range: an edited ledger
        return f'<p class="muted">{esc(title)}: values out of plotting range.</p>'
    ticks = nice_ticks(min(extent), max(extent))
    lo, hi, step = ticks[0], ticks[-1], ticks[1] - ticks[0]
    r0, r1 = rounds[0], rounds[-1]
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def x(r: float) -> float:
        span = plot_w - 2 * INSET
        return LEFT + INSET + span * (0.5 if r1 == r0 else (r - r0) / (r1 - r0))

    def y(v: float) -> float:
        return TOP + plot_h * (1 - (v - lo) / (hi - lo))

    out = [
        f'<svg id="{chart_id}" class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
        f'aria-label="{esc(title)}">',
        f'<text class="chart-title" x="{LEFT}" y="16">{esc(title)}</text>',
    ]
    for t in ticks:
        out.append(
            f'<line class="grid" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y(t):.1f}" y2="{y(t):.1f}"/>'
            f'<text class="tick" x="{LEFT - 6}" y="{y(t) + 4:.1f}" text-anchor="end">'
            f"{_tick_label(t, step)}</text>"
        )
    every = max(1, math.ceil(len(rounds) / 12))
    for i, r in enumerate(rounds):
        if i % every == 0 or r == r1:
            out.append(
                f'<text class="tick" x="{x(r):.1f}" y="{HEIGHT - BOTTOM + 16}" '
                f'text-anchor="middle">{r}</text>'
            )
    out.append(
        f'<text class="axis-label" x="{LEFT + plot_w / 2:.1f}" y="{HEIGHT - 6}" '
        'text-anchor="middle">round</text>'
        f'<line class="axis" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{TOP + plot_h}" '
        f'y2="{TOP + plot_h}"/>'
    )
    for value, label in hlines:
        out.append(
            f'<line class="hline" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y(value):.1f}" '
            f'y2="{y(value):.1f}"><title>{esc(label)}</title></line>'
            f'<text class="hline-label" x="{WIDTH - RIGHT - 4}" y="{y(value) - 4:.1f}" '
            f'text-anchor="end">{esc(label)}</text>'
        )
    for r, text in sorted((markers or {}).items()):
        if r0 <= r <= r1:
            out.append(
                f'<g class="alert-marker" data-round="{r}"><title>{esc(text)}</title>'
                f'<line x1="{x(r):.1f}" x2="{x(r):.1f}" y1="{TOP}" y2="{TOP + plot_h}"/>'
                f'<path d="M{x(r) - 5:.1f},{TOP - 8} h10 l-5,7 z"/></g>'
            )
    for s in series:
        segment: list[str] = []
        segments: list[list[str]] = []
        for r, v in s.points:
            if v is None:
                segments.append(segment)
                segment = []
            else:
                segment.append(f"{x(r):.1f},{y(v):.1f}")
        segments.append(segment)
        for seg in filter(None, segments):
            out.append(
                f'<polyline class="series" data-series="{esc(s.name)}" fill="none" '
                f'stroke="{s.color}" points="{" ".join(seg)}"/>'
            )
        for r, v in s.points:
            if v is not None:
                out.append(
                    f'<circle cx="{x(r):.1f}" cy="{y(v):.1f}" r="3" fill="{s.color}">'
                    f"<title>round {r}: {esc(s.name)} = {fmt(v)}</title></circle>"
                )
    legend_x = LEFT
    for s in series:  # one line under the title, left to right
        out.append(
            f'<line x1="{legend_x}" x2="{legend_x + 16}" y1="31" y2="31" stroke="{s.color}" '
            f'stroke-width="3"/><text class="legend" x="{legend_x + 20}" y="35">'
            f"{esc(s.name)}</text>"
        )
        legend_x += 36 + 6 * len(s.name)
    out.append("</svg>")
    return "".join(out)
