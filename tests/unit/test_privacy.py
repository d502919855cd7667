"""DP numerics: CSPRNG noise, clipping, adaptive clipping, the accountant, the DP mean."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from scipy import stats

from strategies.privacy import noise as noise_module
from strategies.privacy.accountant import (
    PrivacyAccountant,
    default_delta,
    epsilon_of,
    noise_multiplier_for,
)
from strategies.privacy.adaptive import AdaptiveClipping, noise_split
from strategies.privacy.aggregator import ClippedNoisedMean
from strategies.privacy.clipping import clip_factor, clip_update
from strategies.privacy.composition import composed_multiplier, remaining_multiplier
from strategies.privacy.noise import CHUNK, SecureGaussian
from strategies.validation import delta_norm

ROOT = Path(__file__).resolve().parents[2]


def fixed_key_generators(monkeypatch, count: int = 2) -> list[SecureGaussian]:
    """``count`` generators sharing one known key (all-zero urandom), for exact checks."""
    monkeypatch.setattr(noise_module, "urandom", lambda n: bytes(n))
    return [SecureGaussian() for _ in range(count)]


# --- noise ----------------------------------------------------------------------------


def test_secure_gaussian_is_standard_normal():
    x = SecureGaussian().normal(1_000_000, 1.0, np.float64)
    assert abs(x.mean()) < 0.005
    assert abs(x.std() - 1.0) < 0.01
    assert stats.kstest(x[:200_000], "norm").pvalue > 1e-3


def test_each_generator_has_its_own_key():
    a, b = SecureGaussian().normal(64, 1.0), SecureGaussian().normal(64, 1.0)
    assert not np.array_equal(a, b)


def test_a_forked_process_draws_a_new_key(monkeypatch):
    parent, child = fixed_key_generators(monkeypatch)  # the same key, as after a fork
    monkeypatch.undo()  # the real os.urandom again
    in_parent = parent.normal(16, 1.0)
    monkeypatch.setattr(noise_module.os, "getpid", lambda: -1)  # now in "another process"
    assert not np.array_equal(child.normal(16, 1.0), in_parent)


def test_numpy_seeding_does_not_reach_the_noise():
    np.random.seed(0)
    a = SecureGaussian().normal(16, 1.0)
    np.random.seed(0)
    b = SecureGaussian().normal(16, 1.0)
    assert not np.array_equal(a, b)


def test_add_noise_keeps_dtype_and_shape_in_place():
    a = np.zeros((3, 5), np.float32)
    view = a
    SecureGaussian().add_noise(a, 0.5)
    assert view is a and a.dtype == np.float32 and a.shape == (3, 5) and a.std() > 0
    with pytest.raises(TypeError):
        SecureGaussian().add_noise(np.zeros(3, np.int64), 1.0)
    with pytest.raises(ValueError):
        SecureGaussian().add_noise(a, -1.0)


def test_secure_gaussian_pipeline_matches_a_scalar_reference(monkeypatch):
    """Known key: AES-256-CTR keystream -> 53-bit uniforms -> Box-Muller, by hand."""
    (g,) = fixed_key_generators(monkeypatch, 1)
    got = g.normal(6, 2.5, np.float64)
    stream = Cipher(algorithms.AES(bytes(32)), modes.CTR(bytes(16))).encryptor()
    words = np.frombuffer(stream.update(bytes(48)), dtype="<u8")
    pairs = 3
    expected = []
    for trig in (math.cos, math.sin):
        for i in range(pairs):
            u1 = ((int(words[i]) >> 11) + 1) / 2**53
            u2 = (int(words[pairs + i]) >> 11) / 2**53
            expected.append(2.5 * math.sqrt(-2 * math.log(u1)) * trig(2 * math.pi * u2))
    np.testing.assert_allclose(got, expected, rtol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_add_noise_adds_exactly_what_would_be_drawn(monkeypatch, dtype):
    drawer, adder = fixed_key_generators(monkeypatch)
    size = CHUNK + 7  # two chunks, an odd tail
    clean = np.linspace(-1, 1, size, dtype=dtype).reshape(1, -1)
    noised = clean.copy()
    adder.add_noise(noised, 0.3)
    drawn = drawer.normal(size, 0.3, dtype)
    assert noised.dtype == dtype and noised.shape == clean.shape and drawn.dtype == dtype
    np.testing.assert_array_equal(noised, clean + drawn.reshape(clean.shape))


def test_add_noise_works_on_fortran_ordered_arrays(monkeypatch):
    drawer, adder = fixed_key_generators(monkeypatch)
    noised = np.zeros((3, 4), np.float32, order="F")
    adder.add_noise(noised, 1.0)
    assert noised.flags.f_contiguous
    np.testing.assert_array_equal(noised, drawer.normal(12, 1.0).reshape((3, 4), order="F"))


def test_normal_keeps_the_requested_dtype_and_shape():
    g = SecureGaussian()
    assert g.normal(5, 1.0).dtype == np.float32
    assert g.normal((2, 3), 1.0, np.float64).shape == (2, 3)
    assert g.normal(0, 1.0).size == 0
    assert not g.normal(4, 0.0).any()


@pytest.mark.parametrize("std", [-1.0, math.nan, math.inf])
def test_bad_noise_std_is_refused(std):
    with pytest.raises(ValueError, match="std"):
        SecureGaussian().normal(3, std)
    with pytest.raises(ValueError, match="std"):
        SecureGaussian().add_noise(np.zeros(3, np.float32), std)


def test_add_noise_refuses_arrays_it_cannot_noise_in_place():
    g = SecureGaussian()
    with pytest.raises(TypeError):
        g.normal(3, 1.0, np.int32)
    read_only = np.zeros(3, np.float32)
    read_only.flags.writeable = False
    with pytest.raises(ValueError, match="writeable"):
        g.add_noise(read_only, 1.0)
    with pytest.raises(ValueError, match="contiguous"):
        g.add_noise(np.zeros((4, 4), np.float32)[:, 1], 1.0)
    unchanged = np.ones(3, np.float32)
    g.add_noise(unchanged, 0.0)
    assert (unchanged == 1).all()


def test_noise_over_many_trials_has_std_z_c_over_m():
    """The issue's check on the generator: 2000 trials of a 500-value clipped mean."""
    z, clip, m = 1.1, 1.0, 10
    rng = np.random.default_rng(3)
    deltas = [rng.normal(0, s, 500) for s in (0.01, 0.1, 1.0)]  # one under C, two clipped
    clean = sum(d * clip_factor(float(np.linalg.norm(d)), clip) for d in deltas) / m
    clean = clean.astype(np.float32)
    g = SecureGaussian()
    diffs = np.empty((2000, 500), np.float64)
    for i in range(2000):
        noised = clean.copy()
        g.add_noise(noised, z * clip / m)
        diffs[i] = noised.astype(np.float64) - clean
    assert abs(diffs.std() / (z * clip / m) - 1) < 0.02
    assert abs(diffs.mean()) < 0.005 * z * clip / m


def test_noise_std_is_z_c_over_m_within_two_percent():
    """The issue's check: empirical std of (noised - clean) over many trials."""
    z, clip, m = 1.1, 0.7, 40
    reference = {"w": np.zeros(500, np.float32)}
    clean = {"w": np.full(500, 0.01, np.float32)}
    noise = SecureGaussian()
    diffs = []
    for _ in range(400):
        agg = ClippedNoisedMean(reference, clip, m, z, noise)
        agg.add(clean, 1.0)
        diffs.append(agg.mean()["w"] - clean["w"] / m)
    empirical = float(np.std(np.concatenate(diffs)))
    assert abs(empirical / (z * clip / m) - 1) < 0.02


# --- clipping -------------------------------------------------------------------------


def test_clip_factor_and_zero_updates():
    assert clip_factor(0.0, 1.0) == 1.0
    assert clip_factor(0.5, 1.0) == 1.0
    assert clip_factor(4.0, 1.0) == 0.25
    with pytest.raises(ValueError):
        clip_factor(1.0, 0.0)


def test_clip_update_bounds_the_delta_and_keeps_dtypes():
    ref = {"w": np.ones(10, np.float32), "n": np.array(3, np.int64)}
    up = {"w": np.ones(10, np.float32) + 3.0, "n": np.array(5, np.int64)}
    out = clip_update(up, ref, 2.0)
    assert delta_norm(out, ref) == pytest.approx(2.0, rel=1e-6)
    assert out["w"].dtype == np.float32 and out["n"] == 5
    assert clip_update(ref, ref, 1.0)["w"] is ref["w"]  # zero update: unchanged, no crash


@pytest.mark.parametrize("norm, clip", [(math.nan, 1.0), (math.inf, 1.0), (-1.0, 1.0),
                                        (1.0, -1.0), (1.0, math.inf), (1.0, math.nan)])  # fmt: skip
def test_clip_factor_refuses_bad_numbers(norm, clip):
    with pytest.raises(ValueError):
        clip_factor(norm, clip)


def test_clip_update_handles_zero_and_float64_updates():
    ref = {"w": np.arange(6, dtype=np.float64)}
    assert clip_update(ref, ref, 0.5)["w"] is ref["w"]
    far = {"w": ref["w"] + 100.0}
    out = clip_update(far, ref, 0.5)
    assert out["w"].dtype == np.float64
    assert delta_norm(out, ref) == pytest.approx(0.5, rel=1e-12)


# --- adaptive clipping ----------------------------------------------------------------


@pytest.mark.parametrize("start", [0.1, 10.0])
def test_adaptive_clip_norm_converges_to_the_median(start: float):
    """Log-normal norms (median 1.0, log-std 0.5), m = 100, sigma_b = m / 20, eta = 0.2:
    in 2000 simulated runs the largest |C - 1| after 30 rounds was 0.19."""
    rng = np.random.default_rng(1)
    m = 100
    clip = AdaptiveClipping(start, target_quantile=0.5, learning_rate=0.2)
    assert clip.count_stddev_for(m) == 5.0
    noise = SecureGaussian()
    for _ in range(30):
        norms = np.exp(rng.normal(0.0, 0.5, m))  # median 1.0
        unclipped = int((norms <= clip.clip_norm).sum())
        clip.update(clip.noised_count(unclipped, m, m, noise), m)
    assert abs(clip.clip_norm - 1.0) < 0.25


def test_adaptive_clipping_moves_the_right_way():
    grows = AdaptiveClipping(1.0)
    assert grows.update(0.0, 10) > 1.0  # everything was clipped: C is too small
    shrinks = AdaptiveClipping(1.0)
    assert shrinks.update(10.0, 10) < 1.0  # nothing was clipped: C is too large


def test_adaptive_step_sizes_and_clamping():
    clip = AdaptiveClipping(2.0, target_quantile=0.3, learning_rate=0.5)
    assert clip.update(0.0, 10) == pytest.approx(2.0 * math.exp(0.5 * 0.3))
    before = clip.clip_norm
    assert clip.update(-40.0, 10) == pytest.approx(before * math.exp(0.5 * 0.3))  # b >= 0
    before = clip.clip_norm
    assert clip.update(25.0, 10) == pytest.approx(before * math.exp(-0.5 * 0.7))  # b <= 1
    with pytest.raises(ValueError):
        clip.update(math.nan, 10)
    with pytest.raises(ValueError):
        clip.update(1.0, 0)


def test_the_released_count_is_centred():
    """Adding or removing one site moves the released count by 1/2 before the noise (the
    sensitivity behind ``2 sigma_b``); with exactly m participants it is the plain count."""
    clip = AdaptiveClipping(1.0, count_stddev=1e-12)
    g = SecureGaussian()
    assert clip.noised_count(7, 10, 10.0, g) == pytest.approx(7.0)
    assert clip.noised_count(8, 11, 10.0, g) == pytest.approx(7.5)  # + a site under C
    assert clip.noised_count(7, 11, 10.0, g) == pytest.approx(6.5)  # + a clipped site
    spread = [AdaptiveClipping(1.0).noised_count(5, 10, 10.0, g) for _ in range(4000)]
    assert np.std(spread) == pytest.approx(10.0 / 20, rel=0.05)  # default sigma_b = m / 20
    with pytest.raises(ValueError):
        clip.noised_count(11, 10, 10.0, g)


def test_adaptive_state_round_trips_and_bad_settings_are_refused():
    clip = AdaptiveClipping(0.5)
    clip.update(0.0, 10)
    again = AdaptiveClipping(3.0)
    again.load_state(json.loads(json.dumps(clip.state())))
    assert again.clip_norm == clip.clip_norm
    for bad in ({}, {"clip_norm": -1.0}, {"clip_norm": "1"}, {"clip_norm": 1.0, "x": 1}):
        with pytest.raises(ValueError):
            again.load_state(bad)
    for kwargs in ({"target_quantile": 1.0}, {"learning_rate": 0.0}, {"count_stddev": -1.0}):
        with pytest.raises(ValueError):
            AdaptiveClipping(1.0, **kwargs)
    with pytest.raises(ValueError):
        AdaptiveClipping(0.0)


def test_noise_split():
    z_delta = noise_split(1.0, 5.0)
    assert z_delta == pytest.approx((1.0 - 0.01) ** -0.5)
    assert (z_delta**-2 + (2 * 5.0) ** -2) ** -0.5 == pytest.approx(1.0)
    with pytest.raises(ValueError, match="noise_multiplier < 2 x count_stddev"):
        noise_split(2.0, 1.0)  # z == 2 sigma_b: nothing left for the model
    with pytest.raises(ValueError, match="noise_multiplier < 2 x count_stddev"):
        noise_split(3.0, 1.0)
    with pytest.raises(ValueError):
        noise_split(0.0, 1.0)
    assert noise_split(1.0, 1e9) == pytest.approx(1.0)  # a free count costs nothing


# --- accountant -----------------------------------------------------------------------


def test_rdp_epsilon_equals_opacus_for_the_acceptance_parameters():
    from opacus.accountants import RDPAccountant

    ours = PrivacyAccountant("rdp")
    theirs = RDPAccountant()
    for _ in range(100):
        ours.step(1.1, 0.1)
        theirs.step(noise_multiplier=1.1, sample_rate=0.1)
    assert ours.steps == 100 and ours.history == [(1.1, 0.1, 100)]
    epsilon = ours.epsilon(1e-5)
    print(f"RDP epsilon for z=1.1, q=0.1, 100 steps, delta=1e-5: {epsilon:.4f}")
    assert epsilon == pytest.approx(theirs.get_epsilon(delta=1e-5), abs=1e-3)
    assert 5.0 < epsilon < 8.0
    bulk = PrivacyAccountant("rdp")
    bulk.step(1.1, 0.1, steps=100)
    assert bulk.epsilon(1e-5) == epsilon


def test_prv_epsilon_equals_opacus_for_the_acceptance_parameters():
    from opacus.accountants import PRVAccountant

    ours = PrivacyAccountant("prv")
    ours.step(1.1, 0.1, steps=100)
    theirs = PRVAccountant()
    for _ in range(100):
        theirs.step(noise_multiplier=1.1, sample_rate=0.1)
    epsilon = ours.epsilon(1e-5)
    print(f"PRV epsilon for z=1.1, q=0.1, 100 steps, delta=1e-5: {epsilon:.4f}")
    assert epsilon == pytest.approx(theirs.get_epsilon(delta=1e-5, eps_error=0.01), abs=1e-3)


def test_prv_accountant_is_tighter_than_rdp():
    history = [(1.1, 0.1, 100)]
    prv, rdp = epsilon_of("prv", history, 1e-5), epsilon_of("rdp", history, 1e-5)
    assert 0 < prv < rdp


def test_projection_does_not_spend_and_state_round_trips():
    acct = PrivacyAccountant()
    assert acct.epsilon(1e-5) == 0.0
    acct.step(1.0, 0.2, steps=3)
    projected = acct.projected_epsilon(1.0, 0.2, 1e-5)
    assert acct.steps == 3
    acct.step(1.0, 0.2)
    assert acct.epsilon(1e-5) == pytest.approx(projected)
    again = PrivacyAccountant.from_state(json.loads(json.dumps(acct.state())))
    assert again.state() == acct.state() and again.epsilon(1e-5) == acct.epsilon(1e-5)
    state = acct.state()
    acct.projected_epsilon(0.5, 0.5, 1e-5, steps=10)
    assert acct.state() == state


def test_a_changed_setting_starts_a_new_history_run():
    acct = PrivacyAccountant("prv")
    acct.step(1.0, 0.1)
    acct.step(1.0, 0.1)
    acct.step(1.2, 0.1)
    assert acct.history == [(1.0, 0.1, 2), (1.2, 0.1, 1)] and acct.steps == 3
    assert 0 < acct.epsilon(1e-5) < PrivacyAccountant("prv", [(1.0, 0.1, 3)]).epsilon(1e-5)


@pytest.mark.parametrize(
    "state",
    [
        {"kind": "gdp", "history": []},
        {"kind": "rdp"},
        {"kind": "rdp", "history": [[1.0, 2.0, 1]]},
        {"kind": "rdp", "history": [[1.0, 0.1]]},
        {"kind": "rdp", "history": [[0.0, 0.1, 1]]},
        {"kind": "rdp", "history": [[math.nan, 0.1, 1]]},
        {"kind": "rdp", "history": [["1.0", 0.1, 1]]},
        {"kind": "rdp", "history": [[1.0, 0.1, 0]]},
        {"kind": "rdp", "history": [[1.0, 0.1, 1.5]]},
        {"kind": "rdp", "history": [[1.0, 0.1, True]]},
        {"kind": "rdp", "history": {"z": 1.0}},
        {"kind": "rdp", "history": [], "extra": 1},
        [("kind", "rdp")],
    ],
)
def test_bad_states_are_refused(state):
    with pytest.raises(ValueError):
        PrivacyAccountant.from_state(state)


def test_noise_multiplier_for_a_target_epsilon():
    z = noise_multiplier_for(3.0, 1e-5, 0.1, 50)
    spent = epsilon_of("rdp", [(z, 0.1, 50)], 1e-5)
    assert spent <= 3.0 and spent > 2.9
    acct = PrivacyAccountant()
    acct.step(z, 0.1, steps=50)
    assert acct.epsilon(1e-5) == spent


def test_an_unreachable_target_epsilon_is_a_clear_error():
    with pytest.raises(ValueError, match="cannot be reached"):
        noise_multiplier_for(1e-6, 1e-5, 1.0, 1000)
    with pytest.raises(ValueError, match="target epsilon"):
        noise_multiplier_for(0.0, 1e-5, 0.1, 10)
    with pytest.raises(ValueError, match="delta"):
        noise_multiplier_for(1.0, 0.0, 0.1, 10)


def test_accountant_arguments_are_checked():
    acct = PrivacyAccountant()
    for args in ((0.0, 0.1), (1.0, 0.0), (1.0, 1.5), (math.inf, 0.1)):
        with pytest.raises(ValueError):
            acct.step(*args)
    with pytest.raises(ValueError):
        acct.step(1.0, 0.1, steps=0)
    with pytest.raises(ValueError):
        acct.epsilon(1.0)
    with pytest.raises(ValueError):
        PrivacyAccountant("gdp")  # type: ignore[arg-type]
    assert acct.history == [] and acct.epsilon(1e-5) == 0.0


def test_default_delta_is_below_one_over_the_population():
    assert default_delta(10) == 1e-5
    assert default_delta(10_000) == 1e-5
    assert default_delta(1_000_000) < 1e-6
    for n in (1, 7, 10**4, 10**5, 10**8):
        assert default_delta(n) < 1 / n
    with pytest.raises(ValueError):
        default_delta(0)


def test_importing_the_package_does_not_load_opacus():
    code = "import sys, strategies.privacy; print('opacus' in sys.modules, 'torch' in sys.modules)"
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "False"]


# --- the central-DP mean --------------------------------------------------------------


def test_clipped_mean_is_unweighted_over_a_fixed_denominator():
    ref = {"w": np.zeros(4, np.float32), "n": np.array(7, np.int64)}
    agg = ClippedNoisedMean(ref, clip_norm=1.0, denominator=4.0, noise_multiplier=0.0,
                            noise=SecureGaussian())  # fmt: skip
    agg.add({"w": np.array([3.0, 4.0, 0, 0], np.float32), "n": np.array(9, np.int64)}, 1000.0)
    agg.add({"w": np.array([0.1, 0, 0, 0], np.float32), "n": np.array(9, np.int64)}, 1.0)
    agg.add({"w": np.zeros(4, np.float32), "n": np.array(9, np.int64)}, 1.0)  # zero update
    mean = agg.mean()
    np.testing.assert_allclose(mean["w"], [(0.6 + 0.1) / 4, 0.8 / 4, 0, 0], rtol=1e-6)
    assert mean["n"] == 0 and mean["n"].dtype == np.int64  # no unnoised integer release
    assert (agg.count, agg.unclipped) == (3, 2)
    assert agg.mean() is mean  # noise is drawn once
    with pytest.raises(RuntimeError):
        agg.add({"w": np.zeros(4, np.float32), "n": np.array(9, np.int64)}, 1.0)


def test_an_empty_round_releases_pure_noise():
    ref = {"w": np.zeros(1000, np.float32)}
    agg = ClippedNoisedMean(ref, 2.0, 10.0, 1.0, SecureGaussian())
    out = agg.mean()["w"]
    assert out.dtype == np.float32 and math.isclose(float(out.std()), 0.2, rel_tol=0.1)


# --- a pooled data histogram released in the same round ----------------------------------

DP_POOLED = """
name: t
rounds: 20
task: {name: digits}
federation: {sites: 50, sampling: {fraction: 0.2, method: poisson}}
privacy: {dp: {noise_multiplier: 1.2, delta: 1.0e-5}}
drift: {data: {labels: 10, noise_multiplier: 2.0, feature_range: [0, 1], features: 4, bins: 5}}
"""


def pooled_session(text: str = DP_POOLED):
    from coordinator.experiment import parse_experiment
    from coordinator.privacy import PrivacySession

    exp = parse_experiment(text)
    session = PrivacySession.start(exp)
    assert session is not None
    return exp, session


def test_releases_on_one_sample_compose_into_one_gaussian_mechanism():
    z = composed_multiplier(1.2, 2.0)
    assert z == pytest.approx((1.2**-2 + 2.0**-2) ** -0.5) and z < 1.2
    assert remaining_multiplier(z, 2.0) == pytest.approx(1.2)
    assert composed_multiplier(0.7) == pytest.approx(0.7)
    assert composed_multiplier(1.0, 1e12) == pytest.approx(1.0)  # a silent release is free
    with pytest.raises(ValueError, match="alone spends"):
        remaining_multiplier(2.0, 2.0)
    with pytest.raises(ValueError):
        composed_multiplier()
    with pytest.raises(ValueError):
        composed_multiplier(1.0, 0.0)


def test_the_epsilon_is_opacus_rdp_at_the_composed_multiplier():
    """The spend recorded per round equals Opacus' RDP accountant called directly with
    the effective multiplier (z^-2 + sigma_h^-2)^-1/2 at the run's Poisson rate."""
    from opacus.accountants import RDPAccountant

    _, session = pooled_session()
    effective = (1.2**-2 + 2.0**-2) ** -0.5
    assert session.noise_multiplier == 1.2 and session.histogram_multiplier == 2.0
    assert session.accounted_multiplier == pytest.approx(effective, rel=1e-12)
    theirs = RDPAccountant()
    reference = {"w": np.zeros(3, np.float32)}
    for _ in range(5):
        projected = session.projected_epsilon()
        record = session.after_round(session.aggregator(reference, 50))
        theirs.step(noise_multiplier=effective, sample_rate=0.2)
        assert record["epsilon"] == pytest.approx(theirs.get_epsilon(delta=1e-5), rel=1e-9)
        assert projected == pytest.approx(record["epsilon"], rel=1e-12)
    assert record["accounted_noise_multiplier"] == pytest.approx(effective)
    assert record["histogram_noise_multiplier"] == 2.0 and record["noise_multiplier"] == 1.2
    assert record["model_noise_multiplier"] == 1.2  # the model's own noise is unchanged
    assert record["epsilon"] > epsilon_of("rdp", [(1.2, 0.2, 5)], 1e-5)  # not free


def test_target_epsilon_searches_the_round_and_leaves_the_model_the_rest():
    from coordinator.errors import ConfigError

    text = DP_POOLED.replace("noise_multiplier: 1.2", "target_epsilon: 3.0")
    _, session = pooled_session(text)
    effective = noise_multiplier_for(3.0, 1e-5, 0.2, 20)
    assert session.accounted_multiplier == pytest.approx(effective, rel=1e-9)
    assert composed_multiplier(session.noise_multiplier, 2.0) == pytest.approx(effective)
    assert epsilon_of("rdp", [(session.accounted_multiplier, 0.2, 20)], 1e-5) <= 3.0
    loud = text.replace("noise_multiplier: 2.0", "noise_multiplier: 0.5")
    with pytest.raises(ConfigError) as err:
        pooled_session(loud)
    assert err.value.key == "drift.data.noise_multiplier"


def test_the_histogram_noise_has_the_claimed_std(monkeypatch, tmp_path):
    """Fixed key (a reproducible seed source): the noise the pooled histogram gets has
    std sigma_h sqrt(F + 2) on every coordinate, mean 0, and is normal."""
    from coordinator.drift import DriftMonitor
    from coordinator.model_store import ModelStore
    from strategies.drift import profile_of

    (generator,) = fixed_key_generators(monkeypatch, 1)
    exp, session = pooled_session()
    session.noise = generator
    monitor = DriftMonitor(exp, ModelStore(tmp_path))
    spec = monitor.histogram
    assert spec is not None and spec.encoding == "proportions"
    assert spec.sensitivity == math.sqrt(4 + 2) and spec.cap == 50
    rng = np.random.default_rng(0)
    profiles = [
        profile_of(rng.uniform(0, 1, (n, 4)), rng.integers(0, 10, n), 5) for n in (30, 80, 200)
    ]
    clean = spec.decode(sum(spec.encode(p) for p in profiles), 3)
    claimed = 2.0 * math.sqrt(6)
    diffs = np.empty((1000, spec.size))
    for i in range(1000):
        noised = clean.copy()
        assert session.noise_histogram(noised, spec.sensitivity) == pytest.approx(claimed)
        diffs[i] = noised - clean
    assert abs(diffs.std() / claimed - 1) < 0.02
    assert abs(diffs.mean()) < 0.02 * claimed
    assert np.all(np.abs(diffs.std(axis=0) / claimed - 1) < 0.1)  # every coordinate
    assert stats.kstest(diffs.ravel()[:20_000] / claimed, "norm").pvalue > 1e-3
    pooled = monitor.pool(None, profiles, 3, session)  # the engine's path draws it too
    assert pooled is not None and not isinstance(pooled, str)
    assert pooled.noise_std == pytest.approx(claimed) and pooled.encoding == "proportions"
