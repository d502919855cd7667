"""Robust aggregation: exact small cases, robustness to outliers, f rules, storage."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from strategies import robust
from strategies.base import Arrays, Strategy
from strategies.errors import InsufficientUpdates
from strategies.robust import (
    Bulyan,
    FedMedian,
    Krum,
    MultiKrum,
    RobustStrategy,
    TrimmedMean,
    resolve_f,
)
from strategies.stacked import StackedDeltas

ALL = (FedMedian, TrimmedMean, Krum, MultiKrum, Bulyan)


def run(strategy: Strategy, reference: Arrays, updates: list[Arrays]) -> dict[str, np.ndarray]:
    agg = strategy.aggregator(reference, len(updates))
    for i, u in enumerate(updates):
        agg.add(u, float(i + 1))
    return strategy.apply(reference, agg)


def scalars(values: list[float], ref: float = 0.0) -> tuple[Arrays, list[Arrays]]:
    """A one-coordinate model per value (to check rules by hand)."""
    reference = {"w": np.array([ref], np.float32)}
    return reference, [{"w": np.array([v], np.float32)} for v in values]


def random_round(seed: int, n: int, shape: tuple[int, ...] = (37, 11)):
    rng = np.random.default_rng(seed)
    reference = {
        "w": rng.standard_normal(shape).astype(np.float32),
        "b": rng.standard_normal(5).astype(np.float32),
        "bn.num_batches_tracked": np.array(100, np.int64),
    }
    updates = [
        {
            "w": reference["w"] + rng.standard_normal(shape).astype(np.float32),
            "b": reference["b"] + rng.standard_normal(5).astype(np.float32),
            "bn.num_batches_tracked": np.array(100 + i, np.int64),
        }
        for i in range(n)
    ]
    return reference, updates


# --- exact results on hand-checkable inputs ---------------------------------------------


def test_median_of_odd_and_even_counts():
    ref, ups = scalars([5.0, 1.0, 3.0, 100.0, 2.0], ref=1.0)
    assert run(FedMedian(), ref, ups)["w"][0] == 3.0
    ref, ups = scalars([4.0, 1.0, 3.0, 100.0])
    assert run(FedMedian(), ref, ups)["w"][0] == 3.5


def test_trimmed_mean_drops_f_from_each_end_per_coordinate():
    ref = {"w": np.zeros(2, np.float32)}
    cols = [[1.0, 2.0, 3.0, 4.0, 100.0], [-50.0, 10.0, 20.0, 30.0, 40.0]]
    ups = [{"w": np.array([a, b], np.float32)} for a, b in zip(*cols, strict=True)]
    out = run(TrimmedMean(TrimmedMean.Params(f=1)), ref, ups)["w"]
    np.testing.assert_array_equal(out, [3.0, 20.0])
    out = run(TrimmedMean(TrimmedMean.Params(f=0)), ref, ups)["w"]
    np.testing.assert_allclose(out, [22.0, 10.0])


def test_krum_scores_and_choice_by_hand():
    # 1-D points 0, 1, 3, 10, 11; f=1 -> n - f - 2 = 2 nearest neighbours.
    # scores: 0: 1+9=10, 1: 1+4=5, 3: 4+9=13, 10: 1+49=50, 11: 1+64=65 -> picks 1.
    ref, ups = scalars([0.0, 1.0, 3.0, 10.0, 11.0])
    store = StackedDeltas(ref, 5)
    for u in ups:
        store.add(u, 1.0)
    np.testing.assert_allclose(
        robust.krum_scores(store.pairwise_sq_distances(), 1), [10, 5, 13, 50, 65]
    )
    assert run(Krum(Krum.Params(f=1)), ref, ups)["w"][0] == 1.0
    # Multi-Krum with m=3 averages 1, 0, 3.
    out = run(MultiKrum(MultiKrum.Params(f=1, m=3)), ref, ups)["w"][0]
    assert out == pytest.approx(4.0 / 3.0)
    # default m = n - f = 4: 1, 0, 3, 10.
    assert run(MultiKrum(MultiKrum.Params(f=1)), ref, ups)["w"][0] == pytest.approx(3.5)


def test_bulyan_by_hand():
    # n=7, f=1: theta=5 picked by repeated Krum, beta=3 closest to the median averaged.
    # Krum neighbours per pick: 4, 3, 2, 1, 1 (n' - f - 2, at least 1). Picks:
    #   2 (score 1+1+4+4), then 1 (1+4+9, tie with 3: first wins), 3 (1+9), 0 (16, tie
    #   with 4), and among {4, 50, -40}: 4 and -40 are each other's nearest (44^2 each,
    #   a tie the lower index wins), so 4.
    # Median of {2, 1, 3, 0, 4} is 2; the 3 closest are 2, 1, 3 -> mean 2.
    ref, ups = scalars([0.0, 1.0, 2.0, 3.0, 4.0, 50.0, -40.0])
    store = StackedDeltas(ref, 7)
    for u in ups:
        store.add(u, 1.0)
    picked = robust.bulyan_selection(store.pairwise_sq_distances(), 1, 5)
    assert picked.tolist() == [2, 1, 3, 0, 4]
    assert run(Bulyan(Bulyan.Params(f=1)), ref, ups)["w"][0] == 2.0


def test_closest_to_median_mean_per_coordinate():
    block = np.array([[0.0, 10.0], [1.0, 0.0], [2.0, 1.0], [9.0, 2.0], [10.0, 3.0]], np.float32)
    out = robust.closest_to_median_mean(block, 3)
    np.testing.assert_allclose(out, [1.0, 2.0])  # medians 2, 2: {2,1,0} and {2,1,3}
    assert out.dtype == np.float32


# --- robustness -------------------------------------------------------------------------


@pytest.mark.parametrize("cls", ALL)
def test_two_scaled_attackers_do_not_move_robust_rules(cls: type[RobustStrategy]):
    rng = np.random.default_rng(3)
    ref = {"w": np.zeros(200, np.float32)}
    # 9 + 2 updates: Bulyan needs n >= 4f + 3 = 11 for f = 2.
    honest = [{"w": (1.0 + 0.01 * rng.standard_normal(200)).astype(np.float32)} for _ in range(9)]
    attackers = [{"w": u["w"] * 1000} for u in honest[:2]]
    ups = honest + attackers
    mean = np.mean([u["w"] for u in ups], axis=0)
    assert np.abs(mean - 1.0).max() > 100  # the plain mean is ruined
    out = run(cls(cls.Params(f=2)), ref, ups)["w"]
    assert np.abs(out - 1.0).max() < 0.05


# --- f defaults and feasibility ----------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "n", "f"),
    [
        (Krum, 5, 1),
        (Krum, 7, 2),
        (Krum, 8, 2),
        (MultiKrum, 9, 3),
        (Bulyan, 7, 1),
        (Bulyan, 10, 1),
        (Bulyan, 11, 2),
        (TrimmedMean, 5, 2),
        (TrimmedMean, 6, 2),
        (FedMedian, 4, 1),
    ],
)
def test_default_f_is_the_largest_the_rule_allows(cls: type[RobustStrategy], n: int, f: int):
    assert resolve_f(cls.name, None, n, cls.per_f, cls.base) == f


@pytest.mark.parametrize(
    ("strategy", "need"),
    [
        (Krum(), 3),
        (Krum(Krum.Params(f=2)), 7),
        (Bulyan(), 3),
        (Bulyan(Bulyan.Params(f=2)), 11),
        (FedMedian(), 1),
        (TrimmedMean(TrimmedMean.Params(f=3)), 7),
        (MultiKrum(MultiKrum.Params(f=1, m=3)), 5),
        (MultiKrum(MultiKrum.Params(m=6)), 8),  # n=7 uses f=2 and keeps only 5
    ],
)
def test_min_updates_is_the_smallest_feasible_round(strategy: RobustStrategy, need: int):
    assert strategy.min_updates() == need
    ref, ups = random_round(1, need)
    run(strategy, ref, ups)  # feasible at the minimum
    with pytest.raises(InsufficientUpdates):
        run(strategy, ref, ups[:-1])


@pytest.mark.parametrize(
    ("cls", "f", "n", "message"),
    [
        (Krum, 2, 5, "krum with f=2 needs at least 7 updates, the round accepted 5"),
        (MultiKrum, 1, 4, "multikrum with f=1 needs at least 5 updates, the round accepted 4"),
        (Bulyan, 1, 6, "bulyan with f=1 needs at least 7 updates, the round accepted 6"),
        (Bulyan, None, 2, "bulyan with f=0 needs at least 3 updates, the round accepted 2"),
        (TrimmedMean, 2, 4, "trimmed_mean with f=2 needs at least 5 updates, the round accepted 4"),
        (FedMedian, 3, 6, "fedmedian with f=3 needs at least 7 updates, the round accepted 6"),
        (FedMedian, None, 0, "fedmedian with f=0 needs at least 1 updates, the round accepted 0"),
    ],
)
def test_too_few_updates_raise_a_clear_error(
    cls: type[RobustStrategy], f: int | None, n: int, message: str
):
    ref, ups = random_round(0, n)
    with pytest.raises(InsufficientUpdates) as err:
        run(cls(cls.Params(f=f)), ref, ups)
    assert str(err.value) == message


def test_multikrum_m_beyond_n_minus_f_is_refused():
    ref, ups = random_round(0, 7)
    with pytest.raises(InsufficientUpdates, match="multikrum with f=2 and m=6 needs at least 8"):
        run(MultiKrum(MultiKrum.Params(f=2, m=6)), ref, ups)


@pytest.mark.parametrize("bad", [{"f": -1}, {"f": 1.5}, {"f": "2"}, {"g": 1}, {"m": 0}])
def test_params_are_strict(bad: dict[str, object]):
    with pytest.raises(ValidationError):
        MultiKrum.Params.model_validate(bad)


# --- dtypes, blocks, spill ---------------------------------------------------------------


@pytest.mark.parametrize("cls", ALL)
def test_dtypes_and_shapes_are_kept(cls: type[RobustStrategy]):
    ref, ups = random_round(1, 11)
    ref["h"] = np.ones(3, np.float16)
    for u in ups:
        u["h"] = np.full(3, 2, np.float16)
    out = run(cls(), ref, ups)
    assert list(out) == list(ref)
    for name, a in ref.items():
        assert out[name].dtype == a.dtype and out[name].shape == a.shape
    assert out["bn.num_batches_tracked"] == 105  # median of 100..110
    np.testing.assert_array_equal(out["h"], np.full(3, 2, np.float16))


def test_integer_median_rounds_half_to_even():
    ref = {"c": np.array([0, 0], np.int32)}
    store = StackedDeltas(ref, 2)
    store.add({"c": np.array([1, 2], np.int32)}, 1.0)
    store.add({"c": np.array([2, 5], np.int32)}, 1.0)
    out = store.integer_medians()["c"]
    np.testing.assert_array_equal(out, [2, 4])
    assert out.dtype == np.int32


@pytest.mark.parametrize("cls", ALL)
def test_blockwise_equals_whole_matrix(cls: type[RobustStrategy], monkeypatch):
    ref, ups = random_round(2, 11, shape=(50, 40))
    whole = run(cls(), ref, ups)
    monkeypatch.setattr(robust, "BLOCK_ELEMS", 64)  # many blocks, the last one partial
    blocked = run(cls(), ref, ups)
    for name in ref:
        np.testing.assert_allclose(blocked[name], whole[name], rtol=1e-6, atol=1e-6)


def test_pairwise_distances_match_direct_differences():
    ref, ups = random_round(4, 9, shape=(300,))
    store = StackedDeltas(ref, 9)
    for u in ups:
        store.add(u, 1.0)
    flat = store.matrix.astype(np.float64)
    direct = ((flat[:, None, :] - flat[None, :, :]) ** 2).sum(axis=2)
    np.testing.assert_allclose(store.pairwise_sq_distances(7), direct, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("cls", ALL)
def test_memmap_spill_gives_identical_results(cls: type[RobustStrategy], monkeypatch, tmp_path):
    ref, ups = random_round(5, 11)
    in_ram = run(cls(), ref, ups)
    monkeypatch.setattr(robust, "SPILL_BYTES", 0)
    monkeypatch.setattr(cls, "spill_dir", tmp_path)
    strategy = cls()
    agg = strategy.aggregator(ref, len(ups))
    assert agg.spilled
    assert list(Path(tmp_path).iterdir()) == []  # unlinked at once, freed with the map
    for u in ups:
        agg.add(u, 1.0)
    assert isinstance(agg.matrix, np.memmap)
    spilled = strategy.apply(ref, agg)
    for name in ref:
        np.testing.assert_array_equal(spilled[name], in_ram[name])


def test_small_rounds_stay_in_ram():
    ref, _ = random_round(0, 1)
    assert not Krum().aggregator(ref, 10).spilled


def test_store_is_float32_and_weights_do_not_promote():
    ref = {"w": np.zeros(4, np.float32), "d": np.zeros(2, np.float64)}
    store = StackedDeltas(ref, 3)
    store.add({"w": np.ones(4, np.float32), "d": np.ones(2)}, np.float64(2.5))
    assert store.matrix.dtype == np.float32 and store.weights == [2.5]
    assert type(store.weights[0]) is float
    flat = store.mean_of_rows([0])
    assert flat.dtype == np.float32
    out = store.unflatten(flat)
    assert out["w"].dtype == np.float32 and out["d"].dtype == np.float64


def test_store_refuses_more_updates_than_expected():
    ref, ups = random_round(0, 2)
    store = StackedDeltas(ref, 1)
    store.add(ups[0], 1.0)
    with pytest.raises(ValueError, match="more than the expected 1"):
        store.add(ups[1], 1.0)


def test_robust_rules_ignore_weights():
    ref, ups = scalars([0.0, 1.0, 2.0, 3.0, 4.0])
    a = TrimmedMean(TrimmedMean.Params(f=1))
    agg = a.aggregator(ref, 5)
    for u, w in zip(ups, [1.0, 1.0, 1.0, 1.0, 1e6], strict=True):
        agg.add(u, w)
    assert a.apply(ref, agg)["w"][0] == 2.0
