"""The strategy interface: how a round's validated updates become the next global model.

A round opens an :class:`Aggregator` over the update reference (normally the global
model), folds accepted updates into it one by one as they arrive, and the strategy turns
the aggregate into the next model with its server-side rule. Streaming strategies keep
O(model) memory (:class:`~strategies.accumulator.WeightedDeltaMean`); robust ones keep
the round's deltas and work block-wise over coordinates.

Each strategy declares its YAML parameters as a pydantic model ``Params`` (unknown keys
refused) and may send extra round-config keys to sites (:meth:`Strategy.fit_config`).
Server state (momentum, Adam moments, control variates) is returned by
:meth:`Strategy.state` and persisted with every committed round; :meth:`load_state`
restores it after a restart.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import ClassVar, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict

Arrays = Mapping[str, np.ndarray]
ConfigValue = bool | int | float | str


class Aggregator(Protocol):
    """Receives one round's accepted updates, one at a time."""

    count: int

    def add(self, arrays: Arrays, weight: float) -> None: ...


class NoParams(BaseModel):
    """A strategy without parameters."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class Strategy(ABC):
    """Base class of aggregation strategies.

    Parameters
    ----------
    params
        Validated ``Params`` of the strategy (defaults when omitted).
    """

    name: ClassVar[str] = "strategy"
    Params: ClassVar[type[BaseModel]] = NoParams
    supports_dp: ClassVar[bool] = False
    """Whether the rule works on a mean delta alone (``aggregator.mean()``), so central DP
    can hand it a clipped, noised mean instead."""
    supports_secagg: ClassVar[bool] = False
    """Whether the rule needs only ``aggregator.mean()`` and ``aggregator.count``, so secure
    aggregation can hand it the mean of a secure sum (no individual update is seen)."""

    def __init__(self, params: BaseModel | None = None):
        self.params = params if params is not None else self.Params()

    def min_updates(self) -> int:
        """The fewest accepted updates a round needs for this strategy's rule (1 here)."""
        return 1

    def begin_round(self, round_no: int, population: int) -> None:  # noqa: B027 - optional hook
        """Called before a round's tasks go out, with the number of sites online."""

    def fit_config(self, round_no: int) -> dict[str, ConfigValue]:
        """Extra round-config keys sent to sites with every fit task."""
        return {}

    def task_arrays(self, model: Arrays) -> Arrays:
        """What sites receive with a fit task (the global model by default)."""
        return model

    def update_reference(self, model: Arrays) -> Arrays:
        """What a site's update must look like; deltas are taken against it."""
        return model

    @abstractmethod
    def aggregator(self, reference: Arrays, expected: int) -> Aggregator:
        """A fresh aggregator for one round of at most ``expected`` updates."""

    @abstractmethod
    def apply(self, model: Arrays, aggregator: Aggregator) -> dict[str, np.ndarray]:
        """The next global model from the current one and the round's aggregate.

        Raises
        ------
        InsufficientUpdates
            When the rule cannot be honoured with the updates the round accepted.
        """

    def state(self) -> dict[str, np.ndarray]:
        """Server state to persist with the committed round (none by default)."""
        return {}

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore what :meth:`state` returned (after a restart)."""
        if state:
            raise ValueError(f"{self.name} keeps no state but got {sorted(state)[:3]}")


def add_delta(reference: Arrays, delta: Arrays) -> dict[str, np.ndarray]:
    """``reference + delta`` tensor by tensor, keeping each tensor's dtype."""
    return {k: (v + delta[k]).astype(v.dtype, copy=False) for k, v in reference.items()}
