"""Gaussian privacy noise from a cryptographically secure generator.

:class:`SecureGaussian` keys AES-256 in CTR mode with 32 fresh bytes from the operating
system (``os.urandom``) when it is built; nothing comes from NumPy's generators or the
experiment seed, so the noise cannot be replayed from anything stored or configured. The
keystream (encrypted zeros) is read as 64-bit words; each word gives a uniform with 53
random bits, and pairs of uniforms become two standard normals by Box-Muller in float64,
which are scaled by ``std`` and cast to the requested dtype. Work proceeds in chunks of
:data:`CHUNK` values, so noising a 100M-element tensor needs only a few chunk-sized
buffers.

This is a floating-point Gaussian, not a discrete Gaussian. The accountant's epsilon is
proved for the ideal real-valued Gaussian; a sampler built from finite-precision floats
(here: 53-bit uniforms, so tails are cut at about 8.57 std, and an uneven lattice of
representable outputs) can leak more than that in principle, as Mironov (2012) showed for
the floating-point Laplace mechanism and Jin et al. (2022) for Gaussian samplers
including Box-Muller. A discrete Gaussian over a quantised update (Canonne, Kamath and
Steinke, 2020) would close that gap; it is not implemented here.
"""

from __future__ import annotations

import math
import os
import threading
from os import urandom

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from numpy.typing import DTypeLike

CHUNK = 1 << 20
"""Normals drawn per chunk (even, so chunked and one-shot draws give the same stream)."""

_KEY_BYTES = 32
_NONCE_BYTES = 16
_SLACK = 15
"""Extra output room some ``cryptography`` versions want in ``update_into`` (block - 1)."""
_TWO_POW_M53 = 2.0**-53
_TWO_PI = 2.0 * math.pi


def _check_std(std: float) -> float:
    std = float(std)
    if not (math.isfinite(std) and std >= 0.0):
        raise ValueError(f"the noise std must be a finite number >= 0, got {std!r}")
    return std


def _check_float_dtype(dtype: DTypeLike) -> np.dtype:
    dt = np.dtype(dtype)
    if dt.kind != "f":
        raise TypeError(f"Gaussian noise needs a floating dtype, got {dt}")
    return dt


class SecureGaussian:
    """Gaussian noise from an AES-256-CTR keystream keyed by ``os.urandom`` (fresh per
    instance). Thread-safe: draws are serialised by a lock. A forked child process draws
    a new key before its first draw, so parent and child never repeat each other's noise.
    """

    def __init__(self) -> None:
        self._zeros = b""
        self._keystream = bytearray()
        self._lock = threading.Lock()
        self._rekey()

    def _rekey(self) -> None:
        cipher = Cipher(algorithms.AES(urandom(_KEY_BYTES)), modes.CTR(urandom(_NONCE_BYTES)))
        self._encryptor = cipher.encryptor()
        self._pid = os.getpid()

    def _standard(self, k: int) -> np.ndarray:
        """``k <= CHUNK`` standard normals in float64 (``k`` rounded up to even internally:
        Box-Muller makes normals in pairs; an odd tail value is dropped)."""
        pairs = (k + 1) // 2
        nbytes = 16 * pairs
        with self._lock:
            if os.getpid() != self._pid:
                self._rekey()
            if len(self._zeros) < nbytes:  # grown on demand, up to one chunk's worth
                self._zeros = bytes(nbytes)
                self._keystream = bytearray(nbytes + _SLACK)
            self._encryptor.update_into(
                memoryview(self._zeros)[:nbytes], memoryview(self._keystream)[: nbytes + _SLACK]
            )
            words = np.frombuffer(self._keystream, dtype="<u8", count=2 * pairs)
            # Radius from u1 = (top 53 bits + 1) / 2^53 in (0, 1]: log never sees 0.
            r = (words[:pairs] >> np.uint64(11)).astype(np.float64)
            # Angle from u2 = top 53 bits / 2^53 in [0, 1).
            theta = (words[pairs:] >> np.uint64(11)).astype(np.float64)
        r += 1.0
        r *= _TWO_POW_M53
        np.log(r, out=r)
        r *= -2.0
        np.sqrt(r, out=r)
        theta *= _TWO_POW_M53 * _TWO_PI
        out = np.empty(2 * pairs, dtype=np.float64)
        np.cos(theta, out=out[:pairs])
        np.sin(theta, out=out[pairs:])
        out[:pairs] *= r
        out[pairs:] *= r
        return out[:k]

    def normal(
        self, size: int | tuple[int, ...], std: float, dtype: DTypeLike = np.float32
    ) -> np.ndarray:
        """Fresh ``N(0, std^2)`` samples of shape ``size`` in ``dtype`` (floating).

        Raises
        ------
        ValueError
            For ``std`` negative or not finite, or a negative size.
        TypeError
            For a non-floating dtype.
        """
        std = _check_std(std)
        dt = _check_float_dtype(dtype)
        shape = (size,) if isinstance(size, int | np.integer) else tuple(size)
        if any(int(n) < 0 for n in shape):
            raise ValueError(f"size must not be negative, got {size!r}")
        out = np.empty(shape, dtype=dt)
        flat = out.reshape(-1)
        for lo in range(0, flat.size, CHUNK):
            hi = min(lo + CHUNK, flat.size)
            z = self._standard(hi - lo)
            z *= std
            flat[lo:hi] = z  # casts to ``dt``
        return out

    def add_noise(self, array: np.ndarray, std: float) -> None:
        """Add ``N(0, std^2)`` noise to every value of ``array`` in place, chunk by chunk;
        shape and dtype are kept (float32 stays float32). The values added are exactly
        what :meth:`normal` would draw for ``(array.size, std, array.dtype)``.

        Raises
        ------
        ValueError
            For a bad ``std``, a read-only or non-contiguous array.
        TypeError
            For a non-floating array.
        """
        std = _check_std(std)
        _check_float_dtype(array.dtype)
        if not array.flags.writeable:
            raise ValueError("add_noise needs a writeable array")
        if not (array.flags.c_contiguous or array.flags.f_contiguous):
            raise ValueError("add_noise needs a contiguous array (a flat view of it)")
        if std == 0.0 or array.size == 0:
            return
        flat = array.reshape(-1, order="A")  # a view: the array is contiguous
        for lo in range(0, flat.size, CHUNK):
            hi = min(lo + CHUNK, flat.size)
            z = self._standard(hi - lo)
            z *= std
            flat[lo:hi] += z.astype(array.dtype, copy=False)
