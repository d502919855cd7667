"""Helpers shared by the benchmarks: machine description, timing, tables and result files.

A benchmark times fedcoord and a reference implementation on the same inputs in one
process with :func:`best_of`, prints :func:`text_table`, and records its run with
:func:`write_json` (``benchmarks/results/<name>.json``, git-ignored) and
:func:`write_section` (its own section of ``benchmarks/RESULTS.md``, other sections kept).
"""

from __future__ import annotations

import gc
import json
import os
import platform
import re
import statistics
import time
import tracemalloc
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
"""Default directory of the JSON results (git-ignored)."""
RESULTS_MD = BENCH_DIR / "RESULTS.md"
"""Default Markdown summary, one section per benchmark."""

RESULTS_MD_HEADER = (
    "# Benchmark results\n\n"
    "Written by `make bench` (each `python -m benchmarks.<name>` rewrites its own section;\n"
    "the full numbers are in `benchmarks/results/<name>.json`). Numbers are from one run on\n"
    "the machine named in each section; compare ratios, not absolute times, across machines.\n"
)

PACKAGES = ("numpy", "scipy", "torch", "flwr")
"""Packages whose versions a machine description records."""


@dataclass(frozen=True)
class Machine:
    """Where a benchmark ran."""

    cpu: str
    cores: int
    ram_gib: float
    python: str
    packages: dict[str, str]

    def line(self) -> str:
        """One line for a results table, e.g. ``AMD EPYC, 2 cores, 23.4 GiB RAM; ...``."""
        versions = ", ".join(f"{name} {version}" for name, version in self.packages.items())
        return (
            f"{self.cpu}, {self.cores} cores, {self.ram_gib:.1f} GiB RAM; "
            f"Python {self.python}, {versions}"
        )

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


def describe_machine(packages: Sequence[str] = PACKAGES) -> Machine:
    """CPU model, cores, RAM and package versions of this machine (Linux ``/proc``)."""
    return Machine(
        cpu=_cpu_model(),
        cores=os.cpu_count() or 1,
        ram_gib=_ram_bytes() / 2**30,
        python=platform.python_version(),
        packages={name: _version(name) for name in packages},
    )


def _cpu_model() -> str:
    """The ``model name`` of ``/proc/cpuinfo`` (or what :mod:`platform` knows)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    match = re.search(r"^model name\s*:\s*(.+)$", text, flags=re.MULTILINE)
    if match:
        return match.group(1).strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def _ram_bytes() -> int:
    """``MemTotal`` of ``/proc/meminfo`` in bytes (0 when unknown)."""
    try:
        text = Path("/proc/meminfo").read_text()
    except OSError:
        return 0
    match = re.search(r"^MemTotal:\s*(\d+)\s*kB", text, flags=re.MULTILINE)
    return int(match.group(1)) * 1024 if match else 0


def _version(package: str) -> str:
    """The installed version of ``package`` without importing it."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


@dataclass(frozen=True)
class Timing:
    """Wall-clock seconds of the timed runs of one function."""

    runs: tuple[float, ...]

    @property
    def best(self) -> float:
        """The fastest run (the least disturbed by other work on the machine)."""
        return min(self.runs)

    @property
    def median(self) -> float:
        """The median run."""
        return statistics.median(self.runs)


def best_of(fn: Callable[[], T], repeats: int = 3, warmup: int = 1) -> tuple[Timing, T]:
    """Run ``fn`` ``warmup`` times untimed, then ``repeats`` times timed.

    Garbage is collected before every run, and the previous run's result is dropped
    before the next starts, so runs do not pay for each other's memory.

    Returns
    -------
    tuple
        The :class:`Timing` and the result of the last run.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    for _ in range(warmup):
        gc.collect()
        fn()
    runs: list[float] = []
    last: list[T] = []
    for _ in range(repeats):
        last.clear()
        gc.collect()
        start = time.perf_counter()
        value = fn()
        runs.append(time.perf_counter() - start)
        last.append(value)
        del value
    return Timing(tuple(runs)), last[0]


def peak_allocated(fn: Callable[[], object]) -> int:
    """Peak bytes ``fn`` allocates beyond what exists when it starts (NumPy reports its
    buffers to :mod:`tracemalloc`); the result of ``fn`` is dropped before returning."""
    gc.collect()
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def text_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain-text table with aligned columns (for stdout)."""
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-flavoured Markdown table."""
    lines = [
        "| " + " | ".join(str(h) for h in headers) + " |",
        "|" + "|".join("---" for _ in headers) + "|",
    ]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def utc_now() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return datetime.now(UTC).replace(microsecond=0).isoformat()


def write_json(name: str, payload: dict[str, Any], out_dir: Path = RESULTS_DIR) -> Path:
    """Write ``payload`` to ``out_dir/<name>.json`` (directory created) and return the path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    return path


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- benchmark:{name} -->", f"<!-- /benchmark:{name} -->"


def write_section(name: str, body: str, path: Path = RESULTS_MD) -> None:
    """(Re)write benchmark ``name``'s section of the Markdown file at ``path``.

    A section is everything between ``<!-- benchmark:NAME -->`` and
    ``<!-- /benchmark:NAME -->``; other sections and text are kept byte for byte. A new
    section is appended (the file is created with a short header when missing).
    """
    begin, end = _markers(name)
    section = f"{begin}\n{body.strip()}\n{end}"
    text = path.read_text() if path.exists() else RESULTS_MD_HEADER
    start = text.find(begin)
    if start >= 0:
        stop = text.find(end, start)
        if stop < 0:
            raise ValueError(f"{path}: section {name!r} opens but never closes ({end})")
        text = text[:start] + section + text[stop + len(end) :]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def read_section(name: str, path: Path = RESULTS_MD) -> str | None:
    """The body of benchmark ``name``'s section, or ``None`` when it has none."""
    if not path.exists():
        return None
    begin, end = _markers(name)
    text = path.read_text()
    start = text.find(begin)
    stop = text.find(end, start)
    if start < 0 or stop < 0:
        return None
    return text[start + len(begin) : stop].strip()


@dataclass
class SimulationRun:
    """What one benchmarked ``fedcoord simulate`` left: its summary, the payloads of its
    ``round_committed`` ledger entries and its wall time."""

    summary: dict[str, Any]
    rounds: list[dict[str, Any]]
    wall_s: float


def run_simulation(
    exp: Any, what: str, listeners: Sequence[Callable[[Any], None]] = ()
) -> SimulationRun:
    """Run ``exp`` (an :class:`coordinator.experiment.Experiment`) through
    :func:`simulations.local.simulate` in a temporary folder, quietly; raises
    RuntimeError (naming ``what``) when the run does not finish."""
    import io
    import tempfile

    from coordinator.state import Database
    from simulations.local import simulate

    with tempfile.TemporaryDirectory(prefix="fedcoord-bench-") as tmp:
        out = Path(tmp) / "run"
        t0 = time.perf_counter()
        summary = simulate(exp, out, stream=io.StringIO(), listeners=listeners)
        wall = time.perf_counter() - t0
        if summary.get("status") != "finished":
            raise RuntimeError(f"{what}: run did not finish: {summary}")
        db = Database(out)
        try:
            rounds = [e.payload for e in db.ledger_entries() if e.kind == "round_committed"]
        finally:
            db.close()
    return SimulationRun(summary, rounds, wall)
