"""The site's side of secure aggregation (SecAgg+): its update leaves it masked.

A fit task that carries ``TaskHeader.secagg.setup`` starts a round attempt: the site
trains as usual, then encodes its update into the round's vector (weighted delta,
clipped to the range, quantized with stochastic rounding from a CSPRNG; see
:mod:`strategies.secagg.vector`) followed, when the round asks for a pooled data
histogram, by its histogram as exact integers, makes fresh X25519 keys and answers with
them instead of the update. The next tasks of the attempt (kind ``SECAGG``) carry the roster, the
shares addressed to the site and the unmask request; :class:`SecAggSite` answers each
with :class:`strategies.secagg.client.SecAggClient`, which checks every message and never
reveals both shares of one peer. The masked vector is the only vector the site sends.

Only the newest attempt is kept: a new setup discards the previous attempt's secrets,
and a site that restarted has none, so it answers the later stages of an attempt it
does not know with an error (the coordinator counts it as dropped).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from client_sdk.api import Arrays, FitResult
from client_sdk.errors import ClientError
from protos.codec import EncodedPayload, encode
from protos.fedcoord.v1 import fleet_pb2, secagg_pb2
from strategies.histogram import HistogramSpec
from strategies.secagg import QuantizationConfig, SecAggClient, check_no_overflow
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
from strategies.secagg.vector import MASKED_TENSOR, VectorLayout, encode_update

STAGE_OF_TASK = {
    "roster": STAGE_SHARE,
    "delivery": STAGE_MASKED,
    "unmask": STAGE_UNMASK,
}
"""Protocol stage a site enters with each kind of stage task (the fit task enters
``advertise_keys``)."""


@dataclass
class _Attempt:
    session: str
    client: SecAggClient
    vector: np.ndarray


def read_setup(
    run_id: str, round_number: int, msg: secagg_pb2.SecAggSetup, histogram: int = 0
) -> SecAggSetup:
    """The protocol setup of a fit task (``histogram``: length of the vector's histogram
    tail, which the round config's pooled histogram layout gives)."""
    return SecAggSetup(
        run_id=run_id,
        round_number=int(round_number),
        sites=tuple(msg.sites),
        k=int(msg.k),
        t=int(msg.t),
        dimension=VectorLayout(_layout(msg), histogram).dimension,
        ring_bits=int(msg.ring_bits),
        graph_seed=bytes(msg.graph_seed),
    )


def _layout(msg: secagg_pb2.SecAggSetup) -> tuple[tuple[str, str, tuple[int, ...]], ...]:
    return tuple((t.name, t.dtype, tuple(int(s) for s in t.shape)) for t in msg.layout)


def _bundles(
    run_id: str, round_number: int, msg: secagg_pb2.SecAggShares
) -> tuple[EncryptedShares, ...]:
    return tuple(
        EncryptedShares(run_id, round_number, b.sender, b.receiver, bytes(b.ciphertext))
        for b in msg.bundles
    )


def shares_message(upload: ShareUpload) -> secagg_pb2.SecAggShares:
    return secagg_pb2.SecAggShares(
        bundles=[
            secagg_pb2.SecAggBundle(sender=b.sender, receiver=b.receiver, ciphertext=b.ciphertext)
            for b in upload.bundles
        ]
    )


def keys_message(advert: KeyAdvertisement) -> secagg_pb2.SecAggKeys:
    return secagg_pb2.SecAggKeys(
        encryption_key=advert.encryption_key,
        mask_key=advert.mask_key,
        seed_commitment=advert.seed_commitment,
    )


def read_roster(run_id: str, round_number: int, msg: secagg_pb2.SecAggRoster) -> Roster:
    adverts = tuple(
        KeyAdvertisement(
            run_id,
            round_number,
            s.site,
            bytes(s.keys.encryption_key),
            bytes(s.keys.mask_key),
            bytes(s.keys.seed_commitment),
        )
        for s in msg.sites
    )
    return Roster(run_id, round_number, tuple(a.site for a in adverts), adverts)


def unmask_message(response: UnmaskResponse) -> secagg_pb2.SecAggUnmaskResponse:
    def revealed(shares: tuple[RevealedShare, ...]) -> list[secagg_pb2.SecAggRevealedShare]:
        return [secagg_pb2.SecAggRevealedShare(owner=s.owner, x=s.x, y=s.y) for s in shares]

    return secagg_pb2.SecAggUnmaskResponse(
        seed_shares=revealed(response.seed_shares), key_shares=revealed(response.key_shares)
    )


class SecAggSite:
    """One site's secure-aggregation attempts (see the module docstring)."""

    def __init__(self, site_id: str):
        self.site_id = site_id
        self._attempt: _Attempt | None = None

    def begin(
        self,
        header: fleet_pb2.TaskHeader,
        received: Arrays,
        result: FitResult,
        histogram: tuple[HistogramSpec, np.ndarray] | None = None,
    ) -> secagg_pb2.SecAggReply:
        """Encode the trained update (and ``histogram``: the round's pooled histogram
        layout and this site's vector in it) into the round's vector and advertise fresh
        keys.

        Raises
        ------
        ClientError
            When the setup is unusable or the update does not fit its layout.
        strategies.secagg.SecAggError
            For a setup the protocol forbids.
        """
        task = header.secagg
        msg = task.setup
        self._attempt = None  # whatever happens, the previous attempt's secrets go
        tail = 0 if histogram is None else histogram[0].size
        setup = read_setup(header.run_id, header.round, msg, tail)
        try:
            config = QuantizationConfig(msg.clip_range, int(msg.levels), int(msg.ring_bits))
            check_no_overflow(len(setup.sites), config.levels, config.ring_bits)
            if histogram is not None:
                histogram[0].check_ring(len(setup.sites), config.ring_bits)
            quantized = encode_update(
                result.arrays,
                received,
                VectorLayout(_layout(msg), tail),
                config,
                num_examples=int(result.num_examples),
                max_examples=msg.max_examples or None,
                l2_clip=msg.l2_clip or None,
                histogram=None if histogram is None else histogram[1],
            )
        except ValueError as exc:
            raise ClientError(f"cannot encode the update for secure aggregation: {exc}") from None
        client = SecAggClient(self.site_id, setup)
        advert = client.advertise_keys()
        self._attempt = _Attempt(task.session, client, quantized.values)
        return secagg_pb2.SecAggReply(session=task.session, keys=keys_message(advert))

    def stage(self, header: fleet_pb2.TaskHeader) -> str:
        """The protocol stage a stage task asks for (``ClientError`` for an unknown one)."""
        kind = header.secagg.WhichOneof("stage")
        if kind not in STAGE_OF_TASK:
            raise ClientError(f"unknown secure-aggregation stage task {kind!r}")
        return STAGE_OF_TASK[kind]

    def answer(
        self, header: fleet_pb2.TaskHeader
    ) -> tuple[secagg_pb2.SecAggReply, EncodedPayload | None]:
        """The reply to one stage task, and the masked-vector payload for that stage.

        Raises
        ------
        ClientError
            For a task of an attempt this site does not hold (e.g. after a restart).
        strategies.secagg.SecAggError
            For a message the protocol forbids (nothing is revealed then).
        """
        task = header.secagg
        attempt = self._attempt
        if attempt is None or attempt.session != task.session:
            raise ClientError(
                f"no secure-aggregation state for session {task.session[:16]!r} "
                "(this site did not start that attempt, or restarted since)"
            )
        run_id, round_number = header.run_id, int(header.round)
        reply = secagg_pb2.SecAggReply(session=task.session)
        kind = task.WhichOneof("stage")
        if kind == "roster":
            upload = attempt.client.share_keys(read_roster(run_id, round_number, task.roster))
            reply.shares.CopyFrom(shares_message(upload))
            return reply, None
        if kind == "delivery":
            delivery = ShareDelivery(
                run_id, round_number, self.site_id, _bundles(run_id, round_number, task.delivery)
            )
            masked: MaskedInput = attempt.client.masked_input(delivery, attempt.vector)
            attempt.vector = np.empty(0, dtype=np.uint32)  # the plain vector is no longer needed
            reply.masked_input = True
            return reply, encode({MASKED_TENSOR: masked.values})
        if kind == "unmask":
            request = UnmaskRequest(
                run_id, round_number, tuple(task.unmask.survivors), tuple(task.unmask.dropped)
            )
            reply.unmask.CopyFrom(unmask_message(attempt.client.unmask(request)))
            return reply, None
        raise ClientError(f"unknown secure-aggregation stage task {kind!r}")
