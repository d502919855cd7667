"""`fedcoord report RUN_DIR`: a real run's HTML report, rendered by a real headless Chromium."""

from __future__ import annotations

import json
import shutil
import sqlite3
import struct
import subprocess
import zlib
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from coordinator.errors import ConfigError
from coordinator.report import write_report
from coordinator.state import Database
from protos.codec import digest_arrays
from simulations.cli import main
from tests.conftest import fedcoord

CHROMIUM = Path("/usr/bin/chromium")
SECTIONS = ("summary", "accuracy-loss", "epsilon", "site-metrics", "drift", "lineage")
HOSTILE = '<script>alert("x")</script>'


# Chromium -------------------------------------------------------------------------------
def chromium(*args: str, profile: Path) -> subprocess.CompletedProcess[str]:
    """Headless Chromium with networking extras off and a fresh profile."""
    if not CHROMIUM.is_file():
        pytest.fail(f"{CHROMIUM} is missing: run `make dev` (installs Debian's chromium)")
    flags = [
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={profile}",
    ]  # fmt: skip
    return subprocess.run(
        [str(CHROMIUM), *flags, *args], capture_output=True, text=True, timeout=60, check=True
    )


def rendered_dom(page: Path, tmp: Path) -> str:
    profile = tmp / f"profile-dom-{page.stem}"
    return chromium("--dump-dom", page.resolve().as_uri(), profile=profile).stdout


def screenshot(page: Path, png: Path, tmp: Path) -> None:
    args = (f"--screenshot={png}", "--window-size=1200,3000", page.resolve().as_uri())
    chromium(*args, profile=tmp / "profile-shot")


class Dom(HTMLParser):
    """Ids, each SVG polyline (its chart and point count) and each section's text."""

    def __init__(self, text: str):
        super().__init__()
        self.ids: set[str] = set()
        self.tags: set[str] = set()
        self.lines: list[tuple[str, str, int]] = []
        self.text: dict[str, str] = {}
        self._svg = ""
        self._section = ""
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.tags.add(tag)
        if a.get("id"):
            self.ids.add(a["id"] or "")
        if tag == "section":
            self._section = a.get("id") or ""
        if tag == "svg":
            self._svg = a.get("id") or ""
        if tag == "polyline":
            points = (a.get("points") or "").split()
            self.lines.append((self._svg, a.get("data-series") or "", len(points)))

    def handle_data(self, data: str) -> None:
        if self._section:
            self.text[self._section] = self.text.get(self._section, "") + data


def unfilter(kind: int, line: bytes, prev: np.ndarray, bpp: int) -> np.ndarray:
    """One PNG scanline with its filter (0 none, 1 sub, 2 up, 3 average, 4 Paeth) undone."""
    f = np.frombuffer(line, np.uint8)
    if kind == 0:
        return f.copy()
    if kind == 1:
        return (np.cumsum(f.reshape(-1, bpp), axis=0) % 256).astype(np.uint8).ravel()
    if kind == 2:
        return f + prev
    out, up = bytearray(line), prev.tolist()
    for i in range(len(out)):
        left = out[i - bpp] if i >= bpp else 0
        corner = up[i - bpp] if i >= bpp else 0
        if kind == 3:
            guess = (left + up[i]) // 2
        else:
            p = left + up[i] - corner
            pa, pb, pc = abs(p - left), abs(p - up[i]), abs(p - corner)
            guess = left if pa <= pb and pa <= pc else up[i] if pb <= pc else corner
        out[i] = (out[i] + guess) & 255
    return np.frombuffer(bytes(out), np.uint8)


def png_pixels(path: Path, rows: int) -> np.ndarray:
    """The first ``rows`` rows of an 8-bit RGB(A) PNG as a (rows, width, channels) array."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat = 8, b""
    while pos < len(data):
        (n,), kind = struct.unpack(">I", data[pos : pos + 4]), data[pos + 4 : pos + 8]
        if kind == b"IHDR":
            width, height, depth, colour = struct.unpack(">IIBB", data[pos + 8 : pos + 18])
        elif kind == b"IDAT":
            idat += data[pos + 8 : pos + 8 + n]
        pos += 12 + n
    assert depth == 8 and colour in (2, 6)
    bpp = 3 if colour == 2 else 4
    raw, stride = zlib.decompress(idat), width * bpp + 1
    lines = [np.zeros(width * bpp, np.uint8)]
    for y in range(min(rows, height)):
        scan = raw[y * stride + 1 : (y + 1) * stride]
        lines.append(unfilter(raw[y * stride], scan, lines[-1], bpp))
    return np.stack(lines[1:]).reshape(-1, width, bpp)


# a real run -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("report") / "run"
    done = fedcoord(
        "simulate", "examples/digits.yaml", "--out", str(out), "--set", "rounds=4",
        "--set", "federation.sites=4", "--set", "training.local_epochs=1",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return out


@pytest.mark.slow
def test_report_of_a_real_run_renders_in_chromium(run_dir: Path, tmp_path: Path) -> None:
    done = fedcoord("report", str(run_dir), timeout=60)
    assert done.returncode == 0, done.stderr
    page = run_dir / "report.html"
    assert done.stdout.strip() == f"report written to {page}"
    source = page.read_text()
    assert "http://" not in source and "https://" not in source and "<script" not in source

    dom = Dom(rendered_dom(page, tmp_path))
    assert set(SECTIONS) <= dom.ids
    summary = json.loads((run_dir / "summary.json").read_text())
    text = dom.text["summary"]
    for expected in (summary["run_id"], summary["final_model"], summary["ledger_head"]):
        assert expected in text
    assert "verified" in text and "DOES NOT VERIFY" not in text
    assert "No differential privacy in this run" in dom.text["epsilon"]
    lines = {(svg, series): n for svg, series, n in dom.lines}
    assert lines[("chart-accuracy", "accuracy")] == 4 and lines[("chart-loss", "loss")] == 4
    assert lines[("chart-sites", "worst-site accuracy")] == 4  # the lead's site_evaluation
    assert all(f"site-00{i}" in dom.text["site-metrics"] for i in range(4))
    assert summary["final_model"].removeprefix("sha256:")[:12] in dom.text["lineage"]

    png = tmp_path / "report.png"
    screenshot(page, png, tmp_path)
    assert png.stat().st_size > 20_000
    top = png_pixels(png, 700)
    assert top[20, 600].max() < 60  # the dark header band
    assert top[300, 5].min() > 200  # the light page background
    colours = {tuple(p) for p in top[::7, ::7].reshape(-1, top.shape[2])}
    assert len(colours) > 20  # text, lines and charts, not one flat colour


@pytest.mark.slow
def test_report_of_a_tampered_ledger_says_it_does_not_verify(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    copy = tmp_path / "tampered"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("report.html"))
    with sqlite3.connect(copy / "ledger.db") as conn:
        seq, text = conn.execute(
            "SELECT seq, payload FROM ledger WHERE kind='round_committed' ORDER BY seq LIMIT 1"
        ).fetchone()
        at = text.index('"accuracy":') + len('"accuracy":')
        edited = text[:at] + ("1" if text[at] == "0" else "0") + text[at + 1 :]  # one byte
        conn.execute("UPDATE ledger SET payload=? WHERE seq=?", (edited, seq))
    assert main(["report", str(copy), "--out", str(tmp_path / "t.html")]) == 0
    assert "ledger does not verify" in capsys.readouterr().err
    dom = Dom(rendered_dom(tmp_path / "t.html", tmp_path))
    assert f"DOES NOT VERIFY: ledger entry {seq} (round_committed)" in dom.text["summary"]
    assert "entry edited" in dom.text["summary"]


# a hand-written ledger ------------------------------------------------------------------
def model(db: Database, value: float) -> str:
    arrays = {"w": np.full(3, value, np.float32)}
    digest = digest_arrays(arrays)
    db.models.put(arrays, digest)
    return digest


def write_run(db: Database, run_id: str, rounds: int, site: str = "site-a") -> None:
    """A run with every kind of entry the report shows, ``site`` as a site id."""
    first = model(db, 0.0)
    db.append_ledger("run_started", {
        "run_id": run_id, "name": f"name {site}", "config_digest": "sha256:" + "c" * 64,
        "initial_model": first, "dp": None,
        "experiment": {"rounds": rounds, "strategy": {"name": "fedavg"},
                       "task": {"name": "digits", "model": "mlp"}},
    })  # fmt: skip
    previous = first
    for r in range(1, rounds + 1):
        out = model(db, float(r))
        evaluation = {
            "sites": {site: {"loss": 0.9, "accuracy": 0.5, "num_examples": 10},
                      "site-b": {"loss": 0.3, "accuracy": 0.9, "num_examples": 20}},
            "worst": {"site": site, "accuracy": 0.5}, "mean_accuracy": 0.7, "spread": 0.4,
        }  # fmt: skip
        db.append_ledger("round_committed", {
            "run_id": run_id, "round": r, "input_model": previous, "output_model": out,
            "sampled": [site, "site-b", "site-c"], "participants": [site, "site-b"],
            "dropped": [{"site": "site-c", "reason": site}], "rejected": [],
            "metrics": {"accuracy": 0.5 + r / 20, "loss": 1 / r, "epsilon": 0.5 * r},
            "dp": {"mode": "central", "accountant": "rdp", "epsilon": 0.5 * r, "delta": 1e-5},
            "local_dp": None, "secure_aggregation": {"mode": "off"},
            "site_evaluation": None if r == 2 else evaluation,
        })  # fmt: skip
        previous = out
    db.append_ledger("drift_alert", {
        "run_id": run_id, "round": 2, "check": site, "scope": "cross_site", "site_id": site,
        "value": 9.0, "baseline": 1.0, "threshold": 6.0, "message": f"norm of {site} jumped",
    })  # fmt: skip
    db.append_ledger("promotion_refused", {
        "run_id": run_id, "round": rounds, "model": previous, "metric": "accuracy",
        "value": 0.8, "threshold": 0.9, "by": site, "open_alerts": [7],
        "reasons": [f"drift alert open for {site}"],
    })  # fmt: skip
    db.append_ledger("run_finished", {
        "run_id": run_id, "status": "finished", "error": None, "stop_reason": None,
        "rounds_completed": rounds, "final_model": previous,
    })  # fmt: skip


def test_hostile_ledger_strings_are_escaped(tmp_path: Path) -> None:
    db = Database(tmp_path)
    write_run(db, "run-1", 3, site=HOSTILE)
    db.close()
    source = write_report(tmp_path).read_text()
    assert "<script" not in source.lower() and "&lt;script&gt;" in source
    dom = Dom(source)
    assert set(SECTIONS) <= dom.ids and {"script", "img"}.isdisjoint(dom.tags)
    assert HOSTILE in dom.text["site-metrics"] and HOSTILE in dom.text["drift"]
    assert "verified" in dom.text["summary"]
    lines = {(svg, series): n for svg, series, n in dom.lines}
    assert lines[("chart-epsilon", "epsilon")] == 3
    # round 2's evaluation is withheld: the worst-site line breaks there
    assert [n for svg, s, n in dom.lines if s == "worst-site accuracy"] == [1, 1]
    assert "promotion refused" in dom.text["lineage"]


def test_latest_or_named_run_of_a_data_dir_and_one_line_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = Database(tmp_path)
    write_run(db, "run-old", 2)
    write_run(db, "run-new", 3)
    db.close()
    assert "run-new" in Dom(write_report(tmp_path).read_text()).text["summary"]
    picked = write_report(tmp_path, tmp_path / "old.html", run_id="run-old").read_text()
    assert "run-old" in Dom(picked).text["summary"]

    assert main(["report", str(tmp_path), "--run", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--run: no run 'nope'" in err
    with pytest.raises(ConfigError, match=r"^DIR: .* not a fedcoord data directory"):
        write_report(tmp_path / "missing")
    assert not (tmp_path / "missing").exists()


def test_unreadable_entry_is_reported_not_fatal(tmp_path: Path) -> None:
    db = Database(tmp_path)
    write_run(db, "run-1", 2)
    db.close()
    with sqlite3.connect(tmp_path / "ledger.db") as conn:
        conn.execute("UPDATE ledger SET payload='{not json' WHERE kind='drift_alert'")
    text = Dom(write_report(tmp_path).read_text()).text["summary"]
    assert "DOES NOT VERIFY" in text and "unreadable entries skipped" in text
