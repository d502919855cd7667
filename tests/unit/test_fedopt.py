"""Server-optimizer strategies: hand-checked rules, state round trips, dtypes, params."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pytest
from pydantic import ValidationError

from strategies.base import Arrays
from strategies.fedopt import (
    FedAdagrad,
    FedAdam,
    FedAvgM,
    FedProx,
    FedYogi,
    ServerOptimizer,
)

# The global model of the hand-checked tests: a float32 tensor and an integer counter.
X0 = {"w": np.array([1.0, -2.0], dtype=np.float32), "n": np.array([10], dtype=np.int64)}
# Round 1: two sites; the example-weighted mean delta of "w" is [0.25, 1.5], of "n" 1.
ROUND_1 = [([1.0, 0.0], 4, 1), ([0.0, 2.0], 0, 3)]  # (delta of w, delta of n, weight)


def site(model: Arrays, delta_w: Sequence[float], delta_n: int) -> dict[str, np.ndarray]:
    """A site's local model: the global model moved by the given deltas."""
    return {
        "w": model["w"] + np.asarray(delta_w, dtype=np.float32),
        "n": model["n"] + delta_n,
    }


def run_round(
    strategy: ServerOptimizer, model: Arrays, sites: Sequence[tuple[Sequence[float], int, float]]
) -> dict[str, np.ndarray]:
    agg = strategy.aggregator(model, len(sites))
    for delta_w, delta_n, weight in sites:
        agg.add(site(model, delta_w, delta_n), weight)
    return strategy.apply(model, agg)


def run_rounds(strategy: ServerOptimizer, deltas: Sequence[Sequence[float]]) -> np.ndarray:
    """Round 1 as ROUND_1, then one site (weight 1) per delta; returns the final ``w``."""
    model = run_round(strategy, X0, ROUND_1)
    for d in deltas:
        model = run_round(strategy, model, [(d, 0, 1.0)])
    assert model["w"].dtype == np.float32
    return model["w"]


# -- hand-checked rules ---------------------------------------------------------------


def test_fedprox_is_fedavg_on_the_server_and_sends_mu():
    strategy = FedProx(FedProx.Params(mu=0.5))
    out = run_round(strategy, X0, ROUND_1)
    np.testing.assert_array_equal(out["w"], np.array([1.25, -0.5], dtype=np.float32))
    np.testing.assert_array_equal(out["n"], np.array([11]))
    assert out["n"].dtype == np.int64
    assert strategy.fit_config(1) == {"proximal_mu": 0.5}
    assert FedProx().fit_config(3) == {"proximal_mu": 0.01}
    assert strategy.state() == {}


def test_fedavgm_one_and_two_rounds():
    strategy = FedAvgM(FedAvgM.Params(server_lr=2.0, momentum=0.5))
    x1 = run_round(strategy, X0, ROUND_1)
    # v = [0.25, 1.5]; x = [1, -2] + 2 v
    np.testing.assert_array_equal(x1["w"], np.array([1.5, 1.0], dtype=np.float32))
    assert int(x1["n"][0]) == 11  # integer tensors take FedAvg, not momentum
    x2 = run_round(strategy, x1, [([1.0, -1.0], 0, 1.0)])
    # v = 0.5 [0.25, 1.5] + [1, -1] = [1.125, -0.25]; x = [1.5, 1] + 2 v
    np.testing.assert_array_equal(x2["w"], np.array([3.75, 0.5], dtype=np.float32))
    np.testing.assert_array_equal(strategy.state()["momentum/w"], [1.125, -0.25])
    assert int(strategy.state()["step"]) == 2


def test_fedavgm_without_momentum_at_unit_lr_is_fedavg():
    out = run_round(FedAvgM(FedAvgM.Params(momentum=0.0)), X0, ROUND_1)
    np.testing.assert_array_equal(out["w"], run_round(FedProx(), X0, ROUND_1)["w"])


def test_fedadagrad_one_and_two_rounds():
    strategy = FedAdagrad(FedAdagrad.Params(eta=0.1, beta_1=0.0, tau=0.5))
    x1 = run_round(strategy, X0, ROUND_1)
    # m = [0.25, 1.5], v = [0.0625, 2.25], sqrt(v) + tau = [0.75, 2]
    expected_1 = np.array([1.0 + 0.1 * 0.25 / 0.75, -2.0 + 0.1 * 1.5 / 2.0])
    np.testing.assert_allclose(x1["w"], expected_1, rtol=1e-6)
    x2 = run_round(strategy, x1, [([1.0, -1.0], 0, 1.0)])
    # m = [1, -1], v = [1.0625, 3.25]
    step = 0.1 * np.array([1.0, -1.0]) / (np.sqrt([1.0625, 3.25]) + 0.5)
    np.testing.assert_allclose(x2["w"], expected_1 + step, rtol=1e-6)
    np.testing.assert_allclose(strategy.state()["v/w"], [1.0625, 3.25], rtol=1e-7)


def test_fedadagrad_with_momentum():
    w = run_rounds(FedAdagrad(FedAdagrad.Params(eta=0.1, beta_1=0.5, tau=0.5)), [])
    # m = 0.5 [0.25, 1.5] = [0.125, 0.75], v = [0.0625, 2.25]
    np.testing.assert_allclose(w, [1.0 + 0.1 * 0.125 / 0.75, -2.0 + 0.1 * 0.75 / 2.0], rtol=1e-6)


ADAM = {"eta": 0.1, "beta_1": 0.5, "beta_2": 0.75, "tau": 0.5}
# Adam/Yogi round 1: m = [0.125, 0.75], v = 0.25 Δ² = [0.015625, 0.5625], sqrt(v) = m
X1_ADAM = np.array([1.0 + 0.1 * 0.125 / 0.625, -2.0 + 0.1 * 0.75 / 1.25])  # [1.02, -1.94]
M2 = np.array([0.5625, -0.125])  # 0.5 m + 0.5 [1, -1]


def test_fedadam_one_and_two_rounds():
    np.testing.assert_allclose(run_rounds(FedAdam(FedAdam.Params(**ADAM)), []), X1_ADAM, rtol=1e-6)
    v2 = np.array([0.26171875, 0.671875])  # 0.75 v + 0.25 [1, 1]
    w = run_rounds(FedAdam(FedAdam.Params(**ADAM)), [[1.0, -1.0]])
    np.testing.assert_allclose(w, X1_ADAM + 0.1 * M2 / (np.sqrt(v2) + 0.5), rtol=1e-6)


def test_fedadam_bias_correction_uses_the_server_step():
    strategy = FedAdam(FedAdam.Params(**ADAM, bias_correction=True))
    # t = 1: eta * sqrt(1 - 0.75) / (1 - 0.5) = eta, the same first step.
    np.testing.assert_allclose(run_rounds(strategy, []), X1_ADAM, rtol=1e-6)
    strategy = FedAdam(FedAdam.Params(**ADAM, bias_correction=True))
    eta_2 = 0.1 * math.sqrt(1 - 0.75**2) / (1 - 0.5**2)
    v2 = np.array([0.26171875, 0.671875])
    w = run_rounds(strategy, [[1.0, -1.0]])
    np.testing.assert_allclose(w, X1_ADAM + eta_2 * M2 / (np.sqrt(v2) + 0.5), rtol=1e-6)


def test_fedyogi_grows_and_shrinks_v_by_the_sign_rule():
    strategy = FedYogi(FedYogi.Params(**ADAM))
    np.testing.assert_allclose(run_rounds(strategy, []), X1_ADAM, rtol=1e-6)
    strategy = FedYogi(FedYogi.Params(**ADAM))
    w = run_rounds(strategy, [[1.0, -1.0], [0.25, 0.5]])
    # round 2: v < Δ² = 1 so v += 0.25: [0.265625, 0.8125] (Adam would give 0.26171875, ...)
    # round 3: v > Δ² = [0.0625, 0.25] so v -= 0.25 Δ²: [0.25, 0.75]
    np.testing.assert_allclose(strategy.state()["v/w"], [0.25, 0.75], rtol=1e-7)
    x2 = X1_ADAM + 0.1 * M2 / (np.sqrt([0.265625, 0.8125]) + 0.5)
    m3 = 0.5 * M2 + 0.5 * np.array([0.25, 0.5])
    np.testing.assert_allclose(w, x2 + 0.1 * m3 / (np.sqrt([0.25, 0.75]) + 0.5), rtol=1e-6)


def test_zero_delta_leaves_adaptive_models_unchanged():
    for cls in (FedAdagrad, FedAdam, FedYogi):
        out = run_round(cls(), X0, [([0.0, 0.0], 0, 1.0)])
        np.testing.assert_array_equal(out["w"], X0["w"])


# -- state -----------------------------------------------------------------------------

STATEFUL = [FedAvgM, FedAdagrad, FedAdam, FedYogi]


def random_model(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        "layer/weight": rng.standard_normal((5, 3)).astype(np.float32),
        "bias": rng.standard_normal(3).astype(np.float32),
        "head": rng.standard_normal(4),  # float64 stays float64
        "bn.num_batches_tracked": np.array(7, dtype=np.int64),
    }


def random_round(
    strategy: ServerOptimizer, model: Arrays, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    agg = strategy.aggregator(model, 3)
    for _ in range(3):
        local = {
            k: (v + rng.standard_normal(v.shape) * 0.1).astype(v.dtype) for k, v in model.items()
        }
        local["bn.num_batches_tracked"] = model["bn.num_batches_tracked"] + rng.integers(0, 9)
        agg.add(local, float(rng.integers(1, 50)))
    return strategy.apply(model, agg)


@pytest.mark.parametrize("cls", STATEFUL)
def test_restored_state_continues_bit_identically(cls: type[ServerOptimizer]):
    params = cls.Params.model_validate({"bias_correction": True} if cls is FedAdam else {})
    rng = np.random.default_rng(3)
    model = random_model(rng)
    never_stopped = cls(params)
    for _ in range(2):
        model = random_round(never_stopped, model, rng)
    saved = never_stopped.state()
    assert saved["step"].shape == () and saved["step"].dtype == np.int64
    restored = cls(params)
    restored.load_state(saved)
    seed = rng.integers(1 << 31)
    a, b = model, model
    for _ in range(3):
        a = random_round(never_stopped, a, np.random.default_rng(seed))
        b = random_round(restored, b, np.random.default_rng(seed))
        seed += 1
        for name in a:
            assert a[name].dtype == b[name].dtype == model[name].dtype
            np.testing.assert_array_equal(a[name], b[name])
    for key, value in never_stopped.state().items():
        np.testing.assert_array_equal(restored.state()[key], value)


@pytest.mark.parametrize("cls", STATEFUL)
def test_state_is_a_copy_and_names_its_buffers(cls: type[ServerOptimizer]):
    strategy = cls()
    rng = np.random.default_rng(1)
    model = random_round(strategy, random_model(rng), rng)
    saved = strategy.state()
    names = {k.partition("/")[0] for k in saved if k != "step"}
    assert names == set(cls.buffers)
    tensors = {k.partition("/")[2] for k in saved if k != "step"}
    assert tensors == {"layer/weight", "bias", "head"}  # float tensors only
    assert saved[f"{cls.buffers[0]}/bias"].dtype == np.float32
    assert saved[f"{cls.buffers[0]}/head"].dtype == np.float64
    before = {k: v.copy() for k, v in saved.items()}
    random_round(strategy, model, rng)
    for key, value in before.items():
        np.testing.assert_array_equal(saved[key], value)


def test_load_state_validates():
    strategy = FedAdam()
    rng = np.random.default_rng(2)
    model = random_model(rng)
    random_round(strategy, model, rng)
    good = strategy.state()
    bad_states = [
        {k: v for k, v in good.items() if k != "step"},  # no step
        {**good, "step": np.array([1])},  # step not 0-d
        {**good, "step": np.array(-1)},  # negative step
        {**good, "momentum/bias": good["m/bias"]},  # unknown buffer
        {**good, "m/": good["m/bias"]},  # no tensor name
        {k: v for k, v in good.items() if k != "v/bias"},  # m and v disagree on tensors
        {**good, "v/bias": np.zeros(4, dtype=np.float32)},  # m and v disagree on shapes
        {**good, "m/bias": np.zeros(3, dtype=np.int64), "v/bias": np.zeros(3, np.int64)},
    ]
    for state in bad_states:
        with pytest.raises(ValueError):
            FedAdam().load_state(state)
    with pytest.raises(ValueError, match="keeps no state"):
        FedProx().load_state(good)
    FedProx().load_state({})


def test_state_that_does_not_fit_the_model_is_refused_at_apply():
    strategy = FedYogi()
    rng = np.random.default_rng(4)
    model = random_model(rng)
    random_round(strategy, model, rng)
    restored = FedYogi()
    restored.load_state(strategy.state())
    wrong = {**model, "bias": np.zeros(7, dtype=np.float32)}
    with pytest.raises(ValueError, match="does not fit"):
        random_round(restored, wrong, rng)
    extra = {**model, "other": np.zeros(2, dtype=np.float32)}
    with pytest.raises(ValueError, match="does not match"):
        random_round(restored, extra, rng)


def test_empty_state_resets():
    strategy = FedAvgM()
    rng = np.random.default_rng(5)
    model = random_model(rng)
    first = random_round(strategy, model, np.random.default_rng(9))
    random_round(strategy, first, rng)
    strategy.load_state({})
    again = random_round(strategy, model, np.random.default_rng(9))
    for name in first:
        np.testing.assert_array_equal(first[name], again[name])


# -- dtypes -------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [FedProx, *STATEFUL])
def test_float32_survives_float64_weights_and_params(cls: type[ServerOptimizer]):
    # np.float64 weights and parameters must not promote float32 tensors (NumPy 2, NEP 50).
    fields = cls.Params.model_fields
    raw = {k: np.float64(0.5) for k in ("eta", "beta_1", "beta_2", "tau", "server_lr", "momentum")}
    strategy = cls(cls.Params.model_validate({k: v for k, v in raw.items() if k in fields}))
    model = {
        "w": np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3),
        "h": np.ones(2, dtype=np.float16),
        "n": np.array([3], dtype=np.int32),
    }
    for _ in range(2):
        agg = strategy.aggregator(model, 2)
        agg.add({k: v + v.dtype.type(1) for k, v in model.items()}, np.float64(2.0))
        agg.add(dict(model), np.float64(1.0))
        model = strategy.apply(model, agg)
        assert {k: v.dtype for k, v in model.items()} == {
            "w": np.float32,
            "h": np.float16,
            "n": np.int32,
        }
    for value in strategy.state().values():
        assert value.dtype in (np.float32, np.int64)


# -- params -------------------------------------------------------------------------------


def test_defaults():
    assert FedProx.Params().mu == 0.01
    assert (FedAvgM.Params().server_lr, FedAvgM.Params().momentum) == (1.0, 0.9)
    p = FedAdagrad.Params()
    assert (p.eta, p.beta_1, p.tau) == (1e-2, 0.0, 1e-3)
    p = FedAdam.Params()
    assert (p.eta, p.beta_1, p.beta_2, p.tau, p.bias_correction) == (1e-2, 0.9, 0.99, 1e-3, False)
    p = FedYogi.Params()
    assert (p.eta, p.beta_1, p.beta_2, p.tau) == (1e-2, 0.9, 0.99, 1e-3)
    assert FedAvgM.Params.model_validate({"server_lr": 1}).server_lr == 1.0  # YAML int


@pytest.mark.parametrize(
    ("cls", "params"),
    [
        (FedAvgM, {"momentum": 1.0}),
        (FedAvgM, {"momentum": -0.1}),
        (FedAvgM, {"server_lr": 0.0}),
        (FedAvgM, {"lr": 1.0}),  # unknown
        (FedProx, {"mu": -1.0}),
        (FedProx, {"proximal_mu": 0.1}),  # unknown: the YAML key is mu
        (FedProx, {"mu": float("nan")}),
        (FedAdam, {"eta": 0.0}),
        (FedAdam, {"tau": 0.0}),
        (FedAdam, {"beta_2": 1.0}),
        (FedAdam, {"eta": "0.1"}),  # strict: no strings
        (FedAdam, {"eta_l": 0.1}),  # Flower's client lr is not a server parameter
        (FedYogi, {"beta_1": 1.0}),
        (FedYogi, {"tau": float("inf")}),
        (FedYogi, {"bias_correction": True}),
        (FedAdagrad, {"beta_2": 0.9}),  # Adagrad has no second-moment decay
    ],
)
def test_bad_params_are_refused(cls: type[ServerOptimizer], params: dict[str, object]):
    with pytest.raises(ValidationError):
        cls.Params.model_validate(params)


def test_params_are_frozen():
    p = FedAdam.Params()
    with pytest.raises(ValidationError):
        p.eta = 1.0  # type: ignore[misc]


def test_names():
    names = [c.name for c in (FedProx, FedAvgM, FedAdagrad, FedAdam, FedYogi)]
    assert names == ["fedprox", "fedavgm", "fedadagrad", "fedadam", "fedyogi"]
