"""The torch adapter: state_dict <-> arrays, strict loading, TorchClient fit/evaluate."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from client_sdk.api import EvaluateResult, FitResult
from client_sdk.errors import ClientError
from client_sdk.torch import TorchClient, arrays_from_module, load_arrays


def _bn_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    x, y = load_digits(return_X_y=True)
    return torch.from_numpy((x / 16.0).astype(np.float32)), torch.from_numpy(y.astype(np.int64))


def _digits_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def test_arrays_keep_dtypes_and_are_contiguous_copies() -> None:
    model = _bn_model()
    model(torch.randn(5, 4))  # train mode: updates running stats and the int64 counter
    arrays = arrays_from_module(model)
    assert set(arrays) == set(model.state_dict())
    assert arrays["1.num_batches_tracked"].dtype == np.int64
    assert arrays["1.num_batches_tracked"] == 1
    assert arrays["0.weight"].dtype == np.float32
    assert all(a.flags.c_contiguous for a in arrays.values())
    arrays["0.weight"][:] = 0.0
    assert model[0].weight.abs().sum() > 0  # a copy, not a view


def test_load_arrays_round_trips_into_another_module() -> None:
    source, target = _bn_model(seed=1), _bn_model(seed=2)
    source(torch.randn(6, 4))
    load_arrays(target, arrays_from_module(source))
    for name, array in arrays_from_module(target).items():
        expected = source.state_dict()[name].numpy()
        assert array.dtype == expected.dtype
        np.testing.assert_array_equal(array, expected)
    source.eval()
    target.eval()
    x = torch.randn(3, 4)
    torch.testing.assert_close(source(x), target(x))


def test_load_accepts_read_only_arrays_without_warning() -> None:
    model = _bn_model()
    arrays = {}
    for name, array in arrays_from_module(model).items():
        frozen = np.frombuffer(array.tobytes(), dtype=array.dtype).reshape(array.shape)
        assert not frozen.flags.writeable
        arrays[name] = frozen
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_arrays(_bn_model(seed=3), arrays)


@pytest.mark.parametrize(
    ("change", "tensor"),
    [
        (lambda a: a.pop("3.bias"), "3.bias"),
        (lambda a: a.update(extra=np.zeros(2, np.float32)), "extra"),
        (lambda a: a.update({"0.weight": np.zeros((8, 5), np.float32)}), "0.weight"),
        (lambda a: a.update({"0.bias": a["0.bias"].astype(np.float64)}), "0.bias"),
        (
            lambda a: a.update({"1.num_batches_tracked": np.array(0, dtype=np.int32)}),
            "1.num_batches_tracked",
        ),
        (lambda a: a.update({"3.bias": [0.0, 0.0, 0.0]}), "3.bias"),
    ],
    ids=["missing", "extra", "shape", "float64", "int32-counter", "not-an-array"],
)
def test_strict_load_names_the_bad_tensor(change, tensor: str) -> None:
    model = _bn_model()
    arrays = arrays_from_module(model)
    change(arrays)
    with pytest.raises(ClientError, match=tensor):
        load_arrays(model, arrays)


def test_fit_on_digits_lowers_the_loss(digits: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = digits
    client = TorchClient(_digits_model(), (x[:600], y[:600]), test_data=(x[600:], y[600:]))
    start = arrays_from_module(client.model)
    before = client.evaluate(start, {})
    config = {"local_epochs": 3, "lr": 0.1, "momentum": 0.9, "batch_size": 32}
    result = client.fit(start, config)
    after = client.evaluate(result.arrays, {})

    assert isinstance(result, FitResult) and isinstance(after, EvaluateResult)
    assert result.num_examples == 600
    assert set(result.metrics) == {"loss", "accuracy"}
    assert 0.0 <= result.metrics["accuracy"] <= 1.0
    assert after.loss < 0.5 * before.loss
    assert after.metrics["accuracy"] > 0.75
    assert after.num_examples == len(x) - 600
    assert {k: (v.shape, v.dtype) for k, v in result.arrays.items()} == {
        k: (v.shape, v.dtype) for k, v in start.items()
    }


def test_fit_is_deterministic_for_a_seed(digits: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = digits
    start = arrays_from_module(_digits_model())
    config = {"lr": 0.05, "batch_size": 16}
    one = TorchClient(_digits_model(), (x[:200], y[:200]), seed=4).fit(start, config)
    two = TorchClient(_digits_model(), (x[:200], y[:200]), seed=4).fit(start, config)
    other = TorchClient(_digits_model(), (x[:200], y[:200]), seed=5).fit(start, config)
    for name in start:
        np.testing.assert_array_equal(one.arrays[name], two.arrays[name])
    assert not np.array_equal(one.arrays["0.weight"], other.arrays["0.weight"])


def test_fit_with_a_dataloader_and_adam(digits: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = digits
    loader = DataLoader(
        TensorDataset(x[:300], y[:300]),
        batch_size=50,
        shuffle=True,
        generator=torch.Generator().manual_seed(0),
    )
    client = TorchClient(_digits_model(), loader)
    start = arrays_from_module(client.model)
    result = client.fit(start, {"optimizer": "adam", "lr": 0.01, "local_epochs": 2})
    assert result.num_examples == 300
    assert client.evaluate(result.arrays, {}).loss < client.evaluate(start, {}).loss


def test_fit_keeps_the_int64_counter_of_batchnorm() -> None:
    x, y = torch.randn(40, 4), torch.randint(0, 3, (40,))
    client = TorchClient(_bn_model(), (x, y))
    result = client.fit(arrays_from_module(_bn_model()), {"batch_size": 10})
    assert result.arrays["1.num_batches_tracked"].dtype == np.int64
    assert int(result.arrays["1.num_batches_tracked"]) == 4


@pytest.mark.parametrize(
    "config",
    [
        {"optimizer": "rmsprop"},
        {"lr": 0.0},
        {"lr": "fast"},
        {"local_epochs": 0},
        {"batch_size": True},
        {"momentum": -0.5},
    ],
)
def test_bad_round_config_raises_client_error(config: dict) -> None:
    client = TorchClient(_bn_model(), (torch.randn(8, 4), torch.randint(0, 3, (8,))))
    with pytest.raises(ClientError, match=next(iter(config))):
        client.fit(arrays_from_module(client.model), config)


def test_mismatched_x_and_y_are_rejected() -> None:
    with pytest.raises(ClientError, match="rows"):
        TorchClient(_bn_model(), (torch.randn(8, 4), torch.randint(0, 3, (7,))))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fit_on_cuda_returns_cpu_arrays(digits: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = digits
    client = TorchClient(_digits_model(), (x[:200], y[:200]), device="cuda")
    result = client.fit(arrays_from_module(_digits_model()), {"lr": 0.1})
    assert all(isinstance(a, np.ndarray) for a in result.arrays.values())
    assert result.arrays["0.weight"].dtype == np.float32
    assert client.evaluate(result.arrays, {}).num_examples == 200
