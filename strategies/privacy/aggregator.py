"""The central-DP aggregate: clipped deltas, summed, over a fixed denominator, noised once.

Under user-level DP (a site is the unit of privacy) every site's delta
``update - reference`` is scaled to L2 norm at most ``C`` and summed unweighted (example
counts would make the sensitivity unbounded); the sum is divided by the fixed denominator
``m`` (the expected number of sampled sites, ``q x N``), so adding or removing one site
moves the mean by at most ``C / m``. Gaussian noise of std ``z C / m`` is added once, in
:meth:`ClippedNoisedMean.mean`, which server optimizers (FedAvg, FedAvgM, FedAdam, ...)
then treat exactly like FedAvg's mean.

Integer tensors (e.g. BatchNorm counters) stay at the reference: their deltas would be
released without noise.

Under secure aggregation the coordinator never sees the deltas: the sites clip them and
the secure sum arrives whole (``summed``, any object with ``mean(denominator)``); the
noise is then calibrated to ``sensitivity``, the bound on one site's contribution to
that sum (the clip norm plus the quantization's rounding).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import numpy as np

from strategies.accumulator import WeightedDeltaMean
from strategies.privacy.clipping import clip_factor
from strategies.privacy.noise import SecureGaussian
from strategies.validation import delta_norm

Arrays = Mapping[str, np.ndarray]


class _Summed(Protocol):
    count: int

    def mean(self, denominator: float | None = None) -> dict[str, np.ndarray]: ...


class ClippedNoisedMean:
    """Folds clipped deltas in O(model) memory; :meth:`mean` returns the noised mean.

    Parameters
    ----------
    reference
        The update reference (the global model); deltas are taken against it.
    clip_norm
        ``C``: the largest L2 norm a site's delta may contribute.
    denominator
        ``m``: the fixed denominator (expected number of sampled sites).
    noise_multiplier
        ``z``: the noise std is ``z C / m`` (under adaptive clipping, the share of the
        noise that goes to the model update).
    noise
        The CSPRNG the noise comes from.
    summed
        An aggregate already summed elsewhere (secure aggregation); :meth:`add` is then
        refused.
    sensitivity
        The L2 bound on one site's contribution to the sum (default ``clip_norm``).
    """

    def __init__(
        self,
        reference: Arrays,
        clip_norm: float,
        denominator: float,
        noise_multiplier: float,
        noise: SecureGaussian,
        *,
        summed: _Summed | None = None,
        sensitivity: float | None = None,
    ):
        if not denominator > 0:
            raise ValueError(f"the denominator must be > 0, got {denominator}")
        if not noise_multiplier >= 0:
            raise ValueError(f"the noise multiplier must be >= 0, got {noise_multiplier}")
        self.reference = reference
        self.clip_norm = float(clip_norm)
        self.denominator = float(denominator)
        self.noise_multiplier = float(noise_multiplier)
        self._noise = noise
        self.sensitivity = self.clip_norm if sensitivity is None else float(sensitivity)
        if not self.sensitivity >= self.clip_norm:
            raise ValueError(f"the sensitivity must be >= the clip norm, got {sensitivity}")
        self._summed = summed is not None
        self._sum: _Summed = WeightedDeltaMean(reference) if summed is None else summed
        self._mean: dict[str, np.ndarray] | None = None
        self.count = 0 if summed is None else summed.count
        self.unclipped = 0
        """Updates whose delta norm was at most ``C`` (adaptive clipping counts them)."""

    def add(self, arrays: Arrays, weight: float) -> None:
        """Fold in one validated update, clipped; its example count is ignored."""
        if self._mean is not None:
            raise RuntimeError("the noised mean was already released")
        if self._summed:
            raise RuntimeError("this aggregate was summed securely; it takes no updates")
        norm = delta_norm(arrays, self.reference)
        self.unclipped += norm <= self.clip_norm
        self._sum.add(arrays, clip_factor(norm, self.clip_norm))
        self.count += 1

    @property
    def noise_std(self) -> float:
        """The std of the Gaussian noise on each coordinate of the mean: ``z S / m``, with
        ``S`` the sensitivity (the clip norm ``C`` unless summed securely)."""
        return self.noise_multiplier * self.sensitivity / self.denominator

    def mean(self) -> dict[str, np.ndarray]:
        """``sum of clipped deltas / m`` plus noise, drawn once (later calls return the
        same arrays); integer tensors get a zero delta."""
        if self._mean is None:
            mean = self._sum.mean(denominator=self.denominator)
            for name, delta in mean.items():
                if delta.dtype.kind == "f":
                    self._noise.add_noise(delta, self.noise_std)
                else:
                    mean[name] = np.zeros_like(delta)
            self._mean = mean
        return self._mean
