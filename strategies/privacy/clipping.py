"""L2 clipping of update deltas: user-level DP bounds each site's contribution by ``C``.

The norm is that of the whole delta ``update - reference`` over all floating tensors
(:func:`strategies.validation.delta_norm`); integer tensors (e.g. BatchNorm counters) are
not clipped, and the central-DP aggregate does not release them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from strategies.validation import delta_norm

CLIENT_CLIP_KEY = "dp_clip_norm"
"""Round-config key of client-side DP: sites clip their update's delta to this norm."""


def check_clip_norm(clip_norm: float) -> float:
    """``clip_norm`` as a float, or ValueError unless it is finite and > 0."""
    c = float(clip_norm)
    if not (math.isfinite(c) and c > 0.0):
        raise ValueError(f"the clip norm must be a finite number > 0, got {clip_norm!r}")
    return c


def clip_factor(norm: float, clip_norm: float) -> float:
    """``min(1, C / norm)``: the scale that brings a delta of L2 ``norm`` within ``C``.

    A zero delta needs no clipping and gives 1.0 (never a division by zero).

    Raises
    ------
    ValueError
        For a clip norm that is not finite and > 0, or a norm that is not finite and >= 0.
    """
    c = check_clip_norm(clip_norm)
    n = float(norm)
    if not (math.isfinite(n) and n >= 0.0):
        raise ValueError(f"the update norm must be a finite number >= 0, got {norm!r}")
    return 1.0 if n <= c else c / n


def clip_update(
    update: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray], clip_norm: float
) -> dict[str, np.ndarray]:
    """``reference + factor * (update - reference)`` for floating tensors, so the delta's
    L2 norm is at most ``clip_norm`` (up to the rounding of the result to each tensor's
    dtype); integer tensors pass unchanged, and so does an update already within ``C``.
    Each tensor keeps its dtype."""
    factor = clip_factor(delta_norm(update, reference), clip_norm)
    if factor == 1.0:
        return dict(update)
    out: dict[str, np.ndarray] = {}
    for name, value in update.items():
        if value.dtype.kind != "f":
            out[name] = value
            continue
        ref = reference[name]
        delta = np.subtract(value, ref, dtype=np.promote_types(value.dtype, np.float32))
        delta *= factor  # a Python float: float32 stays float32
        delta += ref
        out[name] = delta.astype(value.dtype, copy=False)
    return out
