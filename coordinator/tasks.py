"""Resolving a learning task (model + data) by name.

A task is found either as an entry point of the ``fedcoord.tasks`` group (the built-ins
``digits``, ``breast_cancer`` and ``synthetic`` are registered that way) or as an import
path ``package.module:build_task``. The callable is invoked as
``build_task(model=..., options=..., seed=...)`` and returns a :class:`Task`.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from importlib.metadata import entry_points
from typing import Any, Protocol, runtime_checkable

import numpy as np

from coordinator.errors import ConfigError

ENTRY_POINT_GROUP = "fedcoord.tasks"


@runtime_checkable
class Task(Protocol):
    """A model and the data it is trained on.

    The coordinator uses ``initial_arrays`` and ``central_evaluate``; simulated and
    demo sites use ``make_client``.
    """

    name: str

    def initial_arrays(self) -> dict[str, np.ndarray]:
        """The initial global model, deterministic for a given seed."""
        ...

    def central_evaluate(self, arrays: Mapping[str, np.ndarray]) -> dict[str, float]:
        """Loss and accuracy of ``arrays`` on the held-out test set ({} if there is none)."""
        ...

    def make_client(
        self, site_index: int, num_sites: int, partition: Mapping[str, Any], seed: int
    ) -> Any:
        """A ``client_sdk.Client`` training on partition ``site_index`` of ``num_sites``."""
        ...


def _resolve(name: str) -> Any:
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ConfigError("task.name", f"cannot import {module_name!r}: {exc}") from None
        try:
            return getattr(module, attr)
        except AttributeError:
            raise ConfigError("task.name", f"{module_name!r} has no attribute {attr!r}") from None
    found = entry_points(group=ENTRY_POINT_GROUP, name=name)
    if not found:
        known = sorted(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))
        raise ConfigError(
            "task.name",
            f"unknown task {name!r}; built-in tasks: {', '.join(known)} "
            "(or give an import path 'package.module:build_task')",
        )
    return next(iter(found)).load()


def load_task(name: str, model: str | None, options: Mapping[str, Any], seed: int) -> Task:
    """Build the task ``name``; raises :class:`ConfigError` naming the offending key."""
    build = _resolve(name)
    task = build(model=model, options=dict(options), seed=seed)
    if not isinstance(task, Task):
        raise ConfigError("task.name", f"{name!r} did not return a Task")
    return task
