"""Site clients for integration tests, loadable with ``fedcoord site --client``.

They wrap the real digits task client; behaviour is steered through environment
variables because ``--client`` takes no arguments.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from client_sdk import Client, EvaluateResult, FitResult
from client_sdk.api import Arrays, Config
from coordinator.tasks import load_task
from strategies.scaffold import CONTROL, DELTA_CONTROL


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
