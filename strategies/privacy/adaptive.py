"""Adaptive clipping (Andrew et al. 2021, "Differentially Private Learning with Adaptive
Clipping").

The clip norm ``C`` tracks the ``target_quantile`` (gamma) of the update norms. Each
round, every participating site contributes a bit ``b_i = [norm_i <= C]`` (its update was
*not* clipped); the noised count over the fixed denominator ``m`` gives ``b`` and ``C``
moves geometrically: ``C <- C * exp(-eta * (b - gamma))``. When more than a gamma share
fits under ``C`` (``b > gamma``) ``C`` shrinks; when fewer do, it grows. (Flower 1.41
feeds the *clipped* fraction into the same formula, so its ``C`` runs away from the
quantile.) ``b`` is clamped to ``[0, 1]`` first, as TensorFlow Privacy's implementation
of the paper does; that is post-processing of the noised count and costs no privacy.

Privacy of the count. :meth:`AdaptiveClipping.noised_count` releases the *centred* sum
``sum_i (b_i - 1/2) + N(0, sigma_b^2)`` and adds the public ``m / 2`` back: adding or
removing one site moves the centred sum by at most 1/2, so the count query is a Gaussian
mechanism with multiplier ``2 sigma_b``. Run together with the model sum (multiplier
``z_delta``), the round is one Gaussian mechanism with multiplier
``(z_delta^-2 + (2 sigma_b)^-2)^-1/2``; so a round accounted at ``z`` gives the model
``z_delta = noise_split(z, sigma_b)`` and the accountant records ``z`` (with a pooled
data histogram of multiplier ``sigma_h`` in the same round, ``z`` composed with it: see
:mod:`strategies.privacy.composition`). (A plain count ``sum_i b_i + N(0, sigma_b^2)``
has sensitivity 1, multiplier ``sigma_b``, and would make that split understate the
spend.) With fixed-size sampling of exactly ``m`` sites the
centred and the plain count coincide.

Within a round, the current ``C`` clips the updates and scales that round's noise
(``z_delta C / m``); :meth:`AdaptiveClipping.update` then gives the next round's ``C``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from strategies.privacy.clipping import check_clip_norm
from strategies.privacy.composition import remaining_multiplier
from strategies.privacy.noise import SecureGaussian

COUNT_STDDEV_FRACTION = 1 / 20
"""Default ``sigma_b`` as a share of the expected participants ``m`` (the paper's ``m/20``)."""


def _positive(name: str, value: float) -> float:
    v = float(value)
    if not (math.isfinite(v) and v > 0.0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return v


def noise_split(z: float, sigma_b: float) -> float:
    """The model update's noise multiplier ``z_delta = (z^-2 - (2 sigma_b)^-2)^-1/2`` when
    the clipped-count query with noise std ``sigma_b`` shares a round accounted at ``z``.

    Raises
    ------
    ValueError
        For non-positive arguments, or when ``z >= 2 sigma_b``: the count query alone
        would then spend the whole round's budget and nothing is left for the model.
    """
    z = _positive("noise_multiplier", z)
    sigma_b = _positive("count_stddev", sigma_b)
    if z >= 2.0 * sigma_b:
        raise ValueError(
            f"adaptive clipping needs noise_multiplier < 2 x count_stddev; got "
            f"noise_multiplier {z:g} and count_stddev {sigma_b:g}, so the clipped-count "
            f"query alone would spend the round's whole budget (raise count_stddev or "
            f"lower noise_multiplier)"
        )
    return remaining_multiplier(z, 2.0 * sigma_b)


@dataclass
class AdaptiveClipping:
    """The moving clip norm ``C`` and the rule that moves it.

    Parameters
    ----------
    clip_norm
        The current ``C`` (the initial one at construction).
    target_quantile
        ``gamma`` in (0, 1): the share of updates ``C`` should leave unclipped.
    learning_rate
        ``eta`` > 0 of the geometric update.
    count_stddev
        ``sigma_b`` > 0 of the count noise; ``None``: ``m / 20`` of each round's ``m``.
    """

    clip_norm: float
    target_quantile: float = 0.5
    learning_rate: float = 0.2
    count_stddev: float | None = None

    def __post_init__(self) -> None:
        self.clip_norm = check_clip_norm(self.clip_norm)
        if not 0.0 < self.target_quantile < 1.0:
            raise ValueError(f"target_quantile must be in (0, 1), got {self.target_quantile!r}")
        self.learning_rate = _positive("learning_rate", self.learning_rate)
        if self.count_stddev is not None:
            self.count_stddev = _positive("count_stddev", self.count_stddev)

    def count_stddev_for(self, denominator: float) -> float:
        """``sigma_b`` for a round with fixed denominator ``m``."""
        if self.count_stddev is not None:
            return self.count_stddev
        return _positive("denominator", denominator) * COUNT_STDDEV_FRACTION

    def noised_count(
        self,
        unclipped: int,
        participants: int,
        denominator: float,
        noise: SecureGaussian,
        count_stddev: float | None = None,
    ) -> float:
        """The privately released count of unclipped updates:
        ``(unclipped - participants / 2) + N(0, sigma_b^2) + m / 2`` (centred, see the
        module docstring); ``sigma_b`` is ``count_stddev`` or :meth:`count_stddev_for`."""
        if not 0 <= unclipped <= participants:
            raise ValueError(
                f"need 0 <= unclipped <= participants, got {unclipped}, {participants}"
            )
        m = _positive("denominator", denominator)
        sigma_b = (
            _positive("count_stddev", count_stddev)
            if count_stddev is not None
            else self.count_stddev_for(m)
        )
        drawn = float(noise.normal(1, sigma_b, np.float64)[0])
        return (unclipped - participants / 2.0) + drawn + m / 2.0

    def update(self, noised_unclipped: float, denominator: float) -> float:
        """Move ``C`` with this round's noised count of unclipped updates over the fixed
        denominator ``m``: ``b = clamp(count / m, 0, 1)``, ``C <- C exp(-eta (b - gamma))``.
        Returns the new ``C`` (for the next round)."""
        m = _positive("denominator", denominator)
        count = float(noised_unclipped)
        if not math.isfinite(count):
            raise ValueError(f"the noised count must be finite, got {noised_unclipped!r}")
        b = min(1.0, max(0.0, count / m))
        self.clip_norm *= math.exp(-self.learning_rate * (b - self.target_quantile))
        return self.clip_norm

    def state(self) -> dict[str, float]:
        """JSON-ready state: the current clip norm."""
        return {"clip_norm": self.clip_norm}

    def load_state(self, state: Mapping[str, Any]) -> None:
        """Continue from :meth:`state` (ValueError for a malformed one)."""
        if not isinstance(state, Mapping) or set(state) != {"clip_norm"}:
            raise ValueError(f"adaptive clipping state must be {{'clip_norm': C}}, got {state!r}")
        value = state["clip_norm"]
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"stored clip norm {value!r} is not a number")
        self.clip_norm = check_clip_norm(value)
