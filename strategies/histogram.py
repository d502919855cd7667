"""Pooled data histograms: the fixed-length integer vector one site contributes to the
federation-level (``pooled``) data-drift check, and the decoding of their sum.

Under secure aggregation or DP the coordinator may learn only the sum of the sites'
histograms (noised under DP), so every site encodes its :class:`~strategies.drift.
DataProfile` into the same layout (:class:`HistogramSpec`): ``L`` label counts, ``F``
feature rows of ``B`` bins (row-major), then one count coordinate. Both encodings give
non-negative integers, so the sum of any subset of sites is exact in the ring
``Z_2^b`` of secure aggregation as long as ``sites * max_value <= 2^b - 1``
(:meth:`HistogramSpec.check_ring`).

``counts`` (secure aggregation without DP)
    The rows are the site's example counts; a site with more than ``cap`` (``W``,
    ``privacy.secure_aggregation.max_examples``) examples reports every row scaled to
    exactly ``W`` examples by largest-remainder rounding, as its update weight is capped
    at ``W``. The count coordinate is ``min(n, W)``. The decoded sum is exact.

``proportions`` (DP)
    Each row is the site's proportions times ``S`` (``scale``, a power of two), rounded
    by largest remainder so that every row sums to exactly ``S``; the count coordinate
    is ``floor(S min(n, c) / c)`` with ``c = cap`` (``drift.data.min_samples``). After
    dividing by ``S`` a site's vector is ``F + 1`` probability vectors and one value in
    ``[0, 1]``; a probability vector has L2 norm at most its L1 norm, 1, so adding or
    removing one site moves the sum by at most ``sqrt(F + 2)`` in L2
    (:attr:`HistogramSpec.sensitivity`), whatever its data. Because ``sum_i min(n_i, c)
    >= c`` exactly when ``sum_i n_i >= c``, the (noised) count coordinate decides the
    ``min_samples`` guard on the pooled count without releasing the exact count.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np

from strategies.drift import MAX_LABELS, MAX_PROFILE_VALUES, PROFILE_BINS, DataProfile

Encoding = Literal["counts", "proportions"]
ENCODINGS: tuple[Encoding, ...] = ("counts", "proportions")

PROFILE_LABELS = "profile_labels"
"""Round config key: label ids are ``0 .. profile_labels - 1`` (a larger one is an error)."""
PROFILE_FEATURES = "profile_features"
"""Round config key: feature rows of a pooled histogram (0: labels only)."""
PROFILE_ENCODING = "profile_encoding"
PROFILE_CAP = "profile_cap"
PROFILE_SCALE = "profile_scale"

MAX_SCALE = 1 << 16
"""``S`` when the ring allows it: proportions to 1/65536."""
MIN_SCALE = 1 << 8
"""The coarsest ``S`` accepted (proportions to 1/256)."""


class HistogramOverflow(ValueError):
    """A sum of the round's histograms could wrap the ring."""


def histogram_scale(sites: int, ring_bits: int | None = None) -> int:
    """``S`` for proportions: :data:`MAX_SCALE`, or under secure aggregation the largest
    power of two with ``sites * S <= 2^ring_bits - 1`` when that is smaller.

    Raises
    ------
    HistogramOverflow
        When that power of two is below :data:`MIN_SCALE`.
    """
    if sites < 1:
        raise ValueError(f"sites must be >= 1, got {sites}")
    if ring_bits is None:
        return MAX_SCALE
    room = ((1 << ring_bits) - 1) // sites
    scale = min(MAX_SCALE, 1 << (room.bit_length() - 1)) if room else 0
    if scale < MIN_SCALE:
        raise HistogramOverflow(
            f"Z_2^{ring_bits} cannot hold a sum of {sites} sites' histogram proportions "
            f"at a resolution of 1/{MIN_SCALE}; use ring_bits 32"
        )
    return scale


def largest_remainder(values: np.ndarray, total: int) -> np.ndarray:
    """Non-negative integers summing to exactly ``total`` with each within 1 of
    ``values`` (non-negative floats summing to ``total``): the floors, plus one for the
    largest fractional parts (ties to the lower index)."""
    floors = np.floor(values)
    out = floors.astype(np.int64)
    left = int(total) - int(out.sum())
    if not 0 <= left <= len(out):
        raise ValueError(f"values summing to {float(values.sum())!r} cannot round to {total}")
    if left:
        order = np.argsort(-(values - floors), kind="stable")
        out[order[:left]] += 1
    return out


@dataclass(frozen=True)
class PooledHistogram:
    """The round's pooled histogram as the drift check sees it.

    Attributes
    ----------
    num_examples
        Examples behind it (the ``min_samples`` guard): exact under secure aggregation;
        under DP the noised count ``sum_i min(n_i, cap)`` (rounded, at least 0).
    labels, features
        Proportions (each row sums to 1, or is all zero); features ``None`` without a
        feature range.
    sites
        Sites whose histograms are in the sum.
    noise_std
        Std of the Gaussian noise on each coordinate (DP), else ``None``.
    sample_size
        The sample size the comparison treats the proportions as (KS weighs by it):
        ``num_examples``, under DP at most what the noise allows (see :meth:`HistogramSpec.
        pooled`).
    """

    num_examples: int
    labels: np.ndarray
    features: np.ndarray | None
    sites: int
    encoding: Encoding
    noise_std: float | None = None
    sample_size: int = 0

    def profile(self) -> DataProfile:
        """Pseudo-counts (proportions times ``sample_size``) for PSI and KS."""
        n = self.sample_size
        features = None if self.features is None else self.features * n
        return DataProfile(n, self.labels * n, features)


def _normalised(rows: np.ndarray) -> np.ndarray:
    sums = rows.sum(axis=-1, keepdims=True)
    return np.divide(rows, sums, out=np.zeros_like(rows), where=sums > 0)


@dataclass(frozen=True)
class HistogramSpec:
    """The layout and encoding every site of a round uses for its pooled histogram.

    Attributes
    ----------
    labels
        ``L``: label ids ``0 .. L - 1``.
    features, bins
        ``F`` feature rows of ``B`` bins (``F = 0``: labels only, ``bins`` then 0).
    encoding
        ``counts`` or ``proportions`` (see the module docstring).
    cap
        ``counts``: the most examples one site counts (``W``); ``proportions``: the cap
        ``c`` of the count coordinate.
    scale
        ``proportions``: ``S`` units per row; ``counts``: 1.
    """

    labels: int
    features: int = 0
    bins: int = 0
    encoding: Encoding = "counts"
    cap: int = 1
    scale: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.labels <= MAX_LABELS:
            raise ValueError(f"labels must be in [1, {MAX_LABELS}], got {self.labels}")
        if self.features < 0 or (self.features > 0) != (self.bins > 0) or self.bins < 0:
            raise ValueError(f"need features and bins both 0 or both > 0, got {self}")
        if self.features * self.bins > MAX_PROFILE_VALUES:
            raise ValueError(f"features x bins must be at most {MAX_PROFILE_VALUES}")
        if self.encoding not in ENCODINGS:
            raise ValueError(f"unknown histogram encoding {self.encoding!r}")
        if self.cap < 1:
            raise ValueError(f"cap must be >= 1, got {self.cap}")
        if self.encoding == "proportions" and (self.scale < 1 or self.scale & (self.scale - 1)):
            raise ValueError(f"scale must be a power of two, got {self.scale}")
        if self.encoding == "counts" and self.scale != 1:
            raise ValueError("counts are not scaled")

    @property
    def size(self) -> int:
        """Coordinates: ``L + F B + 1``."""
        return self.labels + self.features * self.bins + 1

    @property
    def max_value(self) -> int:
        """The largest coordinate one site contributes."""
        return self.cap if self.encoding == "counts" else self.scale

    @property
    def sensitivity(self) -> float:
        """L2 bound on one site's decoded ``proportions`` vector: ``sqrt(F + 2)``."""
        if self.encoding != "proportions":
            raise ValueError("only proportions have a bounded sensitivity")
        return math.sqrt(self.features + 2)

    def check_ring(self, sites: int, ring_bits: int) -> None:
        """Ensure ``sites`` vectors sum without wrapping ``Z_2^ring_bits``."""
        if sites * self.max_value > (1 << ring_bits) - 1:
            raise HistogramOverflow(
                f"{sites} sites x {self.max_value} overflow the ring Z_2^{ring_bits} "
                "of the pooled histogram"
            )

    # round config ----------------------------------------------------------------------
    def round_config(self) -> dict[str, bool | int | float | str]:
        """The round config keys that tell the sites this layout."""
        return {
            PROFILE_LABELS: self.labels,
            PROFILE_FEATURES: self.features,
            PROFILE_ENCODING: self.encoding,
            PROFILE_CAP: self.cap,
            PROFILE_SCALE: self.scale,
        }

    @classmethod
    def from_config(cls, config: Mapping[str, object]) -> HistogramSpec | None:
        """The layout a round config names (``None`` when it asks for no pooled
        histogram); ``ValueError`` for one that is incomplete or malformed."""
        if PROFILE_LABELS not in config:
            return None
        values = [config.get(k) for k in (PROFILE_LABELS, PROFILE_FEATURES, PROFILE_CAP)]
        values.append(config.get(PROFILE_SCALE))
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise ValueError("the round config's pooled histogram settings are not integers")
        labels, features, cap, scale = (int(v) for v in values)  # type: ignore[call-overload]
        bins = config.get(PROFILE_BINS, 0) if features else 0
        if not isinstance(bins, int) or isinstance(bins, bool):
            raise ValueError("profile_bins must be an integer")
        encoding = config.get(PROFILE_ENCODING)
        if encoding not in ENCODINGS:
            raise ValueError(f"unknown histogram encoding {encoding!r}")
        return cls(labels, features, bins, encoding, cap, scale)  # type: ignore[arg-type]

    # one site --------------------------------------------------------------------------
    def check(self, profile: DataProfile) -> None:
        """Raise ``ValueError`` unless ``profile`` fits this layout."""
        if self.features == 0:
            if profile.features is not None:
                raise ValueError("the round asked for label counts only")
        elif profile.features is None or profile.features.shape != (self.features, self.bins):
            got = None if profile.features is None else list(profile.features.shape)
            raise ValueError(
                f"feature counts must be {self.features} x {self.bins} "
                f"(drift.data.features x bins), got {got}"
            )
        profile.check(self.bins or None)
        extra = np.flatnonzero(profile.labels[self.labels :])
        if extra.size:
            raise ValueError(
                f"label id {self.labels + int(extra[0])} is outside 0 .. {self.labels - 1} "
                f"(drift.data.labels = {self.labels})"
            )

    def encode(self, profile: DataProfile | None) -> np.ndarray:
        """One site's vector (``int64``, values in ``[0, max_value]``); zeros for a site
        without a profile or without examples. ``ValueError`` for a profile that does not
        fit (:meth:`check`)."""
        out = np.zeros(self.size, dtype=np.int64)
        if profile is None:
            return out
        self.check(profile)
        n = int(profile.num_examples)
        if n == 0:
            return out
        labels = profile.labels[: self.labels]
        rows = [np.pad(labels, (0, self.labels - len(labels)))]
        if profile.features is not None:
            rows.extend(profile.features)
        target = min(n, self.cap) if self.encoding == "counts" else self.scale
        at = 0
        for row in rows:
            row = np.asarray(row, dtype=np.float64)
            out[at : at + row.size] = largest_remainder(row * (target / row.sum()), target)
            at += row.size
        if self.encoding == "counts":
            out[at] = min(n, self.cap)
        else:
            out[at] = (self.scale * min(n, self.cap)) // self.cap
        return out

    # the sum ---------------------------------------------------------------------------
    def decode(self, total: np.ndarray, sites: int) -> np.ndarray:
        """The float64 sum of ``sites`` vectors whose exact integer sum is ``total``:
        counts as they are, proportions divided by ``S`` (exact: ``S`` is a power of two).

        Counts are checked (each value at most ``sites x cap``, every row adding up to
        the count coordinate): a site that sent a malformed vector is caught here, as
        the coordinator cannot check masked vectors one by one. Proportions are not
        checked: under DP an outcome published from the exact sum would be a release
        without noise.

        Raises
        ------
        ValueError
            For a sum of another length or counts that do not add up.
        """
        total = np.asarray(total)
        if total.shape != (self.size,):
            raise ValueError(f"the histogram sum has shape {total.shape}, expected ({self.size},)")
        values = total.astype(np.int64)
        if self.encoding == "proportions":
            return values.astype(np.float64) / self.scale
        count = int(values[-1])
        if (values < 0).any() or int(values.max(initial=0)) > max(sites, 0) * self.cap:
            raise ValueError("the pooled histogram holds counts no honest sites can sum to")
        rows = self._rows(values[:-1])
        if any(int(r.sum()) != count for r in rows):
            raise ValueError("the pooled histogram's rows do not add up to its example count")
        return values.astype(np.float64)

    def _rows(self, body: np.ndarray) -> list[np.ndarray]:
        labels = body[: self.labels]
        return [labels, *body[self.labels :].reshape(self.features, self.bins)]

    def pooled(
        self, vector: np.ndarray, sites: int, noise_std: float | None = None
    ) -> PooledHistogram:
        """The drift check's view of a decoded (and, under DP, noised) sum: negative
        values clamped to 0, rows normalised to proportions, the example count.

        Under DP (``noise_std`` given) two more steps, post-processing of the noised sum
        that costs no privacy: every bin gets ``noise_std`` added before normalising (a
        bin the noise may have emptied or filled differs from its reference by a
        proportion at the noise level, not by PSI's tiny floor), and the sample size KS
        weighs by is at most ``M^2 / (2 B sigma^2)`` (``M`` the mean noised mass of a
        feature row, ``B`` bins, ``sigma`` the noise std): a multinomial sample that size
        has a CDF no less noisy than the noised histogram's (variance ``1 / 4s`` against
        up to ``B sigma^2 / 2 M^2``), so the noise alone rarely passes the KS test.
        """
        v = np.maximum(np.asarray(vector, dtype=np.float64), 0.0)
        smooth = noise_std or 0.0
        labels = _normalised(v[: self.labels] + smooth)
        rows = v[self.labels : -1].reshape(self.features, self.bins)
        features = _normalised(rows + smooth) if self.features else None
        count = float(v[-1]) if self.encoding == "counts" else float(v[-1]) * self.cap
        n = size = round(count)
        if noise_std and self.features:
            mass = float(rows.sum(axis=1).mean())
            size = min(n, math.floor(mass**2 / (2 * self.bins * noise_std**2)))
        return PooledHistogram(n, labels, features, sites, self.encoding, noise_std, size)
