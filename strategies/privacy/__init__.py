"""Differential-privacy numerics, no I/O: CSPRNG Gaussian noise (:mod:`.noise`), L2
clipping (:mod:`.clipping`), adaptive clipping (:mod:`.adaptive`), the releases of one
round as one mechanism (:mod:`.composition`), the privacy accountant (:mod:`.accountant`)
and the central-DP aggregate (:mod:`.aggregator`).

Importing the package is cheap: Opacus (and torch) load only when an epsilon is computed.
"""

from strategies.privacy.accountant import (
    PrivacyAccountant,
    default_delta,
    epsilon_of,
    noise_multiplier_for,
)
from strategies.privacy.adaptive import AdaptiveClipping, noise_split
from strategies.privacy.clipping import clip_factor, clip_update
from strategies.privacy.composition import composed_multiplier, remaining_multiplier
from strategies.privacy.noise import SecureGaussian

__all__ = [
    "AdaptiveClipping",
    "PrivacyAccountant",
    "SecureGaussian",
    "clip_factor",
    "clip_update",
    "composed_multiplier",
    "default_delta",
    "epsilon_of",
    "noise_multiplier_for",
    "noise_split",
    "remaining_multiplier",
]
