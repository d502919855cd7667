"""Byzantine-robust aggregation: coordinate-wise median, trimmed mean, (Multi-)Krum, Bulyan.

Every rule tolerates ``f`` Byzantine sites among the ``n`` updates a round accepted. With
``f`` left unset, a round uses the largest ``f`` the rule allows for its ``n``; with too
few updates for the ``f`` asked for, :meth:`Strategy.apply` raises
:class:`~strategies.errors.InsufficientUpdates` and the round is not committed.

All rules work on update deltas (``update - reference``) and return
``reference + robust delta`` with each tensor's dtype kept. They are unweighted: an
example count is a claim a Byzantine site controls. Integer tensors (e.g. BatchNorm
counters) take the coordinate-wise median of the updates' values under every rule.

Memory: the round's deltas live in a :class:`~strategies.stacked.StackedDeltas`, i.e.
``expected x d x 4`` bytes for ``d`` floating parameters. Up to :data:`SPILL_BYTES` that
matrix is in RAM; beyond it, it is a memory-mapped file under :attr:`RobustStrategy.spill_dir`
(the system temp directory by default), so resident memory stays bounded by the page
cache. Rules read it in blocks of :data:`BLOCK_ELEMS` coordinates: working memory is
``O(n x BLOCK_ELEMS)`` (26 MB at n = 50) plus the ``O(d)`` result.
"""

from __future__ import annotations

import tempfile
from abc import abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from strategies.base import Arrays, Strategy
from strategies.errors import InsufficientUpdates
from strategies.stacked import StackedDeltas

SPILL_BYTES = 1 << 30
"""Rounds whose stacked deltas would exceed this many bytes spill to a memory-mapped file."""

BLOCK_ELEMS = 1 << 16
"""Coordinates per block for coordinate-wise rules and distance computation."""


class RobustParams(BaseModel):
    """``f``: number of Byzantine sites to tolerate (``None``: the most the round allows)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    f: int | None = Field(default=None, ge=0)


class MultiKrumParams(RobustParams):
    """Adds ``m``: how many lowest-score updates to average (``None``: ``n - f``)."""

    m: int | None = Field(default=None, ge=1)


def resolve_f(rule: str, f: int | None, n: int, per_f: int, base: int) -> int:
    """The ``f`` a round of ``n`` updates uses under a rule needing ``n >= per_f * f + base``.

    ``f=None`` gives the largest feasible ``f`` (0 when even that is infeasible, which
    then raises).

    Raises
    ------
    InsufficientUpdates
        When ``n < per_f * f + base``.
    """
    if f is None:
        f = max((n - base) // per_f, 0)
    need = per_f * f + base
    if n < need:
        raise InsufficientUpdates(
            f"{rule} with f={f} needs at least {need} updates, the round accepted {n}"
        )
    return f


class RobustStrategy(Strategy):
    """Shared machinery: stacked deltas, the ``f`` rule, and ``reference + delta``.

    Subclasses set ``per_f`` and ``base`` (the rule needs ``n >= per_f * f + base``) and
    implement :meth:`robust_delta`.
    """

    Params: ClassVar[type[BaseModel]] = RobustParams
    per_f: ClassVar[int] = 2
    base: ClassVar[int] = 1
    spill_dir: ClassVar[Path | None] = None
    """Where large rounds spill (``None``: the system temp directory)."""

    @property
    def params_f(self) -> int | None:
        """The configured ``f`` (``None``: the most the round allows)."""
        f: int | None = getattr(self.params, "f", None)
        return f

    def f_for(self, n: int) -> int:
        """The ``f`` a round of ``n`` updates would use (feasible or not)."""
        f = self.params_f
        return f if f is not None else max((n - self.base) // self.per_f, 0)

    def min_updates(self) -> int:
        return self.per_f * self.f_for(0) + self.base

    def aggregator(self, reference: Arrays, expected: int) -> StackedDeltas:
        floats = sum(a.size for a in reference.values() if a.dtype.kind == "f")
        spill = None
        if expected * floats * 4 > SPILL_BYTES:
            spill = self.spill_dir or Path(tempfile.gettempdir())
        return StackedDeltas(reference, expected, spill_dir=spill)

    def apply(self, model: Arrays, aggregator: StackedDeltas) -> dict[str, np.ndarray]:  # type: ignore[override]
        f = resolve_f(self.name, self.params_f, aggregator.count, self.per_f, self.base)
        delta = aggregator.unflatten(self.robust_delta(aggregator, f))
        out = {
            name: (model[name] + d).astype(model[name].dtype, copy=False)
            for name, d in delta.items()
        }
        for name, median in aggregator.integer_medians().items():
            step = median - aggregator.reference[name]
            out[name] = (model[name] + step).astype(model[name].dtype, copy=False)
        return {name: out[name] for name in model}

    @abstractmethod
    def robust_delta(self, store: StackedDeltas, f: int) -> np.ndarray:
        """The aggregated delta, flat float32 over the store's floating coordinates."""


def _blockwise(store: StackedDeltas, rule: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Apply a coordinate-wise ``rule`` (``(n, b) -> (b,)``) block by block."""
    out = np.empty(store.dim, dtype=np.float32)
    for sl, block in store.blocks(BLOCK_ELEMS):
        out[sl] = rule(block)
    return out


class FedMedian(RobustStrategy):
    """Coordinate-wise median (Yin et al. 2018); ``f`` is only checked (``n >= 2f + 1``)."""

    name = "fedmedian"

    def robust_delta(self, store: StackedDeltas, f: int) -> np.ndarray:
        return _blockwise(store, lambda block: np.median(block, axis=0))


class TrimmedMean(RobustStrategy):
    """Per coordinate, drops the ``f`` largest and ``f`` smallest values and means the rest
    (Yin et al. 2018); needs ``n >= 2f + 1``."""

    name = "trimmed_mean"

    def robust_delta(self, store: StackedDeltas, f: int) -> np.ndarray:
        return _blockwise(store, lambda block: trimmed_mean(block, f))


def trimmed_mean(block: np.ndarray, f: int) -> np.ndarray:
    """Mean along axis 0 after dropping the ``f`` lowest and ``f`` highest values."""
    n = block.shape[0]
    kept = np.partition(block, (f, n - f - 1), axis=0)[f : n - f]
    return kept.mean(axis=0, dtype=np.float64).astype(np.float32)


def krum_scores(dist: np.ndarray, f: int) -> np.ndarray:
    """Krum score of each update: the sum of squared distances to its ``n - f - 2``
    nearest other updates (at least one), from a squared-distance matrix."""
    n = dist.shape[0]
    if n == 1:
        return np.zeros(1)
    neighbours = max(n - f - 2, 1)
    others = dist[~np.eye(n, dtype=bool)].reshape(n, n - 1)
    return np.sort(others, axis=1)[:, :neighbours].sum(axis=1)


class Krum(RobustStrategy):
    """Krum (Blanchard et al. 2017): the update with the lowest score; needs ``n >= 2f + 3``."""

    name = "krum"
    per_f = 2
    base = 3

    def robust_delta(self, store: StackedDeltas, f: int) -> np.ndarray:
        scores = krum_scores(store.pairwise_sq_distances(BLOCK_ELEMS), f)
        return store.mean_of_rows([int(np.argmin(scores))], BLOCK_ELEMS)


class MultiKrum(Krum):
    """Multi-Krum: the unweighted mean of the ``m`` lowest-score updates (``m <= n - f``)."""

    name = "multikrum"
    Params = MultiKrumParams

    def min_updates(self) -> int:
        n = super().min_updates()
        m: int | None = getattr(self.params, "m", None)
        while m is not None and m > n - self.f_for(n):
            n += 1
        return n

    def robust_delta(self, store: StackedDeltas, f: int) -> np.ndarray:
        n = store.count
        m_param: int | None = getattr(self.params, "m", None)
        m = m_param if m_param is not None else n - f
        if m > n - f:
            raise InsufficientUpdates(
                f"{self.name} with f={f} and m={m} needs at least {m + f} updates, "
                f"the round accepted {n}"
            )
        scores = krum_scores(store.pairwise_sq_distances(BLOCK_ELEMS), f)
        return store.mean_of_rows(np.argsort(scores, kind="stable")[:m], BLOCK_ELEMS)


def bulyan_selection(dist: np.ndarray, f: int, theta: int) -> np.ndarray:
    """Indices of ``theta`` updates picked one by one by Krum, each removed once picked."""
    remaining = np.arange(dist.shape[0])
    picked: list[int] = []
    for _ in range(theta):
        sub = dist[np.ix_(remaining, remaining)]
        best = int(np.argmin(krum_scores(sub, f)))
        picked.append(int(remaining[best]))
        remaining = np.delete(remaining, best)
    return np.asarray(picked, dtype=np.intp)


def closest_to_median_mean(block: np.ndarray, beta: int) -> np.ndarray:
    """Per coordinate, the mean of the ``beta`` values closest to the median (axis 0)."""
    median = np.median(block, axis=0)
    order = np.argpartition(np.abs(block - median), beta - 1, axis=0)[:beta]
    closest = np.take_along_axis(block, order, axis=0)
    return closest.mean(axis=0, dtype=np.float64).astype(np.float32)


class Bulyan(RobustStrategy):
    """Bulyan (El Mhamdi et al. 2018) over Krum; needs ``n >= 4f + 3``.

    Picks ``theta = n - 2f`` updates by repeated Krum, then per coordinate averages the
    ``beta = theta - 2f`` picked values closest to their median.
    """

    name = "bulyan"
    per_f = 4
    base = 3

    def robust_delta(self, store: StackedDeltas, f: int) -> np.ndarray:
        theta = store.count - 2 * f
        beta = theta - 2 * f
        picked = bulyan_selection(store.pairwise_sq_distances(BLOCK_ELEMS), f, theta)
        return _blockwise(store, lambda block: closest_to_median_mean(block[picked], beta))


ROBUST_STRATEGIES: dict[str, type[RobustStrategy]] = {
    cls.name: cls for cls in (FedMedian, TrimmedMean, Krum, MultiKrum, Bulyan)
}
"""The robust strategies by name, for the registry."""
