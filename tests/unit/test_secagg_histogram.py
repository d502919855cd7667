"""Pooled data histograms: the site's integer encoding (counts, proportions), its layout
check, the histogram tail of the secure-aggregation vector and the exact integer sums it
gives under any dropout pattern."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from strategies.drift import DataProfile, profile_of
from strategies.histogram import (
    MAX_SCALE,
    HistogramOverflow,
    HistogramSpec,
    histogram_scale,
    largest_remainder,
)
from strategies.secagg import QuantizationConfig, error_bound
from strategies.secagg.quantize import max_levels
from strategies.secagg.vector import (
    SecureSum,
    VectorError,
    VectorLayout,
    decode_sum,
    encode_update,
)
from tests.unit.test_secagg_protocol import ALL, KEYS, MASKED, NOTHING, SHARES, names, run_round

COUNTS = HistogramSpec(labels=4, features=2, bins=3, encoding="counts", cap=500)
PROPORTIONS = HistogramSpec(4, 2, 3, "proportions", cap=50, scale=MAX_SCALE)


def site_profile(rng: np.random.Generator, n: int, labels: int = 4) -> DataProfile:
    x = rng.uniform(0, 1, (n, 2))
    return profile_of(x, rng.integers(0, labels, n), bins=3)


# encoding ------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 10**6), min_size=1, max_size=30), st.integers(1, 1 << 20))
def test_largest_remainder_hits_the_total_and_stays_within_one(counts, total):
    w = np.array(counts, dtype=np.float64)
    if w.sum() <= 0:
        w = np.ones_like(w)
    values = w * (total / w.sum())
    out = largest_remainder(values, total)
    assert out.dtype == np.int64 and int(out.sum()) == total and (out >= 0).all()
    assert np.all(np.abs(out - values) < 1 + 1e-9)


def test_counts_are_kept_exact_up_to_the_cap_and_scaled_to_it_beyond():
    rng = np.random.default_rng(0)
    small = site_profile(rng, 120)
    v = COUNTS.encode(small)
    assert v[:4].tolist() == small.labels.tolist() + [0.0] * (4 - len(small.labels))
    assert v[4:10].tolist() == small.features.ravel().tolist() and v[-1] == 120
    big = site_profile(rng, 2_000)
    w = COUNTS.encode(big)
    rows = [w[:4], w[4:7], w[7:10]]
    assert all(int(r.sum()) == 500 for r in rows) and w[-1] == 500  # capped at W
    expected = big.labels * 500 / 2_000
    assert np.all(np.abs(w[: len(big.labels)] - expected) < 1)
    assert not COUNTS.encode(None).any() and COUNTS.encode(None).shape == (COUNTS.size,)


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 400), st.booleans())
def test_a_sites_proportions_have_l2_norm_at_most_sqrt_of_features_plus_two(seed, n, peaked):
    rng = np.random.default_rng(seed)
    if peaked:  # the worst case: every example in one label and one bin per feature
        profile = profile_of(np.zeros((n, 2)), np.zeros(n, np.int64), bins=3)
    else:
        profile = site_profile(rng, n)
    v = PROPORTIONS.encode(profile)
    rows = [v[:4], v[4:7], v[7:10]]
    assert all(int(r.sum()) == MAX_SCALE for r in rows)
    assert v[-1] == MAX_SCALE * min(n, 50) // 50
    decoded = v / MAX_SCALE
    assert np.linalg.norm(decoded) <= PROPORTIONS.sensitivity == math.sqrt(4)
    if peaked and n >= 50:
        assert np.linalg.norm(decoded) == pytest.approx(PROPORTIONS.sensitivity)


def test_profiles_that_do_not_fit_the_layout_are_refused():
    rng = np.random.default_rng(1)
    with pytest.raises(ValueError, match=r"label id 5 is outside 0 \.\. 3"):
        COUNTS.encode(profile_of(rng.uniform(0, 1, (6, 2)), np.array([0, 1, 5, 2, 2, 1]), 3))
    with pytest.raises(ValueError, match="2 x 3"):
        COUNTS.encode(profile_of(rng.uniform(0, 1, (6, 3)), np.zeros(6, np.int64), 3))
    with pytest.raises(ValueError, match="label counts only"):
        HistogramSpec(4, cap=10).encode(site_profile(rng, 10))
    with pytest.raises(ValueError, match="add up"):
        COUNTS.encode(DataProfile(5, np.array([1.0, 1.0]), np.ones((2, 3))))


def test_the_layout_travels_in_the_round_config():
    for spec in (COUNTS, PROPORTIONS, HistogramSpec(7, cap=3)):
        config = {"profile_bins": spec.bins, **spec.round_config()}
        assert HistogramSpec.from_config(config) == spec
    assert HistogramSpec.from_config({"profile_bins": 3}) is None
    with pytest.raises(ValueError):
        HistogramSpec.from_config({**COUNTS.round_config(), "profile_encoding": "raw"})


def test_the_scale_fits_the_ring():
    assert histogram_scale(10) == histogram_scale(10, 32) == MAX_SCALE
    assert histogram_scale(100_000, 32) == 1 << 15
    assert histogram_scale(10, 16) == 1 << 12  # 10 * 4096 <= 65535 < 10 * 8192
    with pytest.raises(HistogramOverflow):
        histogram_scale(1_000, 16)
    with pytest.raises(HistogramOverflow):
        COUNTS.check_ring(9, 12)  # 9 * 500 > 4095
    COUNTS.check_ring(8, 12)


def test_decoded_counts_must_add_up():
    rng = np.random.default_rng(2)
    total = COUNTS.encode(site_profile(rng, 80)) + COUNTS.encode(site_profile(rng, 90))
    assert COUNTS.decode(total, 2).tolist() == total.astype(float).tolist()
    broken = total.copy()
    broken[0] += 1
    with pytest.raises(ValueError, match="do not add up"):
        COUNTS.decode(broken, 2)
    with pytest.raises(ValueError, match="no honest sites"):
        COUNTS.decode(total * 10, 2)
    pooled = COUNTS.pooled(COUNTS.decode(total, 2), 2)
    assert pooled.num_examples == 170 and pooled.labels.sum() == pytest.approx(1.0)
    assert np.allclose(pooled.features.sum(axis=1), 1.0)
    assert pooled.profile().labels.sum() == pytest.approx(170)


# the vector's histogram tail ------------------------------------------------------------
def layout_for(spec: HistogramSpec) -> tuple[dict[str, np.ndarray], VectorLayout]:
    reference = {"w": np.zeros((3, 2), np.float32), "b": np.zeros(2, np.float32)}
    return reference, VectorLayout.of(reference, spec.size)


def test_the_tail_follows_the_quantized_part_unchanged():
    reference, layout = layout_for(COUNTS)
    assert layout.quantized == 8 + 3 and layout.dimension == 11 + COUNTS.size
    config = QuantizationConfig(1.0, max_levels(5), 32)
    update = {k: v + 0.1 for k, v in reference.items()}
    tail = COUNTS.encode(site_profile(np.random.default_rng(3), 60))
    q = encode_update(
        update, reference, layout, config, num_examples=60, max_examples=100, histogram=tail
    )
    assert q.values.dtype == np.uint32 and q.values.shape == (layout.dimension,)
    assert q.values[layout.quantized :].tolist() == tail.tolist()
    with pytest.raises(VectorError, match="expects a histogram"):
        encode_update(update, reference, layout, config, num_examples=60, max_examples=100)
    with pytest.raises(VectorError, match="must be"):
        encode_update(
            update, reference, layout, config, num_examples=1, max_examples=1,
            histogram=tail[:-1],
        )  # fmt: skip
    small = QuantizationConfig(1.0, 2, 8)
    with pytest.raises(VectorError, match=r"\[0, 2\^8\)"):
        encode_update(
            update, reference, layout, small, num_examples=1, max_examples=1,
            histogram=tail * 0 + 256,
        )  # fmt: skip
    zeros = SecureSum.zeros(layout)
    assert zeros.histogram is not None and not zeros.histogram.any()
    assert SecureSum.zeros(VectorLayout.of(reference)).histogram is None


@st.composite
def histogram_rounds(draw: st.DrawFn) -> dict:
    n = draw(st.integers(3, 8))
    reach = dict.fromkeys(names(n), ALL)
    for s in draw(st.permutations(names(n)))[: draw(st.integers(0, n - 3))]:
        reach[s] = draw(st.sampled_from([NOTHING, KEYS, SHARES, MASKED]))
    return {
        "n": n,
        "reach": reach,
        "ring_bits": draw(st.sampled_from([32, 20])),
        "encoding": draw(st.sampled_from(["counts", "proportions"])),
        "seed": draw(st.integers(0, 2**32 - 1)),
    }


@settings(max_examples=40, deadline=None)
@given(histogram_rounds())
def test_histograms_sum_exactly_in_the_secure_sum_under_any_dropout_pattern(case):
    """Real vectors (quantized update + histogram tail) through the real protocol: the
    decoded tail is exactly the sum of the histograms of the sites in the sum."""
    n, bits, rng = case["n"], case["ring_bits"], np.random.default_rng(case["seed"])
    spec = (
        HistogramSpec(4, 2, 3, "counts", cap=(1 << bits) // 16)
        if case["encoding"] == "counts"
        else HistogramSpec(4, 2, 3, "proportions", 50, histogram_scale(n, bits))
    )
    spec.check_ring(n, bits)
    reference, layout = layout_for(spec)
    config = QuantizationConfig(1.0, max_levels(n, bits), bits)
    sites = names(n)
    tails = {s: spec.encode(site_profile(rng, int(rng.integers(0, 3_000)))) for s in sites}
    updates = {
        s: {k: (v + rng.normal(0, 0.3, v.shape)).astype(np.float32) for k, v in reference.items()}
        for s in sites
    }
    vectors = {
        s: encode_update(
            updates[s], reference, layout, config, num_examples=100, max_examples=100,
            histogram=tails[s],
        ).values
        for s in sites
    }  # fmt: skip
    rnd = run_round(
        n, k=n - 1, t=2, dimension=layout.dimension, ring_bits=bits, reach=case["reach"],
        updates=vectors,
    )  # fmt: skip
    if rnd.result is None:  # too few left: nothing is released at all
        return
    survivors = rnd.result.survivors
    summed = decode_sum(rnd.result.total, len(survivors), layout, config)
    exact = sum((tails[s] for s in survivors), np.zeros(spec.size, np.int64))
    assert summed.histogram is not None and summed.histogram.tolist() == exact.tolist()
    decoded = spec.decode(summed.histogram, len(survivors))  # counts add up: it checks
    if spec.encoding == "proportions":
        assert decoded.tolist() == (exact / spec.scale).tolist()  # exact: S is 2^k
    bound = error_bound(len(survivors), config)
    for k, ref in reference.items():
        clean = sum(np.clip(updates[s][k].astype(np.float64) - ref, -1, 1) for s in survivors)
        assert np.abs(summed.sums[k] - clean).max() <= bound


def test_under_dp_bins_are_smoothed_at_the_noise_and_ks_weighs_by_what_the_noise_allows():
    spec = PROPORTIONS
    rng = np.random.default_rng(7)
    clean = spec.decode(sum(spec.encode(site_profile(rng, 200)) for _ in range(10)), 10)
    noised = clean.copy()
    noised[4] = -0.3  # the noise pushed a bin below zero
    pooled = spec.pooled(noised, 10, noise_std=0.2)
    assert pooled.num_examples == 500  # 10 sites, each counted up to cap = 50
    assert pooled.features[0, 0] == pytest.approx(0.2 / (noised[5:7].sum() + 3 * 0.2))
    assert np.allclose(pooled.features.sum(axis=1), 1.0) and pooled.labels.sum() == 1.0
    mass = np.maximum(noised[4:10], 0).reshape(2, 3).sum(axis=1).mean()
    assert pooled.sample_size == min(500, math.floor(mass**2 / (2 * 3 * 0.2**2)))
    assert pooled.profile().num_examples == pooled.sample_size
    exact = spec.pooled(clean, 10)  # no noise: nothing smoothed, the count as it is
    assert exact.sample_size == exact.num_examples == 500
    assert exact.labels.tolist() == pytest.approx((clean[:4] / clean[:4].sum()).tolist())
