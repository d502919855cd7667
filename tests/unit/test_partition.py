"""Partitioners: coverage, disjointness, determinism, skew, infeasible specs."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from coordinator.errors import ConfigError
from simulations.partition import partition_indices

LABELS = np.repeat(np.arange(10), 100)  # 1000 samples, 10 balanced classes
SPECS: list[dict[str, Any]] = [
    {"kind": "iid"},
    {"kind": "dirichlet", "alpha": 0.5},
    {"kind": "dirichlet", "alpha": 0.1, "min_samples": 5},
    {"kind": "shards", "labels_per_site": 2},
]


def _label_counts(parts: list[np.ndarray]) -> list[int]:
    return [len(np.unique(LABELS[p])) for p in parts]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: str(s))
@pytest.mark.parametrize("num_sites", [1, 7, 20])
def test_parts_cover_every_sample_once(spec: dict[str, Any], num_sites: int) -> None:
    parts = partition_indices(LABELS, num_sites, spec, seed=3)
    assert len(parts) == num_sites
    for part in parts:
        assert part.dtype == np.int64
        assert np.all(np.diff(part) > 0)  # sorted, no duplicates within a site
    together = np.concatenate(parts)
    assert np.array_equal(np.sort(together), np.arange(len(LABELS)))


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: str(s))
def test_same_seed_same_split_other_seed_other_split(spec: dict[str, Any]) -> None:
    first = partition_indices(LABELS, 10, spec, seed=11)
    again = partition_indices(LABELS, 10, spec, seed=11)
    other = partition_indices(LABELS, 10, spec, seed=12)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))


def test_iid_parts_are_balanced_in_size_and_labels() -> None:
    parts = partition_indices(LABELS, 10, {"kind": "iid"}, seed=0)
    assert {len(p) for p in parts} == {100}
    assert min(_label_counts(parts)) >= 8


def test_dirichlet_is_more_skewed_than_iid() -> None:
    def skew(parts: list[np.ndarray]) -> float:
        # mean total-variation distance between a site's label histogram and the global one
        hists = [np.bincount(LABELS[p], minlength=10) / len(p) for p in parts]
        return float(np.mean([0.5 * np.abs(h - 0.1).sum() for h in hists]))

    iid = partition_indices(LABELS, 10, {"kind": "iid"}, seed=0)
    mild = partition_indices(LABELS, 10, {"kind": "dirichlet", "alpha": 1.0}, seed=0)
    strong = partition_indices(LABELS, 10, {"kind": "dirichlet", "alpha": 0.1}, seed=0)
    assert skew(iid) < skew(mild) < skew(strong)
    assert skew(strong) > 0.5


def test_dirichlet_respects_min_samples() -> None:
    parts = partition_indices(LABELS, 50, {"kind": "dirichlet", "alpha": 0.3, "min_samples": 4}, 0)
    assert min(len(p) for p in parts) >= 4


def test_shards_give_each_site_about_labels_per_site_labels() -> None:
    parts = partition_indices(LABELS, 10, {"kind": "shards", "labels_per_site": 2}, seed=5)
    counts = _label_counts(parts)
    assert max(counts) <= 2 * 2  # a shard can straddle a label boundary
    assert np.mean(counts) <= 2.5
    assert {len(p) for p in parts} == {100}


@pytest.mark.parametrize(
    ("num_sites", "spec", "key"),
    [
        (10, {"kind": "random"}, "federation.partition.kind"),
        (10, {}, "federation.partition.kind"),
        (10, {"kind": "dirichlet", "alpha": 0.0}, "federation.partition.alpha"),
        (10, {"kind": "dirichlet", "alpha": -1}, "federation.partition.alpha"),
        (10, {"kind": "dirichlet", "alpha": float("nan")}, "federation.partition.alpha"),
        (10, {"kind": "dirichlet"}, "federation.partition.alpha"),
        (
            10,
            {"kind": "dirichlet", "alpha": 1, "min_samples": 0},
            "federation.partition.min_samples",
        ),
        (10, {"kind": "shards", "labels_per_site": 0}, "federation.partition.labels_per_site"),
        (10, {"kind": "shards", "labels_per_site": 2.5}, "federation.partition.labels_per_site"),
        (600, {"kind": "shards", "labels_per_site": 2}, "federation.partition.labels_per_site"),
        (10, {"kind": "iid", "alpha": 1.0}, "federation.partition.alpha"),
        (1001, {"kind": "iid"}, "federation.sites"),
        (0, {"kind": "iid"}, "federation.sites"),
        (600, {"kind": "dirichlet", "alpha": 1.0}, "federation.sites"),
    ],
)
def test_infeasible_specs_name_the_key(num_sites: int, spec: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        partition_indices(LABELS, num_sites, spec, seed=0)
    assert info.value.key == key


def test_dirichlet_that_cannot_fill_every_site_gives_up_clearly() -> None:
    labels = np.repeat(np.arange(2), 30)
    with pytest.raises(ConfigError) as info:
        partition_indices(labels, 25, {"kind": "dirichlet", "alpha": 0.01}, seed=0)
    assert info.value.key == "federation.partition"
    assert "alpha" in info.value.message
