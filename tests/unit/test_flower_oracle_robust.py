"""Oracle tests: our Byzantine-robust strategies against Flower 1.41's on the same inputs.

We feed both projects the same local models (float32, a (37, 11) weight and a (5,) bias)
and compare the global models. Ours works on deltas against the reference and returns
``reference + robust delta``; Flower works on the models themselves. Coordinate-wise
median and trimmed mean commute with that translation and Krum/Bulyan select by
distances, which do not change under it, so the outputs agree to float32 rounding.

Deliberate differences, each pinned down by a test below:

- Trimmed mean: Flower's ``FedTrimmedAvg(beta)`` cuts ``int(beta * n)`` values per end;
  ours cuts ``f``. ``beta = f / n`` matches, except where ``(f / n) * n`` rounds below
  ``f`` in floating point (e.g. ``n = 49, f = 1``): Flower then cuts one value fewer.
  We pass the smallest ``beta`` with ``int(beta * n) == f``.
- Multi-Krum: Flower (``num_clients_to_keep = m > 0``) averages the kept models weighted
  by ``num_examples``; ours is unweighted (a Byzantine site controls its example count).
  Equal counts match; unequal counts give Flower's weighted mean of the same selection.
- Krum/Multi-Krum neighbour count: both score with the ``n - f - 2`` nearest others (at
  least one). Ties: both take the lowest index among equal computed scores, but Flower's
  squared distances are ``float32 norm ** 2``, which can round an exact tie apart
  (sqrt(2) ** 2 is 1.99999988 in float32). Ours is exact on small integer inputs whose
  column means are integers (a float64 Gram matrix of mean-centred deltas); with other
  means its rounding can also split an exact tie, not always towards the lower index.
- Feasibility and defaults: ours refuses Krum below ``n = 2f + 3`` (Flower clamps the
  neighbour count to 1 and returns a model) and Multi-Krum with ``m > n - f``; with ``f``
  unset ours uses the largest feasible ``f``, Flower's ``num_malicious_clients`` is 0.
- Bulyan: the two agree: both need ``n >= 4f + 3`` (Flower raises ``ValueError``, ours
  ``InsufficientUpdates``), select ``theta = n - 2f`` models by repeated Krum on the
  shrinking set (same ``f``, ``max(n' - f - 2, 1)`` neighbours), then per coordinate
  average the ``beta = theta - 2f`` selected values closest to their median. Flower's
  ``Bulyan`` strategy must be given ``to_keep=0`` (passed on to ``aggregate_krum``, whose
  ``to_keep`` has no default: a ``TypeError`` otherwise; ``to_keep > 0`` makes the inner
  rule Multi-Krum, whose average is no input model: a ``ValueError``). Flower's
  ``aggregate_bulyan`` also pops the selected models from the list it is given.
- Integer tensors: ours never lets them into distances and gives them the coordinate-wise
  median of all updates in their own dtype. Flower's median, trimmed mean, Multi-Krum and
  Bulyan return float64; its Krum returns the chosen model's integers (dtype kept); and its
  distances include them (``np.concatenate`` promotes to float64), so a differing counter
  can change which model Krum picks.

Float64 tensors: deltas are taken at float64 and only then stored as float32, so an
update far below float32's spacing at the weights still counts (a regression test).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

flwr = pytest.importorskip("flwr", minversion="1.41")

from flwr.common import (  # noqa: E402
    Code,
    FitRes,
    NDArrays,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server.client_proxy import ClientProxy  # noqa: E402
from flwr.server.strategy import Bulyan as FlowerBulyan  # noqa: E402
from flwr.server.strategy import FedMedian as FlowerFedMedian  # noqa: E402
from flwr.server.strategy import FedTrimmedAvg as FlowerFedTrimmedAvg  # noqa: E402
from flwr.server.strategy import Krum as FlowerKrum  # noqa: E402
from flwr.server.strategy import Strategy as FlowerStrategy  # noqa: E402
from flwr.server.strategy.aggregate import (  # noqa: E402
    _aggregate_n_closest_weights,
    aggregate,
    aggregate_bulyan,
    aggregate_krum,
    aggregate_median,
    aggregate_trimmed_avg,
)

from strategies import robust  # noqa: E402
from strategies.errors import InsufficientUpdates  # noqa: E402
from strategies.robust import (  # noqa: E402
    Bulyan,
    FedMedian,
    Krum,
    MultiKrum,
    RobustStrategy,
    TrimmedMean,
)
from strategies.stacked import StackedDeltas  # noqa: E402

NAMES = ("fc.weight", "fc.bias")
SHAPES = ((37, 11), (5,))
SEEDS = (0, 1, 2)
RTOL, ATOL = 1e-6, 1e-6


class FakeClient(ClientProxy):
    """A client proxy that is never called: ``aggregate_fit`` only needs its identity."""

    def get_properties(self, ins, timeout, group_id):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def get_parameters(self, ins, timeout, group_id):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def fit(self, ins, timeout, group_id):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def evaluate(self, ins, timeout, group_id):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def reconnect(self, ins, timeout, group_id):  # type: ignore[no-untyped-def]
        raise NotImplementedError


# -- drivers ----------------------------------------------------------------------------


def random_round(
    seed: int, n: int, attackers: int = 0
) -> tuple[dict[str, np.ndarray], list[NDArrays], list[int]]:
    """A reference model, ``n`` local models around it (the last ``attackers`` of them
    pushed far off), and random example counts; all float32, seeded."""
    rng = np.random.default_rng(seed)
    reference = {
        k: rng.standard_normal(s).astype(np.float32) for k, s in zip(NAMES, SHAPES, strict=True)
    }
    models: list[NDArrays] = []
    for i in range(n):
        scale = 8.0 if i >= n - attackers else 1.0
        models.append(
            [
                (reference[k] + scale * rng.standard_normal(s)).astype(np.float32)
                for k, s in zip(NAMES, SHAPES, strict=True)
            ]
        )
    counts = [int(c) for c in rng.integers(5, 500, n)]
    return reference, models, counts


def scalars(values: Sequence[float]) -> list[NDArrays]:
    """One-coordinate float32 models, to check rules by hand."""
    return [[np.array([v], np.float32)] for v in values]


def ours(
    strategy: RobustStrategy,
    reference: dict[str, np.ndarray],
    models: Sequence[NDArrays],
    counts: Sequence[int] | None = None,
) -> dict[str, np.ndarray]:
    names = list(reference)
    weights = counts if counts is not None else [1] * len(models)
    agg = strategy.aggregator(reference, len(models))
    for m, w in zip(models, weights, strict=True):
        agg.add(dict(zip(names, m, strict=True)), float(w))
    out = strategy.apply(reference, agg)
    for name, a in reference.items():
        assert out[name].dtype == a.dtype and out[name].shape == a.shape
    return out


def theirs(
    strategy: FlowerStrategy, models: Sequence[NDArrays], counts: Sequence[int] | None = None
) -> NDArrays:
    """Flower's ``aggregate_fit`` on the same models and counts."""
    weights = counts if counts is not None else [1] * len(models)
    results: list[tuple[ClientProxy, FitRes]] = [
        (
            FakeClient(f"site-{i}"),
            FitRes(
                status=Status(code=Code.OK, message=""),
                parameters=ndarrays_to_parameters(list(m)),
                num_examples=w,
                metrics={},
            ),
        )
        for i, (m, w) in enumerate(zip(models, weights, strict=True))
    ]
    parameters, _ = strategy.aggregate_fit(1, results, [])
    assert parameters is not None
    return parameters_to_ndarrays(parameters)


def assert_close(mine: dict[str, np.ndarray], flower: NDArrays) -> None:
    for (name, got), expected in zip(mine.items(), flower, strict=True):
        assert got.dtype == expected.dtype, name
        np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL, err_msg=name)


def index_of(model: NDArrays, models: Sequence[NDArrays]) -> int:
    """Which input model Flower returned (Krum returns one of them unchanged)."""
    hits = [
        i
        for i, m in enumerate(models)
        if all(np.array_equal(a, b) for a, b in zip(model, m, strict=True))
    ]
    assert len(hits) == 1
    return hits[0]


def zero_reference(models: Sequence[NDArrays]) -> dict[str, np.ndarray]:
    return {f"t{i}": np.zeros_like(a) for i, a in enumerate(models[0])}


def flower_beta(f: int, n: int) -> float:
    """The smallest ``beta`` with ``int(beta * n) == f``: Flower then trims ``f`` per end."""
    beta = f / n
    while int(beta * n) < f:
        beta = float(np.nextafter(beta, 1.0))
    return beta


# -- coordinate-wise median -------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("n", [1, 4, 5, 8, 11])
def test_fedmedian_matches_flower(seed: int, n: int) -> None:
    reference, models, counts = random_round(seed, n, attackers=(n - 1) // 2)
    mine = ours(FedMedian(), reference, models, counts)
    assert_close(mine, theirs(FlowerFedMedian(), models, counts))
    assert_close(mine, aggregate_median(list(zip(models, counts, strict=True))))


def test_fedmedian_by_hand_in_both() -> None:
    models = scalars([5.0, 1.0, 3.0, 100.0, 2.0, 4.0])  # even count: mean of 3 and 4
    assert theirs(FlowerFedMedian(), models)[0][0] == 3.5
    assert ours(FedMedian(), {"w": np.array([1.0], np.float32)}, models)["w"][0] == 3.5


# -- trimmed mean ------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(("n", "f"), [(3, 1), (5, 1), (5, 2), (8, 3), (10, 2), (11, 0)])
def test_trimmed_mean_matches_flower_with_beta_f_over_n(seed: int, n: int, f: int) -> None:
    reference, models, counts = random_round(seed, n, attackers=f)
    assert int((f / n) * n) == f  # for these (n, f), f / n is exactly Flower's cut
    mine = ours(TrimmedMean(TrimmedMean.Params(f=f)), reference, models, counts)
    assert_close(mine, theirs(FlowerFedTrimmedAvg(beta=f / n), models, counts))


def test_trimmed_mean_by_hand_with_flowers_default_beta() -> None:
    # Flower's default beta = 0.2 cuts int(0.2 * 5) = 1 per end, i.e. our f = 1.
    cols = [[1.0, 2.0, 3.0, 4.0, 100.0], [-50.0, 10.0, 20.0, 30.0, 40.0]]
    models = [[np.array(pair, np.float32)] for pair in zip(*cols, strict=True)]
    np.testing.assert_array_equal(theirs(FlowerFedTrimmedAvg(), models)[0], [3.0, 20.0])
    mine = ours(TrimmedMean(TrimmedMean.Params(f=1)), {"w": np.zeros(2, np.float32)}, models)
    np.testing.assert_array_equal(mine["w"], [3.0, 20.0])


@pytest.mark.parametrize("seed", SEEDS)
def test_trimmed_mean_beta_f_over_n_can_round_down_a_cut(seed: int) -> None:
    # (1 / 49) * 49 = 0.9999999999999999, so Flower's beta = 1/49 trims nothing at n = 49.
    n, f = 49, 1
    assert int((f / n) * n) == 0
    reference, models, counts = random_round(seed, n, attackers=f)
    mine = ours(TrimmedMean(TrimmedMean.Params(f=f)), reference, models, counts)
    rounded_down = theirs(FlowerFedTrimmedAvg(beta=f / n), models, counts)
    plain = aggregate_trimmed_avg(list(zip(models, counts, strict=True)), 0.0)
    for a, b in zip(rounded_down, plain, strict=True):
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL)
    assert np.abs(mine[NAMES[0]] - rounded_down[0]).max() > 1e-3
    assert_close(mine, theirs(FlowerFedTrimmedAvg(beta=flower_beta(f, n)), models, counts))


# -- Krum and Multi-Krum ----------------------------------------------------------------

KRUM_CASES = [(3, 0), (5, 1), (7, 2), (8, 2), (11, 3), (12, 2)]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(("n", "f"), KRUM_CASES)
def test_krum_matches_flower(seed: int, n: int, f: int) -> None:
    reference, models, counts = random_round(seed, n, attackers=f)
    mine = ours(Krum(Krum.Params(f=f)), reference, models, counts)
    flower = theirs(FlowerKrum(num_malicious_clients=f), models, counts)
    assert_close(mine, flower)
    chosen = index_of(flower, models)
    assert chosen < n - f  # an honest model, not one of the attackers
    for name, a in zip(NAMES, models[chosen], strict=True):  # ours is that model, too
        np.testing.assert_allclose(mine[name], a, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize(("f", "expected"), [(0, 3.0), (1, 1.0)])
def test_krum_neighbour_count_n_minus_f_minus_2_by_hand(f: int, expected: float) -> None:
    # Points 0, 1, 3, 10, 11. f = 1: 2 neighbours, scores 10, 5, 13, 50, 65 -> 1.
    # f = 0: 3 neighbours, scores 110, 86, 62, 150, 185 -> 3.
    models = scalars([0.0, 1.0, 3.0, 10.0, 11.0])
    assert theirs(FlowerKrum(num_malicious_clients=f), models)[0][0] == expected
    assert ours(Krum(Krum.Params(f=f)), zero_reference(models), models)["t0"][0] == expected


def test_krum_exact_tie_goes_to_the_lowest_index_in_both() -> None:
    # Points -2, -1, 1, 2, 10 with f = 1 (2 neighbours): scores 10, 5, 5, 10, 145.
    models = scalars([-2.0, -1.0, 1.0, 2.0, 10.0])
    assert theirs(FlowerKrum(num_malicious_clients=1), models)[0][0] == -1.0
    assert ours(Krum(Krum.Params(f=1)), zero_reference(models), models)["t0"][0] == -1.0


def test_krum_flowers_float32_distances_can_break_a_tie_otherwise() -> None:
    # 2-D points; exact squared distances d01 = 9, d02 = 5, d03 = 1, d12 = 2, d14 = 4.
    # With 2 neighbours, sites 0 and 1 tie at 1 + 5 = 2 + 4 = 6. Flower's d12 is
    # float32(sqrt(2)) ** 2 = 1.99999988, so site 1 wins there. Column means are 0, so
    # our centred Gram matrix is exact and the tie goes to the lower index: site 0.
    points = [[-2.0, 0.0], [1.0, 0.0], [0.0, -1.0], [-2.0, 1.0], [3.0, 0.0]]
    models = [[np.array(p, np.float32)] for p in points]
    assert np.float32(np.linalg.norm(np.float32([1.0, 1.0]))) ** 2 < 2.0
    flower = theirs(FlowerKrum(num_malicious_clients=1), models)
    assert index_of(flower, models) == 1
    mine = ours(Krum(Krum.Params(f=1)), zero_reference(models), models)["t0"]
    np.testing.assert_array_equal(mine, points[0])


def test_krum_refuses_fewer_than_2f_plus_3_updates_where_flower_clamps() -> None:
    models = scalars([0.0, 1.0, 2.0, 3.0])  # n = 4 < 2 * 2 + 3
    assert theirs(FlowerKrum(num_malicious_clients=2), models)[0][0] in (0.0, 1.0, 2.0, 3.0)
    with pytest.raises(InsufficientUpdates, match="krum with f=2 needs at least 7 updates"):
        ours(Krum(Krum.Params(f=2)), zero_reference(models), models)


def test_unset_f_is_the_largest_feasible_where_flower_defaults_to_zero() -> None:
    models = scalars([0.0, 1.0, 3.0, 10.0, 11.0])  # ours: f = 1 for n = 5; Flower: f = 0
    assert ours(Krum(), zero_reference(models), models)["t0"][0] == 1.0
    assert theirs(FlowerKrum(), models)[0][0] == 3.0


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(
    ("n", "f", "m"), [(5, 1, 3), (5, 1, None), (7, 2, 2), (8, 2, 5), (11, 3, None), (12, 2, 1)]
)
def test_multikrum_matches_flower_with_equal_counts(
    seed: int, n: int, f: int, m: int | None
) -> None:
    reference, models, _ = random_round(seed, n, attackers=f)
    keep = m if m is not None else n - f  # our default m
    mine = ours(MultiKrum(MultiKrum.Params(f=f, m=m)), reference, models, [3] * n)
    flower = FlowerKrum(num_malicious_clients=f, num_clients_to_keep=keep)
    assert_close(mine, theirs(flower, models, [3] * n))


def kept_by_multikrum(models: Sequence[NDArrays], f: int, m: int) -> list[int]:
    store = StackedDeltas(zero_reference(models), len(models))
    for i, model in enumerate(models):
        store.add({f"t{j}": a for j, a in enumerate(model)}, float(i))
    scores = robust.krum_scores(store.pairwise_sq_distances(), f)
    return sorted(np.argsort(scores, kind="stable")[:m].tolist())


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(("n", "f", "m"), [(7, 2, 3), (11, 3, 8)])
def test_multikrum_flower_weights_the_same_selection_by_num_examples(
    seed: int, n: int, f: int, m: int
) -> None:
    reference, models, counts = random_round(seed, n, attackers=f)
    kept = kept_by_multikrum(models, f, m)
    flower = theirs(FlowerKrum(num_malicious_clients=f, num_clients_to_keep=m), models, counts)
    weighted = aggregate([(models[i], counts[i]) for i in kept])
    for a, b in zip(flower, weighted, strict=True):
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL)
    mine = ours(MultiKrum(MultiKrum.Params(f=f, m=m)), reference, models, counts)
    unweighted = [np.mean([models[i][j] for i in kept], axis=0) for j in range(len(NAMES))]
    assert_close(mine, unweighted)
    assert np.abs(mine[NAMES[0]] - flower[0]).max() > 1e-2


def test_multikrum_a_kept_site_claiming_many_examples_dominates_flower_only() -> None:
    # Points 0, 1, 2, 10, 11; f = 1, m = 3: scores 5, 2, 5, 65, 82 keep 0, 1, 2.
    models = scalars([0.0, 1.0, 2.0, 10.0, 11.0])
    counts = [1, 1, 1000, 1, 1]
    flower = theirs(FlowerKrum(num_malicious_clients=1, num_clients_to_keep=3), models, counts)
    assert flower[0][0] == pytest.approx(2001.0 / 1002.0)
    mine = ours(MultiKrum(MultiKrum.Params(f=1, m=3)), zero_reference(models), models, counts)
    assert mine["t0"][0] == 1.0


def test_multikrum_refuses_m_beyond_n_minus_f_where_flower_does_not() -> None:
    models = scalars([0.0, 1.0, 2.0, 10.0, 11.0])
    assert theirs(FlowerKrum(num_malicious_clients=1, num_clients_to_keep=5), models)[0][0] == 4.8
    with pytest.raises(InsufficientUpdates, match="multikrum with f=1 and m=5"):
        ours(MultiKrum(MultiKrum.Params(f=1, m=5)), zero_reference(models), models)


# -- Bulyan ------------------------------------------------------------------------------

BULYAN_CASES = [(3, 0), (7, 1), (10, 1), (11, 2), (15, 3)]


def flower_bulyan(f: int) -> FlowerBulyan:
    """Flower's Bulyan over Krum: ``to_keep=0`` must be passed on to ``aggregate_krum``."""
    return FlowerBulyan(num_malicious_clients=f, to_keep=0)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(("n", "f"), BULYAN_CASES)
def test_bulyan_matches_flower(seed: int, n: int, f: int) -> None:
    reference, models, counts = random_round(seed, n, attackers=f)
    mine = ours(Bulyan(Bulyan.Params(f=f)), reference, models, counts)
    assert_close(mine, theirs(flower_bulyan(f), models, counts))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(("n", "f"), BULYAN_CASES)
def test_bulyan_selects_the_same_theta_models_as_flower(seed: int, n: int, f: int) -> None:
    # aggregate_bulyan pops each selected model from the list it is given: the 2f left
    # over are exactly the ones it did not select.
    _, models, counts = random_round(seed, n, attackers=f)
    results = list(zip(models, counts, strict=True))
    aggregate_bulyan(results, f, aggregate_krum, to_keep=0)
    assert len(results) == 2 * f
    left = {index_of(m, models) for m, _ in results}
    store = StackedDeltas(zero_reference(models), n)
    for model in models:
        store.add({f"t{j}": a for j, a in enumerate(model)}, 1.0)
    picked = robust.bulyan_selection(store.pairwise_sq_distances(), f, n - 2 * f)
    assert sorted(picked.tolist()) == sorted(set(range(n)) - left)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(("theta", "beta"), [(3, 3), (5, 3), (8, 4), (9, 3)])
def test_bulyan_final_step_matches_flowers_n_closest_to_the_median(
    seed: int, theta: int, beta: int
) -> None:
    rng = np.random.default_rng(seed)
    block = rng.standard_normal((theta, 300)).astype(np.float32)
    selected = [([row], 1) for row in block]
    median = aggregate_median(selected)
    flower = _aggregate_n_closest_weights(median, selected, beta_closest=beta)[0]
    mine = robust.closest_to_median_mean(block, beta)
    np.testing.assert_allclose(mine, flower, rtol=RTOL, atol=ATOL)


def test_bulyan_by_hand_in_both() -> None:
    # n = 7, f = 1: theta = 5 picked (2, 1, 3, 0, 4), median 2, beta = 3 closest: 2, 1, 3.
    models = scalars([0.0, 1.0, 2.0, 3.0, 4.0, 50.0, -40.0])
    assert theirs(flower_bulyan(1), models)[0][0] == 2.0
    assert ours(Bulyan(Bulyan.Params(f=1)), zero_reference(models), models)["t0"][0] == 2.0


@pytest.mark.parametrize("f", [1, 2])
def test_bulyan_needs_4f_plus_3_updates_in_both(f: int) -> None:
    _, models, _ = random_round(f, 4 * f + 3)
    ref = zero_reference(models)
    theirs(flower_bulyan(f), models)
    ours(Bulyan(Bulyan.Params(f=f)), ref, models)
    fewer = models[:-1]
    with pytest.raises(ValueError, match=r"greater or equal to the 4 \* num_malicious \+ 3"):
        theirs(flower_bulyan(f), fewer)
    with pytest.raises(InsufficientUpdates, match=f"bulyan with f={f} needs at least {4 * f + 3}"):
        ours(Bulyan(Bulyan.Params(f=f)), ref, fewer)


def test_flower_bulyan_needs_to_keep_zero_for_its_krum() -> None:
    models = scalars([0.0, 1.0, 2.0, 3.0, 4.0, 50.0, -40.0])
    with pytest.raises(TypeError, match="to_keep"):
        theirs(FlowerBulyan(num_malicious_clients=1), models)
    with pytest.raises(ValueError, match="reference weights not found"):
        theirs(FlowerBulyan(num_malicious_clients=1, to_keep=2), models)


# -- integer tensors ---------------------------------------------------------------------


def counter_round() -> tuple[dict[str, np.ndarray], list[NDArrays]]:
    """Seven models of a float32 weight and an int64 counter 100..106."""
    rng = np.random.default_rng(11)
    reference = {"w": np.zeros(6, np.float32), "n": np.array(100, np.int64)}
    models: list[NDArrays] = [
        [rng.standard_normal(6).astype(np.float32), np.array(100 + i, np.int64)] for i in range(7)
    ]
    return reference, models


@pytest.mark.parametrize(
    ("mine", "flower"),
    [
        (FedMedian(), FlowerFedMedian()),
        (TrimmedMean(TrimmedMean.Params(f=1)), FlowerFedTrimmedAvg(beta=1 / 7)),
        (
            MultiKrum(MultiKrum.Params(f=1)),
            FlowerKrum(num_malicious_clients=1, num_clients_to_keep=6),
        ),
        (Bulyan(Bulyan.Params(f=1)), flower_bulyan(1)),
    ],
    ids=["median", "trimmed_mean", "multikrum", "bulyan"],
)
def test_integer_tensors_keep_their_dtype_where_flower_returns_float64(
    mine: RobustStrategy, flower: FlowerStrategy
) -> None:
    reference, models = counter_round()
    counter = ours(mine, reference, models)["n"]
    assert counter.dtype == np.int64 and counter == 103  # median of 100..106
    flower_counter = theirs(flower, models)[1]
    assert flower_counter.dtype == np.float64


def test_integer_tensors_under_krum_flower_returns_the_chosen_models_counter() -> None:
    reference, models = counter_round()
    flower = theirs(FlowerKrum(num_malicious_clients=1), models)
    chosen = index_of(flower, models)
    assert flower[1].dtype == np.int64 and flower[1] == 100 + chosen
    assert ours(Krum(Krum.Params(f=1)), reference, models)["n"] == 103


def test_integer_tensors_enter_flowers_krum_distances_but_not_ours() -> None:
    # Points 0, 1, 3, 10, 11 pick 1 (see the neighbour-count test). A counter 30 higher
    # at that site adds 900 to its squared distances in Flower, which then picks 10.
    models = [
        [np.array([v], np.float32), np.array(c, np.int64)]
        for v, c in zip([0.0, 1.0, 3.0, 10.0, 11.0], [100, 130, 100, 100, 100], strict=True)
    ]
    reference = {"w": np.zeros(1, np.float32), "n": np.array(0, np.int64)}
    flower = theirs(FlowerKrum(num_malicious_clients=1), models)
    assert flower[0][0] == 10.0
    mine = ours(Krum(Krum.Params(f=1)), reference, models)
    assert mine["w"][0] == 1.0 and mine["n"] == 100


# -- float64 tensors -----------------------------------------------------------------------


def test_float64_tensors_keep_small_updates() -> None:
    rng = np.random.default_rng(5)
    reference = {"w": 1000.0 + rng.standard_normal(8)}
    models: list[NDArrays] = [[reference["w"] + 1e-5 * rng.standard_normal(8)] for _ in range(5)]
    flower = theirs(FlowerFedMedian(), models)[0]
    mine = ours(FedMedian(), reference, models)["w"]
    # float32 precision of the delta (~1e-5), not of the weights (~6e-5 at 1000).
    np.testing.assert_allclose(mine - reference["w"], flower - reference["w"], rtol=1e-5)
