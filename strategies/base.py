"""The strategy interface: how a round's validated updates become the next global model.

A round opens an aggregator over the current global model, folds accepted updates
into it one by one (streaming), and the strategy turns the aggregate into the next
model with its server-side rule. :meth:`Strategy.state` / :meth:`Strategy.load_state`
expose server state (e.g. momentum) for persistence; FedAvg keeps none, and the round
engine does not persist strategy state yet (it comes with the first stateful strategy).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping

import numpy as np

from strategies.accumulator import WeightedDeltaMean

Arrays = Mapping[str, np.ndarray]


class Strategy(ABC):
    """Base class of aggregation strategies."""

    name: str = "strategy"

    def aggregator(self, reference: Arrays) -> WeightedDeltaMean:
        """A fresh streaming aggregator for one round over the global model ``reference``."""
        return WeightedDeltaMean(reference)

    @abstractmethod
    def apply(self, reference: Arrays, aggregator: WeightedDeltaMean) -> dict[str, np.ndarray]:
        """The next global model from the round's aggregate."""

    def state(self) -> dict[str, np.ndarray]:
        """Arrays to persist with the committed round (none by default)."""
        return {}

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore what :meth:`state` returned (after a restart)."""
        if state:
            raise ValueError(f"{self.name} keeps no state but got {sorted(state)[:3]}")


def add_delta(reference: Arrays, delta: Arrays) -> dict[str, np.ndarray]:
    """``reference + delta`` tensor by tensor, keeping each tensor's dtype."""
    return {k: (v + delta[k]).astype(v.dtype, copy=False) for k, v in reference.items()}
