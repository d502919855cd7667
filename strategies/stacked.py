"""A round's update deltas stacked as rows of one float32 matrix, for robust rules.

Robust aggregation rules (median, trimmed mean, Krum, Bulyan) need every update of the
round at once, so they cannot stream into a running sum. :class:`StackedDeltas` stores
update ``i``'s delta (``update - reference``) over all floating tensors, flattened in
the reference's order, as row ``i`` of a ``(expected, d)`` float32 matrix: in RAM, or in
a ``np.memmap`` file (page cache, evictable) when a spill directory is given. Rules then
read it in column blocks of ``count x block`` values, so their working memory is
``O(count x block)`` beyond the store itself.

Integer tensors (e.g. BatchNorm counters) are tiny and kept as per-update copies; the
robust rules give them the coordinate-wise median (:meth:`StackedDeltas.integer_medians`).

Weights are recorded in :attr:`StackedDeltas.weights`, but the robust rules built on this
store are unweighted: a Byzantine site could otherwise claim a huge example count.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

Arrays = Mapping[str, np.ndarray]

DEFAULT_BLOCK = 1 << 16
"""Coordinates per block: 64 Ki x 50 updates x 8 bytes = 26 MB of float64 working memory."""


class StackedDeltas:
    """Stores up to ``expected`` update deltas as rows of a float32 matrix.

    Parameters
    ----------
    reference
        The update reference (normally the global model); deltas are taken against it.
    expected
        The most updates the round may add.
    spill_dir
        When given, the matrix is a memory-mapped file created (and at once unlinked)
        in this directory instead of an array in RAM.
    """

    def __init__(self, reference: Arrays, expected: int, spill_dir: Path | None = None):
        if expected < 0:
            raise ValueError(f"expected must be at least 0, got {expected}")
        self.reference = reference
        self.expected = expected
        self.slices: dict[str, slice] = {}
        offset = 0
        for name, a in reference.items():
            if a.dtype.kind == "f":
                self.slices[name] = slice(offset, offset + a.size)
                offset += a.size
        self.dim = offset
        self.spilled = spill_dir is not None
        self._rows = _new_matrix(expected, offset, spill_dir)
        self._ints: dict[str, list[np.ndarray]] = {
            k: [] for k, a in reference.items() if a.dtype.kind != "f"
        }
        self.weights: list[float] = []
        self.count = 0

    def add(self, arrays: Arrays, weight: float) -> None:
        """Store one (already validated) update as the next row."""
        if self.count >= self.expected:
            raise ValueError(f"more than the expected {self.expected} updates")
        row = self._rows[self.count]
        for name, sl in self.slices.items():
            ref = self.reference[name].reshape(-1)
            # subtract at the tensor's own precision, then store the delta as float32
            # (rounding float64 operands first would lose deltas below float32 spacing)
            wide = np.promote_types(ref.dtype, np.float32)
            np.subtract(arrays[name].reshape(-1), ref, out=row[sl], dtype=wide, casting="same_kind")
        for name, values in self._ints.items():
            values.append(np.array(arrays[name], copy=True))
        self.weights.append(float(weight))
        self.count += 1

    @property
    def matrix(self) -> np.ndarray:
        """The stored deltas, ``(count, d)`` float32 (a view, no copy)."""
        return self._rows[: self.count]

    def blocks(self, block_elems: int = DEFAULT_BLOCK) -> Iterator[tuple[slice, np.ndarray]]:
        """Column blocks ``(coordinates, count x block view)`` covering all coordinates."""
        if block_elems < 1:
            raise ValueError(f"block_elems must be at least 1, got {block_elems}")
        for start in range(0, self.dim, block_elems):
            sl = slice(start, min(start + block_elems, self.dim))
            yield sl, self._rows[: self.count, sl]

    def pairwise_sq_distances(self, block_elems: int = DEFAULT_BLOCK) -> np.ndarray:
        """Squared Euclidean distances between stored deltas, ``(count, count)`` float64.

        Accumulated block by block as a float64 Gram matrix of the block centred on its
        column means (distances do not change under translation; centring keeps the
        ``|a|^2 + |b|^2 - 2ab`` form accurate).
        """
        gram = np.zeros((self.count, self.count), dtype=np.float64)
        for _, block in self.blocks(block_elems):
            centred = block.astype(np.float64)
            centred -= centred.mean(axis=0)
            gram += centred @ centred.T
        sq = np.diag(gram)
        dist = sq[:, None] + sq[None, :] - 2.0 * gram
        np.maximum(dist, 0.0, out=dist)
        np.fill_diagonal(dist, 0.0)
        return dist

    def mean_of_rows(
        self, rows: Sequence[int] | np.ndarray, block_elems: int = DEFAULT_BLOCK
    ) -> np.ndarray:
        """The unweighted mean of the given rows, flat float32 of length ``d``."""
        index = np.asarray(rows, dtype=np.intp)
        if index.size == 0:
            raise ValueError("mean of no rows")
        out = np.empty(self.dim, dtype=np.float32)
        for sl, block in self.blocks(block_elems):
            out[sl] = block[index].mean(axis=0, dtype=np.float64)
        return out

    def unflatten(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        """Floating tensors from a flat vector: the reference's shapes and dtypes."""
        if flat.shape != (self.dim,):
            raise ValueError(f"flat vector of shape {flat.shape}, expected ({self.dim},)")
        return {
            name: flat[sl]
            .reshape(self.reference[name].shape)
            .astype(self.reference[name].dtype, copy=False)
            for name, sl in self.slices.items()
        }

    def integer_medians(self) -> dict[str, np.ndarray]:
        """Each integer tensor's coordinate-wise median of the stored values, rounded
        half to even, in the tensor's own dtype and shape."""
        if self.count == 0:
            raise ValueError("no updates were stored")
        out: dict[str, np.ndarray] = {}
        for name, values in self._ints.items():
            median = np.median(np.stack(values).astype(np.float64), axis=0)
            out[name] = np.rint(median).astype(self.reference[name].dtype)
        return out


def _new_matrix(rows: int, cols: int, spill_dir: Path | None) -> np.ndarray:
    """A ``(rows, cols)`` float32 matrix in RAM, or memory-mapped under ``spill_dir``."""
    if spill_dir is None or rows * cols == 0:
        return np.empty((rows, cols), dtype=np.float32)
    fd, name = tempfile.mkstemp(prefix="fedcoord-deltas-", suffix=".f32", dir=spill_dir)
    os.close(fd)
    try:
        return np.memmap(name, dtype=np.float32, mode="w+", shape=(rows, cols))
    finally:
        os.unlink(name)  # the mapping keeps the data; the file vanishes with it (POSIX)
