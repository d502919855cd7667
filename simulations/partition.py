"""Splitting a labelled dataset among simulated sites (pure numpy).

A partition spec is a plain mapping, as written under ``federation.partition`` in an
experiment file:

- ``{"kind": "iid"}`` -- a uniform random split into near-equal parts;
- ``{"kind": "dirichlet", "alpha": 0.5}`` -- label skew: each class is split among the
  sites with proportions drawn from ``Dir(alpha)``; smaller ``alpha`` means more skew.
  An optional ``min_samples`` (default 2) is the least number of samples every site gets;
- ``{"kind": "shards", "labels_per_site": 2}`` -- the samples sorted by label are cut into
  ``sites * labels_per_site`` shards and each site gets ``labels_per_site`` random shards,
  so it sees about that many labels.

Every partitioner returns one sorted ``int64`` index array per site; together they cover
every sample exactly once. The result depends only on the inputs and ``seed``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from coordinator.errors import ConfigError

KEY = "federation.partition"
DIRICHLET_MIN_SAMPLES = 2
"""Default least number of samples a Dirichlet partition gives every site."""
DIRICHLET_MAX_TRIES = 1000
"""How many Dirichlet draws are tried before giving up on ``min_samples``."""

_ALLOWED_KEYS: dict[str, frozenset[str]] = {
    "iid": frozenset({"kind"}),
    "dirichlet": frozenset({"kind", "alpha", "min_samples"}),
    "shards": frozenset({"kind", "labels_per_site"}),
}


def partition_indices(
    labels: np.ndarray, num_sites: int, spec: Mapping[str, Any], seed: int
) -> list[np.ndarray]:
    """Split the sample indices of ``labels`` among ``num_sites`` sites.

    Parameters
    ----------
    labels
        One integer class label per sample (1-D).
    num_sites
        How many sites to split among; at most the number of samples.
    spec
        The partition spec (see the module docstring).
    seed
        Seed of the random split.

    Returns
    -------
    list of np.ndarray
        ``num_sites`` sorted ``int64`` index arrays, disjoint, covering every sample.

    Raises
    ------
    ConfigError
        For an unknown kind, a bad parameter, or a split that cannot be done; the key
        names the offending setting.
    """
    labels = _check_labels(labels)
    _check_num_sites(num_sites, len(labels))
    kind = check_spec(spec)
    rng = np.random.default_rng(seed)
    parts = _PARTITIONERS[kind](labels, num_sites, spec, rng)
    return [np.sort(np.asarray(part, dtype=np.int64)) for part in parts]


def check_spec(spec: Mapping[str, Any]) -> str:
    """Validate a partition spec on its own (no data needed); return its kind."""
    if not isinstance(spec, Mapping):
        raise ConfigError(KEY, f"must be a mapping with a 'kind', got {spec!r}")
    kind = spec.get("kind")
    if kind not in _ALLOWED_KEYS:
        raise ConfigError(
            f"{KEY}.kind", f"unknown partition kind {kind!r}; known: {', '.join(_ALLOWED_KEYS)}"
        )
    unknown = sorted(set(spec) - _ALLOWED_KEYS[kind])
    if unknown:
        raise ConfigError(f"{KEY}.{unknown[0]}", f"not a parameter of a {kind} partition")
    if kind == "dirichlet":
        dirichlet_alpha(spec)
        _positive_int(spec, "min_samples", DIRICHLET_MIN_SAMPLES)
    elif kind == "shards":
        _positive_int(spec, "labels_per_site", None)
    return kind


def dirichlet_alpha(spec: Mapping[str, Any]) -> float:
    """The concentration ``alpha`` of a Dirichlet spec, checked to be finite and > 0."""
    alpha = spec.get("alpha")
    if isinstance(alpha, bool) or not isinstance(alpha, int | float | np.number):
        raise ConfigError(f"{KEY}.alpha", f"must be a number > 0, got {alpha!r}")
    if not math.isfinite(float(alpha)) or float(alpha) <= 0:
        raise ConfigError(f"{KEY}.alpha", f"must be a finite number > 0, got {alpha!r}")
    return float(alpha)


def labels_per_site(spec: Mapping[str, Any]) -> int:
    """The ``labels_per_site`` of a shards spec, checked to be an int >= 1."""
    return _positive_int(spec, "labels_per_site", None)


def _positive_int(spec: Mapping[str, Any], name: str, default: int | None) -> int:
    value = spec.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ConfigError(f"{KEY}.{name}", f"must be an integer >= 1, got {value!r}")
    return int(value)


def _check_labels(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    return labels


def _check_num_sites(num_sites: int, num_samples: int) -> None:
    if isinstance(num_sites, bool) or not isinstance(num_sites, int | np.integer):
        raise ConfigError("federation.sites", f"must be an integer >= 1, got {num_sites!r}")
    if num_sites < 1:
        raise ConfigError("federation.sites", f"must be >= 1, got {num_sites}")
    if num_sites > num_samples:
        raise ConfigError(
            "federation.sites",
            f"{num_sites} sites but only {num_samples} training samples to split among them",
        )


def _iid(
    labels: np.ndarray, num_sites: int, spec: Mapping[str, Any], rng: np.random.Generator
) -> list[np.ndarray]:
    return np.array_split(rng.permutation(len(labels)), num_sites)


def _dirichlet(
    labels: np.ndarray, num_sites: int, spec: Mapping[str, Any], rng: np.random.Generator
) -> list[np.ndarray]:
    alpha = dirichlet_alpha(spec)
    min_samples = _positive_int(spec, "min_samples", DIRICHLET_MIN_SAMPLES)
    if num_sites * min_samples > len(labels):
        raise ConfigError(
            "federation.sites",
            f"{num_sites} sites x {min_samples} samples each needs more than the "
            f"{len(labels)} training samples",
        )
    by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    for _ in range(DIRICHLET_MAX_TRIES):
        parts = _dirichlet_draw(by_class, num_sites, alpha, rng)
        if min(len(p) for p in parts) >= min_samples:
            return parts
    raise ConfigError(
        KEY,
        f"no Dirichlet(alpha={alpha}) draw in {DIRICHLET_MAX_TRIES} tries gave each of "
        f"{num_sites} sites at least {min_samples} samples; raise alpha or use fewer sites",
    )


def _dirichlet_draw(
    by_class: list[np.ndarray], num_sites: int, alpha: float, rng: np.random.Generator
) -> list[np.ndarray]:
    """One draw: every class split among the sites with ``Dir(alpha)`` proportions."""
    pieces: list[list[np.ndarray]] = [[] for _ in range(num_sites)]
    for members in by_class:
        shuffled = rng.permutation(members)
        proportions = rng.dirichlet(np.full(num_sites, alpha))
        cuts = np.round(np.cumsum(proportions)[:-1] * len(shuffled)).astype(np.int64)
        for site, piece in enumerate(np.split(shuffled, cuts)):
            pieces[site].append(piece)
    return [np.concatenate(site_pieces) for site_pieces in pieces]


def _shards(
    labels: np.ndarray, num_sites: int, spec: Mapping[str, Any], rng: np.random.Generator
) -> list[np.ndarray]:
    per_site = labels_per_site(spec)
    num_shards = num_sites * per_site
    if num_shards > len(labels):
        raise ConfigError(
            f"{KEY}.labels_per_site",
            f"{num_sites} sites x {per_site} shards each needs more than the "
            f"{len(labels)} training samples",
        )
    shuffled = rng.permutation(len(labels))
    by_label = shuffled[np.argsort(labels[shuffled], kind="stable")]
    shards = np.array_split(by_label, num_shards)
    order = rng.permutation(num_shards).reshape(num_sites, per_site)
    return [np.concatenate([shards[s] for s in row]) for row in order]


_Partitioner = Callable[[np.ndarray, int, Mapping[str, Any], np.random.Generator], list[np.ndarray]]
_PARTITIONERS: dict[str, _Partitioner] = {"iid": _iid, "dirichlet": _dirichlet, "shards": _shards}
