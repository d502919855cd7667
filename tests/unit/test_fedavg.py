"""Streaming FedAvg and update validation."""

from __future__ import annotations

import numpy as np
import pytest

from strategies.accumulator import WeightedDeltaMean
from strategies.errors import InvalidUpdate
from strategies.fedavg import FedAvg
from strategies.validation import ModelSpec, UpdateLimits, validate_update


def model(rng, scale=1.0):
    return {
        "w": (rng.standard_normal((4, 3)) * scale).astype(np.float32),
        "b": (rng.standard_normal(3) * scale).astype(np.float32),
        "bn.num_batches_tracked": np.array(rng.integers(0, 100), dtype=np.int64),
    }


def test_fedavg_equals_the_weighted_mean_of_models():
    rng = np.random.default_rng(0)
    ref = model(rng)
    updates = [model(rng) for _ in range(5)]
    weights = [10, 1, 7, 3, 100]
    strategy = FedAvg()
    agg = strategy.aggregator(ref, len(updates))
    for u, w in zip(updates, weights, strict=True):
        agg.add(u, w)
    out = strategy.apply(ref, agg)
    total = sum(weights)
    for name in ("w", "b"):
        expected = sum(
            w * u[name].astype(np.float64) for u, w in zip(updates, weights, strict=True)
        )
        np.testing.assert_allclose(out[name], expected / total, rtol=1e-5, atol=1e-6)
        assert out[name].dtype == np.float32
    counter = sum(
        w * int(u["bn.num_batches_tracked"]) for u, w in zip(updates, weights, strict=True)
    )
    assert out["bn.num_batches_tracked"].dtype == np.int64
    assert out["bn.num_batches_tracked"] == round(counter / total)


def test_accumulator_memory_does_not_grow_and_stays_float32():
    ref = {"w": np.zeros(1000, np.float32)}
    agg = WeightedDeltaMean(ref)
    before = agg._acc.nbytes + agg._scratch.nbytes
    for _ in range(50):
        agg.add(
            {"w": np.ones(1000, np.float32)}, np.float64(2.0)
        )  # a float64 weight must not promote
    assert agg._acc.dtype == np.float32 and agg._acc.nbytes + agg._scratch.nbytes == before
    assert np.allclose(agg.mean()["w"], 1.0)


def test_empty_round_has_no_mean():
    with pytest.raises(ValueError, match="no updates"):
        WeightedDeltaMean({"w": np.zeros(2, np.float32)}).mean()


@pytest.mark.parametrize(
    "edit, n, metrics, reason",
    [
        (lambda u: u.pop("b"), 5, {}, "missing_tensor"),
        (lambda u: u.update(extra=np.zeros(1, np.float32)), 5, {}, "unexpected_tensor"),
        (lambda u: u.update(w=u["w"].astype(np.float64)), 5, {}, "dtype_mismatch"),
        (lambda u: u.update(b=np.zeros((1, 3), np.float32)), 5, {}, "shape_mismatch"),
        (lambda u: u["w"].__setitem__((0, 0), np.nan), 5, {}, "non_finite"),
        (lambda u: u["b"].__setitem__(1, np.inf), 5, {}, "non_finite"),
        (lambda u: None, 0, {}, "bad_weight"),
        (lambda u: None, -3, {}, "bad_weight"),
        (lambda u: None, 10**9, {}, "bad_weight"),
        (lambda u: None, 5, {"loss": float("nan")}, "bad_metrics"),
        (lambda u: u.update(w=u["w"] * 1e6), 5, {}, "norm_bound"),
    ],
)
def test_invalid_updates_are_named(edit, n, metrics, reason):
    rng = np.random.default_rng(1)
    ref = model(rng)
    update = {k: v.copy() for k, v in model(rng).items()}
    edit(update)
    limits = UpdateLimits(max_examples=1_000_000, max_norm=1e3)
    with pytest.raises(InvalidUpdate) as info:
        validate_update(update, n, metrics, ref, ModelSpec.of(ref), limits)
    assert info.value.reason == reason


def test_valid_update_passes():
    rng = np.random.default_rng(2)
    ref = model(rng)
    validate_update(model(rng), 5, {"loss": 0.3}, ref, ModelSpec.of(ref), UpdateLimits())
