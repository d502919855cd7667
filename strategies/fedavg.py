"""FedAvg (McMahan et al. 2017): the example-weighted mean of the sites' models."""

from __future__ import annotations

import numpy as np

from strategies.accumulator import WeightedDeltaMean
from strategies.base import Arrays, Strategy, add_delta


class FedAvg(Strategy):
    name = "fedavg"

    def apply(self, reference: Arrays, aggregator: WeightedDeltaMean) -> dict[str, np.ndarray]:
        return add_delta(reference, aggregator.mean())
