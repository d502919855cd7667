"""What a data-site engineer implements: a :class:`Client` with ``fit`` and ``evaluate``."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np

from strategies.drift import DataProfile

Arrays = dict[str, np.ndarray]
"""Named model tensors, e.g. a torch ``state_dict`` as numpy arrays."""
ConfigValue = bool | int | float | str
Config = dict[str, ConfigValue]
"""The round configuration the coordinator sends with a task (flat, scalar values)."""


@dataclass(frozen=True)
class FitResult:
    """A site's answer to a fit task.

    Attributes
    ----------
    arrays
        The locally trained model (same names, shapes and dtypes as received).
    num_examples
        How many local examples the training used (the FedAvg weight).
    metrics
        Scalar training metrics, e.g. ``{"loss": 0.31}``.
    """

    arrays: Arrays
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_result(self.num_examples, self.metrics)


@dataclass(frozen=True)
class EvaluateResult:
    """A site's answer to an evaluate task: loss and metrics on its local data."""

    loss: float
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_result(self.num_examples, self.metrics)


def _check_result(num_examples: int, metrics: dict[str, float]) -> None:
    if not isinstance(num_examples, int | np.integer) or num_examples < 0:
        raise ValueError(f"num_examples must be a non-negative int, got {num_examples!r}")
    for name, value in metrics.items():
        if not isinstance(value, int | float | np.number) or not math.isfinite(float(value)):
            raise ValueError(f"metric {name!r} must be a finite number, got {value!r}")


class Client(ABC):
    """Local training and evaluation at one data site. Data never leaves it."""

    @abstractmethod
    def fit(self, arrays: Arrays, config: Config) -> FitResult:
        """Train starting from the global model ``arrays``; return the local model."""

    @abstractmethod
    def evaluate(self, arrays: Arrays, config: Config) -> EvaluateResult:
        """Evaluate the global model ``arrays`` on local data."""

    def profile(self, config: Config) -> DataProfile | None:
        """Counts of the local data for the coordinator's drift checks (optional): labels,
        and each feature over the bins the round asks for (build it with
        ``strategies.drift.profile_of(x, y, *profile_settings(config))``). ``None``:
        this site reports none."""
        return None

    def before_stage(self, stage: str, config: Config) -> None:  # noqa: B027 - optional hook
        """Called before each secure-aggregation stage after training (``share_keys``,
        ``masked_input``, ``unmask``) with the round config; raise to leave the round
        (the coordinator counts the site as dropped at that stage)."""
