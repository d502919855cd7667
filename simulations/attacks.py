"""Simulated Byzantine sites (``federation.byzantine``), so robustness can be shown.

Attackers are a seeded random choice of ``byzantine.sites`` sites. Update attacks
rewrite an honest update ``y = x + d`` (``x`` the global model received):

============  ==========================================================
``sign_flip`` ``x - d``: the update pointing the other way
``scale``     ``x + SCALE * d``: a boosted update (model replacement)
``gaussian``  ``x + N(0, GAUSSIAN_STD^2)``: random noise, ignoring training
``nan``       NaN in every float tensor (validation must reject it)
============  ==========================================================

``label_flip`` poisons the data instead: the attacker trains on labels ``C - 1 - y``.
Noise comes from a generator seeded by (seed, round, site), so runs are reproducible.
"""

from __future__ import annotations

import numpy as np

from client_sdk.api import Arrays

SCALE = 100.0
GAUSSIAN_STD = 1.0
UPDATE_ATTACKS = frozenset({"sign_flip", "scale", "gaussian", "nan"})


def attackers(num_sites: int, count: int, seed: int) -> frozenset[int]:
    """Indices of the sites that attack (the same for the whole run)."""
    rng = np.random.default_rng([seed, 0xB12])
    return frozenset(int(i) for i in rng.permutation(num_sites)[:count])


def attack_update(
    attack: str, received: Arrays, trained: Arrays, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """The malicious version of an honest update (integer tensors are left alone)."""
    out: dict[str, np.ndarray] = {}
    for name, y in trained.items():
        x = received[name]
        if y.dtype.kind != "f":
            out[name] = y
        elif attack == "sign_flip":
            out[name] = x - (y - x)
        elif attack == "scale":
            out[name] = x + (y - x) * SCALE
        elif attack == "gaussian":
            out[name] = x + rng.normal(0.0, GAUSSIAN_STD, size=x.shape).astype(x.dtype)
        elif attack == "nan":
            out[name] = np.full_like(y, np.nan)
        else:
            raise ValueError(f"unknown update attack {attack!r}")
    return out
