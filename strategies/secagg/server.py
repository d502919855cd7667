"""The coordinator's side of a secure-aggregation round, as a state machine.

::

    server = SecAggServer(run_id, round_number, sampled, k=k, t=t, dimension=d)
    setup = server.setup                            # -> every sampled site
    roster = server.receive_keys(adverts)           # -> every site in the roster
    deliveries = server.receive_shares(uploads)     # deliveries[site] -> site
    for m in masked_inputs: server.add_masked_input(m)   # streamed, O(d) memory
    request = server.unmask_request()               # -> every survivor
    result = server.receive_unmask(responses)       # the ring sum of the survivors

Survivor sets: ``U1`` advertised valid keys, ``U2`` uploaded well-formed shares, ``U3``
sent a masked input, ``U4`` answered the unmask request. Each stage needs at least ``t``
sites (and every secret to rebuild needs ``t`` shares), otherwise the round aborts with
:class:`SecAggAborted` and releases nothing: the accumulator of masked inputs is wiped.

What the server holds: public keys, commitments, routing of ciphertexts it cannot read,
and one ``uint32`` accumulator into which each masked input is added on arrival (the
masked vector itself is not kept). The self masks of ``U3`` and the pairwise masks
between ``U3`` and the dropped sites ``U2 - U3`` come off that accumulator only after
every needed secret has been rebuilt and verified (seeds against their commitments, mask
keys against their public keys), in one cache-blocked pass per mask family.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from strategies.secagg.errors import (
    InvalidMessage,
    InvalidPublicKey,
    ProtocolViolation,
    ReconstructionError,
    SecAggAborted,
    ShamirError,
)
from strategies.secagg.graph import CommunicationGraph
from strategies.secagg.keys import check_public_key, public_from_private
from strategies.secagg.messages import (
    STAGE_ADVERTISE,
    STAGE_MASKED,
    STAGE_SHARE,
    STAGE_UNMASK,
    EncryptedShares,
    KeyAdvertisement,
    MaskedInput,
    Roster,
    SecAggResult,
    SecAggSetup,
    ShareDelivery,
    ShareUpload,
    StageRecord,
    UnmaskRequest,
    UnmaskResponse,
)
from strategies.secagg.prg import SEED_BYTES, add_masks
from strategies.secagg.protocol import (
    SHARE_BYTES,
    check_setup,
    mask_shared_secret,
    mask_sign,
    pair_context,
    pairwise_seed,
    roster_graph,
    seed_commitment,
    self_context,
)
from strategies.secagg.shamir import Share, reconstruct_many

MAX_CIPHERTEXT_BYTES = 1024
"""Upper bound on one encrypted share bundle (the real ones are 172 bytes)."""


class SecAggServer:
    """The coordinator's state for one round (see the module docstring).

    Parameters
    ----------
    run_id, round_number
        Bind every message and every derived key to this round.
    sites
        The sampled sites (``U0``).
    k, t
        Graph degree and Shamir threshold (e.g. from
        :func:`strategies.secagg.params.choose_parameters`); ``2 <= t <= k``.
    dimension
        Length of the flat ``uint32`` vectors.
    ring_bits
        Sums are modulo ``2^ring_bits``.
    graph_seed
        32 bytes that place the sites on the Harary ring; fresh ``os.urandom`` bytes by
        default (pass the value from a seeded CSPRNG for a reproducible simulation).
    """

    def __init__(
        self,
        run_id: str,
        round_number: int,
        sites: Iterable[str],
        *,
        k: int,
        t: int,
        dimension: int,
        ring_bits: int = 32,
        graph_seed: bytes | None = None,
    ) -> None:
        self.setup = SecAggSetup(
            run_id=run_id,
            round_number=int(round_number),
            sites=tuple(sorted(sites)),
            k=int(k),
            t=int(t),
            dimension=int(dimension),
            ring_bits=int(ring_bits),
            graph_seed=os.urandom(SEED_BYTES) if graph_seed is None else graph_seed,
        )
        check_setup(self.setup)
        self._stage = STAGE_ADVERTISE
        self._stages: list[StageRecord] = []
        self._adverts: dict[str, KeyAdvertisement] = {}
        self._graph: CommunicationGraph | None = None
        self._u2: tuple[str, ...] = ()
        self._partners: dict[str, frozenset[str]] = {}
        self._received: set[str] = set()
        self._stage_rejected: dict[str, str] = {}
        self._acc: np.ndarray | None = None
        self._u3: tuple[str, ...] = ()
        self._dropped: tuple[str, ...] = ()

    # -- bookkeeping ----------------------------------------------------------------

    @property
    def stages(self) -> tuple[StageRecord, ...]:
        """Per-stage survivors, dropped and rejected sites so far (for the ledger)."""
        return tuple(self._stages)

    @property
    def graph(self) -> CommunicationGraph | None:
        """The communication graph, once the roster is fixed."""
        return self._graph

    def _expect(self, stage: str) -> None:
        if self._stage == "aborted":
            raise ProtocolViolation("the round was aborted")
        if self._stage != stage:
            raise ProtocolViolation(f"expected stage {stage}, the round is at {self._stage}")

    def _same_round(self, run_id: str, round_number: int) -> bool:
        return (run_id, round_number) == (self.setup.run_id, self.setup.round_number)

    def _record(
        self,
        stage: str,
        before: Iterable[str],
        survivors: Iterable[str],
        rejected: dict[str, str],
    ) -> tuple[str, ...]:
        alive = tuple(sorted(survivors))
        dropped = tuple(sorted(set(before) - set(alive)))
        self._stages.append(StageRecord(stage, alive, dropped, tuple(sorted(rejected.items()))))
        return alive

    def abort(self, stage: str, reason: str, detail: str) -> SecAggAborted:
        """End the round without releasing anything (e.g. below the caller's quorum); the
        error to raise."""
        return self._abort(stage, reason, detail)

    def _abort(self, stage: str, reason: str, detail: str) -> SecAggAborted:
        if self._acc is not None:
            self._acc.fill(0)  # nothing partial survives an abort
        self._acc = None
        self._stage = "aborted"
        return SecAggAborted(stage, reason, detail)

    def _need(self, stage: str, count: int, what: str) -> None:
        if count < self.setup.t:
            raise self._abort(
                stage, "below_threshold", f"{count} {what}, fewer than t={self.setup.t}"
            )

    # -- stage 1 --------------------------------------------------------------------

    def receive_keys(self, adverts: Iterable[KeyAdvertisement]) -> Roster:
        """Close stage 1: accept well-formed advertisements of sampled sites, reject
        repeated sites, malformed or low-order keys and keys seen twice; fix ``U1`` and
        the graph.

        Raises
        ------
        SecAggAborted
            When the graph over ``U1`` gives a site fewer than ``t`` neighbours.
        """
        self._expect(STAGE_ADVERTISE)
        s = self.setup
        rejected: dict[str, str] = {}
        accepted: dict[str, KeyAdvertisement] = {}
        for a in adverts:
            if not self._same_round(a.run_id, a.round_number) or a.site not in s.sites:
                rejected[str(a.site)] = "wrong_round_or_site"
            elif a.site in accepted or a.site in rejected:
                rejected[a.site] = "duplicate_message"
            else:
                try:
                    check_public_key(a.encryption_key, a.site)
                    check_public_key(a.mask_key, a.site)
                except InvalidPublicKey:
                    rejected[a.site] = "invalid_public_key"
                    continue
                if len(a.seed_commitment) != 32:
                    rejected[a.site] = "bad_commitment"
                    continue
                accepted[a.site] = a
        for site in [x for x in rejected if x in accepted]:
            del accepted[site]
        uses = Counter(key for a in accepted.values() for key in (a.encryption_key, a.mask_key))
        for a in list(accepted.values()):
            if uses[a.encryption_key] > 1 or uses[a.mask_key] > 1:
                rejected[a.site] = "duplicate_public_key"
                del accepted[a.site]
        u1 = self._record(STAGE_ADVERTISE, s.sites, accepted, rejected)
        if len(u1) <= s.t:
            raise self._abort(
                STAGE_ADVERTISE,
                "below_threshold",
                f"{len(u1)} sites left: each needs t={s.t} neighbours",
            )
        roster = Roster(s.run_id, s.round_number, u1, tuple(accepted[x] for x in u1))
        self._adverts, self._graph = dict(accepted), roster_graph(s, roster)
        self._stage = STAGE_SHARE
        return roster

    # -- stage 2 --------------------------------------------------------------------

    def receive_shares(self, uploads: Iterable[ShareUpload]) -> dict[str, ShareDelivery]:
        """Close stage 2: accept uploads with exactly one bundle per neighbour, fix
        ``U2`` and route the bundles among ``U2`` (a site's partners are its
        neighbours in ``U2``).

        Raises
        ------
        SecAggAborted
            For fewer than ``t`` sites in ``U2``.
        """
        self._expect(STAGE_SHARE)
        assert self._graph is not None
        s, graph = self.setup, self._graph
        rejected: dict[str, str] = {}
        accepted: dict[str, ShareUpload] = {}
        for up in uploads:
            site = up.site
            if not self._same_round(up.run_id, up.round_number) or site not in self._adverts:
                rejected[str(site)] = "wrong_round_or_site"
            elif site in accepted or site in rejected:
                rejected[site] = "duplicate_message"
                accepted.pop(site, None)
            elif not self._well_formed(up, graph.of(site)):
                rejected[site] = "malformed_shares"
            else:
                accepted[site] = up
        u2 = self._record(STAGE_SHARE, self._adverts, accepted, rejected)
        self._need(STAGE_SHARE, len(u2), "sites shared keys")
        members = set(u2)
        self._u2 = u2
        self._partners = {u: graph.of(u) & members for u in u2}
        inbox: dict[str, list[EncryptedShares]] = {u: [] for u in u2}
        for u in u2:
            for b in accepted[u].bundles:
                if b.receiver in members:
                    inbox[b.receiver].append(b)
        self._stage = STAGE_MASKED
        return {
            u: ShareDelivery(s.run_id, s.round_number, u, tuple(sorted(inbox[u], key=_by_sender)))
            for u in u2
        }

    def _well_formed(self, up: ShareUpload, neighbours: frozenset[str]) -> bool:
        receivers = [b.receiver for b in up.bundles]
        return (
            len(receivers) == len(neighbours)
            and set(receivers) == neighbours
            and all(
                b.sender == up.site
                and self._same_round(b.run_id, b.round_number)
                and 0 < len(b.ciphertext) <= MAX_CIPHERTEXT_BYTES
                for b in up.bundles
            )
        )

    # -- stage 3 --------------------------------------------------------------------

    def add_masked_input(self, message: MaskedInput) -> None:
        """Stage 3, one message at a time: add a masked vector into the accumulator
        (``uint32``, wrapping) and forget it.

        Raises
        ------
        InvalidMessage
            For another round, a site outside ``U2`` or with fewer than ``t`` partners,
            a repeated site, or a vector of the wrong dtype, shape or range; the site is
            then treated as dropped.
        """
        self._expect(STAGE_MASKED)
        s = self.setup
        site = message.site
        reason = None
        values = message.values
        if not self._same_round(message.run_id, message.round_number) or site not in self._u2:
            reason = "wrong_round_or_site"
        elif site in self._received or site in self._stage_rejected:
            # the first message stands (added, or rejected); a repeat changes nothing
            raise InvalidMessage(f"masked input of {site!r} rejected: duplicate_message")
        elif len(self._partners[site]) < s.t:
            reason = "too_few_partners"
        elif (
            not isinstance(values, np.ndarray)
            or values.dtype != np.uint32
            or values.shape != (s.dimension,)
        ):
            reason = "bad_vector"
        elif s.ring_bits < 32 and values.size and int(values.max()) >> s.ring_bits:
            reason = "out_of_ring"
        if reason is not None:
            if site in self._u2:
                self._stage_rejected[site] = reason
            raise InvalidMessage(f"masked input of {site!r} rejected: {reason}")
        if self._acc is None:
            self._acc = np.zeros(s.dimension, dtype=np.uint32)
        np.add(self._acc, values, out=self._acc)
        self._received.add(site)

    def unmask_request(self) -> UnmaskRequest:
        """Close stage 3: fix ``U3`` (survivors) and the dropped sites ``U2 - U3``.

        Raises
        ------
        SecAggAborted
            For fewer than ``t`` survivors.
        """
        self._expect(STAGE_MASKED)
        s = self.setup
        u3 = self._record(STAGE_MASKED, self._u2, self._received, self._stage_rejected)
        self._need(STAGE_MASKED, len(u3), "masked inputs")
        self._u3 = u3
        self._dropped = tuple(sorted(set(self._u2) - set(u3)))
        self._stage = STAGE_UNMASK
        if self._acc is None:
            self._acc = np.zeros(s.dimension, dtype=np.uint32)
        return UnmaskRequest(s.run_id, s.round_number, u3, self._dropped)

    # -- stage 4 --------------------------------------------------------------------

    def receive_unmask(self, responses: Iterable[UnmaskResponse]) -> SecAggResult:
        """Close stage 4: rebuild the self-mask seeds of ``U3`` and the mask keys of the
        dropped sites, verify them, remove every mask and return the sum.

        Raises
        ------
        SecAggAborted
            For fewer than ``t`` responses, a secret with fewer than ``t`` shares, or
            shares that rebuild an inconsistent or unverifiable secret.
        """
        self._expect(STAGE_UNMASK)
        assert self._graph is not None and self._acc is not None
        s, graph = self.setup, self._graph
        survivors, dropped = set(self._u3), set(self._dropped)
        rejected: dict[str, str] = {}
        accepted: dict[str, UnmaskResponse] = {}
        for r in responses:
            if not self._same_round(r.run_id, r.round_number) or r.site not in survivors:
                rejected[str(r.site)] = "wrong_round_or_site"
            elif r.site in accepted or r.site in rejected:
                rejected[r.site] = "duplicate_message"
                accepted.pop(r.site, None)
            elif not self._valid_response(r, graph.index(r.site), survivors, dropped):
                rejected[r.site] = "malformed_response"
            else:
                accepted[r.site] = r
        u4 = self._record(STAGE_UNMASK, self._u3, accepted, rejected)
        self._need(STAGE_UNMASK, len(u4), "unmask responses")
        seed_sets: dict[str, list[Share]] = {u: [] for u in self._u3}
        # only dropped sites with a surviving partner left a mask to remove
        needed = [v for v in self._dropped if self._partners[v] & survivors]
        key_sets: dict[str, list[Share]] = {v: [] for v in needed}
        for site in u4:
            for sh in accepted[site].seed_shares:
                seed_sets[sh.owner].append(Share(sh.x, sh.y))
            for sh in accepted[site].key_shares:
                if sh.owner in key_sets:
                    key_sets[sh.owner].append(Share(sh.x, sh.y))
        short = [o for o, shares in {**seed_sets, **key_sets}.items() if len(shares) < s.t]
        if short:
            raise self._abort(
                STAGE_UNMASK, "too_few_shares", f"fewer than t={s.t} shares for {short}"
            )
        try:
            seeds = reconstruct_many([seed_sets[u] for u in self._u3], s.t)
            keys = reconstruct_many([key_sets[v] for v in needed], s.t)
        except (ShamirError, ReconstructionError) as exc:
            raise self._abort(STAGE_UNMASK, "reconstruction_failed", str(exc)) from exc
        for u, seed in zip(self._u3, seeds, strict=True):
            if seed_commitment(s.run_id, s.round_number, u, seed) != (
                self._adverts[u].seed_commitment
            ):
                raise self._abort(
                    STAGE_UNMASK, "reconstruction_failed", f"self-mask seed of {u} is wrong"
                )
        for v, key in zip(needed, keys, strict=True):
            if public_from_private(key) != self._adverts[v].mask_key:
                raise self._abort(
                    STAGE_UNMASK, "reconstruction_failed", f"mask key of {v} is wrong"
                )
        acc = self._acc
        add_masks(acc, [(seed, -1) for seed in seeds], self_context(s.run_id, s.round_number))
        pair_masks = []
        for v, key in zip(needed, keys, strict=True):
            sk = X25519PrivateKey.from_private_bytes(key)
            for u in sorted(self._partners[v] & survivors):
                shared = mask_shared_secret(sk, self._adverts[u].mask_key, u)
                seed = pairwise_seed(shared, s.run_id, s.round_number, u, v)
                pair_masks.append((seed, -mask_sign(u, v)))  # u added sign(u, v) * PRG

        add_masks(acc, pair_masks, pair_context(s.run_id, s.round_number))
        if s.ring_bits < 32:
            acc &= np.uint32((1 << s.ring_bits) - 1)
        self._acc = None
        self._stage = "done"
        return SecAggResult(
            total=acc,
            survivors=self._u3,
            count=len(self._u3),
            k=graph.k,
            t=s.t,
            complete_graph=graph.complete,
            stages=self.stages,
        )

    def _valid_response(
        self, r: UnmaskResponse, holder_x: int, survivors: set[str], dropped: set[str]
    ) -> bool:
        partners = self._partners[r.site]
        owners = [sh.owner for sh in r.seed_shares] + [sh.owner for sh in r.key_shares]
        return (
            len(set(owners)) == len(owners)  # never two shares for one owner
            and all(sh.owner in partners & survivors for sh in r.seed_shares)
            and all(sh.owner in partners & dropped for sh in r.key_shares)
            and all(
                sh.x == holder_x and len(sh.y) == SHARE_BYTES
                for sh in (*r.seed_shares, *r.key_shares)
            )
        )


def _by_sender(bundle: EncryptedShares) -> str:
    return bundle.sender
