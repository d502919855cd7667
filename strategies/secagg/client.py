"""The site's side of a secure-aggregation round, as a state machine.

One :class:`SecAggClient` per site and round, driven stage by stage::

    client = SecAggClient("hospital-a", setup)
    advert = client.advertise_keys()                  # -> coordinator
    upload = client.share_keys(roster)                # roster <- coordinator
    masked = client.masked_input(delivery, q.values)  # delivery <- coordinator
    reply = client.unmask(request)                    # request <- coordinator

The client never trusts the coordinator's lists blindly: it checks the round of every
message, its own keys in the roster, every public key (length, low order, duplicates),
that it has at least ``t`` partners before masking, and that an unmask request names it
as a survivor, has at least ``t`` survivors and classifies every partner. Above all, it
never reveals both the self-mask-seed share and the mask-key share of one peer, across
any number of requests (:class:`ProtocolViolation` instead).
"""

from __future__ import annotations

import os

import numpy as np

from strategies.secagg.errors import ProtocolViolation, SecAggAborted
from strategies.secagg.graph import CommunicationGraph
from strategies.secagg.keys import (
    PURPOSE_SHARES,
    KeyPair,
    check_distinct,
    decrypt,
    derive_key,
    encrypt,
    generate_keypair,
    share_associated_data,
    shared_secret,
)
from strategies.secagg.messages import (
    STAGE_MASKED,
    STAGE_SHARE,
    STAGE_UNMASK,
    EncryptedShares,
    KeyAdvertisement,
    MaskedInput,
    RevealedShare,
    Roster,
    SecAggSetup,
    ShareDelivery,
    ShareUpload,
    UnmaskRequest,
    UnmaskResponse,
)
from strategies.secagg.prg import SEED_BYTES, add_masks
from strategies.secagg.protocol import (
    check_setup,
    decode_bundle,
    encode_bundle,
    mask_shared_secret,
    mask_sign,
    pair_context,
    pairwise_seed,
    roster_graph,
    seed_commitment,
    self_context,
)
from strategies.secagg.shamir import Share, split

_SEED = "seed"
_KEY = "key"


class SecAggClient:
    """One site's state for one round (see the module docstring).

    Parameters
    ----------
    site
        This site's id (must be in ``setup.sites``).
    setup
        The round's setup from the coordinator.
    self_seed
        The self-mask seed, for reproducible tests only; by default 32 fresh bytes from
        ``os.urandom``.
    """

    def __init__(self, site: str, setup: SecAggSetup, *, self_seed: bytes | None = None):
        check_setup(setup)
        if site not in setup.sites:
            raise ProtocolViolation(f"site {site!r} is not sampled in this round")
        self.site = site
        self.setup = setup
        self._stage = "new"
        self._seed = os.urandom(SEED_BYTES) if self_seed is None else self_seed
        if len(self._seed) != SEED_BYTES:
            raise ValueError(f"the self-mask seed must be {SEED_BYTES} bytes")
        self._enc: KeyPair | None = None
        self._mask: KeyPair | None = None
        self._graph: CommunicationGraph | None = None
        self._enc_shared: dict[str, bytes] = {}
        self._mask_shared: dict[str, bytes] = {}
        self._held_seed: dict[str, Share] = {}
        self._held_key: dict[str, Share] = {}
        self._partners: tuple[str, ...] = ()
        self._revealed: dict[str, str] = {}

    # -- helpers --------------------------------------------------------------------

    def _expect(self, stage: str) -> None:
        if self._stage != stage:
            raise ProtocolViolation(
                f"site {self.site}: called out of order (state {self._stage}, needs {stage})"
            )

    def _check_round(self, run_id: str, round_number: int, what: str) -> None:
        if (run_id, round_number) != (self.setup.run_id, self.setup.round_number):
            raise ProtocolViolation(f"{what} of another run or round")

    @property
    def partners(self) -> tuple[str, ...]:
        """Neighbours whose shares arrived: the sites this site masked with."""
        return self._partners

    # -- stage 1 --------------------------------------------------------------------

    def advertise_keys(self) -> KeyAdvertisement:
        """Stage 1: fresh encryption and mask key pairs, and the seed commitment."""
        self._expect("new")
        self._enc, self._mask = generate_keypair(), generate_keypair()
        self._stage = STAGE_SHARE
        s = self.setup
        return KeyAdvertisement(
            run_id=s.run_id,
            round_number=s.round_number,
            site=self.site,
            encryption_key=self._enc.public,
            mask_key=self._mask.public,
            seed_commitment=seed_commitment(s.run_id, s.round_number, self.site, self._seed),
        )

    # -- stage 2 --------------------------------------------------------------------

    def share_keys(self, roster: Roster) -> ShareUpload:
        """Stage 2: check the roster, split the self-mask seed and the mask secret key
        among the neighbours and encrypt each neighbour's pair of shares to it.

        Raises
        ------
        ProtocolViolation
            For a roster of another round, without this site, or not carrying this
            site's own keys.
        InvalidPublicKey, DuplicatePublicKey
            For a low-order, malformed or repeated key in the roster.
        SecAggAborted
            When this site has fewer than ``t`` neighbours.
        """
        self._expect(STAGE_SHARE)
        assert self._enc is not None and self._mask is not None
        s = self.setup
        graph = roster_graph(s, roster)
        adverts = {a.site: a for a in roster.keys}
        mine = adverts.get(self.site)
        if mine is None:
            raise ProtocolViolation(f"site {self.site} is missing from the roster")
        if (mine.encryption_key, mine.mask_key) != (self._enc.public, self._mask.public):
            raise ProtocolViolation(f"the roster carries other keys for {self.site}")
        for a in roster.keys:
            self._check_round(a.run_id, a.round_number, "key advertisement")
        check_distinct(
            [(a.site, a.encryption_key) for a in roster.keys]
            + [(a.site, a.mask_key) for a in roster.keys]
        )
        neighbours = sorted(graph.of(self.site))
        if len(neighbours) < s.t:
            raise SecAggAborted(
                STAGE_SHARE,
                "below_threshold",
                f"{self.site} has {len(neighbours)} neighbours, fewer than t={s.t}",
            )
        # Both agreements per neighbour, up front: a low-order key stops the round here,
        # before any share leaves this site.
        enc_shared = {
            v: shared_secret(self._enc.private_key, adverts[v].encryption_key, v)
            for v in neighbours
        }
        mask_shared = {
            v: mask_shared_secret(self._mask.private_key, adverts[v].mask_key, v)
            for v in neighbours
        }
        xs = [graph.index(v) for v in neighbours]
        seed_shares = split(self._seed, s.t, xs)
        key_shares = split(self._mask.private, s.t, xs)
        bundles = []
        for v, seed_share, key_share in zip(neighbours, seed_shares, key_shares, strict=True):
            key = derive_key(
                enc_shared[v],
                purpose=PURPOSE_SHARES,
                run_id=s.run_id,
                round_number=s.round_number,
                first=self.site,
                second=v,
            )
            ad = share_associated_data(s.run_id, s.round_number, self.site, v)
            bundles.append(
                EncryptedShares(
                    run_id=s.run_id,
                    round_number=s.round_number,
                    sender=self.site,
                    receiver=v,
                    ciphertext=encrypt(key, encode_bundle(seed_share, key_share), ad),
                )
            )
        self._graph = graph
        self._enc_shared, self._mask_shared = enc_shared, mask_shared
        self._stage = STAGE_MASKED
        return ShareUpload(s.run_id, s.round_number, self.site, tuple(bundles))

    # -- stage 3 --------------------------------------------------------------------

    def masked_input(self, delivery: ShareDelivery, update: np.ndarray) -> MaskedInput:
        """Stage 3: decrypt and keep the shares addressed to this site, then mask the
        quantized ``update`` (flat ``uint32``, ``setup.dimension`` values below
        ``2^ring_bits``) with the self mask and one pairwise mask per partner.

        Raises
        ------
        ProtocolViolation
            For a delivery of another round or site, a bundle from a non-neighbour or
            repeated, or a bad update.
        ShareDecryptionError
            For a bundle that fails authentication.
        SecAggAborted
            When fewer than ``t`` neighbours sent shares.
        """
        self._expect(STAGE_MASKED)
        assert self._graph is not None and self._enc is not None and self._mask is not None
        s = self.setup
        self._check_round(delivery.run_id, delivery.round_number, "share delivery")
        if delivery.site != self.site:
            raise ProtocolViolation(f"share delivery for {delivery.site}, not {self.site}")
        values = np.asarray(update)
        if values.dtype != np.uint32 or values.shape != (s.dimension,):
            raise ProtocolViolation(
                f"the update must be a flat uint32 vector of length {s.dimension}"
            )
        if s.ring_bits < 32 and values.size and int(values.max()) >> s.ring_bits:
            raise ProtocolViolation(f"update values must be below 2^{s.ring_bits}")
        neighbours = self._graph.of(self.site)
        me = self._graph.index(self.site)
        held_seed: dict[str, Share] = {}
        held_key: dict[str, Share] = {}
        for b in delivery.bundles:
            self._check_round(b.run_id, b.round_number, "share bundle")
            if b.receiver != self.site or b.sender not in neighbours or b.sender in held_seed:
                raise ProtocolViolation(f"unexpected share bundle from {b.sender!r}")
            key = derive_key(
                self._enc_shared[b.sender],
                purpose=PURPOSE_SHARES,
                run_id=s.run_id,
                round_number=s.round_number,
                first=b.sender,
                second=self.site,
            )
            ad = share_associated_data(s.run_id, s.round_number, b.sender, self.site)
            seed_share, key_share = decode_bundle(decrypt(key, b.ciphertext, ad))
            if seed_share.x != me:
                raise ProtocolViolation(f"share from {b.sender} is not addressed to index {me}")
            held_seed[b.sender], held_key[b.sender] = seed_share, key_share
        if len(held_seed) < s.t:
            raise SecAggAborted(
                STAGE_MASKED,
                "below_threshold",
                f"{self.site} received shares from {len(held_seed)} neighbours, fewer than "
                f"t={s.t}: its input would not be protected",
            )
        partners = tuple(sorted(held_seed))
        masked = values.copy()
        add_masks(masked, [(self._seed, 1)], self_context(s.run_id, s.round_number))
        pair_masks = [
            (
                pairwise_seed(self._mask_shared[v], s.run_id, s.round_number, self.site, v),
                mask_sign(self.site, v),
            )
            for v in partners
        ]
        add_masks(masked, pair_masks, pair_context(s.run_id, s.round_number))
        if s.ring_bits < 32:
            masked &= np.uint32((1 << s.ring_bits) - 1)
        self._held_seed, self._held_key, self._partners = held_seed, held_key, partners
        self._stage = STAGE_UNMASK
        return MaskedInput(s.run_id, s.round_number, self.site, masked)

    # -- stage 4 --------------------------------------------------------------------

    def unmask(self, request: UnmaskRequest) -> UnmaskResponse:
        """Stage 4: reveal, for each partner, its self-mask-seed share if it survived or
        its mask-key share if it dropped. Repeating a request is allowed (same answer);
        any request that would reveal the other share of a peer is refused.

        Raises
        ------
        ProtocolViolation
            For a request of another round, overlapping survivors and dropped, not
            naming this site as a survivor, leaving a partner unclassified, or that
            would reveal both shares of one peer. Nothing is revealed then.
        SecAggAborted
            For fewer than ``t`` survivors.
        """
        if self._stage not in (STAGE_UNMASK, "done"):
            raise ProtocolViolation(f"site {self.site}: unmask before its masked input")
        s = self.setup
        self._check_round(request.run_id, request.round_number, "unmask request")
        survivors, dropped = set(request.survivors), set(request.dropped)
        if survivors & dropped:
            raise ProtocolViolation("unmask request lists sites both as survivors and dropped")
        if self.site not in survivors:
            raise ProtocolViolation(f"unmask request does not list {self.site} as a survivor")
        if len(survivors) < s.t:
            raise SecAggAborted(
                STAGE_UNMASK,
                "below_threshold",
                f"{len(survivors)} survivors, fewer than t={s.t}",
            )
        plan: dict[str, str] = {}
        for v in self._partners:
            if v in survivors:
                plan[v] = _SEED
            elif v in dropped:
                plan[v] = _KEY
            else:
                raise ProtocolViolation(f"unmask request does not classify partner {v}")
            if self._revealed.get(v, plan[v]) != plan[v]:
                raise ProtocolViolation(
                    f"refusing to reveal both shares of {v} (it was classified differently "
                    "by an earlier request)"
                )
        self._revealed.update(plan)
        self._stage = "done"
        seed_shares = tuple(
            RevealedShare(v, self._held_seed[v].x, self._held_seed[v].y)
            for v in self._partners
            if plan[v] == _SEED
        )
        key_shares = tuple(
            RevealedShare(v, self._held_key[v].x, self._held_key[v].y)
            for v in self._partners
            if plan[v] == _KEY
        )
        return UnmaskResponse(s.run_id, s.round_number, self.site, seed_shares, key_shares)

    def revealed(self) -> dict[str, str]:
        """Which share (``"seed"`` or ``"key"``) this site has revealed, per peer."""
        return dict(self._revealed)
