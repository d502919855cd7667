"""Streaming weighted mean of model deltas in O(model) memory.

Updates are folded in one at a time and can be freed right after; memory does not grow
with the number of sites. Floating tensors accumulate into one flat float32 buffer
(float32 stays float32: weights are Python floats, so NumPy 2 never promotes);
integer tensors (e.g. BatchNorm counters) accumulate in float64 and are rounded back to
their own dtype.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

Arrays = Mapping[str, np.ndarray]


class WeightedDeltaMean:
    """Accumulates ``sum_i w_i * (x_i - reference)``; :meth:`mean` divides by ``sum_i w_i``."""

    def __init__(self, reference: Arrays):
        self.reference = reference
        self._float_slices: dict[str, slice] = {}
        offset = 0
        largest = 0
        for name, a in reference.items():
            if a.dtype.kind == "f":
                self._float_slices[name] = slice(offset, offset + a.size)
                offset += a.size
                largest = max(largest, a.size)
        self._acc = np.zeros(offset, dtype=np.float32)
        self._scratch = np.empty(largest, dtype=np.float32)
        self._int_acc = {
            k: np.zeros(a.shape, dtype=np.float64)
            for k, a in reference.items()
            if a.dtype.kind != "f"
        }
        self.total_weight = 0.0
        self.count = 0

    def add(self, arrays: Arrays, weight: float) -> None:
        """Fold in one (already validated) update with a positive weight."""
        w = float(weight)
        for name, sl in self._float_slices.items():
            n = sl.stop - sl.start
            tmp = self._scratch[:n]
            ref = self.reference[name].reshape(-1)
            np.subtract(arrays[name].reshape(-1), ref, out=tmp, dtype=np.float32)
            tmp *= w
            self._acc[sl] += tmp
        for name, acc in self._int_acc.items():
            acc += w * (arrays[name].astype(np.float64) - self.reference[name])
        self.total_weight += w
        self.count += 1

    def mean(self) -> dict[str, np.ndarray]:
        """The weighted mean delta, each tensor in its own dtype and shape."""
        if self.count == 0 or self.total_weight <= 0.0:
            raise ValueError("no updates were aggregated")
        inv = 1.0 / self.total_weight
        out: dict[str, np.ndarray] = {}
        for name, sl in self._float_slices.items():
            ref = self.reference[name]
            out[name] = (self._acc[sl] * inv).astype(ref.dtype, copy=False).reshape(ref.shape)
        for name, acc in self._int_acc.items():
            dtype = self.reference[name].dtype
            out[name] = np.rint(acc * inv).astype(dtype)
        return out
