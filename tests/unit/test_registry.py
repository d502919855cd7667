"""Strategies by name: the built-ins, and a user's own class by import path."""

from __future__ import annotations

from typing import Annotated

import numpy as np
import pytest
from pydantic import BaseModel, ConfigDict, Field

from coordinator.errors import ConfigError
from coordinator.experiment import parse_experiment
from strategies.accumulator import WeightedDeltaMean
from strategies.base import Arrays, Strategy, add_delta
from strategies.registry import STRATEGIES, StrategyConfigError, make_strategy

BASE = "name: t\nrounds: 2\ntask: {name: digits}\n"


class HalfStepParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    step: Annotated[float, Field(gt=0, le=1)] = 0.5


class HalfStep(Strategy):
    """A user's rule: FedAvg with the mean delta scaled by ``step``."""

    name = "half_step"
    Params = HalfStepParams

    def aggregator(self, reference: Arrays, expected: int) -> WeightedDeltaMean:
        return WeightedDeltaMean(reference)

    def apply(self, model: Arrays, aggregator: WeightedDeltaMean) -> dict[str, np.ndarray]:  # type: ignore[override]
        step = float(self.params.step)  # type: ignore[attr-defined]
        return add_delta(model, {k: v * step for k, v in aggregator.mean().items()})


class NotAStrategy:
    pass


PATH = f"{__name__}:HalfStep"


def test_every_built_in_is_listed_under_its_own_name():
    assert sorted(STRATEGIES) == sorted(
        [
            "fedavg",
            "fedavgm",
            "fedprox",
            "fedadam",
            "fedyogi",
            "fedadagrad",
            "scaffold",
            "fedmedian",
            "trimmed_mean",
            "krum",
            "multikrum",
            "bulyan",
        ]
    )
    assert all(cls.name == name for name, cls in STRATEGIES.items())


def test_a_user_strategy_loads_by_import_path_with_validated_params():
    strategy = make_strategy(PATH, {"step": 0.25})
    assert isinstance(strategy, HalfStep)
    reference = {"w": np.zeros(3, np.float32)}
    agg = strategy.aggregator(reference, 1)
    agg.add({"w": np.full(3, 4.0, np.float32)}, 10.0)
    np.testing.assert_array_equal(strategy.apply(reference, agg)["w"], [1.0, 1.0, 1.0])
    with pytest.raises(StrategyConfigError) as err:
        make_strategy(PATH, {"step": 2})
    assert err.value.key == "step"


def test_a_user_strategy_in_an_experiment():
    exp = parse_experiment(BASE + f"strategy: {{name: '{PATH}', step: 0.5}}\n")
    assert isinstance(exp.make_strategy(), HalfStep)
    with pytest.raises(ConfigError) as err:
        parse_experiment(BASE + f"strategy: {{name: '{PATH}', stpe: 0.5}}\n")
    assert (err.value.key, err.value.message) == ("strategy.stpe", "unknown key")


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("no_such_rule", "unknown strategy 'no_such_rule'"),
        ("no_such_module_xyz:Rule", "cannot load 'no_such_module_xyz:Rule'"),
        (f"{__name__}:Missing", "cannot load"),
        (f"{__name__}:NotAStrategy", "is not a strategies.base.Strategy subclass"),
    ],
)
def test_bad_names_are_refused_clearly(name: str, message: str):
    with pytest.raises(StrategyConfigError) as err:
        make_strategy(name)
    assert err.value.key == "name" and message in err.value.message
