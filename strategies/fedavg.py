"""FedAvg (McMahan et al. 2017): the example-weighted mean of the sites' models."""

from __future__ import annotations

import numpy as np

from strategies.accumulator import WeightedDeltaMean
from strategies.base import Arrays, Strategy, add_delta


class FedAvg(Strategy):
    """Streams updates into one weighted mean; O(model) memory for any number of sites."""

    supports_dp = True
    supports_secagg = True

    name = "fedavg"

    def aggregator(self, reference: Arrays, expected: int) -> WeightedDeltaMean:
        return WeightedDeltaMean(reference)

    def apply(self, model: Arrays, aggregator: WeightedDeltaMean) -> dict[str, np.ndarray]:  # type: ignore[override]
        return add_delta(model, aggregator.mean())
