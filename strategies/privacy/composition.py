"""Several Gaussian releases of one round, accounted as one Gaussian mechanism.

A round may release more than the noised model update: under adaptive clipping a noised
count, with pooled data-drift checks a noised histogram. Each is a sum over the same
Poisson-sampled sites of per-site vectors ``v_k`` with L2 sensitivity ``S_k``, noised
with std ``z_k S_k``. Scale each part by ``1 / (z_k S_k)`` and concatenate: one site then
moves the joint vector by at most ``sqrt(sum_k z_k^-2)`` while the noise is ``N(0, I)``,
so the round is *one* Gaussian mechanism with multiplier ``(sum_k z_k^-2)^-1/2``
(:func:`composed_multiplier`) on the same sample, and the accountant records that
multiplier once per round. This is exact (the joint release is that mechanism, up to
an invertible rescaling), not a bound from composing separate steps.
:func:`remaining_multiplier` is the inverse: the multiplier left to one release when a
round is accounted at ``z`` and another release uses ``z_other``.
"""

from __future__ import annotations

import math


def _positive(name: str, value: float) -> float:
    v = float(value)
    if not (math.isfinite(v) and v > 0.0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return v


def composed_multiplier(*multipliers: float) -> float:
    """``(sum_k z_k^-2)^-1/2``: the multiplier of releases with multipliers ``z_k`` on
    one sample, taken together (at least one; each finite and > 0)."""
    if not multipliers:
        raise ValueError("composed_multiplier needs at least one multiplier")
    return sum(_positive("noise multiplier", z) ** -2 for z in multipliers) ** -0.5


def remaining_multiplier(total: float, other: float) -> float:
    """``(z^-2 - z_other^-2)^-1/2``: what is left for one release of a round accounted at
    ``z = total`` when another release of it has multiplier ``z_other``.

    Raises
    ------
    ValueError
        For non-positive arguments, or ``total >= other`` (the other release alone would
        spend the round's whole budget).
    """
    z = _positive("noise multiplier", total)
    o = _positive("noise multiplier", other)
    if z >= o:
        raise ValueError(
            f"a release with noise multiplier {o:g} alone spends a round accounted at {z:g}"
        )
    return (z**-2 - o**-2) ** -0.5
