"""Site clients for integration tests, loadable with ``fedcoord site --client``, and
helpers to run them against an in-process coordinator.

The clients wrap the real digits task client or return known updates; behaviour is
steered through environment variables because ``--client`` takes no arguments.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from client_sdk import Client, EvaluateResult, FitResult, run_site
from client_sdk.api import Arrays, Config
from coordinator.tasks import load_task
from strategies.scaffold import CONTROL, DELTA_CONTROL


def start_site_threads(address: str, clients: Mapping[str, Client], stop: threading.Event) -> None:
    """Run each client as a site (real gRPC to ``address``) on its own thread until ``stop``."""
    for name, client in clients.items():
        threading.Thread(
            target=run_site,
            args=(client, address, name),
            kwargs={"insecure": True, "stop": stop, "poll_wait_s": 1},
            daemon=True,
        ).start()


def run(coordinator: Any, sites: Mapping[str, Client], text: str) -> Any:
    """Submit experiment ``text`` to an in-process coordinator and execute it with
    ``sites`` running on their own threads; the finished run's row."""
    stop = threading.Event()
    start_site_threads(coordinator.address, sites, stop)
    try:
        row = coordinator.engine.submit(text)
        return coordinator.engine.execute(row.run_id)
    finally:
        stop.set()


def ledger_payloads(coordinator: Any, kind: str) -> list[dict]:
    """The payloads of ``coordinator``'s ledger entries of ``kind``, in order."""
    return [e.payload for e in coordinator.db.ledger_entries() if e.kind == kind]


class SlowSite(Client):
    """A digits site whose fit sleeps ``FEDCOORD_TEST_FIT_S`` seconds after training and
    touches ``FEDCOORD_TEST_MARKER`` (if set) when a fit starts."""

    def __init__(self, index: int, num_sites: int):
        task = load_task("digits", None, {}, 0)
        self.inner = task.make_client(index, num_sites, {"kind": "iid"}, 0)
        self.delay = float(os.environ.get("FEDCOORD_TEST_FIT_S", "0"))
        self.marker = os.environ.get("FEDCOORD_TEST_MARKER")

    def fit(self, arrays: Arrays, config: Config) -> FitResult:
        if self.marker:
            Path(self.marker).write_text(str(config.get("round")))
        result = self.inner.fit(arrays, config)
        time.sleep(self.delay)
        return result

    def evaluate(self, arrays: Arrays, config: Config) -> EvaluateResult:
        return self.inner.evaluate(arrays, config)


def slow_site() -> SlowSite:
    i, n = (int(x) for x in os.environ["FEDCOORD_TEST_PARTITION"].split("/"))
    return SlowSite(i - 1, n)


class HostileSite(Client):
    """Returns a poisoned update: ``kind`` is ``nan`` or ``shape``."""

    def __init__(self, kind: str):
        self.kind = kind

    def fit(self, arrays: Arrays, config: Config) -> FitResult:
        out = {k: np.array(v, copy=True) for k, v in arrays.items() if not k.startswith(CONTROL)}
        for k, v in arrays.items():  # answer SCAFFOLD's control variates as its sites do
            if k.startswith(CONTROL):
                out[DELTA_CONTROL + k.removeprefix(CONTROL)] = np.zeros_like(v)
        name = sorted(k for k, v in out.items() if v.dtype.kind == "f")[0]
        if self.kind == "nan":
            out[name].reshape(-1)[0] = np.nan
        else:
            out[name] = np.zeros((*out[name].shape, 2), dtype=out[name].dtype)
        return FitResult(out, num_examples=100, metrics={"loss": 0.0})

    def evaluate(self, arrays: Arrays, config: Config) -> EvaluateResult:
        return EvaluateResult(loss=0.0, num_examples=1)


class ShiftSite(Client):
    """Returns the global model plus a fixed, seeded delta (``scale`` times a standard
    normal per float tensor) with ``num_examples`` examples; raises in
    :meth:`before_stage` at ``drop_at`` (a secure-aggregation stage), like a site that
    vanishes there."""

    def __init__(self, seed: int, num_examples: int, scale: float = 0.01, drop_at: str = ""):
        self.seed = seed
        self.num_examples = num_examples
        self.scale = scale
        self.drop_at = drop_at

    def delta(self, arrays: Arrays) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(self.seed)
        return {
            k: (self.scale * rng.standard_normal(v.shape)).astype(v.dtype)
            for k, v in sorted(arrays.items())
            if v.dtype.kind == "f"
        }

    def fit(self, arrays: Arrays, config: Config) -> FitResult:
        delta = self.delta(arrays)
        out = {k: (v + delta[k]).astype(v.dtype) if k in delta else v for k, v in arrays.items()}
        return FitResult(out, num_examples=self.num_examples, metrics={"loss": 1.0})

    def evaluate(self, arrays: Arrays, config: Config) -> EvaluateResult:
        return EvaluateResult(loss=0.0, num_examples=1)

    def before_stage(self, stage: str, config: Config) -> None:
        if stage == self.drop_at:
            raise RuntimeError(f"vanished at {stage}")
