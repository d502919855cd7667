"""Local DP-SGD in the torch adapter: real Opacus, real torch, a small MLP on digits."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from opacus.accountants import PRVAccountant, RDPAccountant
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from client_sdk.errors import ClientError, LocalBudgetExhausted
from client_sdk.local_dp import LocalDPSettings
from client_sdk.torch import SCAFFOLD_C, SCAFFOLD_DELTA_C, TorchClient, arrays_from_module

# Opacus' backward hooks make torch note that no input requires a gradient.
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")

N = 300
BATCH = 32
Z = 1.0
DELTA = 1e-5
DP = {
    "local_dp_noise_multiplier": Z,
    "local_dp_max_grad_norm": 1.0,
    "local_dp_delta": DELTA,
}
STEPS_PER_EPOCH = int(N / BATCH)  # Opacus' epoch: int(1 / q) Poisson draws, q = B / n


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    x, y = load_digits(return_X_y=True)
    return torch.from_numpy((x / 16.0).astype(np.float32)), torch.from_numpy(y.astype(np.int64))


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def site(digits, **kwargs) -> TorchClient:
    x, y = digits
    return TorchClient(mlp(), (x[:N], y[:N]), test_data=(x[N : 2 * N], y[N : 2 * N]), **kwargs)


def independent_epsilon(steps: int, accountant=RDPAccountant) -> float:
    independent = accountant()
    for _ in range(steps):
        independent.step(noise_multiplier=Z, sample_rate=BATCH / N)
    return independent.get_epsilon(delta=DELTA)


def test_dp_fit_trains_and_epsilon_grows_each_round(digits) -> None:
    client = site(digits)
    arrays = arrays_from_module(client.model)
    before = client.evaluate(arrays, {}).loss
    config = {**DP, "lr": 0.5, "batch_size": BATCH, "local_epochs": 3}
    epsilons = []
    for _ in range(3):
        result = client.fit(arrays, config)
        arrays = result.arrays
        epsilons.append(result.metrics["epsilon"])
        assert result.metrics["delta"] == DELTA
        assert {"loss", "accuracy"} <= set(result.metrics)
        assert result.num_examples == N
    assert 0 < epsilons[0] < epsilons[1] < epsilons[2]
    assert client.evaluate(arrays, {}).loss < 0.75 * before
    start = arrays_from_module(mlp())
    assert {k: (v.shape, v.dtype) for k, v in arrays.items()} == {
        k: (v.shape, v.dtype) for k, v in start.items()
    }


@pytest.mark.parametrize(("kind", "accountant"), [("rdp", RDPAccountant), ("prv", PRVAccountant)])
def test_epsilon_is_an_independent_accountant_over_the_steps_taken(
    digits, kind: str, accountant
) -> None:
    client = site(digits)
    arrays = arrays_from_module(client.model)
    config = {**DP, "local_dp_accountant": kind, "lr": 0.1, "batch_size": BATCH}
    config["local_epochs"] = 2
    first = client.fit(arrays, config)
    engine = client._privacy.engine
    second = client.fit(first.arrays, config)
    assert client._privacy.engine is engine  # one engine for the client's life
    steps = 2 * 2 * STEPS_PER_EPOCH
    assert client._privacy.history == [(Z, BATCH / N, steps)]
    assert second.metrics["epsilon"] == pytest.approx(
        independent_epsilon(steps, accountant), abs=1e-6
    )
    assert first.metrics["epsilon"] == pytest.approx(
        independent_epsilon(steps // 2, accountant), abs=1e-6
    )


def test_budget_refusal_trains_nothing_and_spends_nothing(digits) -> None:
    client = site(digits)
    config = {**DP, "lr": 0.5, "batch_size": BATCH}
    one_round = independent_epsilon(STEPS_PER_EPOCH)
    budget = (one_round + independent_epsilon(2 * STEPS_PER_EPOCH)) / 2  # room for one round only
    config["local_dp_epsilon_budget"] = budget
    trained = client.fit(arrays_from_module(client.model), config).arrays
    assert trained_model_equals(client, trained)
    history = client._privacy.history

    other = {k: np.zeros_like(v) for k, v in trained.items()}  # must not even be loaded
    with pytest.raises(LocalBudgetExhausted, match="local_dp_epsilon_budget") as caught:
        client.fit(other, config)
    assert isinstance(caught.value, ClientError)  # reported to the coordinator as a failure
    assert trained_model_equals(client, trained)
    assert client._privacy.history == history
    assert client._privacy.engine.accountant.get_epsilon(DELTA) == pytest.approx(one_round)


def trained_model_equals(client: TorchClient, arrays: dict[str, np.ndarray]) -> bool:
    now = arrays_from_module(client.model)
    return all(np.array_equal(now[k], arrays[k]) for k in arrays)


def test_state_file_resumes_the_spend_next_to_scaffold_state(digits, tmp_path) -> None:
    path = tmp_path / "site.safetensors"
    client = site(digits, state_path=path)
    start = arrays_from_module(client.model)
    control = {SCAFFOLD_C + k: np.zeros_like(v) for k, v in start.items()}
    config = {**DP, "lr": 0.1, "batch_size": BATCH}
    result = client.fit({**start, **control}, config)
    stored = json.loads((tmp_path / "site.safetensors.dp.json").read_text())
    assert stored["accountant"] == "rdp"
    assert stored["history"] == [[Z, BATCH / N, STEPS_PER_EPOCH]]

    restarted = site(digits, state_path=path)  # a killed site comes back
    assert restarted._privacy.history == client._privacy.history
    for name in start:  # SCAFFOLD's variate survived in its own file, as before
        np.testing.assert_allclose(
            restarted._c_local[name].numpy(), result.arrays[SCAFFOLD_DELTA_C + name], rtol=1e-6
        )
    model = {k: v for k, v in result.arrays.items() if not k.startswith(SCAFFOLD_DELTA_C)}
    again = restarted.fit({**model, **control}, config)
    assert again.metrics["epsilon"] == pytest.approx(
        independent_epsilon(2 * STEPS_PER_EPOCH), abs=1e-6
    )
    with pytest.raises(ClientError, match="without local DP"):
        site(digits, state_path=path).fit(model, {"lr": 0.1})


@pytest.mark.filterwarnings("ignore:Optimal order is the smallest alpha")  # z ~ 0
def test_corrections_are_added_after_the_noise() -> None:
    """With q = 1 (every example each step), no clipping and ~no noise, DP-SGD is plain
    full-batch SGD, and SCAFFOLD's c - c_i = 0.5 moves one step lr * 0.5 further."""
    torch.manual_seed(0)
    x = torch.randn(32, 3)
    y = (x[:, 0] > 0).long()
    config = {
        "lr": 0.1,
        "batch_size": 32,
        "local_dp_noise_multiplier": 1e-9,
        "local_dp_max_grad_norm": 1e3,
        "local_dp_delta": DELTA,
    }

    def client() -> TorchClient:
        torch.manual_seed(1)
        return TorchClient(nn.Linear(3, 2), (x, y))

    start = arrays_from_module(client().model)
    c = {SCAFFOLD_C + k: np.full_like(v, 0.5) for k, v in start.items()}
    plain = client().fit(dict(start), {"lr": 0.1, "batch_size": 32}).arrays
    private = client().fit(dict(start), config).arrays
    shifted = client().fit({**start, **c}, config).arrays
    for k in start:
        np.testing.assert_allclose(private[k], plain[k], atol=1e-5)
        np.testing.assert_allclose(private[k] - shifted[k], 0.05, rtol=1e-3)


def test_dp_with_a_dataloader_samples_its_dataset(digits) -> None:
    x, y = digits
    loader = DataLoader(TensorDataset(x[:N], y[:N]), batch_size=50, shuffle=True)
    client = TorchClient(mlp(), loader)
    result = client.fit(arrays_from_module(client.model), {**DP, "batch_size": BATCH})
    assert result.num_examples == N
    assert client._privacy.history == [(Z, BATCH / N, STEPS_PER_EPOCH)]
    with pytest.raises(ClientError, match="DataLoader"):
        TorchClient(mlp(), [(x[:8], y[:8])]).fit(arrays_from_module(mlp()), DP)


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"local_dp_noise_multiplier": 0.0}, "local_dp_noise_multiplier"),
        ({"local_dp_noise_multiplier": True}, "local_dp_noise_multiplier"),
        ({"local_dp_max_grad_norm": -1.0}, "local_dp_max_grad_norm"),
        ({"local_dp_delta": 1.0}, "local_dp_delta"),
        ({"local_dp_delta": "tiny"}, "local_dp_delta"),
        ({"local_dp_epsilon_budget": float("inf")}, "local_dp_epsilon_budget"),
        ({"local_dp_accountant": "gdp"}, "local_dp_accountant"),
        ({"local_dp_noise": 1.0}, "local_dp_noise"),
        ({"local_dp_delta": None}, "local_dp_delta"),
        ({"batch_size": N + 1}, "batch_size"),
    ],
)
def test_bad_local_dp_config_is_refused(digits, change: dict, key: str) -> None:
    config = {k: v for k, v in {**DP, **change}.items() if v is not None}
    client = site(digits)
    with pytest.raises(ClientError, match=key):
        client.fit(arrays_from_module(client.model), config)
    assert client._privacy.history == []


def test_settings_are_absent_without_local_dp_keys() -> None:
    assert LocalDPSettings.from_config({"lr": 0.1, "batch_size": 8}) is None
    settings = LocalDPSettings.from_config({**DP, "local_dp_epsilon_budget": 3})
    assert settings == LocalDPSettings(Z, 1.0, DELTA, 3.0, "rdp")


def test_batchnorm_model_is_refused_with_a_hint() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    client = TorchClient(model, (torch.randn(64, 4), torch.randint(0, 3, (64,))))
    with pytest.raises(ClientError, match="GroupNorm"):
        client.fit(arrays_from_module(model), {**DP, "batch_size": 8})


def test_the_accountant_cannot_change_and_plain_rounds_are_refused(digits) -> None:
    client = site(digits)
    arrays = client.fit(arrays_from_module(client.model), {**DP, "batch_size": BATCH}).arrays
    with pytest.raises(ClientError, match="local_dp_accountant"):
        client.fit(arrays, {**DP, "batch_size": BATCH, "local_dp_accountant": "prv"})
    with pytest.raises(ClientError, match="without local DP"):
        client.fit(arrays, {"batch_size": BATCH})
    assert client._privacy.history == [(Z, BATCH / N, STEPS_PER_EPOCH)]
