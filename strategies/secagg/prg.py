"""Mask expansion: a 32-byte seed -> a stream of uniform words, by AES-256-CTR.

Round binding. The AES key is never the seed itself: it is
``HKDF-SHA256(ikm=seed, info=pack_fields("prg", context))`` where ``context`` (built with
:func:`stream_context`) names the run, the round and the purpose (``"self"`` for a
site's self mask, ``"pair"`` for a pairwise mask, ...). The same seed in another round or
for another purpose therefore keys another AES key and gives an unrelated mask, and all
256 bits of the seed enter the key (no folding to 32 bits as in Flower's SecAgg+).
Because each derived key produces exactly one keystream, the CTR counter block starts at
zero; a keystream of ``2^128`` blocks never wraps in practice.

Speed and memory. The keystream is AES-CTR encryption of zeros written straight into the
caller's buffer with ``update_into`` (no temporaries), in chunks of :data:`CHUNK_WORDS`
words, so a mask for any length needs one chunk of zeros plus the output. :func:`add_masks`
adds or subtracts many masks into one accumulator in a single cache-blocked pass: each
chunk of the accumulator stays in cache while every seed's keystream is folded into it.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from numpy.typing import DTypeLike

from strategies.secagg.encoding import pack_fields

SEED_BYTES = 32
"""Length of every PRG seed (self-mask seeds, pairwise seeds)."""

CHUNK_WORDS = 1 << 16
"""32-bit words produced per AES call (256 KiB: an accumulator chunk stays in L2)."""

_BLOCK = 16
_ZEROS = bytes(4 * CHUNK_WORDS)
"""Shared plaintext of zeros (immutable, so every stream can read it)."""
_WORD_DTYPES = (np.dtype(np.uint32), np.dtype(np.uint64))


def stream_context(run_id: str, round_number: int, purpose: str) -> bytes:
    """The PRG context that binds a keystream to a run, a round and a purpose."""
    return pack_fields("context", run_id, int(round_number), purpose)


def stream_key(seed: bytes, context: bytes) -> bytes:
    """The AES-256 key of ``(seed, context)``: HKDF-SHA256 over the full 32-byte seed.

    Raises
    ------
    ValueError
        For a seed that is not 32 bytes.
    """
    if not isinstance(seed, bytes) or len(seed) != SEED_BYTES:
        raise ValueError(f"a PRG seed must be {SEED_BYTES} bytes")
    hkdf = HKDF(hashes.SHA256(), length=32, salt=None, info=pack_fields("prg", context))
    return hkdf.derive(seed)


def _probe_exact_output() -> bool:
    """Whether this ``cryptography`` accepts an ``update_into`` buffer of exactly
    ``len(data)`` bytes (older versions want ``block - 1`` bytes of slack)."""
    enc = Cipher(algorithms.AES(bytes(32)), modes.CTR(bytes(_BLOCK))).encryptor()
    try:
        enc.update_into(bytes(_BLOCK), bytearray(_BLOCK))
    except ValueError:
        return False
    return True


_EXACT_OUTPUT = _probe_exact_output()


class KeyStream:
    """The keystream of one ``(seed, context)``, read in order by :meth:`fill`.

    Two instances with the same seed and context produce the same words; successive
    ``fill`` calls continue the stream (chunked and one-shot reads agree).
    """

    def __init__(self, seed: bytes, context: bytes) -> None:
        key = stream_key(seed, context)
        self._encryptor = Cipher(algorithms.AES(key), modes.CTR(bytes(_BLOCK))).encryptor()

    def fill(self, out: np.ndarray) -> None:
        """Overwrite the 1-D C-contiguous ``uint32``/``uint64`` array ``out`` with the
        next ``out.size`` words of the stream (little-endian).

        Raises
        ------
        ValueError
            For another dtype, a non-contiguous or read-only array.
        """
        if out.dtype not in _WORD_DTYPES or out.ndim != 1:
            raise ValueError("fill needs a 1-D uint32 or uint64 array")
        if not (out.flags.c_contiguous and out.flags.writeable):
            raise ValueError("fill needs a writeable C-contiguous array")
        raw = memoryview(out.view(np.uint8))
        total = raw.nbytes
        step = len(_ZEROS)
        for lo in range(0, total, step):
            hi = min(lo + step, total)
            zeros = memoryview(_ZEROS)[: hi - lo]
            if _EXACT_OUTPUT or hi + _BLOCK <= total:
                end = hi if _EXACT_OUTPUT else hi + _BLOCK - 1
                self._encryptor.update_into(zeros, raw[lo:end])
            else:  # the last chunk on an old cryptography: through a scratch buffer
                scratch = bytearray(hi - lo + _BLOCK - 1)
                self._encryptor.update_into(zeros, scratch)
                raw[lo:hi] = scratch[: hi - lo]
        # only native dtypes pass the check above (byteorder "="): swap on big-endian hosts
        if sys.byteorder == "big":  # pragma: no cover - big-endian hosts only
            out.byteswap(inplace=True)


def expand(
    seed: bytes,
    length: int,
    context: bytes,
    *,
    dtype: DTypeLike = np.uint32,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """The first ``length`` words of the keystream of ``(seed, context)``.

    Parameters
    ----------
    seed
        32 bytes (all of them key the stream).
    length
        Number of words.
    context
        From :func:`stream_context`; another run, round or purpose gives another stream.
    dtype
        ``uint32`` (masks) or ``uint64`` (e.g. 53-bit uniforms).
    out
        Optional reused buffer (1-D, C-contiguous, ``length`` words of ``dtype``).

    Raises
    ------
    ValueError
        For a bad seed, a negative length or an unusable ``out``.
    """
    if length < 0:
        raise ValueError(f"length must be >= 0, got {length}")
    dt = np.dtype(dtype)
    if out is None:
        out = np.empty(int(length), dtype=dt)
    elif out.dtype != dt or out.shape != (length,):
        raise ValueError(f"out must have shape ({length},) and dtype {dt}")
    KeyStream(seed, context).fill(out)
    return out


def add_masks(
    acc: np.ndarray,
    masks: Sequence[tuple[bytes, int]],
    context: bytes,
    *,
    chunk_words: int = CHUNK_WORDS,
) -> None:
    """``acc += sign * expand(seed, acc.size, context)`` for every ``(seed, sign)`` in
    ``masks``, modulo ``2^32``, in place and in one cache-blocked pass.

    Memory: one chunk of zeros and one chunk of keystream, whatever the length.

    Raises
    ------
    ValueError
        For an ``acc`` that is not a writeable 1-D C-contiguous ``uint32`` array, a sign
        other than ``+1``/``-1``, a bad seed or a chunk size that is not positive.
    """
    if acc.dtype != np.uint32 or acc.ndim != 1:
        raise ValueError("masks are added to a 1-D uint32 accumulator")
    if not (acc.flags.c_contiguous and acc.flags.writeable):
        raise ValueError("the accumulator must be writeable and C-contiguous")
    if chunk_words <= 0:
        raise ValueError(f"chunk_words must be > 0, got {chunk_words}")
    if any(sign not in (1, -1) for _, sign in masks):
        raise ValueError("a mask sign must be +1 or -1")
    streams = [(KeyStream(seed, context), sign) for seed, sign in masks]
    if not streams or acc.size == 0:
        return
    chunk = min(chunk_words, acc.size)
    buf = np.empty(chunk, dtype=np.uint32)
    for lo in range(0, acc.size, chunk):
        hi = min(lo + chunk, acc.size)
        block = acc[lo:hi]
        words = buf[: hi - lo]
        for stream, sign in streams:
            stream.fill(words)
            if sign > 0:
                np.add(block, words, out=block)
            else:
                np.subtract(block, words, out=block)
