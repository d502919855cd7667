"""Oracle tests: our aggregation strategies against Flower 1.41's on the same inputs.

Flower's strategies take whole models and example counts through ``aggregate_fit``; we
feed ours the same local models and counts, round after round, and compare the global
models (Flower computes in float64, we in float32: float32 tolerances). Where Flower's
convention differs on purpose, the test asserts the documented relationship instead.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import pytest

flwr = pytest.importorskip("flwr", minversion="1.41")

from flwr.common import (  # noqa: E402
    Code,
    FitRes,
    Parameters,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server.client_manager import SimpleClientManager  # noqa: E402
from flwr.server.client_proxy import ClientProxy  # noqa: E402
from flwr.server.strategy import FedAdagrad as FlowerFedAdagrad  # noqa: E402
from flwr.server.strategy import FedAdam as FlowerFedAdam  # noqa: E402
from flwr.server.strategy import FedAvg as FlowerFedAvg  # noqa: E402
from flwr.server.strategy import FedAvgM as FlowerFedAvgM  # noqa: E402
from flwr.server.strategy import FedProx as FlowerFedProx  # noqa: E402
from flwr.server.strategy import FedYogi as FlowerFedYogi  # noqa: E402
from flwr.server.strategy import Strategy as FlowerStrategy  # noqa: E402
from flwr.server.strategy.aggregate import aggregate  # noqa: E402

from strategies.base import Strategy  # noqa: E402
from strategies.fedavg import FedAvg  # noqa: E402
from strategies.fedopt import FedAdagrad, FedAdam, FedAvgM, FedProx, FedYogi  # noqa: E402

NAMES = ("conv.weight", "conv.bias", "fc.weight")
SHAPES = ((4, 3, 3), (4,), (6, 4))
SITES = 4
ROUNDS = 3
RTOL, ATOL = 2e-5, 2e-6  # models; moments (differences of models) get atol 1e-5


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


def initial_model() -> list[np.ndarray]:
    rng = np.random.default_rng(2024)
    return [rng.standard_normal(s).astype(np.float32) for s in SHAPES]


def site_rounds() -> Iterator[tuple[list[list[np.ndarray]], list[int]]]:
    """Per round: each site's local model (float32) and example count, seeded."""
    rng = np.random.default_rng(7)
    base = initial_model()
    for r in range(ROUNDS):
        drift = [rng.standard_normal(s).astype(np.float32) * 0.05 for s in SHAPES]
        models = [
            [
                (b + (r + 1) * d + rng.standard_normal(b.shape) * 0.1).astype(np.float32)
                for b, d in zip(base, drift, strict=True)
            ]
            for _ in range(SITES)
        ]
        yield models, [int(n) for n in rng.integers(5, 200, SITES)]


def as_dict(arrays: list[np.ndarray]) -> dict[str, np.ndarray]:
    return dict(zip(NAMES, arrays, strict=True))


def flower_round(
    strategy: FlowerStrategy, server_round: int, models: list[list[np.ndarray]], counts: list[int]
) -> list[np.ndarray]:
    results = [
        (
            FakeClient(f"site-{i}"),
            FitRes(
                status=Status(code=Code.OK, message=""),
                parameters=ndarrays_to_parameters(m),
                num_examples=n,
                metrics={},
            ),
        )
        for i, (m, n) in enumerate(zip(models, counts, strict=True))
    ]
    parameters, _ = strategy.aggregate_fit(server_round, results, [])
    assert parameters is not None
    return parameters_to_ndarrays(parameters)


def our_round(
    strategy: Strategy,
    model: dict[str, np.ndarray],
    models: list[list[np.ndarray]],
    counts: list[int],
) -> dict[str, np.ndarray]:
    agg = strategy.aggregator(model, len(models))
    for m, n in zip(models, counts, strict=True):
        agg.add(as_dict(m), n)
    out = strategy.apply(model, agg)
    assert all(v.dtype == np.float32 for v in out.values())
    return out


def assert_close(ours: dict[str, np.ndarray], theirs: list[np.ndarray]) -> None:
    for name, expected in zip(NAMES, theirs, strict=True):
        np.testing.assert_allclose(ours[name], expected, rtol=RTOL, atol=ATOL, err_msg=name)


def initial_parameters() -> Parameters:
    return ndarrays_to_parameters(initial_model())


def compare(ours: Strategy, theirs: FlowerStrategy) -> tuple[dict[str, np.ndarray], list]:
    """Run both over all rounds from the same start; returns the final models."""
    model = as_dict(initial_model())
    flower_model: list[np.ndarray] = []
    for r, (models, counts) in enumerate(site_rounds(), start=1):
        model = our_round(ours, model, models, counts)
        flower_model = flower_round(theirs, r, models, counts)
        assert_close(model, flower_model)
    return model, flower_model


# -- FedAvg and FedProx -----------------------------------------------------------------


def test_fedavg_matches_flower_weighted_aggregate():
    strategy = FedAvg()
    model = as_dict(initial_model())
    for models, counts in site_rounds():
        ours = our_round(strategy, model, models, counts)
        assert_close(ours, aggregate(list(zip(models, counts, strict=True))))
        assert_close(ours, flower_round(FlowerFedAvg(), 1, models, counts))
        model = ours


def test_fedavg_integer_tensors_keep_their_dtype_where_flower_returns_float64():
    # Documented difference: Flower's weighted mean of an int64 counter is float64; ours is
    # the same mean rounded to the nearest integer, in int64.
    counters = [np.array([3, 100], dtype=np.int64), np.array([4, 90], dtype=np.int64)]
    counts = [1, 2]
    theirs = aggregate([([c], n) for c, n in zip(counters, counts, strict=True)])[0]
    assert theirs.dtype == np.float64
    strategy = FedAvg()
    ref = {"n": np.array([0, 0], dtype=np.int64)}
    agg = strategy.aggregator(ref, 2)
    for c, n in zip(counters, counts, strict=True):
        agg.add({"n": c}, n)
    ours = strategy.apply(ref, agg)["n"]
    assert ours.dtype == np.int64
    np.testing.assert_array_equal(ours, np.rint(theirs).astype(np.int64))


def test_fedprox_matches_flower_aggregate_and_fit_config():
    mu = 0.3
    theirs = FlowerFedProx(proximal_mu=mu, initial_parameters=initial_parameters())
    ours = FedProx(FedProx.Params(mu=mu))
    compare(ours, theirs)
    # Flower sends "proximal_mu" in every fit config; so do we, under the same key.
    manager = SimpleClientManager()
    for i in range(2):
        manager.register(FakeClient(f"site-{i}"))
    for r in (1, 2):
        pairs = theirs.configure_fit(r, initial_parameters(), manager)
        assert pairs
        for _, fit_ins in pairs:
            assert fit_ins.config["proximal_mu"] == ours.fit_config(r)["proximal_mu"]


# -- FedAvgM ----------------------------------------------------------------------------


@pytest.mark.parametrize(("server_lr", "momentum"), [(1.0, 0.9), (0.7, 0.5), (1.3, 0.0)])
def test_fedavgm_matches_flower(server_lr: float, momentum: float):
    ours = FedAvgM(FedAvgM.Params(server_lr=server_lr, momentum=momentum))
    theirs = FlowerFedAvgM(
        initial_parameters=initial_parameters(),
        server_learning_rate=server_lr,
        server_momentum=momentum,
    )
    compare(ours, theirs)
    if momentum > 0:
        # Documented difference: Flower keeps the momentum of the pseudo-gradient
        # (global - average), i.e. the negation of ours (average - global); same models.
        state = ours.state()
        for name, flower_v in zip(NAMES, theirs.momentum_vector, strict=True):
            np.testing.assert_allclose(state[f"momentum/{name}"], -flower_v, rtol=RTOL, atol=ATOL)


# -- adaptive family ------------------------------------------------------------------


def assert_moments_match(ours: Strategy, theirs: FlowerStrategy) -> None:
    state = ours.state()
    for buffer, flower_buffers in (("m", theirs.m_t), ("v", theirs.v_t)):
        for name, expected in zip(NAMES, flower_buffers, strict=True):
            np.testing.assert_allclose(
                state[f"{buffer}/{name}"], expected, rtol=RTOL, atol=1e-5, err_msg=buffer
            )


@pytest.mark.parametrize(("eta", "tau"), [(0.1, 1e-9), (0.05, 1e-3)])
def test_fedadagrad_matches_flower(eta: float, tau: float):
    # Flower's FedAdagrad fixes beta_1 = 0 (no first-moment averaging); ours takes beta_1,
    # so set it to 0. Flower's eta_l is a client-side setting it never uses on the server.
    ours = FedAdagrad(FedAdagrad.Params(eta=eta, beta_1=0.0, tau=tau))
    theirs = FlowerFedAdagrad(initial_parameters=initial_parameters(), eta=eta, tau=tau)
    compare(ours, theirs)
    assert_moments_match(ours, theirs)


@pytest.mark.parametrize(
    ("eta", "beta_1", "beta_2", "tau"), [(1e-2, 0.9, 0.99, 1e-3), (0.05, 0.5, 0.9, 1e-2)]
)
def test_fedyogi_matches_flower(eta: float, beta_1: float, beta_2: float, tau: float):
    ours = FedYogi(FedYogi.Params(eta=eta, beta_1=beta_1, beta_2=beta_2, tau=tau))
    theirs = FlowerFedYogi(
        initial_parameters=initial_parameters(), eta=eta, beta_1=beta_1, beta_2=beta_2, tau=tau
    )
    compare(ours, theirs)
    assert_moments_match(ours, theirs)


ADAM = {"eta": 0.05, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3}


def flower_adam_eta(server_round: int) -> float:
    """Flower 1.41's FedAdam step size: Kingma & Ba's correction with exponent round + 1."""
    b1, b2 = ADAM["beta_1"], ADAM["beta_2"]
    return ADAM["eta"] * math.sqrt(1 - b2 ** (server_round + 1)) / (1 - b1 ** (server_round + 1))


def test_fedadam_paper_rule_is_flower_with_its_correction_folded_into_eta():
    # Documented difference: ours follows the paper (no bias correction) by default, while
    # Flower always scales eta by sqrt(1 - beta_2^(r+1)) / (1 - beta_1^(r+1)) in round r.
    # Our rule with that per-round eta (a new strategy each round, restored from the
    # previous one's state) reproduces Flower's models and moments exactly.
    theirs = FlowerFedAdam(initial_parameters=initial_parameters(), **ADAM)
    model = as_dict(initial_model())
    state: dict[str, np.ndarray] = {}
    for r, (models, counts) in enumerate(site_rounds(), start=1):
        ours = FedAdam(FedAdam.Params(**{**ADAM, "eta": flower_adam_eta(r)}))
        ours.load_state(state)
        model = our_round(ours, model, models, counts)
        assert_close(model, flower_round(theirs, r, models, counts))
        assert_moments_match(ours, theirs)
        state = ours.state()


def test_fedadam_bias_correction_is_flower_one_round_earlier():
    # Documented difference: with bias_correction=True we use exponent t (the server step,
    # 1 on the first round), as Kingma & Ba do; Flower uses server_round + 1. Driving
    # Flower with server_round = t - 1 therefore gives exactly our corrected rule.
    ours = FedAdam(FedAdam.Params(**ADAM, bias_correction=True))
    theirs = FlowerFedAdam(initial_parameters=initial_parameters(), **ADAM)
    model = as_dict(initial_model())
    for t, (models, counts) in enumerate(site_rounds(), start=1):
        model = our_round(ours, model, models, counts)
        assert_close(model, flower_round(theirs, t - 1, models, counts))
    assert_moments_match(ours, theirs)


def test_fedadam_default_differs_from_flower_by_its_correction():
    # The same inputs without any mapping: round 1 steps differ exactly by Flower's factor.
    ours = FedAdam(FedAdam.Params(**ADAM))
    theirs = FlowerFedAdam(initial_parameters=initial_parameters(), **ADAM)
    models, counts = next(site_rounds())
    start = as_dict(initial_model())
    mine = our_round(ours, start, models, counts)
    flower = flower_round(theirs, 1, models, counts)
    factor = flower_adam_eta(1) / ADAM["eta"]
    assert abs(factor - 1) > 0.1
    for name, f in zip(NAMES, flower, strict=True):
        np.testing.assert_allclose(
            f - start[name], factor * (mine[name] - start[name]), rtol=1e-4, atol=ATOL
        )
