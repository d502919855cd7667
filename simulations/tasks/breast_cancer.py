"""The ``breast_cancer`` task: scikit-learn's Wisconsin diagnostic dataset, 2 classes.

The 30 features are standardized with the mean and std of the training split; 20 % of
the samples (stratified, fixed split) are the held-out test set. Models: ``mlp`` (default,
``hidden: [32]``), ``logreg``. The one option is ``hidden`` (mlp layer widths).
"""

from __future__ import annotations

from functools import cache
from typing import Any

from sklearn.datasets import load_breast_cancer

from simulations.tasks.base import TabularClassificationTask, TabularData, build_tabular_task

NAME = "breast_cancer"
DEFAULT_HIDDEN = (32,)


@cache
def load_data() -> TabularData:
    """The standardized breast cancer split (cached; treat the arrays as read-only)."""
    x, y = load_breast_cancer(return_X_y=True)
    return TabularData.split(x, y).standardized()


def build_task(model: str | None, options: dict[str, Any], seed: int) -> TabularClassificationTask:
    """Entry point of the ``breast_cancer`` task."""
    return build_tabular_task(NAME, load_data(), model, options, seed, DEFAULT_HIDDEN)
