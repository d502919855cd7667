"""Fixtures of the integration tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from coordinator.server import Coordinator


@pytest.fixture
def coordinator(tmp_path: Path) -> Iterator[Coordinator]:
    """A real coordinator on 127.0.0.1 (open enrollment, no engine thread: tests call
    ``engine.execute``), stopped after the test."""
    c = Coordinator(tmp_path / "coord", "127.0.0.1:0", open_enrollment=True)
    c.start(run_engine=False)
    yield c
    c.stop(grace=0.5)
