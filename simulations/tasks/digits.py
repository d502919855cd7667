"""The ``digits`` task: scikit-learn's 8x8 handwritten digits, 10 classes.

Features are pixel intensities scaled to [0, 1]; 20 % of the samples (stratified, fixed
split) are the held-out test set. Models: ``mlp`` (default, ``hidden: [64]``), ``logreg``.
The one option is ``hidden`` (mlp layer widths).
"""

from __future__ import annotations

from functools import cache
from typing import Any

import numpy as np
from sklearn.datasets import load_digits

from simulations.tasks.base import TabularClassificationTask, TabularData, build_tabular_task

NAME = "digits"
DEFAULT_HIDDEN = (64,)


@cache
def load_data() -> TabularData:
    """The scaled digits split (cached; treat the arrays as read-only)."""
    x, y = load_digits(return_X_y=True)
    return TabularData.split(x.astype(np.float32) / np.float32(16.0), y)


def build_task(model: str | None, options: dict[str, Any], seed: int) -> TabularClassificationTask:
    """Entry point of the ``digits`` task."""
    return build_tabular_task(NAME, load_data(), model, options, seed, DEFAULT_HIDDEN)
