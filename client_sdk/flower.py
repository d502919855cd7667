"""Run an unmodified Flower ``NumPyClient`` as a fedcoord site.

Flower passes models as ordered lists of arrays; fedcoord names every tensor. The
adapter needs the names in the Flower client's order: pass ``names`` (for a torch model
usually ``list(net.state_dict())``), or let it match the client's
``get_parameters()`` to the received tensors by shape and dtype, which works when no
two tensors share both.

The adapter only calls ``get_parameters``, ``fit`` and ``evaluate``, so Flower itself
need not be installed at the site.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from client_sdk.api import Arrays, Client, Config, EvaluateResult, FitResult
from client_sdk.errors import ClientError


class NumPyClientLike(Protocol):
    def get_parameters(self, config: dict[str, Any]) -> list[np.ndarray]: ...

    def fit(self, parameters: list[np.ndarray], config: dict[str, Any]) -> tuple[Any, ...]: ...

    def evaluate(self, parameters: list[np.ndarray], config: dict[str, Any]) -> tuple[Any, ...]: ...


def is_numpy_client(obj: object) -> bool:
    return all(callable(getattr(obj, m, None)) for m in ("get_parameters", "fit", "evaluate"))


def numeric_metrics(metrics: dict[str, Any] | None) -> dict[str, float]:
    """Flower metrics may hold strings or bytes; keep the finite numbers."""
    out: dict[str, float] = {}
    for name, value in (metrics or {}).items():
        if isinstance(value, bool | int | float | np.number) and math.isfinite(float(value)):
            out[str(name)] = float(value)
    return out


class FlowerSite(Client):
    """A :class:`~client_sdk.api.Client` backed by a Flower ``NumPyClient``."""

    def __init__(self, numpy_client: NumPyClientLike, names: Sequence[str] | None = None):
        self.inner = numpy_client
        self.names: list[str] | None = list(names) if names is not None else None

    def _order(self, arrays: Arrays) -> list[str]:
        if self.names is None:
            self.names = self._match(arrays)
        if set(self.names) != set(arrays):
            raise ClientError(
                f"the Flower client's names {sorted(self.names)[:3]}... do not match the "
                f"global model's {sorted(arrays)[:3]}..."
            )
        return self.names

    def _match(self, arrays: Arrays) -> list[str]:
        """Names in the Flower client's order, matched by (shape, dtype)."""
        signature = {name: (a.shape, a.dtype) for name, a in arrays.items()}
        if len(set(signature.values())) != len(signature):
            raise ClientError(
                "tensors share shapes and dtypes, so their order cannot be inferred; "
                "pass FlowerSite(client, names=[...]) in the client's order"
            )
        by_signature = {sig: name for name, sig in signature.items()}
        local = self.inner.get_parameters({})
        try:
            return [by_signature[(np.asarray(p).shape, np.asarray(p).dtype)] for p in local]
        except KeyError as exc:
            raise ClientError(f"the Flower client has a tensor the model lacks: {exc}") from None

    def _to_named(
        self, order: list[str], parameters: Sequence[np.ndarray]
    ) -> dict[str, np.ndarray]:
        if len(parameters) != len(order):
            raise ClientError(
                f"the Flower client returned {len(parameters)} arrays, not {len(order)}"
            )
        return {name: np.asarray(p) for name, p in zip(order, parameters, strict=True)}

    def fit(self, arrays: Arrays, config: Config) -> FitResult:
        order = self._order(arrays)
        parameters, num_examples, metrics = self.inner.fit([arrays[n] for n in order], dict(config))
        return FitResult(
            self._to_named(order, parameters), int(num_examples), numeric_metrics(metrics)
        )

    def evaluate(self, arrays: Arrays, config: Config) -> EvaluateResult:
        order = self._order(arrays)
        loss, num_examples, metrics = self.inner.evaluate([arrays[n] for n in order], dict(config))
        return EvaluateResult(float(loss), int(num_examples), numeric_metrics(metrics))
