"""t-of-n Shamir secret sharing over the prime field ``GF(2^31 - 1)``, vectorised.

A secret of ``2m`` bytes (32 for seeds and X25519 keys) is cut into ``m`` big-endian
16-bit chunks; each chunk is the constant term of its own random polynomial of degree
``t - 1`` over ``GF(p)``, ``p = 2^31 - 1``. Every field element is below ``2^31``, so a
product of two fits an ``int64`` and all arithmetic is plain NumPy. A share is the
polynomials' values at one non-zero ``x`` (the holder's index), stored as ``m``
little-endian ``uint32`` (64 bytes for a 32-byte secret).

Reconstruction interpolates at zero with Lagrange weights computed for many secrets at
once (:func:`reconstruct_many`): the weights for an ``(S, t)`` matrix of x coordinates
take ``t`` vectorised passes plus one vectorised Fermat inversion, so rebuilding 100
secrets from 100 shares each is a few milliseconds. A reconstructed chunk must be below
``2^16``; shares that do not lie on one polynomial give chunks spread over ``GF(p)``, so a
corrupted share set is detected with probability ``1 - 2^-15`` per chunk (``1 - 2^-240``
for a 32-byte secret) and raises :class:`ReconstructionError`.

Coefficients are uniform in ``GF(p)`` (31-bit draws from ``os.urandom``, rejecting
``p`` itself), so any ``t - 1`` shares are independent of the secret.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from strategies.secagg.errors import ReconstructionError, ShamirError

PRIME = (1 << 31) - 1
"""The field modulus ``2^31 - 1`` (a Mersenne prime)."""

CHUNK_BITS = 16
_CHUNK_BYTES = CHUNK_BITS // 8
_P = np.int64(PRIME)


@dataclass(frozen=True)
class Share:
    """One holder's share: ``x`` in ``[1, p)`` and ``y``, the little-endian ``uint32``
    values of every chunk's polynomial at ``x``."""

    x: int
    y: bytes


def _random_field(shape: tuple[int, ...]) -> np.ndarray:
    """Uniform elements of ``GF(p)`` from ``os.urandom`` (31-bit draws, ``p`` rejected)."""
    count = int(np.prod(shape))
    out = np.frombuffer(os.urandom(4 * count), dtype="<u4").astype(np.int64) & PRIME
    bad = out == PRIME
    while bad.any():
        redraw = np.frombuffer(os.urandom(4 * int(bad.sum())), dtype="<u4").astype(np.int64)
        out[bad] = redraw & PRIME
        bad = out == PRIME
    return out.reshape(shape)


def _chunks(secret: bytes) -> np.ndarray:
    if not isinstance(secret, bytes) or not secret or len(secret) % _CHUNK_BYTES:
        raise ShamirError("a secret must be a non-empty bytes object of even length")
    return np.frombuffer(secret, dtype=">u2").astype(np.int64)


def _check_xs(xs: Sequence[int]) -> np.ndarray:
    arr = np.asarray([int(x) for x in xs], dtype=np.int64)
    if arr.size and (arr.min() <= 0 or arr.max() >= PRIME):
        raise ShamirError(f"share x coordinates must be in [1, {PRIME - 1}] (never zero)")
    if np.unique(arr).size != arr.size:
        raise ShamirError("duplicate share x coordinates")
    return arr


def split(secret: bytes, threshold: int, xs: Sequence[int]) -> list[Share]:
    """Shares of ``secret`` for the holders at ``xs``; any ``threshold`` of them rebuild
    it, fewer reveal nothing.

    Raises
    ------
    ShamirError
        For a secret of odd or zero length, ``threshold`` outside ``[1, len(xs)]``, or
        zero, out-of-field or duplicate x coordinates.
    """
    chunks = _chunks(secret)
    x = _check_xs(xs)
    if not 1 <= threshold <= x.size:
        raise ShamirError(f"threshold must be in [1, {x.size}] for {x.size} holders")
    coeffs = _random_field((threshold - 1, chunks.size))
    acc = np.zeros((x.size, chunks.size), dtype=np.int64)
    xcol = x[:, None]
    for row in coeffs[::-1]:  # Horner, highest degree first
        acc *= xcol
        acc += row
        acc %= _P
    acc *= xcol
    acc += chunks
    acc %= _P
    values = acc.astype("<u4")
    return [Share(x=int(xi), y=values[i].tobytes()) for i, xi in enumerate(x)]


def _pow_mod(base: np.ndarray, exponent: int) -> np.ndarray:
    result = np.ones_like(base)
    b = base % _P
    e = exponent
    while e:
        if e & 1:
            result = result * b % _P
        b = b * b % _P
        e >>= 1
    return result


def _pair_products(a: np.ndarray, reduce: bool) -> np.ndarray:
    """Products of adjacent halves along the last axis (an odd last column is carried
    over unchanged), reduced modulo ``p`` when ``reduce``."""
    half = a.shape[-1] // 2
    b = a[..., :half] * a[..., half : 2 * half]
    if reduce:
        b %= _P
    if a.shape[-1] % 2:
        b = np.concatenate([b, a[..., -1:]], axis=-1)
    return b


def _prod_mod(a: np.ndarray) -> np.ndarray:
    """Product modulo ``p`` along the last axis of elements of ``[0, p)``, by a tree of
    pairwise products."""
    while a.shape[-1] > 1:
        a = _pair_products(a, reduce=True)
    return a[..., 0]


_SMALL_X = 1 << 15
"""Below this, differences of x coordinates have ``|d| < 2^15``: two levels of products
(``< 2^60``) fit an ``int64`` before the first reduction modulo ``p``."""

_BLOCK_ELEMENTS = 1 << 21
"""Bound on the ``rows * t * t`` difference tensor built at once (16 MiB of int64)."""


def _difference_products(x: np.ndarray) -> np.ndarray:
    """``prod_{j != i} (x_j - x_i) mod p`` for every row and ``i`` of ``x`` (``(r, t)``)."""
    t = x.shape[1]
    diff = x[:, None, :] - x[:, :, None]  # [r, i, j] = x_j - x_i
    diff[:, np.arange(t), np.arange(t)] = 1
    if int(x.max()) < _SMALL_X:  # site indices: skip reductions while products are small
        diff = _pair_products(diff, reduce=False)  # |.| < 2^30
        if diff.shape[-1] > 1:
            diff = _pair_products(diff, reduce=True)  # |.| < 2^60, then reduced
        else:
            diff %= _P
    else:
        diff %= _P
    return _prod_mod(diff)


def lagrange_at_zero(xs: np.ndarray) -> np.ndarray:
    """Lagrange weights at zero for each row of the ``(S, t)`` matrix ``xs``:
    ``lambda_i = prod_{j != i} x_j / (x_j - x_i) mod p``.

    Rows must hold distinct x coordinates in ``[1, p)`` (not checked here). Work: one
    ``(rows, t, t)`` tensor of differences reduced by a tree of products, in blocks of
    rows, and one vectorised Fermat inversion.
    """
    x = np.asarray(xs, dtype=np.int64)
    if x.ndim != 2:
        raise ShamirError("lagrange_at_zero needs an (S, t) matrix of x coordinates")
    s, t = x.shape
    if t == 1:
        return np.ones((s, 1), dtype=np.int64)
    total = _prod_mod(x)  # prod_j x_j, per row
    den = np.empty((s, t), dtype=np.int64)
    rows = max(1, _BLOCK_ELEMENTS // (t * t))
    for lo in range(0, s, rows):
        den[lo : lo + rows] = _difference_products(x[lo : lo + rows])
    inv = _pow_mod(den * x % _P, PRIME - 2)  # 1 / (x_i * den_i)
    return inv * total[:, None] % _P


def _share_matrix(
    share_sets: Sequence[Sequence[Share]], threshold: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(S, t)`` x coordinates and ``(S, t, m)`` values of the first ``threshold`` shares
    of each set, validated."""
    if threshold < 1:
        raise ShamirError(f"threshold must be >= 1, got {threshold}")
    xs = np.empty((len(share_sets), threshold), dtype=np.int64)
    blobs: list[bytes] = []
    width = -1
    for k, shares in enumerate(share_sets):
        if len(shares) < threshold:
            raise ShamirError(
                f"secret {k}: {len(shares)} shares, fewer than the threshold {threshold}"
            )
        all_x = [int(sh.x) for sh in shares]
        if len(set(all_x)) != len(all_x):
            raise ShamirError(f"secret {k}: duplicate share x coordinates")
        if min(all_x) <= 0 or max(all_x) >= PRIME:
            raise ShamirError(f"share x coordinates must be in [1, {PRIME - 1}] (never zero)")
        xs[k] = all_x[:threshold]
        if width < 0:
            width = len(shares[0].y)
        blob = b"".join(sh.y for sh in shares[:threshold])
        if width == 0 or width % 4 or len(blob) != width * threshold:
            raise ShamirError("shares of different or malformed lengths")
        blobs.append(blob)
    y = np.frombuffer(b"".join(blobs), dtype="<u4").astype(np.int64)
    y = y.reshape(len(share_sets), threshold, width // 4)
    if (y >= PRIME).any():
        raise ShamirError("share values must be field elements below p")
    return xs, y


def reconstruct_many(share_sets: Sequence[Sequence[Share]], threshold: int) -> list[bytes]:
    """Rebuild one secret from each set of shares (the first ``threshold`` of each set
    are used), all at once.

    Raises
    ------
    ShamirError
        For fewer than ``threshold`` shares, duplicate or zero x coordinates, or malformed
        share values.
    ReconstructionError
        When the shares do not lie on one polynomial of a valid secret.
    """
    if not share_sets:
        return []
    xs, y = _share_matrix(share_sets, threshold)
    lam = lagrange_at_zero(xs)
    chunks = np.zeros((y.shape[0], y.shape[2]), dtype=np.int64)
    for i in range(threshold):  # sum_i lambda_i * y_i, reduced term by term
        chunks += lam[:, i : i + 1] * y[:, i, :] % _P
        if i % 1024 == 1023:
            chunks %= _P
    chunks %= _P
    bad = (chunks >= 1 << CHUNK_BITS).any(axis=1)
    if bad.any():
        raise ReconstructionError(
            f"inconsistent shares for secret(s) {np.flatnonzero(bad).tolist()}"
        )
    return [row.astype(">u2").tobytes() for row in chunks]


def reconstruct(shares: Sequence[Share], threshold: int) -> bytes:
    """Rebuild one secret from at least ``threshold`` shares (see :func:`reconstruct_many`)."""
    return reconstruct_many([shares], threshold)[0]
