"""A site's update as one flat vector in the ring, and the coordinator's decoded sum.

Layout (:class:`VectorLayout`): the delta ``update - reference`` of every floating tensor
of the update reference, sorted by name, each in C order, then three extra
coordinates that the same secure sum carries:

``weight``
    ``r`` (the clip range), so after weighting the decoded sum holds ``r * sum_i w_i``;
``clipped``
    ``r * f_i``, with ``f_i`` the fraction of the site's delta values outside
    ``[-r, r]``, so the sum reports how much clipping the range caused (weighted);
``capped``
    ``r`` when the site's example count exceeded the weight bound (its weight factor
    is then exactly 1), so the sum counts the sites whose weight was capped.

All of that is quantized (:mod:`strategies.secagg.quantize`) with the site's weight
factor ``w_i = min(n_i, W) / W`` (1 for every site when unweighted), so the coordinator
learns only ``sum_i w_i * clip(delta_i)`` and the three sums above, and divides. Integer
tensors (e.g. BatchNorm counters) are not in the vector and stay at the reference, as
under central DP.

With pooled data-drift checks a ``histogram`` tail follows: the site's pooled histogram
(:mod:`strategies.histogram`), ``VectorLayout.histogram`` non-negative integers appended
*un-quantized*, so the ring sum of the tails is the exact integer sum of the sites'
histograms (the round's layout keeps ``sites * max_value < 2^ring_bits``). As with the
update, the coordinator cannot check a site's tail, only the sum.

Under client-side DP (``l2_clip``) the site first scales its float64 delta to L2 norm at
most ``C`` and quantizes with ``r = C``, so no coordinate is clipped; the quantized
vector's norm is then below ``C + step * sqrt(d)`` (:func:`quantized_sensitivity`), the
sensitivity the coordinator's noise must be calibrated to.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from strategies.accumulator import mean_denominator
from strategies.secagg.quantize import (
    QuantizationConfig,
    Quantized,
    dequantize_sum,
    error_bound,
    quantize,
)

Arrays = Mapping[str, np.ndarray]

MASKED_TENSOR = "masked"
"""Name of the one tensor of a masked-input payload (``uint32``, the vector's length)."""

EXTRAS = ("weight", "clipped", "capped")
"""The coordinates that follow the deltas, in order."""

L2_CLIP_SLACK = 1e-12
"""Relative slack on a float64 L2 clip (rounding of the scaled delta's norm)."""


class VectorError(ValueError):
    """An update that does not fit the round's vector layout."""


@dataclass(frozen=True)
class VectorLayout:
    """The floating tensors of the update reference, in vector order: ``(name, dtype
    name, shape)``, and the length of the integer histogram tail (0: none)."""

    tensors: tuple[tuple[str, str, tuple[int, ...]], ...]
    histogram: int = 0

    @classmethod
    def of(cls, reference: Arrays, histogram: int = 0) -> VectorLayout:
        """The layout of ``reference``'s floating tensors, sorted by name."""
        return cls(
            tuple(
                (name, np.dtype(a.dtype).name, tuple(int(s) for s in a.shape))
                for name, a in sorted(reference.items())
                if a.dtype.kind == "f"
            ),
            histogram,
        )

    @property
    def size(self) -> int:
        """Number of delta coordinates."""
        return sum(math.prod(shape) for _, _, shape in self.tensors)

    @property
    def quantized(self) -> int:
        """Length of the quantized part: deltas plus :data:`EXTRAS`."""
        return self.size + len(EXTRAS)

    @property
    def dimension(self) -> int:
        """Length of the whole vector: the quantized part, then the histogram tail."""
        return self.quantized + self.histogram


def weight_of(num_examples: int, max_examples: float | None) -> tuple[float, bool]:
    """The weight factor ``min(n, W) / W`` (1 when unweighted) and whether it was capped."""
    if max_examples is None:
        return 1.0, False
    if not (math.isfinite(max_examples) and max_examples > 0):
        raise VectorError(f"the weight bound must be a finite number > 0, got {max_examples!r}")
    if num_examples < 1:
        raise VectorError(f"a weighted update needs num_examples >= 1, got {num_examples}")
    return min(num_examples, max_examples) / max_examples, num_examples > max_examples


def flatten_delta(update: Arrays, reference: Arrays, layout: VectorLayout) -> np.ndarray:
    """The float64 deltas of ``update`` in layout order (a tensor missing from
    ``reference`` counts from zero, e.g. SCAFFOLD's ``delta_c``).

    Raises
    ------
    VectorError
        For a missing tensor, or one of another shape or dtype kind.
    """
    out = np.empty(layout.size, dtype=np.float64)
    at = 0
    for name, _, shape in layout.tensors:
        value = update.get(name)
        if value is None:
            raise VectorError(f"the update lacks tensor {name!r}")
        value = np.asarray(value)
        if value.dtype.kind != "f" or tuple(value.shape) != shape:
            raise VectorError(
                f"tensor {name!r} is {value.dtype}{list(value.shape)}, the round expects a "
                f"floating tensor of shape {list(shape)}"
            )
        part = out[at : at + value.size]
        if name in reference:  # one pass, at float64: exact for float32 tensors
            np.subtract(value.reshape(-1), reference[name].reshape(-1), out=part, dtype=np.float64)
        else:
            part[:] = value.reshape(-1)
        at += value.size
    return out


def encode_update(
    update: Arrays,
    reference: Arrays,
    layout: VectorLayout,
    config: QuantizationConfig,
    *,
    num_examples: int,
    max_examples: float | None,
    l2_clip: float | None = None,
    seed: bytes | None = None,
    histogram: np.ndarray | None = None,
) -> Quantized:
    """The site's vector (deltas, then :data:`EXTRAS`, quantized; then the histogram tail
    as it is; see the module docstring).

    Parameters
    ----------
    update, reference
        The trained model and the arrays the site received.
    num_examples, max_examples
        The weight ``min(n, W) / W``; ``max_examples=None`` weighs every site 1.
    l2_clip
        Client-side DP: scale the delta to L2 norm at most this first.
    seed
        Key of the rounding randomness, for reproducible tests only.
    histogram
        The site's pooled histogram, ``layout.histogram`` integers in
        ``[0, 2^ring_bits)`` (required when the layout has a tail).

    Raises
    ------
    VectorError
        When the update or the histogram does not fit the layout or the weight is invalid.
    """
    tail = _histogram_tail(histogram, layout, config)
    delta = flatten_delta(update, reference, layout)
    weight, capped = weight_of(num_examples, max_examples)
    try:
        if l2_clip is not None:
            norm = float(np.linalg.norm(delta))
            if norm > l2_clip:
                delta *= l2_clip / norm
        deltas = quantize(delta, config, weight=weight, seed=seed)
    except ValueError as exc:  # non-finite values
        raise VectorError(f"the update cannot be encoded: {exc}") from None
    r = float(config.clip_range)
    extras = np.array([r, r * deltas.clipped / max(layout.size, 1), r if capped else 0.0])
    extra_seed = None if seed is None else hashlib.sha256(b"extras" + seed).digest()
    quantized_extras = quantize(extras, config, weight=weight, seed=extra_seed)
    vector = np.concatenate([deltas.values, quantized_extras.values, tail])
    return Quantized(vector, deltas.clipped)


def _histogram_tail(
    histogram: np.ndarray | None, layout: VectorLayout, config: QuantizationConfig
) -> np.ndarray:
    """The histogram as ``uint32`` values of the ring, checked against the layout."""
    if histogram is None:
        if layout.histogram:
            raise VectorError(f"the round expects a histogram of {layout.histogram} values")
        return np.empty(0, dtype=np.uint32)
    values = np.asarray(histogram)
    if values.dtype.kind not in "iu" or values.shape != (layout.histogram,):
        raise VectorError(
            f"the histogram must be {layout.histogram} integers, got {values.dtype}"
            f"{list(values.shape)}"
        )
    if values.size and (int(values.min()) < 0 or int(values.max()) >= config.modulus):
        raise VectorError(f"histogram values must lie in [0, 2^{config.ring_bits})")
    return values.astype(np.uint32)


def quantized_sensitivity(
    l2_clip: float, layout: VectorLayout, config: QuantizationConfig
) -> float:
    """Bound on the L2 norm of one site's decoded contribution to the deltas' sum under
    client-side DP: ``C (1 + 1e-12) + step * sqrt(d)`` (stochastic rounding moves each
    coordinate by less than one step)."""
    return l2_clip * (1.0 + L2_CLIP_SLACK) + config.step * math.sqrt(layout.size)


@dataclass(frozen=True, eq=False)
class SecureSum:
    """What the coordinator learns from a secure round: per-tensor sums of the weighted
    deltas (float32), the total weight, the weighted mean fraction of clipped values and
    the number of sites whose weight was capped."""

    sums: dict[str, np.ndarray]
    count: int
    total_weight: float
    clipped_fraction: float
    capped_sites: int
    histogram: np.ndarray | None = None
    """The exact integer sum of the sites' histogram tails (``int64``), if any."""

    @classmethod
    def zeros(cls, layout: VectorLayout) -> SecureSum:
        """The sum over no sites."""
        sums = {name: np.zeros(shape, dtype=np.float32) for name, _, shape in layout.tensors}
        histogram = np.zeros(layout.histogram, np.int64) if layout.histogram else None
        return cls(sums, 0, 0.0, 0.0, 0, histogram)


def decode_sum(
    total: np.ndarray, count: int, layout: VectorLayout, config: QuantizationConfig
) -> SecureSum:
    """Decode the exact ring sum ``total`` of ``count`` sites' vectors.

    Raises
    ------
    ValueError
        For a sum of another length, or one no ``count`` vectors can reach.
    """
    if total.shape != (layout.dimension,):
        raise ValueError(f"the sum has shape {total.shape}, the layout ({layout.dimension},)")
    values = dequantize_sum(total[: layout.quantized], count, config)
    histogram = total[layout.quantized :].astype(np.int64) if layout.histogram else None
    r = float(config.clip_range)
    sums: dict[str, np.ndarray] = {}
    at = 0
    for name, _, shape in layout.tensors:
        n = math.prod(shape)
        sums[name] = values[at : at + n].reshape(shape)
        at += n
    weight, clipped, capped = (float(v) for v in values[at:])
    noise = error_bound(count, config)  # below it, a decoded extra may be rounding alone
    return SecureSum(
        sums=sums,
        count=int(count),
        total_weight=weight / r,
        clipped_fraction=clipped / weight if clipped > noise and weight > 0 else 0.0,
        capped_sites=max(0, round(capped / r)),
        histogram=histogram,
    )


class SecureMean:
    """The round's aggregate for strategies that need only the mean delta
    (``aggregator.mean()`` and ``aggregator.count``), from a :class:`SecureSum`.

    Integer tensors of ``reference`` get a zero delta (they are not aggregated).
    """

    def __init__(self, reference: Arrays, summed: SecureSum):
        self.reference = reference
        self.summed = summed
        self.count = summed.count
        self.total_weight = summed.total_weight

    def add(self, arrays: Arrays, weight: float) -> None:
        raise RuntimeError("a secure aggregate is summed by the protocol, not update by update")

    def mean(self, denominator: float | None = None) -> dict[str, np.ndarray]:
        """``sum / denominator`` per tensor (default: the total weight), in each tensor's
        dtype; zeros for integer tensors."""
        inv = 1.0 / mean_denominator(denominator, self.count, self.total_weight)
        out: dict[str, np.ndarray] = {}
        for name, ref in self.reference.items():
            if ref.dtype.kind == "f":
                out[name] = (self.summed.sums[name] * inv).astype(ref.dtype, copy=False)
            else:
                out[name] = np.zeros_like(ref)
        return out
