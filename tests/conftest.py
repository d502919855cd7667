"""Shared helpers: free ports, real fedcoord processes, polling."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(
    predicate: Callable[[], object],
    timeout: float,
    what: str,
    detail: Callable[[], str] | None = None,
) -> object:
    """``predicate()`` once it is truthy; on timeout fail, adding ``detail()`` if given."""
    end = time.time() + timeout
    while time.time() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(
        f"timed out after {timeout}s waiting for {what}{detail() if detail else ''}"
    )


def fedcoord(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run the ``fedcoord`` command (``python -m simulations.cli``) to its end, output captured."""
    return subprocess.run(
        [sys.executable, "-m", "simulations.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def ledger_entries(data_dir: Path) -> list[dict]:
    """``fedcoord ledger export DIR``, parsed."""
    done = fedcoord("ledger", "export", str(data_dir), timeout=60)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def rounds_committed(data_dir: Path) -> list[dict]:
    """The payloads of the ``round_committed`` ledger entries of ``data_dir``."""
    return [e["payload"] for e in ledger_entries(data_dir) if e["kind"] == "round_committed"]


class Processes:
    """Starts ``python -m simulations.cli ...`` processes; kills leftovers at teardown."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(
        self, name: str, *args: str, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        log = open(self.tmp / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(
            [sys.executable, "-m", "simulations.cli", *args],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
        proc.log_path = self.tmp / f"{name}.log"  # type: ignore[attr-defined]
        self.procs.append(proc)
        return proc

    def log(self, proc: subprocess.Popen[bytes]) -> str:
        return Path(proc.log_path).read_text(errors="replace")  # type: ignore[attr-defined]

    def wait_for_log(
        self, proc: subprocess.Popen[bytes], text: str, what: str, timeout: float = 90
    ) -> None:
        """Wait until ``text`` is in the log of ``proc``; fail at once when ``proc`` ends
        first, and show the log's tail either way (start-up on a loaded CI machine is the
        slow part, hence the generous default)."""

        def tail() -> str:
            return "\n" + self.log(proc)[-3000:]

        def seen() -> bool:
            exited = proc.poll() is not None  # before reading: its last line is in the log
            if text in self.log(proc):
                return True
            if exited:
                raise AssertionError(f"{what}: exited {proc.returncode}{tail()}")
            return False

        wait_for(seen, timeout, what, detail=tail)

    def stop_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
                p.wait(timeout=10)


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    procs = Processes(tmp_path)
    yield procs
    procs.stop_all()
