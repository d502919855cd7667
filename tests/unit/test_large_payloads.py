"""What keeps large models in bounded memory: the upload budget, the in-place mean, the
streaming model file and zero-copy model loading."""

from __future__ import annotations

import threading
import time
import warnings

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from client_sdk.torch import arrays_from_module, load_arrays
from coordinator.fleet import UploadBudget
from coordinator.model_store import ModelStore, map_safetensors
from protos.codec import digest_arrays
from strategies.accumulator import WeightedDeltaMean


def test_an_upload_that_does_not_fit_waits_for_the_one_in_progress():
    budget = UploadBudget(limit=100)
    events: list[str] = []
    first_in = threading.Event()

    def upload(name: str, size: int, hold_s: float) -> None:
        with budget.hold(size, lambda: True) as held:
            assert held
            events.append(f"{name} in")
            first_in.set()
            time.sleep(hold_s)
            events.append(f"{name} out")

    a = threading.Thread(target=upload, args=("a", 60, 0.3))
    a.start()
    first_in.wait(5)
    b = threading.Thread(target=upload, args=("b", 60, 0.0))
    b.start()
    a.join(5)
    b.join(5)
    assert events == ["a in", "a out", "b in", "b out"] and budget.in_use == 0


def test_an_upload_larger_than_the_budget_runs_alone_and_a_waiter_can_give_up():
    budget = UploadBudget(limit=10)
    with budget.hold(50, lambda: True) as held:
        assert held and budget.in_use == 50
        with budget.hold(1, lambda: False) as second:
            assert second is False and budget.in_use == 50
    assert budget.in_use == 0


def test_mean_divides_the_accumulator_in_place():
    reference = {"w": np.zeros(5, np.float32), "n": np.zeros(2, np.int64)}
    agg = WeightedDeltaMean(reference)
    agg.add({"w": np.ones(5, np.float32), "n": np.array([2, 4])}, 1.0)
    agg.add({"w": np.full(5, 3.0, np.float32), "n": np.array([2, 4])}, 3.0)
    mean = agg.mean()
    assert mean["w"].tolist() == [2.5] * 5 and mean["w"].dtype == np.float32
    assert np.shares_memory(mean["w"], agg._acc) and mean["n"].tolist() == [2, 4]
    assert agg.mean() is mean
    with pytest.raises(ValueError):
        agg.mean(denominator=8.0)
    with pytest.raises(RuntimeError):
        agg.add({"w": np.ones(5, np.float32), "n": np.array([0, 0])}, 1.0)


def test_model_file_is_safetensors_written_and_verified_without_a_copy(tmp_path):
    arrays = {
        "w": np.arange(12, dtype=np.float32).reshape(3, 4),
        "b": np.arange(3, dtype=">i8"),
        "empty": np.zeros((0, 2), np.float16),
        "scalar": np.array(1.5),
    }
    store = ModelStore(tmp_path)
    digest = digest_arrays(arrays)
    path = store.put(arrays, digest)
    loaded = load_file(str(path))
    assert set(loaded) == set(arrays)
    for name, a in arrays.items():
        assert loaded[name].shape == a.shape and np.array_equal(loaded[name], a)
    mapped = map_safetensors(path)
    assert isinstance(mapped["w"], np.memmap) and digest_arrays(mapped) == digest
    store.verify(digest)


def test_module_arrays_can_share_memory_and_load_from_read_only_arrays():
    module = torch.nn.Linear(3, 2)
    shared = arrays_from_module(module, copy=False)
    assert np.shares_memory(shared["weight"], module.weight.detach().numpy())
    copied = arrays_from_module(module)
    assert not np.shares_memory(copied["weight"], module.weight.detach().numpy())
    frozen = {k: np.full_like(v, 0.5) for k, v in copied.items()}
    for a in frozen.values():
        a.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_arrays(module, frozen)
    assert torch.all(module.weight == 0.5)
