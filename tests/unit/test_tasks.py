"""Built-in tasks: entry points, determinism, central evaluation, clients, options."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from client_sdk.api import Client
from client_sdk.torch import TorchClient
from coordinator.errors import ConfigError
from coordinator.tasks import Task, load_task
from simulations.models import build_model, mlp_num_parameters
from simulations.tasks import synthetic

SMALL_SYNTHETIC = {"num_features": 8, "num_classes": 4, "samples_per_site": 50, "test_samples": 200}
BUILT_INS: list[tuple[str, dict[str, Any]]] = [
    ("digits", {}),
    ("breast_cancer", {}),
    ("synthetic", SMALL_SYNTHETIC),
]


def _same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(("name", "options"), BUILT_INS)
def test_built_ins_resolve_through_entry_points(name: str, options: dict[str, Any]) -> None:
    task = load_task(name, None, options, 0)
    assert isinstance(task, Task)
    assert task.name == name


@pytest.mark.parametrize(("name", "options"), BUILT_INS)
@pytest.mark.parametrize("model", ["mlp", "logreg"])
def test_initial_arrays_are_deterministic_per_seed(
    name: str, options: dict[str, Any], model: str
) -> None:
    first = load_task(name, model, options, 3).initial_arrays()
    assert _same(first, load_task(name, model, options, 3).initial_arrays())
    assert not _same(first, load_task(name, model, options, 4).initial_arrays())
    assert all(a.dtype == np.float32 for a in first.values())


@pytest.mark.parametrize(("name", "options"), BUILT_INS)
def test_central_evaluate_returns_loss_and_accuracy(name: str, options: dict[str, Any]) -> None:
    task = load_task(name, None, options, 0)
    metrics = task.central_evaluate(task.initial_arrays())
    assert set(metrics) == {"loss", "accuracy"}
    assert all(type(v) is float for v in metrics.values())
    assert np.isfinite(metrics["loss"]) and metrics["loss"] > 0
    assert 0.0 <= metrics["accuracy"] <= 1.0


def test_digits_shapes_and_defaults() -> None:
    task = load_task("digits", None, {}, 0)
    shapes = {k: v.shape for k, v in task.initial_arrays().items()}
    assert shapes == {"0.weight": (64, 64), "0.bias": (64,), "2.weight": (10, 64), "2.bias": (10,)}
    logreg = load_task("digits", "logreg", {}, 0).initial_arrays()
    assert {k: v.shape for k, v in logreg.items()} == {"0.weight": (10, 64), "0.bias": (10,)}
    wider = load_task("digits", "mlp", {"hidden": [16, 8]}, 0).initial_arrays()
    assert wider["2.weight"].shape == (8, 16)


def test_breast_cancer_is_standardized_binary() -> None:
    task = load_task("breast_cancer", None, {}, 0)
    arrays = task.initial_arrays()
    assert arrays["0.weight"].shape == (32, 30) and arrays["2.weight"].shape == (2, 32)
    x, y = task.site_data(0, 1, {"kind": "iid"}, 0)
    assert x.dtype == np.float32 and y.dtype == np.int64 and set(np.unique(y)) == {0, 1}
    assert np.abs(x.mean(axis=0)).max() < 1e-4 and np.allclose(x.std(axis=0), 1.0, atol=1e-3)


def test_clients_split_the_training_set_and_train() -> None:
    task = load_task("digits", None, {}, 0)
    spec = {"kind": "dirichlet", "alpha": 0.5}
    clients = [task.make_client(i, 5, spec, 1) for i in range(5)]
    assert all(isinstance(c, Client) and isinstance(c, TorchClient) for c in clients)
    arrays = task.initial_arrays()
    results = [c.fit(arrays, {"lr": 0.1, "batch_size": 16}) for c in clients]
    assert sum(r.num_examples for r in results) == 1437  # 80 % of the 1797 digits
    assert all(np.isfinite(r.metrics["loss"]) for r in results)
    assert not _same(results[0].arrays, arrays)


def test_partition_is_computed_once_per_key() -> None:
    task = load_task("digits", None, {}, 0)
    spec = {"kind": "iid"}
    first = task.partition(10, spec, 2)
    assert task.partition(10, dict(spec), 2) is first
    assert task.partition(10, spec, 3) is not first


def test_synthetic_sites_are_lazy_deterministic_and_label_skewed() -> None:
    task = load_task("synthetic", None, {"num_classes": 10, "samples_per_site": 300}, 0)
    shards = {"kind": "shards", "labels_per_site": 2}
    x, y = task.site_data(999, 1000, shards, 5)
    assert x.shape == (300, 32) and x.dtype == np.float32 and y.dtype == np.int64
    assert len(np.unique(y)) == 2
    x2, y2 = task.site_data(999, 1000, shards, 5)
    assert np.array_equal(x, x2) and np.array_equal(y, y2)
    _, y_other = task.site_data(998, 1000, shards, 5)
    assert not np.array_equal(y, y_other)
    _, y_iid = task.site_data(0, 1000, {"kind": "iid"}, 5)
    assert len(np.unique(y_iid)) == 10


def test_synthetic_is_learnable() -> None:
    task = load_task("synthetic", "logreg", SMALL_SYNTHETIC, 0)
    arrays = task.initial_arrays()
    client = task.make_client(0, 2, {"kind": "iid"}, 0)
    result = client.fit(arrays, {"lr": 0.1, "local_epochs": 20, "batch_size": 10})
    assert task.central_evaluate(result.arrays)["accuracy"] > 0.6


@pytest.mark.parametrize("target", [1_000, 100_000, 1_000_000])
def test_synthetic_num_parameters_is_close_to_target(target: int) -> None:
    hidden = synthetic.hidden_for_parameters(target, 32, 10)
    assert abs(mlp_num_parameters(32, [hidden], 10) - target) <= 43
    task = load_task("synthetic", None, {"num_parameters": target}, 0)
    assert abs(sum(a.size for a in task.initial_arrays().values()) - target) <= 43


def test_build_model_counts_match() -> None:
    model = build_model("mlp", 32, 10, seed=0, hidden=[7, 5])
    assert sum(p.numel() for p in model.parameters()) == mlp_num_parameters(32, [7, 5], 10)


@pytest.mark.parametrize(
    ("name", "model", "options", "key"),
    [
        ("digits", None, {"hiden": [8]}, "task.options.hiden"),
        ("digits", None, {"hidden": [0]}, "task.options.hidden"),
        ("digits", None, {"hidden": "64"}, "task.options.hidden"),
        ("digits", "logreg", {"hidden": [8]}, "task.options.hidden"),
        ("digits", "resnet", {}, "task.model"),
        ("breast_cancer", None, {"num_features": 3}, "task.options.num_features"),
        ("synthetic", None, {"features": 3}, "task.options.features"),
        ("synthetic", None, {"num_classes": 1}, "task.options.num_classes"),
        ("synthetic", None, {"samples_per_site": 0}, "task.options.samples_per_site"),
        ("synthetic", None, {"num_parameters": 10}, "task.options.num_parameters"),
        ("synthetic", None, {"num_parameters": 1e6}, "task.options.num_parameters"),
        (
            "synthetic",
            None,
            {"num_parameters": 10**6, "hidden": [4]},
            "task.options.num_parameters",
        ),
        ("synthetic", "logreg", {"num_parameters": 10**6}, "task.options.num_parameters"),
    ],
)
def test_bad_task_settings_name_the_key(
    name: str, model: str | None, options: dict[str, Any], key: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_task(name, model, options, 0)
    assert info.value.key == key


def test_bad_partition_reaches_make_client_as_config_error() -> None:
    task = load_task("synthetic", None, SMALL_SYNTHETIC, 0)
    with pytest.raises(ConfigError) as info:
        task.make_client(0, 2, {"kind": "dirichlet", "alpha": -1}, 0)
    assert info.value.key == "federation.partition.alpha"
