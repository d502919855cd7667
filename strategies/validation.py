"""Checks every update must pass before it touches an aggregate."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from strategies.errors import InvalidUpdate

Arrays = Mapping[str, np.ndarray]


@dataclass(frozen=True)
class ModelSpec:
    """Names, dtypes and shapes an update must have (those of the global model)."""

    tensors: Mapping[str, tuple[np.dtype, tuple[int, ...]]]

    @classmethod
    def of(cls, arrays: Arrays) -> ModelSpec:
        return cls({k: (np.dtype(v.dtype), tuple(v.shape)) for k, v in arrays.items()})


@dataclass(frozen=True)
class UpdateLimits:
    """Bounds on the example-count weight and (optionally) the L2 norm of the delta."""

    max_examples: int = 10_000_000
    max_norm: float | None = None


def check_specs(specs: Mapping[str, tuple[np.dtype, tuple[int, ...]]], spec: ModelSpec) -> None:
    """Same names, dtypes and shapes as the global model (no broadcasting, no casting)."""
    missing = spec.tensors.keys() - specs.keys()
    if missing:
        raise InvalidUpdate("missing_tensor", f"update lacks {sorted(missing)[:3]}")
    extra = specs.keys() - spec.tensors.keys()
    if extra:
        raise InvalidUpdate("unexpected_tensor", f"update has unknown {sorted(extra)[:3]}")
    for name, (dtype, shape) in spec.tensors.items():
        got_dtype, got_shape = specs[name]
        if got_dtype != dtype:
            raise InvalidUpdate("dtype_mismatch", f"{name}: {got_dtype} instead of {dtype}")
        if tuple(got_shape) != shape:
            raise InvalidUpdate("shape_mismatch", f"{name}: {tuple(got_shape)} instead of {shape}")


def check_structure(arrays: Arrays, spec: ModelSpec) -> None:
    check_specs({k: (a.dtype, a.shape) for k, a in arrays.items()}, spec)


CHECK_BLOCK = 1 << 20
"""Elements checked at once, so that checks of a huge tensor need no tensor-sized temporary."""


def _blocks(a: np.ndarray) -> list[np.ndarray]:
    flat = a.reshape(-1)
    return [flat[i : i + CHECK_BLOCK] for i in range(0, flat.size, CHECK_BLOCK)]


def check_finite(arrays: Arrays) -> None:
    for name, a in arrays.items():
        if a.dtype.kind == "f" and not all(np.isfinite(b).all() for b in _blocks(a)):
            raise InvalidUpdate("non_finite", f"{name} holds NaN or infinite values")


def check_weight(num_examples: int, limits: UpdateLimits) -> None:
    if not 0 < num_examples <= limits.max_examples:
        raise InvalidUpdate(
            "bad_weight", f"num_examples {num_examples} not in [1, {limits.max_examples}]"
        )


MAX_METRICS = 64


def check_metrics(metrics: Mapping[str, float]) -> None:
    """At most :data:`MAX_METRICS` finite scalar metrics with short printable names."""
    if len(metrics) > MAX_METRICS:
        raise InvalidUpdate("bad_metrics", f"{len(metrics)} metrics, more than {MAX_METRICS}")
    for name, value in metrics.items():
        if not name or len(name) > 64 or not name.isprintable():
            raise InvalidUpdate("bad_metrics", f"invalid metric name {name[:40]!r}")
        if not math.isfinite(value):
            raise InvalidUpdate("bad_metrics", f"metric {name!r} is not finite")


def delta_norm(arrays: Arrays, reference: Arrays) -> float:
    """L2 norm of ``arrays - reference`` over all floating tensors, in float64."""
    total = 0.0
    for name, a in arrays.items():
        if a.dtype.kind == "f":
            for b, r in zip(_blocks(a), _blocks(np.asarray(reference[name])), strict=True):
                d = np.subtract(b, r, dtype=np.float64)
                total += float(np.dot(d, d))
    return math.sqrt(total)


def validate_update(
    arrays: Arrays,
    num_examples: int,
    metrics: Mapping[str, float],
    reference: Arrays,
    spec: ModelSpec,
    limits: UpdateLimits,
) -> None:
    """Raise :class:`InvalidUpdate` unless the update may be aggregated."""
    check_weight(num_examples, limits)
    check_metrics(metrics)
    check_structure(arrays, spec)
    check_finite(arrays)
    if limits.max_norm is not None:
        norm = delta_norm(arrays, reference)
        if norm > limits.max_norm:
            raise InvalidUpdate("norm_bound", f"update norm {norm:.4g} > {limits.max_norm:.4g}")
