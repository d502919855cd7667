"""Streaming FedAvg and update validation."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from strategies import accumulator
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


# --- the blocked accumulator -------------------------------------------------------------


@pytest.fixture(params=["blas", "numpy"])
def fold_path(request, monkeypatch):
    """Run a test with BLAS ``saxpy`` folding and again with the NumPy fallback."""
    monkeypatch.setattr(accumulator, "use_blas", request.param == "blas")
    if request.param == "blas":
        assert accumulator._blas_saxpy() is not None  # SciPy is a dependency (scikit-learn)
    return request.param


def float64_mean_delta(reference, updates, weights):
    """The weighted mean delta of every tensor, computed in float64."""
    total = float(sum(weights))
    return {
        name: sum(
            float(w) * (u[name].astype(np.float64) - ref.astype(np.float64))
            for u, w in zip(updates, weights, strict=True)
        )
        / total
        for name, ref in reference.items()
    }


def fold(reference, updates, weights):
    agg = WeightedDeltaMean(reference)
    for u, w in zip(updates, weights, strict=True):
        agg.add(u, w)
    return agg


def perturbed(rng, reference, scale=0.01):
    """An update near ``reference`` (float tensors moved, integer tensors bumped)."""
    out = {}
    for name, ref in reference.items():
        if ref.dtype.kind == "f":
            noise = rng.standard_normal(ref.shape) * scale
            out[name] = (ref + noise).astype(ref.dtype)
        else:
            out[name] = (ref + rng.integers(0, 5, ref.shape)).astype(ref.dtype)
    return out


def assert_close_to_float64(reference, updates, weights, mean):
    expected = float64_mean_delta(reference, updates, weights)
    for name, ref in reference.items():
        assert mean[name].dtype == ref.dtype and mean[name].shape == ref.shape, name
        if ref.dtype.kind == "f":
            np.testing.assert_allclose(mean[name], expected[name], rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize(
    "sizes",
    [
        [0],
        [1],
        [0, 1, 0],
        [accumulator.BLOCK_ELEMS - 1],
        [accumulator.BLOCK_ELEMS],
        [accumulator.BLOCK_ELEMS + 1],
        [2 * accumulator.BLOCK_ELEMS + 12_345],
        [accumulator.BLOCK_ELEMS - 3, 5, 1, 0, accumulator.BLOCK_ELEMS + 7],
    ],
    ids=lambda sizes: "-".join(map(str, sizes)),
)
def test_blocks_cover_every_coordinate_once(sizes, fold_path):
    rng = np.random.default_rng(len(sizes) + sum(sizes))
    reference = {f"t{i}": rng.standard_normal(n).astype(np.float32) for i, n in enumerate(sizes)}
    updates = [perturbed(rng, reference) for _ in range(4)]
    weights = [3, 1, 250, 17]
    mean = fold(reference, updates, weights).mean()
    assert_close_to_float64(reference, updates, weights, mean)


@pytest.mark.parametrize("block, axpy", [(1, 1), (7, 3), (64, 8192), (1000, 10)])
def test_small_blocks_split_many_small_tensors_correctly(block, axpy, fold_path, monkeypatch):
    """Tiny blocks make tensors straddle many block and ``saxpy`` call boundaries."""
    monkeypatch.setattr(accumulator, "BLOCK_ELEMS", block)
    monkeypatch.setattr(accumulator, "AXPY_ELEMS", axpy)
    rng = np.random.default_rng(block)
    shapes = [(), (0,), (1,), (3, 0), *[(int(n),) for n in rng.integers(0, 40, 200)], (9, 31)]
    reference = {f"t{i}": rng.standard_normal(s).astype(np.float32) for i, s in enumerate(shapes)}
    reference["bn.num_batches_tracked"] = np.array(40, np.int64)
    updates = [perturbed(rng, reference) for _ in range(5)]
    weights = [1, 2, 3, 500, 7]
    mean = fold(reference, updates, weights).mean()
    assert_close_to_float64(reference, updates, weights, mean)


def test_float32_result_matches_float64_on_large_offsets(fold_path):
    """Deltas are taken against the reference, so a large common offset costs no precision."""
    rng = np.random.default_rng(3)
    reference = {"w": (1000.0 + rng.standard_normal(100_003)).astype(np.float32)}
    updates = [perturbed(rng, reference, scale=1e-3) for _ in range(30)]
    weights = [int(w) for w in rng.integers(1, 10_000, 30)]
    mean = fold(reference, updates, weights).mean()
    expected = float64_mean_delta(reference, updates, weights)["w"]
    np.testing.assert_allclose(mean["w"], expected, rtol=1e-5, atol=1e-9)
    # next global model, as FedAvg applies it: each coordinate within one float32 ulp
    model = FedAvg().apply(reference, fold(reference, updates, weights))
    exact = reference["w"].astype(np.float64) + expected
    assert np.all(np.abs(model["w"] - exact) <= np.spacing(model["w"]))


@pytest.mark.parametrize("weight", [np.float64(2.5), np.float32(2.5), 2.5, 5 // 2, np.int64(3)])
def test_float32_stays_float32_whatever_the_weight_type(weight, fold_path):
    """No float64 (or any full-size) temporary appears while folding, whatever the weight."""
    n = 1_000_000
    reference = {
        "w": np.zeros(n, np.float32),
        "half": np.zeros(10, np.float16),
        "step": np.array(0, np.int64),
    }
    update = {
        "w": np.full(n, 0.5, np.float32),
        "half": np.ones(10, np.float16),
        "step": np.array(4, np.int64),
    }
    agg = WeightedDeltaMean(reference)
    agg.add(update, weight)  # warm-up: first call may import and probe BLAS
    tracemalloc.start()
    try:
        agg.add(update, weight)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < n  # a float32 temporary of "w" would take 4 * n bytes, a float64 one 8 * n
    assert agg._acc.dtype == np.float32 and agg._scratch.dtype == np.float32
    assert agg._scratch.size <= accumulator.BLOCK_ELEMS
    assert isinstance(agg.total_weight, float)
    mean = agg.mean()
    assert mean["w"].dtype == np.float32 and np.all(mean["w"] == 0.5)
    assert mean["half"].dtype == np.float16 and np.all(mean["half"] == 1.0)
    assert mean["step"].dtype == np.int64 and mean["step"] == 4


def test_integer_tensors_keep_their_dtype_and_round(fold_path):
    reference = {
        "w": np.zeros(3, np.float32),
        "count": np.array([10, 20], np.int64),
        "small": np.array([1, 2, 3], np.int32),
    }
    updates = [
        {"w": np.ones(3, np.float32), "count": np.array([11, 20]), "small": np.array([1, 2, 4])},
        {"w": np.ones(3, np.float32), "count": np.array([14, 23]), "small": np.array([3, 2, 3])},
    ]
    for u in updates:
        u["small"] = u["small"].astype(np.int32)
    mean = fold(reference, updates, [1, 3]).mean()
    assert mean["count"].dtype == np.int64 and mean["count"].tolist() == [3, 2]  # 3.25, 2.25
    assert mean["small"].dtype == np.int32 and mean["small"].tolist() == [2, 0, 0]  # 1.5, 0, .25
    np.testing.assert_array_equal(mean["w"], np.ones(3, np.float32))


def test_a_model_without_floating_tensors_aggregates(fold_path):
    reference = {"count": np.array(5, np.int64)}
    agg = fold(reference, [{"count": np.array(7, np.int64)}], [2])
    assert agg._acc.size == 0 and agg.mean()["count"] == 2


def test_a_tensor_of_the_wrong_size_is_refused(fold_path):
    agg = WeightedDeltaMean({"w": np.zeros(10, np.float32)})
    with pytest.raises(ValueError, match="'w' has 11 values"):
        agg.add({"w": np.zeros(11, np.float32)}, 1)
    assert agg.count == 0


def test_float64_deltas_below_float32_spacing_are_kept():
    rng = np.random.default_rng(5)
    reference = {"w": 1000.0 + rng.standard_normal(8)}
    updates = [reference["w"] + 1e-5 * rng.standard_normal(8) for _ in range(4)]
    agg = WeightedDeltaMean(reference)
    for u in updates:
        agg.add({"w": u}, 1.0)
    expected = np.mean([u - reference["w"] for u in updates], axis=0)
    np.testing.assert_allclose(agg.mean()["w"], expected, rtol=1e-5, atol=1e-10)
