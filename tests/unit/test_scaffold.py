"""SCAFFOLD: server variates and the site's drift correction."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from client_sdk.errors import ClientError
from client_sdk.torch import SCAFFOLD_C, SCAFFOLD_DELTA_C, TorchClient, arrays_from_module
from strategies.scaffold import CONTROL, DELTA_CONTROL, Scaffold


def model() -> dict[str, np.ndarray]:
    return {"w": np.ones((2, 2), np.float32), "n": np.array(3, np.int64)}


def test_server_sends_variates_and_expects_delta_variates():
    s = Scaffold()
    m = model()
    assert set(s.task_arrays(m)) == {"w", "n", CONTROL + "w"}
    ref = s.update_reference(m)
    assert set(ref) == {"w", "n", DELTA_CONTROL + "w"} and not ref[DELTA_CONTROL + "w"].any()


def test_server_step_and_variate_update():
    s = Scaffold(Scaffold.Params(server_lr=0.5))
    m = model()
    s.begin_round(1, population=4)
    ref = s.update_reference(m)
    agg = s.aggregator(ref, 2)
    for dy, dc, n in ((1.0, 2.0, 1), (3.0, 4.0, 3)):  # weighted means: dy 2.5, dc 3.5
        agg.add(
            {"w": m["w"] + dy, "n": m["n"], DELTA_CONTROL + "w": np.full((2, 2), dc, np.float32)}, n
        )
    new = s.apply(m, agg)
    np.testing.assert_allclose(new["w"], 1.0 + 0.5 * 2.5)
    np.testing.assert_allclose(s.control["w"], 3.5 * 2 / 4)  # |S|/N = 2/4
    assert new["w"].dtype == np.float32 and new["n"] == 3 and set(new) == {"w", "n"}
    restored = Scaffold()
    restored.load_state(s.state())
    np.testing.assert_array_equal(restored.control["w"], s.control["w"])


def linear_client(tmp_path=None) -> TorchClient:
    torch.manual_seed(0)
    x = torch.randn(32, 3)
    y = (x[:, 0] > 0).long()
    path = None if tmp_path is None else tmp_path / "site.safetensors"
    return TorchClient(nn.Linear(3, 2), (x, y), seed=1, state_path=path)


def test_site_returns_delta_variates_and_keeps_its_own(tmp_path):
    client = linear_client(tmp_path)
    start = arrays_from_module(client.model)
    c = {SCAFFOLD_C + k: np.zeros_like(v) for k, v in start.items()}
    config = {"lr": 0.1, "local_epochs": 1, "batch_size": 8}
    result = client.fit({**start, **c}, config)
    deltas = {
        k.removeprefix(SCAFFOLD_DELTA_C): v
        for k, v in result.arrays.items()
        if k.startswith(SCAFFOLD_DELTA_C)
    }
    assert set(deltas) == set(start)
    # with c = c_i = 0: delta c_i = (x - y) / (K lr), K = 4 steps of batch 8
    for k in start:
        expected = (start[k] - result.arrays[k]) / (4 * 0.1)
        np.testing.assert_allclose(deltas[k], expected, rtol=1e-4, atol=1e-6)
    # a restarted site reloads c_i from its state file
    again = linear_client(tmp_path)
    for k in start:
        np.testing.assert_allclose(again._c_local[k].numpy(), deltas[k], rtol=1e-6)


def test_correction_shifts_gradients_by_c_minus_ci():
    plain, corrected = linear_client(), linear_client()
    start = arrays_from_module(plain.model)
    config = {"lr": 0.1, "local_epochs": 1, "batch_size": 32}  # one full-batch step
    c = {SCAFFOLD_C + k: np.full_like(v, 0.5) for k, v in start.items()}
    a = plain.fit(dict(start), config).arrays
    b = corrected.fit({**start, **c}, config).arrays
    for k in start:  # c - c_i = 0.5 everywhere, so one SGD step moves 0.1 * 0.5 further
        np.testing.assert_allclose(a[k] - b[k], 0.05, rtol=1e-4)


def test_scaffold_refuses_adam():
    client = linear_client()
    start = arrays_from_module(client.model)
    c = {SCAFFOLD_C + k: np.zeros_like(v) for k, v in start.items()}
    with pytest.raises(ClientError, match="sgd"):
        client.fit({**start, **c}, {"optimizer": "adam", "lr": 0.01})


def test_fedprox_pulls_towards_the_global_model():
    far, near = linear_client(), linear_client()
    start = arrays_from_module(far.model)
    config = {"lr": 0.5, "local_epochs": 5, "batch_size": 8}
    free = far.fit(dict(start), config).arrays
    prox = near.fit(dict(start), {**config, "proximal_mu": 1.0}).arrays

    def dist(a):
        return sum(float(np.sum((a[k] - start[k]) ** 2)) for k in start)

    assert dist(prox) < 0.5 * dist(free)
