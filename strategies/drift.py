"""Numerics of the drift checks: update sketches, data profiles, PSI, KS, robust scores.

Both ends use this module: sites build a :class:`DataProfile` of their data with the
bins the round config names (:data:`PROFILE_BINS`, :data:`PROFILE_LOW`,
:data:`PROFILE_HIGH`); the coordinator sketches each update, and compares statistics
with their history and profiles with their reference.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

Arrays = Mapping[str, np.ndarray]

SITE_EVALUATION = "site_evaluation"
"""Round config key: evaluate the received model on local data before training and
report ``eval_loss``, ``eval_accuracy`` and ``eval_examples`` with the fit result."""
EVAL_PREFIX = "eval_"
PROFILE_BINS = "profile_bins"
"""Round config key: report a :class:`DataProfile` with this many bins per feature."""
PROFILE_LOW = "profile_low"
PROFILE_HIGH = "profile_high"
MAX_LABELS = 10_000
MAX_PROFILE_VALUES = 1_000_000

SKETCH_DIM = 2048
"""Updates with more coordinates are count-sketched to this many (inner products are
kept in expectation); smaller ones are kept exactly."""
SKETCH_SAMPLE = 1 << 22
"""Coordinates a sketch hashes at most: a larger model's sketch covers a seeded random
choice of :data:`SKETCH_BLOCK`-coordinate blocks holding about this many (its norm
still covers every coordinate), so sketching costs the same from 4M parameters up."""
SKETCH_BLOCK = 1 << 16
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


@dataclass(frozen=True)
class DataProfile:
    """Counts of a site's data: examples per label id and, per feature, examples per bin.

    Attributes
    ----------
    labels
        ``labels[k]`` examples have label ``k`` (float64 counts).
    features
        ``(features, bins)`` counts over the round's range, or ``None``.
    """

    num_examples: int
    labels: np.ndarray
    features: np.ndarray | None = None

    def check(self, bins: int | None) -> None:
        """Raise ``ValueError`` unless the counts are sane for a round with ``bins``."""
        if self.num_examples < 0 or self.labels.ndim != 1 or len(self.labels) > MAX_LABELS:
            raise ValueError("label counts must be one row of at most 10000 ids")
        arrays = [self.labels] if self.features is None else [self.labels, self.features]
        for a in arrays:
            if not np.isfinite(a).all() or (a < 0).any():
                raise ValueError("counts must be finite and non-negative")
        if not math.isclose(self.labels.sum(), self.num_examples, rel_tol=1e-6, abs_tol=0.5):
            raise ValueError("label counts do not add up to num_examples")
        if self.features is None:
            return
        if bins is None or self.features.ndim != 2 or self.features.shape[1] != bins:
            raise ValueError(f"feature counts must have {bins} bins per feature")
        if self.features.size > MAX_PROFILE_VALUES:
            raise ValueError("too many feature counts")
        sums = self.features.sum(axis=1)
        if not np.allclose(sums, self.num_examples, rtol=1e-6, atol=0.5):
            raise ValueError("each feature's counts must add up to num_examples")


def profile_of(
    x: np.ndarray, y: np.ndarray, bins: int | None, low: float = 0.0, high: float = 1.0
) -> DataProfile:
    """The profile of features ``x`` (rows are examples; flattened per row) and integer
    labels ``y``; values outside ``[low, high]`` count in the end bins."""
    y = np.asarray(y).reshape(-1)
    if y.size and (y.dtype.kind not in "iu" or y.min() < 0 or y.max() >= MAX_LABELS):
        raise ValueError("labels must be integers in [0, 10000) for a data profile")
    labels = np.bincount(y.astype(np.int64), minlength=1).astype(np.float64)
    features = None
    if bins is not None:
        rows = np.asarray(x, dtype=np.float64).reshape(len(y), -1)
        width = (high - low) / bins
        index = np.clip(((rows - low) / width).astype(np.int64), 0, bins - 1)
        offsets = np.arange(rows.shape[1], dtype=np.int64) * bins
        flat = np.bincount((index + offsets).ravel(), minlength=rows.shape[1] * bins)
        features = flat.reshape(rows.shape[1], bins).astype(np.float64)
    return DataProfile(len(y), labels, features)


def profile_settings(config: Mapping[str, object]) -> tuple[int | None, float, float]:
    """``(bins, low, high)`` a round config asks profiles for (``bins`` None: labels only)."""
    bins = int(config.get(PROFILE_BINS, 0)) or None  # type: ignore[call-overload]
    low = float(config.get(PROFILE_LOW, 0.0))  # type: ignore[arg-type]
    high = float(config.get(PROFILE_HIGH, 1.0))  # type: ignore[arg-type]
    return bins, low, high


def psi(reference: np.ndarray, current: np.ndarray, floor: float = 1e-4) -> float:
    """Population stability index of two count vectors (padded to one length; each
    proportion floored at ``floor`` so empty bins stay finite)."""
    n = max(len(reference), len(current))
    p = np.pad(np.asarray(reference, np.float64), (0, n - len(reference)))
    q = np.pad(np.asarray(current, np.float64), (0, n - len(current)))
    p = np.maximum(p / max(p.sum(), 1e-12), floor)
    q = np.maximum(q / max(q.sum(), 1e-12), floor)
    return float(np.sum((q - p) * np.log(q / p)))


def ks_from_counts(reference: np.ndarray, current: np.ndarray) -> tuple[float, float]:
    """Two-sample Kolmogorov-Smirnov statistic and p-value of two binned samples
    (``scipy.stats.ks_2samp`` over the bin indices, counts rounded to examples)."""
    bins = np.arange(len(reference))
    a = np.repeat(bins, np.rint(reference).astype(np.int64))
    b = np.repeat(bins, np.rint(current).astype(np.int64))
    if not len(a) or not len(b):
        return 0.0, 1.0
    result = stats.ks_2samp(a, b, method="asymp")
    return float(result.statistic), float(result.pvalue)


def robust_score(value: float, history: Sequence[float], min_scale: float) -> float:
    """How many robust deviations ``value`` lies above the median of ``history``: the
    scale is 1.4826 x MAD (the standard deviation for normal data), at least
    ``min_scale``, so a flat history does not make every wobble an outlier."""
    h = np.asarray(history, dtype=np.float64)[None, :]
    return float(robust_scores(np.array([value], np.float64), h, min_scale)[0])


def robust_scores(values: np.ndarray, baselines: np.ndarray, min_scale: float) -> np.ndarray:
    """:func:`robust_score` of each ``values[i]`` against the row ``baselines[i]``."""
    median = np.median(baselines, axis=1)
    mad = np.median(np.abs(baselines - median[:, None]), axis=1)
    return (values - median) / np.maximum(1.4826 * mad, max(min_scale, 1e-12))


LEAVE_ONE_OUT_CELLS = 1 << 22
"""Baseline values :func:`leave_one_out_scores` holds at once (32 MiB of float64)."""


def leave_one_out_scores(values: np.ndarray, min_scale: float) -> np.ndarray:
    """:func:`robust_score` of each value against all the others (the cross-site check),
    vectorised in blocks of rows that hold at most :data:`LEAVE_ONE_OUT_CELLS` values."""
    v = np.asarray(values, dtype=np.float64)
    n = v.size
    scores = np.empty(n, np.float64)
    rows = max(1, LEAVE_ONE_OUT_CELLS // max(n, 1))
    for lo in range(0, n, rows):
        hi = min(n, lo + rows)
        keep = np.ones((hi - lo, n), bool)
        keep[np.arange(hi - lo), np.arange(lo, hi)] = False
        others = np.broadcast_to(v, (hi - lo, n))[keep].reshape(hi - lo, n - 1)
        scores[lo:hi] = robust_scores(v[lo:hi], others, min_scale)
    return scores


class UpdateSketcher:
    """The L2 norm of an update's delta and a fixed-size linear sketch of it.

    Models up to :data:`SKETCH_DIM` floating coordinates are kept exactly; larger ones
    are count-sketched with a multiply-shift hash of the coordinate index seeded by
    ``seed``, so sketches of different sites share buckets and signs and the sketch of a
    weighted mean is the weighted mean of the sketches. Beyond :data:`SKETCH_SAMPLE`
    coordinates only seeded random blocks are sketched (the same blocks for every site),
    scaled so that inner products are still kept in expectation.
    """

    def __init__(self, reference: Arrays, seed: int, chunk: int = 1 << 20):
        self.names = [k for k, a in reference.items() if a.dtype.kind == "f"]
        self.size = sum(int(reference[k].size) for k in self.names)
        self.exact = self.size <= SKETCH_DIM
        self.dim = self.size if self.exact else SKETCH_DIM
        rng = np.random.default_rng([seed, 0x5EED])
        self._mul = rng.integers(1, 2**63, dtype=np.uint64) | np.uint64(1)
        self._chunk = chunk
        blocks = -(-self.size // SKETCH_BLOCK)
        keep = min(blocks, max(1, SKETCH_SAMPLE // SKETCH_BLOCK))
        self._blocks = np.sort(rng.choice(blocks, keep, replace=False)) * SKETCH_BLOCK
        self._scale = math.sqrt(blocks / keep)
        """The sketched blocks' first coordinates, and the factor that makes up for
        the blocks left out."""

    def sketch(self, arrays: Arrays, reference: Arrays) -> tuple[float, np.ndarray]:
        """``(||delta||, sketch of delta)`` in float64, one chunk of the delta at a time
        (no model-sized float64 temporary)."""
        out = np.zeros(self.dim, dtype=np.float64)
        offset = 0
        total = 0.0
        for name in self.names:
            a, r = arrays[name].reshape(-1), np.asarray(reference[name]).reshape(-1)
            for start in range(0, a.size, self._chunk):
                stop = min(start + self._chunk, a.size)
                delta = np.subtract(a[start:stop], r[start:stop], dtype=np.float64)
                total += float(np.dot(delta, delta))
                if self.exact:
                    out[offset + start : offset + stop] = delta
                else:
                    self._add_sampled(out, delta, offset + start)
            offset += a.size
        if self._scale != 1.0:
            out *= self._scale
        return math.sqrt(total), out

    def _add_sampled(self, out: np.ndarray, delta: np.ndarray, offset: int) -> None:
        """Sketch the parts of ``delta`` (coordinates from ``offset``) in sampled blocks."""
        end = offset + delta.size
        first = int(np.searchsorted(self._blocks, offset - SKETCH_BLOCK, side="right"))
        for lo in self._blocks[first:].tolist():
            if lo >= end:
                break
            a, b = max(lo, offset), min(lo + SKETCH_BLOCK, end)
            if a < b:
                self._add(out, delta[a - offset : b - offset], a)

    def _add(self, out: np.ndarray, delta: np.ndarray, offset: int) -> None:
        shift = np.uint64(64 - int(math.log2(SKETCH_DIM)))
        for start in range(0, delta.size, self._chunk):
            part = delta[start : start + self._chunk]
            index = np.arange(offset + start, offset + start + part.size, dtype=np.uint64)
            with np.errstate(over="ignore"):
                hashed = index * self._mul
                signs = ((index * _GOLDEN) >> np.uint64(63)).astype(np.float64) * 2.0 - 1.0
            out += np.bincount(
                (hashed >> shift).astype(np.int64), weights=part * signs, minlength=SKETCH_DIM
            )


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine of two vectors (0 when either is zero)."""
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0.0 or nb == 0.0:
        return 0.0
    return float(np.dot(a, b) / (na * nb))
