"""The messages of one secure-aggregation round, transport-free frozen dataclasses.

Stage by stage (``->`` site to coordinator, ``<-`` coordinator to site):

0. ``<-`` :class:`SecAggSetup` (run, round, sampled sites, ``k``, ``t``, vector length,
   ring, graph seed).
1. ``->`` :class:`KeyAdvertisement`; ``<-`` :class:`Roster` (all accepted keys).
2. ``->`` :class:`ShareUpload` (one :class:`EncryptedShares` per neighbour);
   ``<-`` :class:`ShareDelivery` (the bundles addressed to the site).
3. ``->`` :class:`MaskedInput` (``uint32``, the only vector a site ever sends).
4. ``<-`` :class:`UnmaskRequest` (survivors and dropped sites); ``->``
   :class:`UnmaskResponse` (:class:`RevealedShare` values).

Every message carries ``run_id`` and ``round_number``; receivers reject a mismatch, so
a message can never be replayed into another round.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

STAGE_ADVERTISE = "advertise_keys"
STAGE_SHARE = "share_keys"
STAGE_MASKED = "masked_input"
STAGE_UNMASK = "unmask"


@dataclass(frozen=True)
class SecAggSetup:
    """What every sampled site needs before stage 1."""

    run_id: str
    round_number: int
    sites: tuple[str, ...]
    k: int
    t: int
    dimension: int
    ring_bits: int
    graph_seed: bytes


@dataclass(frozen=True)
class KeyAdvertisement:
    """A site's two X25519 public keys and its commitment to its self-mask seed
    (``SHA-256`` of the seed and its context: public, and lets the coordinator verify
    the rebuilt seed)."""

    run_id: str
    round_number: int
    site: str
    encryption_key: bytes
    mask_key: bytes
    seed_commitment: bytes


@dataclass(frozen=True)
class Roster:
    """The sites whose keys were accepted (sorted), with their advertisements; with the
    setup's ``k`` and graph seed it fixes the communication graph."""

    run_id: str
    round_number: int
    sites: tuple[str, ...]
    keys: tuple[KeyAdvertisement, ...]


@dataclass(frozen=True)
class EncryptedShares:
    """The AES-GCM bundle of ``sender``'s two Shamir shares for ``receiver``."""

    run_id: str
    round_number: int
    sender: str
    receiver: str
    ciphertext: bytes


@dataclass(frozen=True)
class ShareUpload:
    """Stage 2, site to coordinator: one bundle per neighbour."""

    run_id: str
    round_number: int
    site: str
    bundles: tuple[EncryptedShares, ...]


@dataclass(frozen=True)
class ShareDelivery:
    """Stage 2, coordinator to site: the bundles addressed to ``site``; their senders are
    the neighbours the site masks with."""

    run_id: str
    round_number: int
    site: str
    bundles: tuple[EncryptedShares, ...]


@dataclass(frozen=True, eq=False)
class MaskedInput:
    """Stage 3: ``values`` = quantized update + self mask + signed pairwise masks, a
    flat ``uint32`` vector modulo ``2^ring_bits``."""

    run_id: str
    round_number: int
    site: str
    values: np.ndarray


@dataclass(frozen=True)
class UnmaskRequest:
    """Stage 4: who sent a masked input (``survivors``) and who sent shares but no
    masked input (``dropped``)."""

    run_id: str
    round_number: int
    survivors: tuple[str, ...]
    dropped: tuple[str, ...]


@dataclass(frozen=True)
class RevealedShare:
    """One share a site held for ``owner``: ``x`` is the holder's index, ``y`` the
    share values (see :class:`strategies.secagg.shamir.Share`)."""

    owner: str
    x: int
    y: bytes


@dataclass(frozen=True)
class UnmaskResponse:
    """Stage 4, site to coordinator: self-mask-seed shares of surviving neighbours and
    mask-key shares of dropped neighbours (never both for one owner)."""

    run_id: str
    round_number: int
    site: str
    seed_shares: tuple[RevealedShare, ...]
    key_shares: tuple[RevealedShare, ...]


@dataclass(frozen=True)
class StageRecord:
    """Who went through one stage (``survivors``), who did not (``dropped``, rejected
    sites included) and why each rejected site was rejected."""

    stage: str
    survivors: tuple[str, ...]
    dropped: tuple[str, ...]
    rejected: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, eq=False)
class SecAggResult:
    """The unmasked sum: ``total`` is ``sum_{u in survivors} x_u mod 2^ring_bits``
    (``uint32``), ``count = len(survivors)``; ``stages`` is the per-stage ledger."""

    total: np.ndarray
    survivors: tuple[str, ...]
    count: int
    k: int
    t: int
    complete_graph: bool
    stages: tuple[StageRecord, ...]
