"""Strategies by name, as selected by ``strategy.name`` in an experiment.

Built-ins are listed in :data:`STRATEGIES`; a user strategy is given by import path
``package.module:ClassName`` (a :class:`~strategies.base.Strategy` subclass).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from strategies.base import Strategy
from strategies.fedavg import FedAvg
from strategies.fedopt import FedAdagrad, FedAdam, FedAvgM, FedProx, FedYogi
from strategies.robust import ROBUST_STRATEGIES
from strategies.scaffold import Scaffold

STRATEGIES: dict[str, type[Strategy]] = {
    **{cls.name: cls for cls in (FedAvg, FedAvgM, FedProx, FedAdam, FedYogi, FedAdagrad, Scaffold)},
    **ROBUST_STRATEGIES,
}


class StrategyConfigError(ValueError):
    """A strategy name or parameter is invalid; ``key`` is relative to ``strategy``."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


def strategy_class(name: str) -> type[Strategy]:
    if name in STRATEGIES:
        return STRATEGIES[name]
    if ":" not in name:
        raise StrategyConfigError(
            "name",
            f"unknown strategy {name!r}; built-in: {', '.join(sorted(STRATEGIES))} "
            "(or an import path 'package.module:Class')",
        )
    module_name, _, attr = name.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise StrategyConfigError("name", f"cannot load {name!r}: {exc}") from None
    if not (isinstance(cls, type) and issubclass(cls, Strategy)):
        raise StrategyConfigError("name", f"{name!r} is not a strategies.base.Strategy subclass")
    return cls


def make_strategy(name: str, params: Mapping[str, Any] | None = None) -> Strategy:
    """Build strategy ``name`` with validated ``params`` (raises StrategyConfigError)."""
    cls = strategy_class(name)
    try:
        validated = cls.Params.model_validate(dict(params or {}))
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"]) or "name"
        message = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        raise StrategyConfigError(key, message) from None
    return cls(validated)
