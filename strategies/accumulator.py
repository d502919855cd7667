"""Streaming weighted mean of model deltas in O(model) memory.

Updates are folded in one at a time and can be freed right after; memory does not grow
with the number of sites, and :meth:`WeightedDeltaMean.mean` divides the accumulator in
place (no second model-sized buffer). Floating tensors accumulate into one flat float32
buffer (float32 stays float32: weights become Python floats, so NumPy 2 never promotes);
integer tensors (e.g. BatchNorm counters) accumulate in float64 and are rounded back to
their own dtype.

Speed: folding an update is bound by memory traffic (read the update and the reference,
read and write the accumulator). :meth:`WeightedDeltaMean.add` walks the flat coordinate
space in blocks of :data:`BLOCK_ELEMS`: each block's ``update - reference`` goes into a
small float32 scratch that stays in the L2 cache, and BLAS ``saxpy`` then adds
``w * scratch`` to the accumulator in one fused pass. Blocks span tensor boundaries, so a
model of many small tensors costs one scaled add per block, not one per tensor. Without
SciPy the scale and add are two NumPy passes over the cached scratch (a little slower).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import NamedTuple

import numpy as np

Arrays = Mapping[str, np.ndarray]

BLOCK_ELEMS = 1 << 16
"""Coordinates per block: a 256 KiB float32 scratch that stays in L2 between its passes."""

AXPY_ELEMS = 8192
"""Elements per BLAS ``saxpy`` call. OpenBLAS runs axpy single-threaded up to 10,000
elements; larger calls wake its thread pool for every block, which costs more than it
gains for a memory-bound add (and much more on a busy machine)."""


use_blas = True
"""Fold with BLAS ``saxpy`` when SciPy provides it; ``False`` forces the NumPy path."""


@functools.cache
def _blas_saxpy() -> Callable[..., np.ndarray] | None:
    """SciPy's BLAS ``saxpy(x, y, n, a, offx, incx, offy)``, i.e.
    ``y[offy:offy+n] += a * x[offx:offx+n]`` in float32, in place; ``None`` without SciPy
    or when a tiny probe shows it does not update ``y`` in place.

    Imported on first use, not with this module (``scipy.linalg`` takes ~0.3 s to import).
    """
    try:  # SciPy comes with scikit-learn
        from scipy.linalg.blas import saxpy
    except ImportError:  # pragma: no cover - the NumPy path is tested via ``use_blas``
        return None
    y = np.zeros(4, dtype=np.float32)
    saxpy(np.ones(4, dtype=np.float32), y, 2, 2.0, 1, 1, 1)  # y[1:3] += 2 * x[1:3]
    return saxpy if y.tolist() == [0.0, 2.0, 2.0, 0.0] else None


class _Piece(NamedTuple):
    """The part of one floating tensor that falls into one block."""

    name: str
    lo: int
    """First coordinate within the flattened tensor."""
    hi: int
    """One past the last coordinate within the flattened tensor."""
    ref: np.ndarray
    """The reference's flat values ``[lo, hi)`` (a view)."""
    out: np.ndarray
    """Where the piece's delta goes in the scratch (a view)."""
    dtype: np.dtype
    """Precision of the subtraction: the tensor's own, at least float32 (a float64
    delta far below float32's spacing at the weights must not round away)."""


class _Block(NamedTuple):
    """One block of the flat accumulator, with everything :meth:`WeightedDeltaMean.add`
    needs precomputed (views and call arguments), so folding an update slices only it."""

    pieces: tuple[_Piece, ...]
    axpy_calls: tuple[tuple[int, int, int], ...]
    """``(n, offset in scratch, offset in accumulator)`` of each ``saxpy`` call."""
    scratch: np.ndarray
    """The scratch's used part (a view), for the NumPy path."""
    acc: np.ndarray
    """The block's part of the accumulator (a view), for the NumPy path."""


class WeightedDeltaMean:
    """Accumulates ``sum_i w_i * (x_i - reference)``; :meth:`mean` divides by ``sum_i w_i``.

    Not thread-safe: callers serialise :meth:`add` (the round collector holds a lock).

    Parameters
    ----------
    reference
        The update reference (normally the global model); deltas are taken against it.
    """

    def __init__(self, reference: Arrays):
        self.reference = reference
        self._float_slices: dict[str, slice] = {}
        offset = 0
        for name, a in reference.items():
            if a.dtype.kind == "f":
                self._float_slices[name] = slice(offset, offset + a.size)
                offset += a.size
        self._acc = np.zeros(offset, dtype=np.float32)
        self._scratch = np.empty(min(offset, BLOCK_ELEMS), dtype=np.float32)
        self._blocks = _plan_blocks(reference, self._float_slices, self._scratch, self._acc)
        self._int_acc = {
            k: np.zeros(a.shape, dtype=np.float64)
            for k, a in reference.items()
            if a.dtype.kind != "f"
        }
        self.total_weight = 0.0
        self.count = 0
        self._mean: tuple[float, dict[str, np.ndarray]] | None = None

    def add(self, arrays: Arrays, weight: float) -> None:
        """Fold in one (already validated) update with a positive weight."""
        if self._mean is not None:
            raise RuntimeError("the mean was taken: no more updates can be added")
        w = float(weight)  # never an np.float64 scalar: it would promote float32 to float64
        w32 = np.float32(w)
        flat: dict[str, np.ndarray] = {}
        for name, sl in self._float_slices.items():
            flat[name] = arrays[name].reshape(-1)
            if flat[name].size != sl.stop - sl.start:
                raise ValueError(
                    f"{name!r} has {flat[name].size} values, the reference {sl.stop - sl.start}"
                )
        subtract, multiply, add = np.subtract, np.multiply, np.add
        blas, scratch, acc = _blas_saxpy() if use_blas else None, self._scratch, self._acc
        for pieces, axpy_calls, part, acc_part in self._blocks:
            for name, lo, hi, ref, out, dtype in pieces:
                subtract(flat[name][lo:hi], ref, out=out, dtype=dtype, casting="same_kind")
            if blas is not None:
                for n, offx, offy in axpy_calls:
                    blas(scratch, acc, n, w, offx, 1, offy)
            else:
                multiply(part, w32, out=part)
                add(acc_part, part, out=acc_part)
        for name, int_acc in self._int_acc.items():
            int_acc += w * (arrays[name].astype(np.float64) - self.reference[name])
        self.total_weight += w
        self.count += 1

    def mean(self, denominator: float | None = None) -> dict[str, np.ndarray]:
        """The weighted mean delta, each tensor in its own dtype and shape.

        ``denominator`` replaces the total weight (a fixed-denominator mean, as central
        DP needs); with it, no updates give zeros instead of an error.

        The float32 accumulator is divided in place and returned as views (a float32
        model's mean costs no extra memory); after that :meth:`add` is refused and
        later calls with the same denominator return the same arrays.
        """
        d = mean_denominator(denominator, self.count, self.total_weight)
        if self._mean is not None:
            if self._mean[0] != d:
                raise ValueError(f"the mean was taken with denominator {self._mean[0]}, not {d}")
            return self._mean[1]
        inv = 1.0 / d
        np.multiply(self._acc, np.float32(inv), out=self._acc)
        out: dict[str, np.ndarray] = {}
        for name, sl in self._float_slices.items():
            ref = self.reference[name]
            out[name] = self._acc[sl].astype(ref.dtype, copy=False).reshape(ref.shape)
        for name, acc in self._int_acc.items():
            dtype = self.reference[name].dtype
            out[name] = np.rint(acc * inv).astype(dtype)
        self._mean = (d, out)
        return out


def mean_denominator(denominator: float | None, count: int, total_weight: float) -> float:
    """What a mean divides by: ``denominator`` when given (a fixed-denominator mean), else
    the total weight of the ``count`` updates (ValueError when there are none)."""
    if denominator is None:
        if count == 0 or total_weight <= 0.0:
            raise ValueError("no updates were aggregated")
        denominator = total_weight
    if not denominator > 0.0:
        raise ValueError(f"denominator must be > 0, got {denominator}")
    return float(denominator)


def _plan_blocks(
    reference: Arrays, slices: Mapping[str, slice], scratch: np.ndarray, acc: np.ndarray
) -> list[_Block]:
    """Cut the flat coordinates ``[0, acc.size)`` into blocks of at most
    :data:`BLOCK_ELEMS` and precompute each block's tensor pieces and calls."""
    spans = [(name, sl.start, sl.stop) for name, sl in slices.items() if sl.stop > sl.start]
    flat_refs = {name: reference[name].reshape(-1) for name, _, _ in spans}
    blocks: list[_Block] = []
    t = 0  # index into spans of the first tensor that may overlap the current block
    for start in range(0, acc.size, BLOCK_ELEMS):
        stop = min(start + BLOCK_ELEMS, acc.size)
        pieces: list[_Piece] = []
        while t < len(spans) and spans[t][1] < stop:
            name, lo, hi = spans[t]
            a, b = max(lo, start) - lo, min(hi, stop) - lo  # within the tensor
            at = lo + a - start  # within the block
            out = scratch[at : at + b - a]
            ref = flat_refs[name][a:b]
            dtype = np.promote_types(ref.dtype, np.float32)
            pieces.append(_Piece(name, a, b, ref, out, dtype))
            if hi > stop:
                break  # the tensor goes on into the next block
            t += 1
        n = stop - start
        calls = tuple(
            (min(AXPY_ELEMS, n - off), off, start + off) for off in range(0, n, AXPY_ELEMS)
        )
        blocks.append(_Block(tuple(pieces), calls, scratch[:n], acc[start:stop]))
    return blocks
