"""Fixed-point encoding of updates for secure aggregation, in the ring ``Z_{2^b}``.

Encoding of one value ``x`` with clip range ``r``, ``L`` levels and weight factor
``w in [0, 1]``:

1. clip: ``c = min(max(x, -r), r)`` (values beyond the range are *counted* and reported in
   :attr:`Quantized.clipped`; Flower saturates silently);
2. weight: ``c * w`` (still within ``[-r, r]``);
3. scale: ``u = (c * w + r) / step`` with ``step = 2r / (L - 1)``, so ``u in [0, L - 1]``;
4. stochastic rounding: ``q = floor(u) + [U < u - floor(u)]`` with ``U`` a 53-bit uniform
   from an AES-256-CTR keystream keyed by ``os.urandom`` (a CSPRNG); ``q in {0..L-1}``
   and ``E[q] = u`` (up to ``2^-53``).

``q`` is stored as ``uint32``; the coordinator recovers ``sum_i q_i`` exactly as long as
``n * (L - 1) < 2^b`` (:func:`check_no_overflow`), because the sum then never wraps.

Weighting is left to the caller through ``weight`` (a factor in ``[0, 1]``, e.g.
:func:`weight_factor` of an example count bounded by a maximum count). For a weighted
mean, append ``w_i * r`` as one more coordinate before quantizing (``weight=1`` for that
coordinate, i.e. quantize the already weighted vector ``[w_i * clip(x_i), w_i * r]``); the
dequantized sum's last coordinate is then ``r * sum_i w_i`` (up to the bound below) and
the mean is ``sum_i w_i c_i / sum_i w_i``. Secure aggregation hides each ``w_i`` as well.

Error bound (deterministic, per coordinate): for ``n`` quantized vectors,
``|dequantize_sum(sum q_i) - sum_i w_i * clip(x_i)| <= n * step + 2^-23 * n * r``
(:func:`error_bound`): each stochastic rounding moves a value by less than one ``step``,
and the float32 result adds at most half an ulp of a value bounded by ``n * r``
(``2^-24 * n * r``; the other ``2^-24 * n * r`` covers the float64 arithmetic). The
rounding errors are independent and zero-mean, so the typical error is about
``step * sqrt(n) / 2``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

from strategies.secagg.encoding import pack_fields
from strategies.secagg.errors import QuantizationOverflow
from strategies.secagg.prg import CHUNK_WORDS, SEED_BYTES, KeyStream

_TWO_POW_M53 = 2.0**-53
_ROUNDING_CONTEXT = pack_fields("stochastic-rounding")


@dataclass(frozen=True)
class QuantizationConfig:
    """Clip range ``r``, number of levels ``L`` (values in ``[0, L)``) and ring bits
    ``b`` (sums are taken modulo ``2^b``, ``1 <= b <= 32``)."""

    clip_range: float
    levels: int
    ring_bits: int = 32

    def __post_init__(self) -> None:
        r = float(self.clip_range)
        if not (math.isfinite(r) and r > 0.0):
            raise ValueError(f"clip_range must be a finite number > 0, got {self.clip_range!r}")
        if not 1 <= int(self.ring_bits) <= 32:
            raise ValueError(f"ring_bits must be in [1, 32], got {self.ring_bits!r}")
        if not 2 <= int(self.levels) <= 1 << int(self.ring_bits):
            raise ValueError(
                f"levels must be in [2, 2^ring_bits], got {self.levels!r} "
                f"with ring_bits={self.ring_bits}"
            )

    @property
    def step(self) -> float:
        """Spacing of the grid: ``2r / (L - 1)``."""
        return 2.0 * float(self.clip_range) / (int(self.levels) - 1)

    @property
    def modulus(self) -> int:
        """``2^ring_bits``."""
        return 1 << int(self.ring_bits)


@dataclass(frozen=True, eq=False)
class Quantized:
    """A quantized update: flat ``uint32`` ``values`` in ``[0, L)`` and the number of
    input values that lay outside ``[-r, r]`` and were clipped."""

    values: np.ndarray
    clipped: int


def max_levels(sites: int, ring_bits: int = 32) -> int:
    """The largest ``L`` with ``sites * (L - 1) < 2^ring_bits`` (capped at ``2^ring_bits``)."""
    if sites < 1:
        raise ValueError(f"sites must be >= 1, got {sites}")
    return min(((1 << ring_bits) - 1) // sites + 1, 1 << ring_bits)


def check_no_overflow(sites: int, levels: int, ring_bits: int = 32) -> None:
    """Ensure a sum of ``sites`` values in ``[0, levels)`` never wraps modulo
    ``2^ring_bits``, i.e. ``sites * (levels - 1) <= 2^ring_bits - 1``.

    Raises
    ------
    QuantizationOverflow
        When it would wrap (the message names the largest safe ``levels``).
    ValueError
        For ``sites < 1``, ``levels < 2`` or ``ring_bits`` outside ``[1, 32]``.
    """
    if sites < 1 or levels < 2 or not 1 <= ring_bits <= 32:
        raise ValueError(
            f"need sites >= 1, levels >= 2, 1 <= ring_bits <= 32; got {sites}, {levels}, "
            f"{ring_bits}"
        )
    if sites * (levels - 1) > (1 << ring_bits) - 1:
        raise QuantizationOverflow(
            f"{sites} sites x {levels} levels overflow the ring Z_2^{ring_bits}: "
            f"{sites} * ({levels} - 1) = {sites * (levels - 1)} > 2^{ring_bits} - 1; use "
            f"levels <= {max_levels(sites, ring_bits)} or a larger ring"
        )


def weight_factor(weight: float, max_weight: float) -> float:
    """``min(weight, max_weight) / max_weight`` in ``[0, 1]`` (e.g. an example count
    bounded by a maximum count, so no site can outweigh the bound).

    Raises
    ------
    ValueError
        For a weight that is not finite and >= 0 or a bound that is not finite and > 0.
    """
    w, m = float(weight), float(max_weight)
    if not (math.isfinite(w) and w >= 0.0):
        raise ValueError(f"the weight must be a finite number >= 0, got {weight!r}")
    if not (math.isfinite(m) and m > 0.0):
        raise ValueError(f"max_weight must be a finite number > 0, got {max_weight!r}")
    return min(w, m) / m


def quantize(
    values: np.ndarray,
    config: QuantizationConfig,
    *,
    weight: float = 1.0,
    seed: bytes | None = None,
) -> Quantized:
    """Clip, weight, scale and stochastically round ``values`` (flattened, C order) to
    ``uint32`` integers in ``[0, levels)`` (see the module docstring).

    Parameters
    ----------
    values
        A floating array of any shape.
    config
        Clip range, levels and ring.
    weight
        Factor in ``[0, 1]`` applied after clipping.
    seed
        32 bytes keying the rounding randomness, for reproducible tests only; by default
        fresh ``os.urandom`` bytes per call.

    Raises
    ------
    ValueError
        For non-finite values, a weight outside ``[0, 1]`` or a bad seed.
    TypeError
        For a non-floating array.
    """
    arr = np.asarray(values)
    if arr.dtype.kind != "f":
        raise TypeError(f"quantize needs a floating array, got {arr.dtype}")
    w = float(weight)
    if not (math.isfinite(w) and 0.0 <= w <= 1.0):
        raise ValueError(f"the weight factor must be in [0, 1], got {weight!r}")
    flat = arr.reshape(-1)
    r = float(config.clip_range)
    step = config.step
    top = float(int(config.levels) - 1)
    stream = KeyStream(os.urandom(SEED_BYTES) if seed is None else seed, _ROUNDING_CONTEXT)
    out = np.empty(flat.size, dtype=np.uint32)
    size = min(CHUNK_WORDS, max(flat.size, 1))  # scratch reused for every chunk
    x_buf, low_buf = np.empty(size, np.float64), np.empty(size, np.float64)
    uniform_buf, bits_buf = np.empty(size, np.float64), np.empty(size, np.uint64)
    flag_buf = np.empty(size, np.bool_)
    clipped = 0
    for lo in range(0, flat.size, CHUNK_WORDS):
        hi = min(lo + CHUNK_WORDS, flat.size)
        m = hi - lo
        x, low, uniform, bits, flag = (
            x_buf[:m],
            low_buf[:m],
            uniform_buf[:m],
            bits_buf[:m],
            flag_buf[:m],
        )
        x[...] = flat[lo:hi]
        if not np.isfinite(x, out=flag).all():
            raise ValueError("cannot quantize non-finite values (NaN or infinity)")
        clipped += int(np.count_nonzero(np.greater(x, r, out=flag)))
        clipped += int(np.count_nonzero(np.less(x, -r, out=flag)))
        np.clip(x, -r, r, out=x)
        if w != 1.0:
            x *= w
        x += r
        x /= step
        np.floor(x, out=low)
        x -= low  # fractional part in [0, 1)
        stream.fill(bits)
        np.right_shift(bits, np.uint64(11), out=bits)
        np.multiply(bits, _TWO_POW_M53, out=uniform)
        low += np.less(uniform, x, out=flag)
        np.clip(low, 0.0, top, out=low)
        out[lo:hi] = low
    return Quantized(values=out, clipped=clipped)


def error_bound(sites: int, config: QuantizationConfig) -> float:
    """Largest absolute error per coordinate of :func:`dequantize_sum` over ``sites``
    vectors against the exact sum of the weighted clipped inputs:
    ``sites * step + 2^-23 * sites * clip_range``."""
    if sites < 1:
        raise ValueError(f"sites must be >= 1, got {sites}")
    return sites * config.step + 2.0**-23 * sites * float(config.clip_range)


def dequantize_sum(total: np.ndarray, sites: int, config: QuantizationConfig) -> np.ndarray:
    """The float32 sum ``total * step - sites * r`` of ``sites`` quantized vectors whose
    exact integer sum is ``total`` (``uint32``, modulo ``2^ring_bits``).

    Raises
    ------
    QuantizationOverflow
        When ``sites`` vectors could have wrapped the ring.
    ValueError
        For a ``total`` that is not ``uint32`` or holds a value no sum of ``sites``
        quantized vectors can reach (a sign of a wrong unmasking).
    """
    check_no_overflow(sites, int(config.levels), int(config.ring_bits))
    arr = np.asarray(total)
    if arr.dtype != np.uint32:
        raise ValueError(f"a quantized sum is uint32, got {arr.dtype}")
    flat = arr.reshape(-1)
    limit = sites * (int(config.levels) - 1)
    if flat.size and int(flat.max()) > limit:
        raise ValueError(
            f"value {int(flat.max())} exceeds {limit}, the largest sum of {sites} "
            "quantized vectors: not an exact unmasked sum"
        )
    out = np.empty(flat.size, dtype=np.float32)
    shift = sites * float(config.clip_range)
    step = config.step
    for lo in range(0, flat.size, CHUNK_WORDS):
        hi = min(lo + CHUNK_WORDS, flat.size)
        x = flat[lo:hi].astype(np.float64)
        x *= step
        x -= shift
        out[lo:hi] = x
    return out.reshape(arr.shape)
