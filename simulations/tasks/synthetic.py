"""The ``synthetic`` task: generated Gaussian-mixture classification data of any size.

Each class ``c`` has a mean ``mu_c ~ N(0, (s^2 / num_features) I)`` drawn from the task
seed (so ``|mu_c|`` is about ``s`` whatever the width); a sample of class ``c`` is
``mu_c + N(0, I)`` (float32). With ``s = 3`` the best possible accuracy is about 0.9
for 10 classes and 8 or more features. Labels are drawn first, so label skew is
exact: under a ``dirichlet`` partition a site's label proportions are ``Dir(alpha)``,
under ``shards`` a site holds ``labels_per_site`` random classes, under ``iid`` all
classes equally. Every site has ``samples_per_site`` samples generated lazily from
``(seed, site_index)`` in ``make_client``: 1000 sites cost nothing until used.

Options (all optional): ``num_features`` (32), ``num_classes`` (10), ``hidden`` (mlp
widths, [64]) or ``num_parameters`` (the width of a one-hidden-layer mlp is chosen so the
model has about that many parameters), ``samples_per_site`` (200), ``test_samples``
(1000). Models: ``mlp`` (default), ``logreg``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from coordinator.errors import ConfigError
from simulations.models import mlp_num_parameters
from simulations.partition import check_spec, dirichlet_alpha, labels_per_site
from simulations.tasks.base import ClassificationTask, check_options, int_option, model_options

NAME = "synthetic"
OPTIONS = frozenset(
    {"num_features", "num_classes", "hidden", "num_parameters", "samples_per_site", "test_samples"}
)
DEFAULT_HIDDEN = (64,)
CLASS_SEPARATION = 3.0
"""``s``: the typical norm of a class mean; sets how separable the classes are."""

_MEANS, _TEST, _SITE = 0, 1, 2
"""Stream tags: the class means, the test set and site data come from separate streams."""


class SyntheticTask(ClassificationTask):
    """A Gaussian-mixture task whose site data is generated on demand."""

    def __init__(
        self,
        model: str,
        model_options: Mapping[str, Any],
        num_features: int,
        num_classes: int,
        samples_per_site: int,
        test_samples: int,
        seed: int,
    ) -> None:
        means_rng = np.random.default_rng([seed, _MEANS])
        scale = CLASS_SEPARATION / np.sqrt(num_features)
        means = scale * means_rng.standard_normal((num_classes, num_features))
        self.means = means.astype(np.float32)
        self.samples_per_site = samples_per_site
        test_rng = np.random.default_rng([seed, _TEST])
        x_test, y_test = self._sample(
            np.full(num_classes, 1.0 / num_classes), test_samples, test_rng
        )
        super().__init__(
            NAME, model, model_options, num_features, num_classes, x_test, y_test, seed
        )

    def site_data(
        self, site_index: int, num_sites: int, partition: Mapping[str, Any], seed: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """``samples_per_site`` fresh samples with the site's label distribution."""
        rng = np.random.default_rng([seed, _SITE, site_index])
        proportions = self._label_proportions(partition, rng)
        return self._sample(proportions, self.samples_per_site, rng)

    def _label_proportions(
        self, partition: Mapping[str, Any], rng: np.random.Generator
    ) -> np.ndarray:
        kind = check_spec(partition)
        num_classes = len(self.means)
        if kind == "dirichlet":
            return rng.dirichlet(np.full(num_classes, dirichlet_alpha(partition)))
        proportions = np.zeros(num_classes)
        if kind == "shards":
            chosen = rng.choice(num_classes, min(labels_per_site(partition), num_classes), False)
            proportions[chosen] = 1.0 / len(chosen)
            return proportions
        return proportions + 1.0 / num_classes

    def _sample(
        self, proportions: np.ndarray, n: int, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.choice(len(self.means), size=n, p=proportions / proportions.sum())
        noise = rng.standard_normal((n, self.means.shape[1]), dtype=np.float32)
        return self.means[labels] + noise, labels.astype(np.int64)


def hidden_for_parameters(num_parameters: int, num_features: int, num_classes: int) -> int:
    """The width ``h`` of a one-hidden-layer mlp with about ``num_parameters`` parameters.

    Such a model has ``(num_features + 1) * h + (h + 1) * num_classes`` parameters.
    """
    per_unit = num_features + 1 + num_classes
    width = round((num_parameters - num_classes) / per_unit)
    if width < 1:
        smallest = mlp_num_parameters(num_features, [1], num_classes)
        raise ConfigError(
            "task.options.num_parameters",
            f"{num_parameters} is too small; the smallest mlp here has {smallest} parameters",
        )
    return width


def _synthetic_model_options(
    model: str, options: Mapping[str, Any], num_features: int, num_classes: int
) -> dict[str, Any]:
    if "num_parameters" not in options:
        return model_options(model, options, DEFAULT_HIDDEN)
    if "hidden" in options:
        raise ConfigError("task.options.num_parameters", "give either hidden or num_parameters")
    if model != "mlp":
        raise ConfigError("task.options.num_parameters", f"not an option of model {model!r}")
    target = int_option(options, "num_parameters", 0)
    return {"hidden": [hidden_for_parameters(target, num_features, num_classes)]}


def build_task(model: str | None, options: dict[str, Any], seed: int) -> SyntheticTask:
    """Entry point of the ``synthetic`` task."""
    check_options(options, OPTIONS)
    model = model or "mlp"
    num_features = int_option(options, "num_features", 32)
    num_classes = int_option(options, "num_classes", 10, minimum=2)
    return SyntheticTask(
        model,
        _synthetic_model_options(model, options, num_features, num_classes),
        num_features,
        num_classes,
        samples_per_site=int_option(options, "samples_per_site", 200),
        test_samples=int_option(options, "test_samples", 1000),
        seed=seed,
    )
