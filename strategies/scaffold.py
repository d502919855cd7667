"""SCAFFOLD (Karimireddy et al. 2020): control variates correct client drift.

The server keeps a control variate ``c`` per float tensor and sends it with the model
as ``scaffold.c/<tensor>``; each site corrects its gradients by ``c - c_i`` and returns
its model plus ``scaffold.delta_c/<tensor>`` (see ``client_sdk.torch``). The server
then moves ``x <- x + server_lr * mean(y_i - x)`` and
``c <- c + (|S| / N) * mean(delta c_i)``, with ``|S|`` the sites aggregated and ``N``
the sites online. Means are example-weighted like FedAvg's (the paper averages
unweighted); both stream in O(model) memory.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from strategies.accumulator import WeightedDeltaMean
from strategies.base import Arrays, Strategy, add_delta

CONTROL = "scaffold.c/"
DELTA_CONTROL = "scaffold.delta_c/"


class ScaffoldParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    server_lr: Annotated[float, Field(gt=0)] = 1.0


class Scaffold(Strategy):
    name = "scaffold"
    Params = ScaffoldParams
    supports_secagg = True

    def __init__(self, params: BaseModel | None = None):
        super().__init__(params)
        self.control: dict[str, np.ndarray] = {}
        self.population = 0

    def _controls(self, model: Arrays) -> dict[str, np.ndarray]:
        """The server variates, created as zeros for the model's float tensors."""
        if not self.control:
            self.control = {k: np.zeros_like(v) for k, v in model.items() if v.dtype.kind == "f"}
        return self.control

    def begin_round(self, round_no: int, population: int) -> None:
        self.population = population

    def task_arrays(self, model: Arrays) -> Arrays:
        return {**model, **{CONTROL + k: c for k, c in self._controls(model).items()}}

    def update_reference(self, model: Arrays) -> Arrays:
        zeros = {DELTA_CONTROL + k: np.zeros_like(c) for k, c in self._controls(model).items()}
        return {**model, **zeros}

    def aggregator(self, reference: Arrays, expected: int) -> WeightedDeltaMean:
        return WeightedDeltaMean(reference)

    def apply(self, model: Arrays, aggregator: WeightedDeltaMean) -> dict[str, np.ndarray]:  # type: ignore[override]
        mean = aggregator.mean()
        lr = self.params.server_lr  # type: ignore[attr-defined]
        step = {k: mean[k] * lr if v.dtype.kind == "f" else mean[k] for k, v in model.items()}
        share = aggregator.count / max(self.population, aggregator.count)
        for k, c in self._controls(model).items():
            c += (mean[DELTA_CONTROL + k] * share).astype(c.dtype, copy=False)
        return add_delta(model, step)

    def state(self) -> dict[str, np.ndarray]:
        return dict(self.control)

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        self.control = {k: np.array(v, copy=True) for k, v in state.items()}
