"""Secure-aggregation numerics: label encoding, the AES-CTR mask PRG, vectorised Shamir
over GF(2^31 - 1), X25519/HKDF/AES-GCM, the Harary graph, the choice of k and t, and
fixed-point quantization into Z_2^b."""

from __future__ import annotations

import contextlib
import math
import os
import random

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from strategies.secagg import encoding, graph, keys, params, prg, shamir
from strategies.secagg.errors import (
    DuplicatePublicKey,
    InvalidPublicKey,
    QuantizationOverflow,
    ReconstructionError,
    ShamirError,
    ShareDecryptionError,
)

# (``strategies.secagg.quantize`` is the function re-exported by the package, so the
# module's names are imported one by one)
from strategies.secagg.quantize import (
    QuantizationConfig,
    check_no_overflow,
    dequantize_sum,
    error_bound,
    max_levels,
    quantize,
    weight_factor,
)

P = shamir.PRIME
CHUNK = prg.CHUNK_WORDS


def seed_of(i: int) -> bytes:
    """A fixed 32-byte test seed."""
    return i.to_bytes(32, "big")


def flip_bit(data: bytes, bit: int) -> bytes:
    out = bytearray(data)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


seeds = st.binary(min_size=32, max_size=32)


# -- encoding ----------------------------------------------------------------------

field = st.one_of(st.text(max_size=6), st.binary(max_size=6), st.integers(0, (1 << 64) - 1))


def typed(fields: tuple) -> tuple:
    return tuple((type(f), f) for f in fields)


@settings(max_examples=150, deadline=None)
@given(st.lists(field, max_size=4), st.lists(field, max_size=4))
def test_pack_fields_is_injective(a, b):
    same = typed(tuple(a)) == typed(tuple(b))
    assert (encoding.pack_fields(*a) == encoding.pack_fields(*b)) == same
    assert encoding.pack_fields(*a).startswith(encoding.DOMAIN)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (("ab", "c"), ("a", "bc")),
        (("a",), (b"a",)),
        ((1,), ("1",)),
        ((b"",), ("",)),
        (("",), ()),
        ((0,), (b"\x00" * 8,)),
    ],
)
def test_pack_fields_known_ambiguities_are_avoided(a, b):
    assert encoding.pack_fields(*a) != encoding.pack_fields(*b)


@pytest.mark.parametrize("bad", [-1, 1 << 64])
def test_pack_fields_refuses_out_of_range_integers(bad):
    with pytest.raises(ValueError, match="out of range"):
        encoding.pack_fields("x", bad)


@pytest.mark.parametrize("bad", [True, np.int64(1), 1.0, None, bytearray(b"x")])
def test_pack_fields_refuses_other_types(bad):
    with pytest.raises(TypeError):
        encoding.pack_fields(bad)


# -- PRG ---------------------------------------------------------------------------

CTX = prg.stream_context("run-a", 3, "self")


def test_expand_is_deterministic_and_matches_plain_aes_ctr():
    seed = seed_of(7)
    a = prg.expand(seed, 1000, CTX)
    assert a.dtype == np.uint32 and a.shape == (1000,)
    assert np.array_equal(a, prg.expand(seed, 1000, CTX))
    # independent reference: AES-256-CTR (counter block 0) of zeros under the HKDF key
    key = prg.stream_key(seed, CTX)
    enc = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
    ref = np.frombuffer(enc.update(bytes(4000)) + enc.finalize(), dtype="<u4")
    assert np.array_equal(a, ref)
    assert key != seed


def test_stream_key_uses_every_seed_bit_and_the_context():
    base = prg.stream_key(seed_of(1), CTX)
    assert len(base) == 32
    assert len({prg.stream_key(flip_bit(seed_of(1), b), CTX) for b in range(256)} | {base}) == 257
    assert prg.stream_key(seed_of(1), prg.stream_context("run-a", 3, "pair")) != base


@settings(max_examples=60, deadline=None)
@given(seeds, st.integers(0, 255))
def test_one_bit_change_of_the_seed_changes_the_mask(seed, bit):
    a = prg.expand(seed, 64, CTX)
    b = prg.expand(flip_bit(seed, bit), 64, CTX)
    assert np.mean(a != b) > 0.9


@pytest.mark.parametrize(
    "other",
    [
        prg.stream_context("run-a", 4, "self"),  # another round
        prg.stream_context("run-b", 3, "self"),  # another run
        prg.stream_context("run-a", 3, "pair"),  # another purpose
        prg.stream_context("run-a3", 0, "self"),
    ],
)
def test_same_seed_in_another_context_gives_another_mask(other):
    assert other != CTX
    a = prg.expand(seed_of(9), 256, CTX)
    b = prg.expand(seed_of(9), 256, other)
    assert np.mean(a != b) > 0.9


@settings(max_examples=40, deadline=None)
@given(seeds, st.lists(st.integers(0, 40), min_size=1, max_size=8), st.booleans())
def test_chunked_keystream_reads_agree_with_one_shot(seed, sizes, wide):
    dtype = np.uint64 if wide else np.uint32
    total = sum(sizes)
    one_shot = prg.expand(seed, total, CTX, dtype=dtype)
    stream = prg.KeyStream(seed, CTX)
    parts = []
    for size in sizes:
        buf = np.empty(size, dtype=dtype)
        stream.fill(buf)
        parts.append(buf)
    assert np.array_equal(np.concatenate(parts), one_shot)


def test_keystream_across_the_chunk_boundary_and_word_sizes_agree():
    seed = seed_of(3)
    long = prg.expand(seed, 2 * CHUNK + 3, CTX)
    assert np.array_equal(long[:CHUNK], prg.expand(seed, CHUNK, CTX))
    assert np.array_equal(long[: CHUNK + 1], prg.expand(seed, CHUNK + 1, CTX))
    wide = prg.expand(seed, CHUNK + 1, CTX, dtype=np.uint64)
    assert np.array_equal(wide.view("<u4"), long[: 2 * CHUNK + 2])
    # mixed reads: an odd number of uint32 words, then more across the boundary
    stream = prg.KeyStream(seed, CTX)
    first, second = np.empty(CHUNK - 1, np.uint32), np.empty(CHUNK + 4, np.uint32)
    stream.fill(first)
    stream.fill(second)
    assert np.array_equal(np.concatenate([first, second]), long)


@pytest.mark.parametrize("length", [0, 1, 3, 4, CHUNK - 3, CHUNK, CHUNK + 2, 2 * CHUNK + 1])
def test_keystream_without_exact_output_buffers_agrees(monkeypatch, length):
    """The path for a ``cryptography`` that wants ``block - 1`` bytes of slack."""
    expected = prg.expand(seed_of(5), length, CTX)
    monkeypatch.setattr(prg, "_EXACT_OUTPUT", False)
    assert np.array_equal(prg.expand(seed_of(5), length, CTX), expected)
    stream = prg.KeyStream(seed_of(5), CTX)
    head, tail = np.empty(length // 2, np.uint32), np.empty(length - length // 2, np.uint32)
    stream.fill(head)
    stream.fill(tail)
    assert np.array_equal(np.concatenate([head, tail]), expected)


def test_keystream_words_are_little_endian_on_every_host(monkeypatch):
    """Sites and coordinator must agree on the words whatever their byte order, so a
    big-endian host byte-swaps its native reading of the keystream. Simulated here: on
    this little-endian host the swap shows as the big-endian reading of the bytes."""
    seed = seed_of(6)
    key = prg.stream_key(seed, CTX)
    enc = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
    raw = enc.update(bytes(64))
    little = np.frombuffer(raw, dtype="<u4")
    assert np.array_equal(prg.expand(seed, 16, CTX), little)
    monkeypatch.setattr(prg.sys, "byteorder", "big")
    swapped = prg.expand(seed, 16, CTX)
    assert np.array_equal(swapped, np.frombuffer(raw, dtype=">u4"))


def test_keystream_looks_uniform():
    words = prg.expand(seed_of(11), 1 << 16, CTX)
    # mean of 2^16 uniform 32-bit words: sd = 2^32 / sqrt(12 * 2^16) ~ 4.8e6
    assert abs(float(words.mean()) - 2.0**31) < 6 * 2.0**32 / math.sqrt(12 * 2**16)
    bits = np.unpackbits(words.view(np.uint8))
    assert abs(float(bits.mean()) - 0.5) < 6 * 0.5 / math.sqrt(bits.size)


def test_expand_edge_lengths_and_errors():
    assert prg.expand(seed_of(1), 0, CTX).shape == (0,)
    assert prg.expand(seed_of(1), 1, CTX)[0] == prg.expand(seed_of(1), 5, CTX)[0]
    with pytest.raises(ValueError, match="length"):
        prg.expand(seed_of(1), -1, CTX)
    for bad in (b"", bytes(31), bytes(33), "x" * 32):
        with pytest.raises(ValueError, match="seed"):
            prg.expand(bad, 4, CTX)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        prg.expand(seed_of(1), 4, CTX, dtype=np.int32)


def test_expand_reuses_the_out_buffer():
    out = np.full(300, 7, dtype=np.uint32)
    got = prg.expand(seed_of(1), 300, CTX, out=out)
    assert got is out
    assert np.array_equal(out, prg.expand(seed_of(1), 300, CTX))
    prg.expand(seed_of(2), 300, CTX, out=out)  # reused: overwritten, not accumulated
    assert np.array_equal(out, prg.expand(seed_of(2), 300, CTX))
    wide = np.empty(5, dtype=np.uint64)
    assert prg.expand(seed_of(1), 5, CTX, dtype=np.uint64, out=wide) is wide
    for bad in (np.empty(299, np.uint32), np.empty(300, np.uint64), np.empty((300, 1), np.uint32)):
        with pytest.raises(ValueError, match="out must"):
            prg.expand(seed_of(1), 300, CTX, out=bad)


def test_fill_refuses_unusable_buffers():
    stream = prg.KeyStream(seed_of(1), CTX)
    read_only = np.zeros(4, np.uint32)
    read_only.flags.writeable = False
    for bad in (
        np.zeros(4, np.int32),
        np.zeros(4, np.float64),
        np.zeros((2, 2), np.uint32),
        np.zeros(8, np.uint32)[::2],
        read_only,
        np.zeros(4, ">u4"),
    ):
        with pytest.raises(ValueError):
            stream.fill(bad)


@settings(max_examples=30, deadline=None)
@given(
    st.sampled_from([0, 1, 2, 17, 1000, CHUNK - 1, CHUNK + 1]),
    st.lists(st.tuples(seeds, st.sampled_from([1, -1])), max_size=5),
    st.integers(1, 2 * CHUNK),
    st.integers(0, 2**32 - 1),
)
def test_add_masks_is_the_signed_sum_of_expansions(length, masks, chunk_words, fill):
    acc = np.full(length, fill, dtype=np.uint32)
    expected = acc.astype(np.int64)
    for seed, sign in masks:
        expected += sign * prg.expand(seed, length, CTX).astype(np.int64)
    prg.add_masks(acc, masks, CTX, chunk_words=chunk_words)
    assert np.array_equal(acc, (expected % (1 << 32)).astype(np.uint32))


@settings(max_examples=20, deadline=None)
@given(st.lists(seeds, min_size=1, max_size=4), st.sampled_from([0, 1, 33, CHUNK + 5]))
def test_add_then_subtract_restores_the_accumulator(mask_seeds, length):
    rng = np.random.default_rng(length)
    acc = rng.integers(0, 1 << 32, size=length, dtype=np.uint64).astype(np.uint32)
    before = acc.copy()
    prg.add_masks(acc, [(s, 1) for s in mask_seeds], CTX)
    if length >= 8:
        assert not np.array_equal(acc, before)
    prg.add_masks(acc, [(s, -1) for s in reversed(mask_seeds)], CTX, chunk_words=7)
    assert np.array_equal(acc, before)


def test_add_masks_chunk_size_does_not_matter():
    masks = [(seed_of(1), 1), (seed_of(2), -1), (seed_of(3), 1)]
    results = []
    for chunk_words in (1, 3, 1000, CHUNK, 10 * CHUNK):
        acc = np.arange(CHUNK + 10, dtype=np.uint32)
        prg.add_masks(acc, masks, CTX, chunk_words=chunk_words)
        results.append(acc)
    for r in results[1:]:
        assert np.array_equal(r, results[0])


def test_add_masks_refuses_bad_arguments():
    good = np.zeros(4, np.uint32)
    read_only = np.zeros(4, np.uint32)
    read_only.flags.writeable = False
    for acc in (np.zeros(4, np.uint64), np.zeros((2, 2), np.uint32), np.zeros(8, np.uint32)[::2]):
        with pytest.raises(ValueError):
            prg.add_masks(acc, [(seed_of(1), 1)], CTX)
    with pytest.raises(ValueError):
        prg.add_masks(read_only, [(seed_of(1), 1)], CTX)
    for sign in (0, 2, -2):
        with pytest.raises(ValueError, match="sign"):
            prg.add_masks(good, [(seed_of(1), sign)], CTX)
    with pytest.raises(ValueError, match="chunk_words"):
        prg.add_masks(good, [(seed_of(1), 1)], CTX, chunk_words=0)
    with pytest.raises(ValueError, match="seed"):
        prg.add_masks(good, [(bytes(16), 1)], CTX)
    prg.add_masks(good, [], CTX)
    assert not good.any()


# -- Shamir ------------------------------------------------------------------------


def reference_lagrange(xs: list[int]) -> list[int]:
    out = []
    for i, xi in enumerate(xs):
        num = den = 1
        for j, xj in enumerate(xs):
            if j != i:
                num = num * xj % P
                den = den * (xj - xi) % P
        out.append(num * pow(den, P - 2, P) % P)
    return out


def random_field_bytes(size: int) -> bytes:
    """``size // 4`` uniform-ish field elements, as share values."""
    words = np.frombuffer(os.urandom(size), "<u4").astype(np.int64) % P
    return words.astype("<u4").tobytes()


secrets = st.integers(1, 32).flatmap(lambda m: st.binary(min_size=2 * m, max_size=2 * m))


@settings(max_examples=80, deadline=None)
@given(
    secrets,
    st.integers(1, 20).flatmap(lambda n: st.tuples(st.just(n), st.integers(1, n))),
    st.randoms(),
)
def test_any_t_of_n_shares_rebuild_the_secret(secret, n_t, rnd):
    n, t = n_t
    xs = rnd.sample(range(1, 40), n)
    shares = shamir.split(secret, t, xs)
    assert [s.x for s in shares] == xs
    assert all(len(s.y) == 2 * len(secret) for s in shares)
    subset = rnd.sample(shares, rnd.randint(t, n))
    assert shamir.reconstruct(subset, t) == secret


@settings(max_examples=40, deadline=None)
@given(
    st.binary(min_size=32, max_size=32),
    st.integers(2, 12).flatmap(lambda n: st.tuples(st.just(n), st.integers(2, n))),
    st.randoms(),
)
def test_t_minus_one_shares_do_not_rebuild_the_secret(secret, n_t, rnd):
    n, t = n_t
    shares = shamir.split(secret, t, range(1, n + 1))
    fewer = rnd.sample(shares, t - 1)
    with pytest.raises(ShamirError, match="fewer than the threshold"):
        shamir.reconstruct(fewer, t)
    # interpolating the t-1 shares as if the threshold were t-1 gives noise, not the secret
    with contextlib.suppress(ReconstructionError):
        assert shamir.reconstruct(fewer, t - 1) != secret


@pytest.mark.parametrize("t", [2, 3])
def test_shares_below_the_threshold_are_uniform_whatever_the_secret(t):
    # one share (t >= 2) of the all-zero and of the all-ones secret: both uniform in GF(p)
    for secret in (bytes(32), b"\xff" * 32):
        ys = np.concatenate(
            [np.frombuffer(shamir.split(secret, t, [1, 2, 3])[0].y, "<u4") for _ in range(400)]
        ).astype(np.float64)
        assert ys.size == 6400 and ys.max() < P
        assert abs(ys.mean() / P - 0.5) < 6 * math.sqrt(1 / 12 / ys.size)
        assert abs(np.mean(ys < P / 4) - 0.25) < 6 * math.sqrt(0.25 * 0.75 / ys.size)
        assert np.mean(ys < 1 << 16) < 0.01  # the secret's 16-bit chunks do not show


def test_threshold_one_share_is_the_secret_itself():
    secret = bytes(range(32))
    shares = shamir.split(secret, 1, [5, 9])
    assert shares[0].y == shares[1].y
    assert shamir.reconstruct(shares[1:], 1) == secret


@pytest.mark.parametrize("xs", [[1, 2, 2], [0, 1, 2], [1, -3, 2], [1, P, 2], [1, P + 1]])
def test_split_refuses_zero_duplicate_and_out_of_field_x(xs):
    with pytest.raises(ShamirError):
        shamir.split(bytes(32), 2, xs)


@pytest.mark.parametrize(
    ("secret", "t"),
    [(b"", 1), (b"abc", 1), ("ab" * 16, 1), (bytes(32), 0), (bytes(32), 4), (bytes(32), -1)],
)
def test_split_refuses_bad_secrets_and_thresholds(secret, t):
    with pytest.raises(ShamirError):
        shamir.split(secret, t, [1, 2, 3])  # type: ignore[arg-type]


def test_reconstruct_refuses_malformed_share_sets():
    shares = shamir.split(bytes(range(32)), 3, [1, 2, 3, 4])
    a, b, c, d = shares
    with pytest.raises(ShamirError, match="duplicate"):
        shamir.reconstruct([a, b, a], 3)
    with pytest.raises(ShamirError, match="duplicate"):
        shamir.reconstruct([a, b, c, shamir.Share(b.x, d.y)], 3)  # a repeat beyond t too
    with pytest.raises(ShamirError, match="never zero"):
        shamir.reconstruct([shamir.Share(0, a.y), b, c], 3)
    with pytest.raises(ShamirError, match="never zero"):
        shamir.reconstruct([shamir.Share(P, a.y), b, c], 3)
    with pytest.raises(ShamirError, match="fewer than the threshold"):
        shamir.reconstruct([a, b], 3)
    with pytest.raises(ShamirError):
        shamir.reconstruct([a, b, c], 0)
    with pytest.raises(ShamirError, match="lengths"):
        shamir.reconstruct([a, b, shamir.Share(c.x, c.y[:-4])], 3)
    with pytest.raises(ShamirError, match="lengths"):
        shamir.reconstruct([a, b, shamir.Share(c.x, c.y + b"\x00")], 3)
    with pytest.raises(ShamirError, match="lengths"):
        shamir.reconstruct([shamir.Share(1, b"")], 1)
    too_big = (P).to_bytes(4, "little") + c.y[4:]
    with pytest.raises(ShamirError, match="below p"):
        shamir.reconstruct([a, b, shamir.Share(c.x, too_big)], 3)
    # sets of different widths in one batch
    short = shamir.split(bytes(4), 2, [1, 2])
    with pytest.raises(ShamirError, match="lengths"):
        shamir.reconstruct_many([shares[:3], short], 2)


@settings(max_examples=50, deadline=None)
@given(
    st.binary(min_size=32, max_size=32),
    st.integers(2, 10).flatmap(lambda n: st.tuples(st.just(n), st.integers(1, n))),
    st.integers(0, 9),
)
def test_a_corrupted_share_is_detected(secret, n_t, which):
    n, t = n_t
    shares = shamir.split(secret, t, range(1, n + 1))
    i = which % t
    # replace the share's values by random field elements (a random, not a crafted error:
    # undetected with probability 2^-240; see the next test for a crafted one)
    vals = random_field_bytes(64)
    if vals == shares[i].y:
        return
    bad = list(shares[:t])
    bad[i] = shamir.Share(shares[i].x, vals)
    with pytest.raises(ReconstructionError):
        shamir.reconstruct(bad, t)
    # a share moved to another holder's x is wrong as well
    if t >= 2:
        moved = list(shares[:t])
        moved[i] = shamir.Share(n + 1 + which, shares[i].y)
        with pytest.raises(ReconstructionError):
            shamir.reconstruct(moved, t)


def test_a_crafted_error_can_pass_shamir_so_callers_must_verify():
    """Detection is probabilistic for random errors only: a holder who knows the
    Lagrange weight can shift a chunk by a small amount undetected. The server checks
    every rebuilt seed against its commitment and every key against its public key."""
    secret = bytes(32)
    shares = shamir.split(secret, 3, [1, 2, 3])
    lam = reference_lagrange([1, 2, 3])
    y = np.frombuffer(shares[0].y, "<u4").astype(np.int64)
    y[0] = (y[0] + pow(lam[0], P - 2, P)) % P  # shifts chunk 0 by exactly +1
    forged = [shamir.Share(1, y.astype("<u4").tobytes()), *shares[1:]]
    assert shamir.reconstruct(forged, 3) == b"\x00\x01" + bytes(30)


@settings(max_examples=60, deadline=None)
@given(
    st.tuples(st.integers(1, 12), st.sampled_from([(1 << 15) - 1, P - 1])).flatmap(
        lambda t_top: st.lists(
            st.lists(st.integers(1, t_top[1]), min_size=t_top[0], max_size=t_top[0], unique=True),
            min_size=1,
            max_size=4,
        )
    )
)
def test_lagrange_weights_match_a_reference(rows):
    lam = shamir.lagrange_at_zero(np.array(rows, dtype=np.int64))
    assert lam.tolist() == [reference_lagrange(r) for r in rows]


def test_lagrange_needs_a_matrix():
    with pytest.raises(ShamirError):
        shamir.lagrange_at_zero(np.array([1, 2, 3]))


@pytest.mark.parametrize("large_x", [False, True])
def test_reconstruct_many_100_secrets_from_100_shares_each(large_x):
    rnd = random.Random(100 + large_x)
    secrets_ = [os.urandom(32) for _ in range(100)]
    sets = []
    for secret in secrets_:
        xs = rnd.sample(range(1 << 15, P), 100) if large_x else list(range(1, 101))
        shares = shamir.split(secret, 100, xs)
        rnd.shuffle(shares)
        sets.append(shares)
    assert shamir.reconstruct_many(sets, 100) == secrets_


def test_reconstruct_many_matches_reconstruct_across_blocks():
    # t = 60 gives blocks of 2^21 // 3600 = 582 rows; 600 secrets span two blocks
    rnd = random.Random(5)
    sets = []
    for _ in range(600):
        xs = rnd.sample(range(1, 200), 70)
        sets.append(shamir.split(os.urandom(16), 60, xs))
    many = shamir.reconstruct_many(sets, 60)
    assert len(many) == 600
    for i in range(0, 600, 50):
        assert many[i] == shamir.reconstruct(sets[i], 60)
    assert shamir.reconstruct_many([], 3) == []


def test_reconstruct_many_names_the_inconsistent_secret():
    good = [shamir.split(bytes([i]) * 32, 2, [1, 2, 3]) for i in range(3)]
    bad = list(good[1])
    bad[0] = shamir.Share(bad[0].x, random_field_bytes(64))
    with pytest.raises(ReconstructionError, match=r"\[1\]"):
        shamir.reconstruct_many([good[0], bad, good[2]], 2)


# -- keys --------------------------------------------------------------------------

_P25519 = 2**255 - 19
_ORDER8_A = 325606250916557431795983626356110631294008115727848805560023387167927233504
_ORDER8_B = 39382357235489614581723060781553021112529911719440698176882885853963445705823
LOW_ORDER = [
    u + (high << 255)
    for u in (0, 1, _ORDER8_A, _ORDER8_B, _P25519 - 1, _P25519, _P25519 + 1)
    for high in (0, 1)  # the top bit is ignored by X25519 (RFC 7748)
]


def test_known_low_order_points_are_really_low_order():
    # sanity of the list: hex of the order-8 points as published (e.g. libsodium)
    assert _ORDER8_A.to_bytes(32, "little").hex().startswith("e0eb7a7c3b41b8ae")
    assert _ORDER8_B.to_bytes(32, "little").hex().startswith("5f9c95bca3508c24")


@pytest.mark.parametrize("u", LOW_ORDER, ids=lambda u: hex(u)[:10])
def test_low_order_public_keys_are_rejected(u):
    bad = u.to_bytes(32, "little")
    with pytest.raises(InvalidPublicKey, match="low-order"):
        keys.check_public_key(bad, "site-x")
    me = keys.generate_keypair()
    with pytest.raises(InvalidPublicKey, match="low-order"):
        keys.shared_secret(me.private, bad)
    with pytest.raises(InvalidPublicKey):
        keys.agree(
            me.private_key, bad, purpose="p", run_id="r", round_number=1, first="a", second="b"
        )


@pytest.mark.parametrize("bad", [b"", bytes(31), bytes(33), "k" * 32, bytearray(32)])
def test_malformed_public_keys_are_rejected(bad):
    with pytest.raises(InvalidPublicKey, match="32 bytes"):
        keys.check_public_key(bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidPublicKey, match="32 bytes"):
        keys.shared_secret(keys.generate_keypair().private, bad)  # type: ignore[arg-type]


def test_generated_keys_are_valid_and_fresh():
    pairs = [keys.generate_keypair() for _ in range(8)]
    for kp in pairs:
        keys.check_public_key(kp.public)
        assert keys.public_from_private(kp.private) == kp.public
        assert kp.private.hex() not in repr(kp)
        assert kp.private_key is kp.private_key  # built once
    keys.check_distinct([(str(i), kp.public) for i, kp in enumerate(pairs)])
    with pytest.raises(ValueError):
        keys.public_from_private(bytes(31))


def test_duplicate_public_keys_are_rejected():
    a, b = keys.generate_keypair(), keys.generate_keypair()
    with pytest.raises(DuplicatePublicKey, match="site-a and site-c"):
        keys.check_distinct([("site-a", a.public), ("site-b", b.public), ("site-c", a.public)])
    with pytest.raises(DuplicatePublicKey):
        keys.check_distinct([("site-a", a.public), ("site-a", a.public)])
    keys.check_distinct([])


def test_agreement_is_symmetric_and_bound_to_its_labels():
    a, b = keys.generate_keypair(), keys.generate_keypair()
    label = {"purpose": "p", "run_id": "r", "round_number": 1, "first": "a", "second": "b"}
    k_ab = keys.agree(a.private, b.public, **label)
    assert k_ab == keys.agree(b.private_key, a.public, **label)
    assert len(k_ab) == 32
    assert keys.shared_secret(a.private, b.public) == keys.shared_secret(b.private, a.public)
    variants = [
        {"purpose": "q"},
        {"run_id": "r2"},
        {"round_number": 2},
        {"first": "b", "second": "a"},
        {"first": "ab", "second": ""},
    ]
    derived = {keys.agree(a.private, b.public, **{**label, **v}) for v in variants}
    assert len(derived | {k_ab}) == len(variants) + 1
    c = keys.generate_keypair()
    assert keys.agree(a.private, c.public, **label) != k_ab


def test_share_encryption_round_trip_and_authentication():
    key = os.urandom(32)
    ad = keys.share_associated_data("run", 2, "site-a", "site-b")
    blob = keys.encrypt(key, b"secret shares", ad)
    assert len(blob) == keys.NONCE_BYTES + len(b"secret shares") + keys.TAG_BYTES
    assert keys.decrypt(key, blob, ad) == b"secret shares"
    assert keys.encrypt(key, b"secret shares", ad) != blob  # fresh nonce each time
    for i in range(len(blob)):  # nonce, ciphertext and tag are all authenticated
        tampered = bytearray(blob)
        tampered[i] ^= 0x01
        with pytest.raises(ShareDecryptionError):
            keys.decrypt(key, bytes(tampered), ad)
    for other in (
        keys.share_associated_data("run", 2, "site-b", "site-a"),
        keys.share_associated_data("run", 3, "site-a", "site-b"),
        keys.share_associated_data("run2", 2, "site-a", "site-b"),
        keys.share_associated_data("run", 2, "site-a", "site-c"),
        b"",
    ):
        assert other != ad
        with pytest.raises(ShareDecryptionError):
            keys.decrypt(key, blob, other)
    with pytest.raises(ShareDecryptionError):
        keys.decrypt(os.urandom(32), blob, ad)
    with pytest.raises(ShareDecryptionError, match="too short"):
        keys.decrypt(key, blob[: keys.NONCE_BYTES + keys.TAG_BYTES - 1], ad)
    with pytest.raises(ShareDecryptionError):
        keys.decrypt(key, blob[:-1], ad)


# -- graph -------------------------------------------------------------------------


def site_names(n: int) -> list[str]:
    return [f"site-{i:03d}" for i in range(n)]


def is_connected(g: graph.CommunicationGraph) -> bool:
    seen, todo = {g.sites[0]}, [g.sites[0]]
    while todo:
        for v in g.of(todo.pop()):
            if v not in seen:
                seen.add(v)
                todo.append(v)
    return len(seen) == len(g.sites)


@settings(max_examples=80, deadline=None)
@given(st.integers(2, 30).flatmap(lambda n: st.tuples(st.just(n), st.integers(1, n + 2))), seeds)
def test_graph_is_regular_symmetric_and_deterministic(n_k, seed):
    n, k = n_k
    names = site_names(n)
    random.Random(seed).shuffle(names)
    if k < n - 1 and k % 2:
        with pytest.raises(ValueError, match="even"):
            graph.build_graph(names, k, seed)
        return
    g = graph.build_graph(names, k, seed)
    assert g.sites == tuple(sorted(names))
    assert g.complete == (k >= n - 1)
    assert g.k == min(k, n - 1)
    assert [g.index(s) for s in g.sites] == list(range(1, n + 1))
    for s in g.sites:
        assert len(g.of(s)) == g.k and s not in g.of(s)
        assert g.of(s) <= set(g.sites)
        assert all(s in g.of(v) for v in g.of(s))
    assert is_connected(g)
    again = graph.build_graph(reversed(names), k, seed)
    assert dict(again.neighbours) == dict(g.neighbours)
    order = graph.ring_order(names, seed)
    assert sorted(order) == sorted(names)
    if not g.complete:  # neighbours are the k/2 ring positions on each side
        pos = {s: i for i, s in enumerate(order)}
        for s in g.sites:
            gaps = {min((pos[v] - pos[s]) % n, (pos[s] - pos[v]) % n) for v in g.of(s)}
            assert gaps == set(range(1, k // 2 + 1))


def test_graph_seed_changes_the_ring():
    names = site_names(20)
    orders = {graph.ring_order(names, seed_of(i)) for i in range(20)}
    assert len(orders) == 20


def test_neighbour_sets_are_uniform_over_seeds():
    n, k, rounds = 10, 4, 1500
    names = site_names(n)
    counts = dict.fromkeys(names[1:], 0)
    for i in range(rounds):
        for v in graph.build_graph(names, k, seed_of(i)).of(names[0]):
            counts[v] += 1
    p = k / (n - 1)
    sd = math.sqrt(rounds * p * (1 - p))
    for c in counts.values():
        assert abs(c - rounds * p) < 6 * sd


def test_graph_refuses_bad_inputs():
    with pytest.raises(ValueError, match="distinct"):
        graph.build_graph(["a", "b", "a"], 2, seed_of(1))
    with pytest.raises(ValueError, match="non-empty"):
        graph.build_graph(["a", "", "c"], 2, seed_of(1))
    with pytest.raises(ValueError, match="at least 2"):
        graph.build_graph(["a"], 1, seed_of(1))
    with pytest.raises(ValueError, match=">= 1"):
        graph.build_graph(["a", "b", "c"], 0, seed_of(1))
    with pytest.raises(ValueError, match="even"):
        graph.build_graph(site_names(8), 3, seed_of(1))
    with pytest.raises(ValueError, match="seed"):
        graph.build_graph(site_names(8), 4, bytes(8))
    g = graph.build_graph(site_names(4), 3, seed_of(1))
    with pytest.raises(KeyError):
        g.of("outsider")
    with pytest.raises(KeyError):
        g.index("outsider")


# -- params ------------------------------------------------------------------------


def secure_t(n: int, k: int, corrupt: int, bad_rate: float, eps: float) -> int | None:
    """Smallest t in (k/2, k] meeting both security conditions, by brute force."""
    disconnect = params.disconnection_bound(n, k, bad_rate)
    for t in range(max(k // 2 + 1, 2), k + 1):
        leak = n * params.hypergeometric_at_least(n - 1, corrupt, k, 2 * t - k)
        if disconnect + leak <= eps:
            return t
    return None


@pytest.mark.parametrize("n", [3, 4, 5, 8, 10, 12, 14])
def test_small_rounds_use_the_complete_graph(n):
    p = params.choose_parameters(n, 0.05, 0.05)
    assert p.complete and p.k == n - 1 and p.sites == n
    assert p.corrupt_sites == math.floor(0.05 * n)
    assert p.t == max((p.k + p.corrupt_sites) // 2 + 1, 2) and 2 <= p.t <= p.k
    assert p.security_failure == 0.0
    assert p.abort_probability == pytest.approx(min(1.0, n * params.binomial_below(p.k, 0.95, p.t)))


@pytest.mark.parametrize(
    ("n", "dropout", "corrupt"), [(1000, 0.05, 0.05), (200, 0.1, 0.1), (5000, 0.02, 0.0)]
)
def test_large_rounds_use_a_sparse_even_degree(n, dropout, corrupt):
    p = params.choose_parameters(n, dropout, corrupt)
    assert not p.complete and p.k % 2 == 0
    assert p.k <= (n - 1) / 2
    assert p.k // 2 < p.t <= p.k
    assert p.security_failure <= params.DEFAULT_SECURITY_TARGET
    assert p.abort_probability <= params.DEFAULT_CORRECTNESS_TARGET
    c = p.corrupt_sites
    bad_rate = c / n + (1 - c / n) * dropout
    expected = params.disconnection_bound(n, p.k, bad_rate) + n * params.hypergeometric_at_least(
        n - 1, c, p.k, 2 * p.t - p.k
    )
    assert p.security_failure == pytest.approx(expected, rel=1e-9)
    assert p.abort_probability == pytest.approx(
        n * params.binomial_below(p.k, 1 - dropout, p.t), rel=1e-9
    )


def test_1000_sites_give_a_small_degree():
    p = params.choose_parameters(1000, 0.05, 0.05)
    assert p.k <= 100 and p.corrupt_sites == 50


@settings(max_examples=40, deadline=None)
@given(
    st.integers(3, 400),
    st.floats(0.0, 0.3),
    st.floats(0.0, 0.3),
    st.sampled_from([2.0**-40, 2.0**-20, 1e-3]),
    st.sampled_from([1e-6, 1e-3, 0.1]),
)
def test_chosen_parameters_meet_their_targets_and_k_is_minimal(n, dropout, corrupt, eps, eta):
    p = params.choose_parameters(n, dropout, corrupt, security_target=eps, correctness_target=eta)
    c = math.floor(corrupt * n)
    assert p.corrupt_sites == c and p.sites == n
    assert 2 <= p.t <= p.k <= n - 1
    assert 0.0 <= p.abort_probability <= 1.0
    bad_rate = c / n + (1 - c / n) * dropout
    if p.complete:
        assert p.k == n - 1 and p.t == max((n - 1 + c) // 2 + 1, 2)
    else:
        assert p.k % 2 == 0 and p.t > p.k // 2
        assert p.security_failure <= eps and p.abort_probability <= eta
        assert p.t == secure_t(n, p.k, c, bad_rate, eps)  # the smallest secure t
    # no smaller even degree (below n - 1) would have done
    for k in range(2, p.k if not p.complete else n - 1, 2):
        t = secure_t(n, k, c, bad_rate, eps)
        assert t is None or n * params.binomial_below(k, 1 - dropout, t) > eta


def test_tail_helpers_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    for k, p, t in [(10, 0.9, 7), (54, 0.95, 38), (5, 0.5, 0), (5, 0.0, 1), (5, 1.0, 5)]:
        assert params.binomial_below(k, p, t) == pytest.approx(
            float(stats.binom.cdf(t - 1, k, p)), abs=1e-15
        )
    for pop, marked, draws, m in [(999, 50, 54, 16), (20, 3, 6, 2), (9, 0, 4, 1), (9, 9, 4, 4)]:
        assert params.hypergeometric_at_least(pop, marked, draws, m) == pytest.approx(
            float(stats.hypergeom.sf(m - 1, pop, marked, draws)), rel=1e-9, abs=1e-300
        )
    assert params.disconnection_bound(10, 2, 0.9) == 1.0
    assert params.disconnection_bound(10, 4, 0.1) == pytest.approx(45 * 1e-4)


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [
        ((2, 0.05, 0.05), {}),
        ((0, 0.05, 0.05), {}),
        ((-5, 0.05, 0.05), {}),
        ((10, 1.0, 0.05), {}),
        ((10, -0.01, 0.05), {}),
        ((10, float("nan"), 0.05), {}),
        ((10, float("inf"), 0.05), {}),
        ((10, 0.05, 0.5), {}),
        ((10, 0.05, -0.1), {}),
        ((10, 0.05, 0.05), {"security_target": 1.0}),
        ((10, 0.05, 0.05), {"security_target": -1e-9}),
        ((10, 0.05, 0.05), {"correctness_target": float("nan")}),
        ((10, 0.05, 0.05), {"correctness_target": 2.0}),
    ],
)
def test_choose_parameters_refuses_invalid_inputs(args, kwargs):
    with pytest.raises(ValueError):
        params.choose_parameters(*args, **kwargs)


# -- quantize ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"clip_range": 0.0, "levels": 4},
        {"clip_range": -1.0, "levels": 4},
        {"clip_range": float("nan"), "levels": 4},
        {"clip_range": float("inf"), "levels": 4},
        {"clip_range": 1.0, "levels": 1},
        {"clip_range": 1.0, "levels": 17, "ring_bits": 4},
        {"clip_range": 1.0, "levels": 4, "ring_bits": 0},
        {"clip_range": 1.0, "levels": 4, "ring_bits": 33},
    ],
)
def test_quantization_config_validation(kwargs):
    with pytest.raises(ValueError):
        QuantizationConfig(**kwargs)


def test_quantization_config_properties():
    cfg = QuantizationConfig(2.0, 5, ring_bits=8)
    assert cfg.step == 1.0 and cfg.modulus == 256
    assert QuantizationConfig(1.0, 16, ring_bits=4).modulus == 16  # L = 2^b is allowed


configs = st.builds(
    lambda r, bits, frac: QuantizationConfig(r, max(2, int(2 + frac * ((1 << bits) - 2))), bits),
    st.floats(1e-3, 1e3),
    st.integers(1, 32),
    st.floats(0.0, 1.0),
)


@settings(max_examples=60, deadline=None)
@given(
    hnp.arrays(
        st.sampled_from([np.float32, np.float64]),
        hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=6),
        elements=st.floats(-1e6, 1e6, width=32),
    ),
    configs,
    st.floats(0.0, 1.0),
    seeds,
)
def test_quantized_values_lie_in_the_levels_and_clipping_is_counted(values, cfg, weight, seed):
    q = quantize(values, cfg, weight=weight, seed=seed)
    assert q.values.dtype == np.uint32 and q.values.shape == (values.size,)
    if q.values.size:
        assert int(q.values.max()) < cfg.levels
    assert q.clipped == int(np.count_nonzero(np.abs(values.astype(np.float64)) > cfg.clip_range))
    again = quantize(values, cfg, weight=weight, seed=seed)
    assert np.array_equal(q.values, again.values)


def test_quantize_is_exact_on_the_grid_and_clips_to_the_ends():
    cfg = QuantizationConfig(1.0, 5)  # step 0.5: grid -1, -0.5, 0, 0.5, 1
    x = np.array([[-1.0, -0.5, 0.0], [0.5, 1.0, 7.0]], dtype=np.float32)
    for _ in range(5):
        q = quantize(x, cfg)
        assert q.values.tolist() == [0, 1, 2, 3, 4, 4] and q.clipped == 1
    q = quantize(np.array([-3.0, 3.0, 1.0000001]), cfg)
    assert q.values.tolist() == [0, 4, 4] and q.clipped == 3
    assert quantize(np.array([0.7]), cfg, weight=0.0).values.tolist() == [2]
    assert quantize(np.array([1.0]), cfg, weight=0.5).values.tolist() == [3]


def test_quantize_crosses_the_chunk_boundary():
    cfg = QuantizationConfig(1.0, 1 << 20)
    x = np.linspace(-1.5, 1.5, CHUNK + 17)
    q = quantize(x, cfg, seed=seed_of(4))
    assert q.values.shape == (CHUNK + 17,) and q.clipped == int(np.sum(np.abs(x) > 1.0))
    err = q.values.astype(np.float64) * cfg.step - 1.0 - np.clip(x, -1, 1)
    assert np.abs(err).max() < cfg.step
    assert quantize(np.zeros(0, np.float32), cfg).values.shape == (0,)


@pytest.mark.parametrize("x", [-0.9, -0.3137, 0.0001, 0.4999, 0.77])
@pytest.mark.parametrize("weight", [1.0, 0.37])
def test_stochastic_rounding_is_unbiased(x, weight):
    cfg = QuantizationConfig(1.0, 9)  # step 0.25
    n = 200_000
    q = quantize(np.full(n, x), cfg, weight=weight, seed=seed_of(42))
    u = (x * weight + 1.0) / cfg.step
    frac = u - math.floor(u)
    assert set(np.unique(q.values).tolist()) <= {math.floor(u), math.floor(u) + 1}
    sd = math.sqrt(frac * (1 - frac) / n)
    assert abs(float(q.values.mean()) - u) < 6 * sd + 1e-9
    decoded = float(q.values.mean()) * cfg.step - 1.0
    assert abs(decoded - x * weight) < 6 * sd * cfg.step + 1e-9


def test_quantize_randomness_is_fresh_without_a_seed():
    cfg = QuantizationConfig(1.0, 3)
    x = np.full(256, 0.5)  # u = 1.5: each value rounds up or down at random
    assert not np.array_equal(quantize(x, cfg).values, quantize(x, cfg).values)
    a = quantize(x, cfg, seed=seed_of(1)).values
    b = quantize(x, cfg, seed=seed_of(2)).values
    assert not np.array_equal(a, b)


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 8),
    st.integers(0, 40),
    st.integers(1, 32),
    st.floats(0.0, 1.0),
    st.floats(1e-2, 1e2),
    st.data(),
)
def test_dequantized_sum_is_within_the_error_bound(n, dim, bits, level_frac, r, data):
    top = max_levels(n, bits)
    if top < 2:
        return
    cfg = QuantizationConfig(r, max(2, int(2 + level_frac * (top - 2))), bits)
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32)))
    weights = [data.draw(st.floats(0.0, 1.0)) for _ in range(n)]
    xs = [rng.uniform(-2 * r, 2 * r, size=dim) for _ in range(n)]
    total = np.zeros(dim, dtype=np.uint64)
    exact = np.zeros(dim, dtype=np.float64)
    for x, w in zip(xs, weights, strict=True):
        q = quantize(x, cfg, weight=w, seed=rng.bytes(32))
        total += q.values
        exact += w * np.clip(x, -r, r)
    assert int(total.max(initial=0)) <= n * (cfg.levels - 1) < cfg.modulus  # never wraps
    got = dequantize_sum(total.astype(np.uint32), n, cfg)
    assert got.dtype == np.float32 and got.shape == (dim,)
    assert np.all(np.abs(got.astype(np.float64) - exact) <= error_bound(n, cfg))


def test_dequantize_sum_keeps_the_shape_and_refuses_impossible_totals():
    cfg = QuantizationConfig(1.0, 5, ring_bits=8)
    total = np.array([[0, 8], [4, 2]], dtype=np.uint32)
    assert dequantize_sum(total, 2, cfg).tolist() == [[-2.0, 2.0], [0.0, -1.0]]
    with pytest.raises(ValueError, match="exceeds"):
        dequantize_sum(np.array([9], np.uint32), 2, cfg)
    with pytest.raises(ValueError, match="uint32"):
        dequantize_sum(np.array([1], np.int64), 2, cfg)
    with pytest.raises(QuantizationOverflow):
        dequantize_sum(np.array([1], np.uint32), 64, cfg)  # 64 * 4 > 255
    assert dequantize_sum(np.zeros(0, np.uint32), 2, cfg).shape == (0,)


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 1 << 33),
    st.integers(1, 32).flatmap(lambda b: st.tuples(st.just(b), st.integers(2, 1 << b))),
)
def test_overflow_is_reported_exactly_when_the_sum_can_wrap(sites, bits_levels):
    bits, levels = bits_levels
    wraps = sites * (levels - 1) > (1 << bits) - 1
    if wraps:
        with pytest.raises(QuantizationOverflow, match=f"levels <= {max_levels(sites, bits)}"):
            check_no_overflow(sites, levels, bits)
    else:
        check_no_overflow(sites, levels, bits)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 1 << 33), st.integers(1, 32))
def test_max_levels_is_the_largest_safe_number_of_levels(sites, bits):
    m = max_levels(sites, bits)
    assert 1 <= m <= 1 << bits
    assert sites * (m - 1) <= (1 << bits) - 1
    if m >= 2:
        check_no_overflow(sites, m, bits)
    with pytest.raises(QuantizationOverflow):
        check_no_overflow(sites, m + 1, bits)


def test_max_levels_examples():
    assert max_levels(1) == 1 << 32
    assert max_levels(2) == 1 << 31
    assert max_levels(3, 8) == 86  # 3 * 85 = 255
    assert max_levels(255, 8) == 2
    assert max_levels(256, 8) == 1  # no level count is safe
    with pytest.raises(ValueError):
        max_levels(0)


@pytest.mark.parametrize("args", [(0, 4, 32), (3, 1, 32), (3, 4, 0), (3, 4, 33)])
def test_check_no_overflow_refuses_invalid_arguments(args):
    with pytest.raises(ValueError):
        check_no_overflow(*args)


def test_quantize_refuses_bad_inputs():
    cfg = QuantizationConfig(1.0, 5)
    with pytest.raises(TypeError):
        quantize(np.arange(3), cfg)
    for bad in (np.array([0.0, np.nan]), np.array([np.inf]), np.array([-np.inf])):
        with pytest.raises(ValueError, match="non-finite"):
            quantize(bad, cfg)
    for w in (-0.1, 1.1, float("nan")):
        with pytest.raises(ValueError, match="weight"):
            quantize(np.zeros(2), cfg, weight=w)
    with pytest.raises(ValueError, match="seed"):
        quantize(np.zeros(2), cfg, seed=bytes(5))


def test_weight_factor_and_error_bound():
    assert weight_factor(5, 10) == 0.5
    assert weight_factor(50, 10) == 1.0
    assert weight_factor(0, 10) == 0.0
    for w, m in ((-1, 10), (float("nan"), 10), (1, 0), (1, float("inf"))):
        with pytest.raises(ValueError):
            weight_factor(w, m)
    cfg = QuantizationConfig(2.0, 5)
    assert error_bound(3, cfg) == pytest.approx(3 * 1.0 + 2.0**-23 * 6.0)
    with pytest.raises(ValueError):
        error_bound(0, cfg)
