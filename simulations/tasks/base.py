"""Shared machinery of the built-in classification tasks.

:class:`ClassificationTask` implements the :class:`coordinator.tasks.Task` protocol for a
model from :mod:`simulations.models` and a held-out test set; subclasses only say where
a site's data comes from. :class:`TabularClassificationTask` partitions an in-memory
training set with :func:`simulations.partition.partition_indices`.

Sites built by ``make_client`` are :class:`client_sdk.torch.TorchClient` objects over a
``(x, y)`` pair of tensors, so the batch size comes from the round config's
``batch_size`` at fit time (shuffled by a generator seeded from the seed and the site
index). A site evaluates on its own training data; the held-out set is the coordinator's.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from sklearn.model_selection import train_test_split
from torch import nn

from client_sdk.torch import (
    TorchClient,
    arrays_from_module,
    check_arrays,
    evaluate_module,
    iterate_batches,
    source_tensor,
)
from coordinator.errors import ConfigError
from simulations.models import build_model, check_model
from simulations.partition import check_spec, partition_indices

TEST_FRACTION = 0.2
SPLIT_RANDOM_STATE = 0
"""The train/test split of the bundled datasets is fixed, whatever the experiment seed."""
EVAL_ACTIVATION_BUDGET = 1 << 24
"""Central evaluation batches so that one layer's activations stay under this many floats."""
MAX_EVAL_BATCH = 1024


@dataclass(frozen=True)
class TabularData:
    """A train/test split: float32 features of shape (n, d) and int64 labels of shape (n,)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    @classmethod
    def split(cls, x: np.ndarray, y: np.ndarray) -> TabularData:
        """The fixed, stratified 80/20 split of ``(x, y)``."""
        x_train, x_test, y_train, y_test = train_test_split(
            x, y, test_size=TEST_FRACTION, stratify=y, random_state=SPLIT_RANDOM_STATE
        )
        return cls(
            np.ascontiguousarray(x_train, dtype=np.float32),
            np.ascontiguousarray(y_train, dtype=np.int64),
            np.ascontiguousarray(x_test, dtype=np.float32),
            np.ascontiguousarray(y_test, dtype=np.int64),
        )

    def standardized(self) -> TabularData:
        """Features centred and scaled with the mean and std of the training split."""
        mean = self.x_train.mean(axis=0, dtype=np.float64)
        std = self.x_train.std(axis=0, dtype=np.float64)
        std[std == 0] = 1.0
        mean32, std32 = mean.astype(np.float32), std.astype(np.float32)
        return TabularData(
            (self.x_train - mean32) / std32,
            self.y_train,
            (self.x_test - mean32) / std32,
            self.y_test,
        )

    @property
    def num_features(self) -> int:
        """Width of a feature row."""
        return int(self.x_train.shape[1])

    @property
    def num_classes(self) -> int:
        """Number of classes (labels are 0..num_classes-1)."""
        return int(max(self.y_train.max(), self.y_test.max())) + 1


class ClassificationTask(ABC):
    """A classifier from :mod:`simulations.models` and a held-out test set.

    Parameters
    ----------
    name
        The task's name.
    model
        Model name (``mlp``, ``logreg``) and ``model_options`` its keyword arguments.
    num_features, num_classes
        Input width and number of classes.
    x_test, y_test
        The held-out set for :meth:`central_evaluate` (float32 / int64).
    seed
        Seed of the initial model.
    """

    def __init__(
        self,
        name: str,
        model: str,
        model_options: Mapping[str, Any],
        num_features: int,
        num_classes: int,
        x_test: np.ndarray,
        y_test: np.ndarray,
        seed: int,
    ) -> None:
        check_model(model, model_options)
        self.name = name
        self.model = model
        self.model_options = dict(model_options)
        self.num_features = num_features
        self.num_classes = num_classes
        self.seed = seed
        self._x_test = torch.from_numpy(x_test)
        self._y_test = torch.from_numpy(y_test)
        self._eval_model: _Bound | None = None
        self._lock = threading.Lock()

    def new_model(self, seed: int | None, device: str = "cpu") -> nn.Module:
        """A fresh model with weights from ``seed`` (``None``: uninitialized, see models;
        on ``device="meta"``: without storage)."""
        return build_model(
            self.model, self.num_features, self.num_classes, seed=seed, device=device,
            **self.model_options,
        )  # fmt: skip

    def initial_arrays(self) -> dict[str, np.ndarray]:
        """The initial global model, deterministic for the task's seed (the arrays are
        the fresh module's own memory: no copy)."""
        return arrays_from_module(self.new_model(self.seed), copy=False)

    def central_evaluate(self, arrays: Mapping[str, np.ndarray]) -> dict[str, float]:
        """Mean cross-entropy ``loss`` and ``accuracy`` of ``arrays`` on the held-out set.

        The model runs over the arrays' own memory (``torch.func.functional_call`` on a
        module without storage), so evaluating costs no copy of the model.
        """
        with self._lock:
            if self._eval_model is None:
                self._eval_model = _Bound(self.new_model(None, device="meta"))
            check_arrays(self._eval_model.module, arrays)
            self._eval_model.tensors = {k: source_tensor(v) for k, v in arrays.items()}
            try:
                batch_size = _eval_batch_size(self._eval_model)
                batches = iterate_batches(self._x_test, self._y_test, batch_size)
                stats = evaluate_module(self._eval_model, batches)
            finally:
                self._eval_model.tensors = {}
        return {"loss": stats.loss, "accuracy": float(stats.accuracy or 0.0)}

    def make_client(
        self,
        site_index: int,
        num_sites: int,
        partition: Mapping[str, Any],
        seed: int,
        flip_labels: bool = False,
        shift: str | None = None,
    ) -> TorchClient:
        """A :class:`TorchClient` over partition ``site_index`` of ``num_sites``;
        ``flip_labels`` maps label y to num_classes - 1 - y (a label-flipping attacker);
        ``shift`` drifts the data (see :func:`shifted`)."""
        _check_site(site_index, num_sites)
        x, y = self.site_data(site_index, num_sites, partition, seed)
        if flip_labels:
            y = self.num_classes - 1 - y
        if shift is not None:
            x, y = shifted(shift, x, y, self.num_classes, np.random.default_rng([seed, site_index]))
        data = (torch.from_numpy(x), torch.from_numpy(y))
        return TorchClient(self.new_model(None), data, seed=_site_seed(seed, site_index))

    @abstractmethod
    def site_data(
        self, site_index: int, num_sites: int, partition: Mapping[str, Any], seed: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Features (float32) and labels (int64) of one site."""


class TabularClassificationTask(ClassificationTask):
    """A classification task over an in-memory :class:`TabularData` split.

    A site's data is its part of the training split under the partition spec; partitions
    are computed once per ``(num_sites, spec, seed)`` and cached.
    """

    def __init__(
        self,
        name: str,
        data: TabularData,
        model: str,
        model_options: Mapping[str, Any],
        seed: int,
    ) -> None:
        super().__init__(
            name,
            model,
            model_options,
            data.num_features,
            data.num_classes,
            data.x_test,
            data.y_test,
            seed,
        )
        self.data = data
        self._partitions: dict[tuple[int, str, int], list[np.ndarray]] = {}
        self._partition_lock = threading.Lock()

    def site_data(
        self, site_index: int, num_sites: int, partition: Mapping[str, Any], seed: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Rows of the training split given to site ``site_index``."""
        index = self.partition(num_sites, partition, seed)[site_index]
        return self.data.x_train[index], self.data.y_train[index]

    def partition(self, num_sites: int, spec: Mapping[str, Any], seed: int) -> list[np.ndarray]:
        """The (cached) index arrays of every site."""
        check_spec(spec)
        key = (num_sites, repr(sorted(spec.items())), seed)
        with self._partition_lock:
            if key not in self._partitions:
                self._partitions[key] = partition_indices(self.data.y_train, num_sites, spec, seed)
            return self._partitions[key]


def shifted(
    kind: str, x: np.ndarray, y: np.ndarray, num_classes: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """A drifted copy of a site's data: ``label_shift`` relabels y as (y + 1) mod classes
    (concept drift); ``feature_shift`` moves each feature by its standard deviation (at
    least half the overall one) and adds noise of half that size (covariate drift)."""
    if kind == "label_shift":
        return x, (y + 1) % num_classes
    if kind == "feature_shift":
        scale = np.maximum(x.std(axis=0), 0.5 * x.std()).astype(np.float32)
        noise = rng.standard_normal(x.shape).astype(np.float32)
        return (x + scale * (1.0 + 0.5 * noise)).astype(x.dtype), y
    raise ValueError(f"unknown drift kind {kind!r}")


def check_options(options: Mapping[str, Any], allowed: Iterable[str]) -> None:
    """Raise ``ConfigError("task.options.<name>")`` for the first option not in ``allowed``."""
    allowed = set(allowed)
    for name in options:
        if name not in allowed:
            known = ", ".join(sorted(allowed)) or "none"
            raise ConfigError(f"task.options.{name}", f"unknown option; known options: {known}")


def int_option(options: Mapping[str, Any], name: str, default: int, minimum: int = 1) -> int:
    """Option ``name`` as an int >= ``minimum`` (``default`` when absent)."""
    value = options.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ConfigError(f"task.options.{name}", f"must be an integer >= {minimum}, got {value!r}")
    return int(value)


def hidden_option(value: Any) -> list[int]:
    """A ``hidden`` option: a list of positive layer widths."""
    if (
        not isinstance(value, Sequence)
        or isinstance(value, str)
        or not all(
            isinstance(w, int | np.integer) and not isinstance(w, bool) and w >= 1 for w in value
        )
    ):
        raise ConfigError("task.options.hidden", f"must be a list of integers >= 1, got {value!r}")
    return [int(w) for w in value]


def model_options(
    model: str, options: Mapping[str, Any], default_hidden: Sequence[int]
) -> dict[str, Any]:
    """Keyword arguments for ``model``: ``hidden`` from the options, else the default for mlp."""
    if "hidden" in options:
        return {"hidden": hidden_option(options["hidden"])}
    return {"hidden": list(default_hidden)} if model == "mlp" else {}


def build_tabular_task(
    name: str,
    data: TabularData,
    model: str | None,
    options: Mapping[str, Any],
    seed: int,
    default_hidden: Sequence[int],
) -> TabularClassificationTask:
    """A tabular task taking the one option ``hidden`` (mlp widths); model default mlp."""
    check_options(options, {"hidden"})
    model = model or "mlp"
    return TabularClassificationTask(
        name, data, model, model_options(model, options, default_hidden), seed
    )


def _check_site(site_index: int, num_sites: int) -> None:
    if isinstance(num_sites, bool) or not isinstance(num_sites, int | np.integer) or num_sites < 1:
        raise ConfigError("federation.sites", f"must be an integer >= 1, got {num_sites!r}")
    if not 0 <= site_index < num_sites:
        raise ValueError(f"site_index must be in [0, {num_sites}), got {site_index}")


def _site_seed(seed: int, site_index: int) -> int:
    """A seed for one site's shuffling, distinct per (seed, site_index)."""
    return int(np.random.SeedSequence([seed, site_index]).generate_state(1, np.uint64)[0] >> 1)


class _Bound(nn.Module):
    """Runs ``module`` (storage-less) over the tensors set in :attr:`tensors`."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module
        self.tensors: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(self.module, self.tensors, (x,), strict=True)


def _eval_batch_size(model: nn.Module) -> int:
    widest = max((m.out_features for m in model.modules() if isinstance(m, nn.Linear)), default=1)
    return max(1, min(MAX_EVAL_BATCH, EVAL_ACTIVATION_BUDGET // widest))
