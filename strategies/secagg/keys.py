"""X25519 key agreement, HKDF-SHA256 key derivation and AES-256-GCM share encryption.

Each site holds two X25519 key pairs per round (Bonawitz et al. 2017): an *encryption*
pair, whose agreements key the AEAD channels that carry Shamir shares between
neighbours, and a *mask* pair, whose agreements seed the pairwise masks. Only the mask
secret is ever Shamir-shared (and rebuilt if the site drops), so rebuilding it never
opens the share channels.

Derivation: ``HKDF-SHA256(ikm=X25519(sk_a, pk_b), salt=None, length=32,
info=pack_fields("agree", purpose, run_id, round, first, second))``. For pairwise masks
``(first, second)`` is the sorted pair of site ids (both ends derive the same seed); for
share encryption it is ``(sender, receiver)``, so each direction has its own key.

Public keys are checked on receipt: 32 bytes, not a low-order point. ``cryptography``
raises a bare ``ValueError("Error computing shared key.")`` when an exchange yields the
all-zero secret, which happens exactly for the low-order points (the all-zero key
included); :func:`check_public_key` turns that into :class:`InvalidPublicKey` before any
secret depends on the key. :func:`check_distinct` rejects a key seen twice in a round.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from strategies.secagg.encoding import pack_fields
from strategies.secagg.errors import DuplicatePublicKey, InvalidPublicKey, ShareDecryptionError

KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16

PURPOSE_MASK = "pairwise-mask"
PURPOSE_SHARES = "share-encryption"

_PROBE = X25519PrivateKey.generate()
"""A throwaway key: an exchange with it fails exactly for low-order public keys."""


@dataclass(frozen=True)
class KeyPair:
    """Raw X25519 key bytes (the private half is kept out of ``repr``)."""

    private: bytes = field(repr=False)
    public: bytes

    @cached_property
    def private_key(self) -> X25519PrivateKey:
        """The private key object (built once: ``from_private_bytes`` costs ~50 us)."""
        return X25519PrivateKey.from_private_bytes(self.private)


def generate_keypair() -> KeyPair:
    """A fresh X25519 key pair from the operating system's CSPRNG."""
    sk = X25519PrivateKey.generate()
    return KeyPair(private=sk.private_bytes_raw(), public=sk.public_key().public_bytes_raw())


def public_from_private(private: bytes) -> bytes:
    """The X25519 public key of raw ``private`` bytes."""
    return _private_key(private).public_key().public_bytes_raw()


def check_public_key(public: bytes, owner: str = "a site") -> None:
    """Ensure ``public`` is a usable X25519 public key.

    Raises
    ------
    InvalidPublicKey
        For a key that is not 32 bytes, or a low-order point (all-zero shared secret).
    """
    if not isinstance(public, bytes) or len(public) != KEY_BYTES:
        raise InvalidPublicKey(f"public key of {owner} is not {KEY_BYTES} bytes")
    try:
        _PROBE.exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError as exc:
        raise InvalidPublicKey(
            f"public key of {owner} is a low-order X25519 point (shared secret all zeros)"
        ) from exc


def check_distinct(keys: Iterable[tuple[str, bytes]]) -> None:
    """Ensure no public key appears twice among ``(owner, key)`` pairs.

    Raises
    ------
    DuplicatePublicKey
        Naming both owners of the repeated key.
    """
    seen: dict[bytes, str] = {}
    for owner, key in keys:
        if key in seen:
            raise DuplicatePublicKey(f"{seen[key]} and {owner} advertise the same public key")
        seen[key] = owner


def shared_secret(
    private: X25519PrivateKey | bytes, peer_public: bytes, owner: str = "a peer"
) -> bytes:
    """The raw X25519 shared secret (input to :func:`derive_key` only, never a key).

    Raises
    ------
    InvalidPublicKey
        For a malformed or low-order ``peer_public``.
    """
    if not isinstance(peer_public, bytes) or len(peer_public) != KEY_BYTES:
        raise InvalidPublicKey(f"public key of {owner} is not {KEY_BYTES} bytes")
    sk = private if isinstance(private, X25519PrivateKey) else _private_key(private)
    try:
        return sk.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as exc:  # cryptography's answer to an all-zero shared secret
        raise InvalidPublicKey(
            f"public key of {owner} is a low-order X25519 point (shared secret all zeros)"
        ) from exc


def _private_key(private: bytes) -> X25519PrivateKey:
    if not isinstance(private, bytes) or len(private) != KEY_BYTES:
        raise ValueError(f"an X25519 private key is {KEY_BYTES} bytes")
    return X25519PrivateKey.from_private_bytes(private)


def derive_key(
    shared: bytes, *, purpose: str, run_id: str, round_number: int, first: str, second: str
) -> bytes:
    """HKDF-SHA256 of a shared secret, bound to ``purpose``, the run, the round and the
    ordered pair ``(first, second)``: 32 bytes."""
    info = pack_fields("agree", purpose, run_id, int(round_number), first, second)
    return HKDF(hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(shared)


def agree(
    private: X25519PrivateKey | bytes,
    peer_public: bytes,
    *,
    purpose: str,
    run_id: str,
    round_number: int,
    first: str,
    second: str,
) -> bytes:
    """``derive_key(shared_secret(private, peer_public), ...)``: 32 bytes from X25519
    agreement and HKDF-SHA256 bound to ``purpose``, the run, the round and the ordered
    pair ``(first, second)``.

    Raises
    ------
    InvalidPublicKey
        For a malformed or low-order ``peer_public``.
    """
    return derive_key(
        shared_secret(private, peer_public, second),
        purpose=purpose,
        run_id=run_id,
        round_number=round_number,
        first=first,
        second=second,
    )


def share_associated_data(run_id: str, round_number: int, sender: str, receiver: str) -> bytes:
    """AEAD associated data of a share bundle: binds run, round, sender and receiver."""
    return pack_fields("shares", run_id, int(round_number), sender, receiver)


def encrypt(key: bytes, plaintext: bytes, associated_data: bytes) -> bytes:
    """AES-256-GCM: ``nonce (12 random bytes) || ciphertext || tag``."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, associated_data)


def decrypt(key: bytes, blob: bytes, associated_data: bytes) -> bytes:
    """Inverse of :func:`encrypt`.

    Raises
    ------
    ShareDecryptionError
        When the blob is too short or fails authentication.
    """
    if len(blob) < NONCE_BYTES + TAG_BYTES:
        raise ShareDecryptionError("encrypted share bundle too short")
    try:
        return AESGCM(key).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], associated_data)
    except InvalidTag as exc:
        raise ShareDecryptionError(
            "share bundle failed authentication (wrong key, parties, round or tampered)"
        ) from exc
