"""Rules shared by both ends of a round: PRG contexts, seed commitments, pairwise seeds
and signs, the share-bundle plaintext, and the checks of setups and rosters.

Masking (Bonawitz et al. 2017, over the SecAgg+ graph of Bell et al. 2020): site ``u``
sends ``y_u = x_u + PRG(b_u) + sum_{v in P(u)} sign(u, v) * PRG(s_uv) mod 2^b`` where
``P(u)`` are the neighbours that sent it shares, ``b_u`` is a fresh 32-byte self-mask
seed, ``s_uv`` the pairwise seed from X25519 + HKDF over the sorted pair, and
``sign(u, v) = +1`` if ``u < v`` (site ids compared as strings) else ``-1``, so the
pairwise masks of two survivors cancel in the sum.
"""

from __future__ import annotations

import hashlib
import struct

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from strategies.secagg.encoding import pack_fields
from strategies.secagg.errors import ProtocolViolation
from strategies.secagg.graph import CommunicationGraph, build_graph
from strategies.secagg.keys import PURPOSE_MASK, derive_key, shared_secret
from strategies.secagg.messages import Roster, SecAggSetup
from strategies.secagg.prg import SEED_BYTES, stream_context
from strategies.secagg.shamir import Share

SHARE_BYTES = 4 * (SEED_BYTES // 2)
"""Bytes of one Shamir share of a 32-byte secret (16 chunks, a uint32 each)."""

_BUNDLE = struct.Struct(f">I{SHARE_BYTES}s{SHARE_BYTES}s")


def self_context(run_id: str, round_number: int) -> bytes:
    """PRG context of self masks."""
    return stream_context(run_id, round_number, "self-mask")


def pair_context(run_id: str, round_number: int) -> bytes:
    """PRG context of pairwise masks."""
    return stream_context(run_id, round_number, "pairwise-mask")


def seed_commitment(run_id: str, round_number: int, site: str, seed: bytes) -> bytes:
    """``SHA-256`` commitment to a self-mask seed (the seed has 256 random bits)."""
    data = pack_fields("seed-commitment", run_id, int(round_number), site, seed)
    return hashlib.sha256(data).digest()


def mask_sign(site: str, peer: str) -> int:
    """``+1`` if ``site < peer`` else ``-1``: the sign ``site`` gives their pairwise mask."""
    if site == peer:
        raise ProtocolViolation("a site has no pairwise mask with itself")
    return 1 if site < peer else -1


def pairwise_seed(shared: bytes, run_id: str, round_number: int, a: str, b: str) -> bytes:
    """The seed ``s_ab`` both ends derive from their mask-key shared secret (HKDF info
    holds the sorted pair)."""
    first, second = (a, b) if a < b else (b, a)
    return derive_key(
        shared,
        purpose=PURPOSE_MASK,
        run_id=run_id,
        round_number=round_number,
        first=first,
        second=second,
    )


def mask_shared_secret(
    mask_private: X25519PrivateKey | bytes, peer_mask_public: bytes, peer: str
) -> bytes:
    """X25519 secret of a pair's mask keys (InvalidPublicKey for a low-order key)."""
    return shared_secret(mask_private, peer_mask_public, peer)


def encode_bundle(seed_share: Share, key_share: Share) -> bytes:
    """Plaintext of a share bundle: the holder's x, then the two share values."""
    if seed_share.x != key_share.x:
        raise ValueError("both shares of a bundle belong to one holder")
    return _BUNDLE.pack(seed_share.x, seed_share.y, key_share.y)


def decode_bundle(plaintext: bytes) -> tuple[Share, Share]:
    """Inverse of :func:`encode_bundle`.

    Raises
    ------
    ProtocolViolation
        For a plaintext of the wrong size.
    """
    if len(plaintext) != _BUNDLE.size:
        raise ProtocolViolation("share bundle of the wrong size")
    x, seed_y, key_y = _BUNDLE.unpack(plaintext)
    return Share(x=x, y=seed_y), Share(x=x, y=key_y)


def check_setup(setup: SecAggSetup) -> None:
    """Reject a setup no round can run with.

    Raises
    ------
    ProtocolViolation
        For unsorted or repeated sites, fewer than 3, a threshold below 2 or above
        ``k``, an odd sparse ``k``, a bad ring, length or graph seed.
    """
    sites = setup.sites
    if len(set(sites)) != len(sites) or tuple(sorted(sites)) != tuple(sites):
        raise ProtocolViolation("setup sites must be distinct and sorted")
    if len(sites) < 3:
        raise ProtocolViolation("secure aggregation needs at least 3 sites")
    if not 2 <= setup.t <= min(setup.k, len(sites) - 1):
        raise ProtocolViolation(
            f"threshold t={setup.t} must be in [2, min(k, n - 1)] for k={setup.k}, n={len(sites)}"
        )
    if setup.k < len(sites) - 1 and setup.k % 2:
        raise ProtocolViolation(f"a sparse graph needs an even k, got {setup.k}")
    if not 1 <= setup.ring_bits <= 32:
        raise ProtocolViolation(f"ring_bits must be in [1, 32], got {setup.ring_bits}")
    if setup.dimension < 0:
        raise ProtocolViolation(f"dimension must be >= 0, got {setup.dimension}")
    if len(setup.graph_seed) != SEED_BYTES:
        raise ProtocolViolation(f"the graph seed must be {SEED_BYTES} bytes")


def roster_graph(setup: SecAggSetup, roster: Roster) -> CommunicationGraph:
    """The communication graph of a roster: degree ``setup.k`` over the roster's sites
    (the complete graph once ``k >= n - 1``).

    Raises
    ------
    ProtocolViolation
        For a roster of another round, with sites outside the setup, unsorted or
        repeated, or whose keys do not match its sites one to one.
    """
    if (roster.run_id, roster.round_number) != (setup.run_id, setup.round_number):
        raise ProtocolViolation("roster of another run or round")
    sites = roster.sites
    if len(set(sites)) != len(sites) or tuple(sorted(sites)) != tuple(sites):
        raise ProtocolViolation("roster sites must be distinct and sorted")
    if not set(sites) <= set(setup.sites):
        raise ProtocolViolation("roster names sites outside the round's sample")
    if tuple(a.site for a in roster.keys) != sites:
        raise ProtocolViolation("roster keys must match its sites one to one, in order")
    if len(sites) < 2:
        raise ProtocolViolation("roster of fewer than 2 sites")
    return build_graph(sites, setup.k, setup.graph_seed)
