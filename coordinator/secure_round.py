"""A round under secure aggregation (SecAgg+): the coordinator learns only the sum.

The stages run over the ordinary Fleet transport, each as one task per site and one
:class:`~coordinator.dispatch.StageCollector`:

1. ``advertise_keys``: the fit task carries the setup (sites, ``k``, ``t``, ring,
   quantization, vector layout, a fresh graph seed; the round config the layout of the
   pooled data histogram, if any); each site trains, encodes its update (and its
   histogram, as exact integers after the quantized part) and answers with fresh
   public keys.
2. ``share_keys``: every site of the roster gets all accepted keys and answers with its
   encrypted Shamir shares, which are routed to their receivers.
3. ``masked_input``: each site gets its shares and streams its masked ``uint32``
   vector, which is added into the server's accumulator on arrival and dropped.
4. ``unmask``: the survivors reveal, per partner, the self-mask-seed share of a
   survivor or the mask-key share of a dropped site; the server rebuilds and removes
   every mask.

``k`` and ``t`` come from :func:`strategies.secagg.params.choose_parameters` for the
round's sampled sites, the configured dropout rate and corrupt fraction. A stage that
leaves too few sites (fewer than ``t``, or fewer survivors than the round's quorum)
aborts the attempt with :class:`~strategies.secagg.SecAggAborted` before anything is
unmasked, so no partial sum is ever released; the engine records the abort and redoes
the round with fresh keys.

What this coordinator holds of a site: its public keys, ciphertexts it cannot read, and
for the length of one ``add`` its masked vector; never an unmasked individual update or
histogram (so, as with updates, it cannot validate one site's histogram: only the sum).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from coordinator.dispatch import (
    Assignment,
    Collector,
    Dispatcher,
    RoundOutcome,
    SiteOutcome,
    StageCollector,
)
from coordinator.experiment import SecureAggregation
from protos.codec import EncodedPayload
from protos.fedcoord.v1 import common_pb2, fleet_pb2, secagg_pb2
from strategies.histogram import HistogramSpec
from strategies.privacy.accountant import LOCAL_DP_METRICS
from strategies.secagg import (
    QuantizationConfig,
    SecAggAborted,
    SecAggServer,
    choose_parameters,
    error_bound,
)
from strategies.secagg.errors import InvalidMessage
from strategies.secagg.messages import (
    STAGE_ADVERTISE,
    STAGE_MASKED,
    STAGE_SHARE,
    STAGE_UNMASK,
    EncryptedShares,
    KeyAdvertisement,
    MaskedInput,
    RevealedShare,
    Roster,
    ShareDelivery,
    ShareUpload,
    UnmaskRequest,
    UnmaskResponse,
)
from strategies.secagg.quantize import max_levels
from strategies.secagg.vector import MASKED_TENSOR, SecureMean, VectorLayout, decode_sum
from strategies.validation import ModelSpec

log = logging.getLogger("fedcoord.secagg")

MIN_SITES = 3
"""The fewest sites a secure sum may have (with two, each learns the other's input)."""

Wait = Callable[[Collector, float], None]
"""Blocks until a collector is complete, its deadline passes or the run halts."""


@dataclass
class SecureRoundPlan:
    """What one attempt needs from the engine."""

    run_id: str
    round_no: int
    selected: list[str]
    config_json: str
    task_payload: EncodedPayload
    reference: Mapping[str, np.ndarray]
    fit_deadline: float
    settings: SecureAggregation
    quorum: int
    dp_clip: float | None = None
    """Client-side DP clip norm ``C``: sites clip to it and quantize with ``r = C``."""
    histogram: HistogramSpec | None = None
    """The pooled data histogram each site appends to its vector (the round config tells
    the sites the same layout)."""


@dataclass
class SecureRoundResult:
    """A finished attempt: the round's outcome (aggregate + ledger fields) and how its
    vectors were laid out and encoded."""

    outcome: RoundOutcome
    layout: VectorLayout
    quantization: QuantizationConfig


@dataclass
class _Stages:
    """Per-stage survivors and dropped sites (with reasons), for the ledger."""

    records: list[dict[str, Any]] = field(default_factory=list)

    def add(
        self,
        stage: str,
        asked: list[str],
        survivors: tuple[str, ...],
        collector: Collector,
        rejected: Mapping[str, str],
        seconds: float,
    ) -> None:
        alive = set(survivors)
        dropped = []
        for site in sorted(set(asked) - alive):
            o = collector.outcomes.get(site)
            if site in rejected:
                reason = f"rejected: {rejected[site]}"
            elif o is None:
                reason = "deadline"
            else:
                reason = o.reason or o.status
            dropped.append({"site": site, "reason": reason})
        self.records.append(
            {
                "stage": stage,
                "survivors": sorted(alive),
                "dropped": dropped,
                "seconds": round(seconds, 4),
            }
        )


def headline(settings: SecureAggregation, dp_clip: float | None) -> str:
    """One line for the progress output: how rounds are securely aggregated."""
    if dp_clip is not None:
        encoding = "sites clip to the DP clip norm, unweighted"
    else:
        encoding = f"clip range {settings.clip_range:g}, " + (
            f"weights min(examples, {settings.max_examples})/{settings.max_examples}"
            if settings.max_examples is not None
            else "unweighted"
        )
    return f"secure aggregation (SecAgg+), ring Z_2^{settings.ring_bits}, {encoding}"


def quantization_for(
    settings: SecureAggregation, sites: int, dp_clip: float | None
) -> QuantizationConfig:
    """The encoding of a round of ``sites`` sampled sites: the configured levels or the
    most that cannot overflow the ring; the clip range, or ``C`` under client-side DP."""
    levels = settings.levels or max_levels(sites, settings.ring_bits)
    clip_range = dp_clip if dp_clip is not None else settings.clip_range
    return QuantizationConfig(clip_range, levels, settings.ring_bits)


class SecureRound:
    """Runs one attempt of a secure round (see the module docstring).

    Parameters
    ----------
    dispatcher
        Shared with the Fleet servicer.
    plan
        The attempt's sites, config, model and settings.
    wait
        The engine's wait (deadline, lost contact, halting).
    halted
        Whether the run or the coordinator is stopping.
    """

    def __init__(
        self,
        dispatcher: Dispatcher,
        plan: SecureRoundPlan,
        wait: Wait,
        halted: Callable[[], bool],
    ):
        self.dispatcher = dispatcher
        self.plan = plan
        self._wait = wait
        self._halted = halted
        self.session = uuid.uuid4().hex
        n, settings = len(plan.selected), plan.settings
        histogram = plan.histogram
        if histogram is not None:
            histogram.check_ring(n, settings.ring_bits)  # the experiment checked the worst case
        self.layout = VectorLayout.of(plan.reference, 0 if histogram is None else histogram.size)
        self.params = choose_parameters(n, settings.dropout_rate, settings.corrupt_fraction)
        self.quantization = quantization_for(settings, n, plan.dp_clip)
        self.server = SecAggServer(
            plan.run_id,
            plan.round_no,
            plan.selected,
            k=self.params.k,
            t=self.params.t,
            dimension=self.layout.dimension,
            ring_bits=plan.settings.ring_bits,
        )
        self.stages = _Stages()
        self._fit_metrics: dict[str, dict[str, float]] = {}
        self._masked_digests: dict[str, str] = {}
        self._stage_seconds: dict[str, float] = {}

    # ledger ---------------------------------------------------------------------------
    def record(self) -> dict[str, Any]:
        """The round's ``secure_aggregation`` ledger field, so far."""
        q = self.quantization
        p = self.params
        return {
            "mode": "secagg" if p.complete else "secagg+",
            "session": self.session,
            "sampled": len(self.plan.selected),
            "k": p.k,
            "t": p.t,
            "complete_graph": p.complete,
            "security_failure": p.security_failure,
            "abort_probability": p.abort_probability,
            "ring_bits": q.ring_bits,
            "levels": q.levels,
            "clip_range": q.clip_range,
            "weighting": "examples" if self._max_examples() else "uniform",
            "max_examples": self._max_examples() or None,
            "error_bound": error_bound(len(self.plan.selected), q),
            "histogram": self._histogram_record(),
            "stages": list(self.stages.records),
        }

    def _histogram_record(self) -> dict[str, Any] | None:
        """The pooled histogram tail of the vectors (``None``: none)."""
        h = self.plan.histogram
        if h is None:
            return None
        return {
            "coordinates": h.size, "labels": h.labels, "features": h.features,
            "bins": h.bins, "encoding": h.encoding, "cap": h.cap, "scale": h.scale,
        }  # fmt: skip

    def _max_examples(self) -> float:
        """The weight bound ``W`` (0: unweighted, as client-side DP needs)."""
        if self.plan.dp_clip is not None or self.plan.settings.max_examples is None:
            return 0.0
        return float(self.plan.settings.max_examples)

    # the attempt -----------------------------------------------------------------------
    def run(self) -> SecureRoundResult:
        """All four stages; the decoded sum and the round's outcome.

        Raises
        ------
        SecAggAborted
            When a stage leaves too few sites; nothing was unmasked.
        """
        plan = self.plan
        roster = self._advertise()
        deliveries = self._share(roster)
        request = self._mask(deliveries)
        result = self._unmask(request)
        summed = decode_sum(result.total, result.count, self.layout, self.quantization)
        accepted = {
            s: SiteOutcome(
                "accepted", 0, self._fit_metrics.get(s, {}), self._masked_digests.get(s, "")
            )
            for s in result.survivors
        }
        dropped, rejected = [], []  # sites whose update is not in the sum, and why
        for rec in self.stages.records:
            for d in rec["dropped"]:
                if d["site"] in accepted:  # vanished at unmask: its update still counts
                    continue
                entry = {"site": d["site"], "reason": f"{rec['stage']}: {d['reason']}"}
                (rejected if d["reason"].startswith("rejected") else dropped).append(entry)
        extra = {
            "clipped_fraction": summed.clipped_fraction,
            "weight_capped_sites": summed.capped_sites,
        }
        if summed.clipped_fraction > 0:
            log.warning(
                "round %d: %.3g%% of the update values lay outside the clip range +-%g and "
                "were clipped (privacy.secure_aggregation.clip_range)",
                plan.round_no,
                100 * summed.clipped_fraction,
                self.quantization.clip_range,
            )
        if summed.capped_sites:
            log.warning(
                "round %d: %d site(s) had more than %g examples; their weight was capped",
                plan.round_no,
                summed.capped_sites,
                self._max_examples(),
            )
        outcome = RoundOutcome(
            aggregator=SecureMean(plan.reference, summed),
            accepted=accepted,
            participants=sorted(result.survivors),
            rejected=sorted(rejected, key=lambda e: e["site"]),
            dropped=sorted(dropped, key=lambda e: e["site"]),
            secure_aggregation={**self.record(), **extra},
            histogram=summed.histogram,
        )
        return SecureRoundResult(outcome, self.layout, self.quantization)

    def _stage(
        self,
        stage: str,
        tasks: Mapping[str, secagg_pb2.SecAggTask],
        deadline: float,
        handler: Callable[[str, fleet_pb2.ResultHeader, Mapping[str, np.ndarray] | None], Any],
        *,
        kind: int = fleet_pb2.TASK_KIND_SECAGG,
        model: EncodedPayload | None = None,
        payload: ModelSpec | None = None,
    ) -> StageCollector:
        """Post one task per site, collect the replies until all answered or the
        deadline, withdraw the tasks."""
        plan = self.plan
        collector = StageCollector(set(tasks), stage, self.session, handler, payload)
        assignments = [
            Assignment(
                uuid.uuid4().hex, site, plan.run_id, plan.round_no, kind, plan.config_json,
                model, deadline, collector, secagg=task,
            )
            for site, task in tasks.items()
        ]  # fmt: skip
        t0 = time.time()
        self.dispatcher.post(assignments)
        try:
            self._wait(collector, deadline)
        finally:
            self.dispatcher.withdraw(assignments)
            self._stage_seconds[stage] = time.time() - t0
        if self._halted():
            raise SecAggAborted(stage, "halted", "the run or the coordinator is stopping")
        return collector

    def _stage_deadline(self) -> float:
        return time.time() + self.plan.settings.stage_timeout_s

    def _advertise(self) -> Roster:
        plan, q = self.plan, self.quantization
        setup = self.server.setup
        msg = secagg_pb2.SecAggSetup(
            sites=list(setup.sites),
            k=setup.k,
            t=setup.t,
            ring_bits=setup.ring_bits,
            graph_seed=setup.graph_seed,
            clip_range=q.clip_range,
            levels=q.levels,
            max_examples=self._max_examples(),
            l2_clip=plan.dp_clip or 0.0,
            layout=[
                common_pb2.TensorSpec(name=name, dtype=dtype, shape=shape)
                for name, dtype, shape in self.layout.tensors
            ],
        )
        task = secagg_pb2.SecAggTask(session=self.session, setup=msg)

        def read(site: str, header: fleet_pb2.ResultHeader, _: Any) -> KeyAdvertisement:
            keys = _reply(header, "keys").keys
            self._fit_metrics[site] = {
                k: v for k, v in header.metrics.items() if k in LOCAL_DP_METRICS
            }
            return KeyAdvertisement(
                plan.run_id, plan.round_no, site, bytes(keys.encryption_key),
                bytes(keys.mask_key), bytes(keys.seed_commitment),
            )  # fmt: skip

        collector = self._stage(
            STAGE_ADVERTISE,
            {s: task for s in plan.selected},
            plan.fit_deadline,
            read,
            kind=fleet_pb2.TASK_KIND_FIT,
            model=plan.task_payload,
        )
        return self._close(
            STAGE_ADVERTISE, collector, lambda r: self.server.receive_keys(r.values())
        )

    def _share(self, roster: Roster) -> dict[str, ShareDelivery]:
        plan = self.plan
        msg = secagg_pb2.SecAggRoster(
            sites=[
                secagg_pb2.SecAggSiteKeys(
                    site=a.site,
                    keys=secagg_pb2.SecAggKeys(
                        encryption_key=a.encryption_key,
                        mask_key=a.mask_key,
                        seed_commitment=a.seed_commitment,
                    ),
                )
                for a in roster.keys
            ]
        )
        task = secagg_pb2.SecAggTask(session=self.session, roster=msg)

        def read(site: str, header: fleet_pb2.ResultHeader, _: Any) -> ShareUpload:
            shares = _reply(header, "shares").shares
            return ShareUpload(plan.run_id, plan.round_no, site, _bundles(plan, shares))

        collector = self._stage(
            STAGE_SHARE, {s: task for s in roster.sites}, self._stage_deadline(), read
        )
        return self._close(STAGE_SHARE, collector, lambda r: self.server.receive_shares(r.values()))

    def _mask(self, deliveries: Mapping[str, ShareDelivery]) -> UnmaskRequest:
        plan = self.plan
        tasks = {
            site: secagg_pb2.SecAggTask(
                session=self.session,
                delivery=secagg_pb2.SecAggShares(
                    bundles=[
                        secagg_pb2.SecAggBundle(
                            sender=b.sender, receiver=b.receiver, ciphertext=b.ciphertext
                        )
                        for b in d.bundles
                    ]
                ),
            )
            for site, d in deliveries.items()
        }
        spec = ModelSpec({MASKED_TENSOR: (np.dtype(np.uint32), (self.layout.dimension,))})

        def add(site: str, header: fleet_pb2.ResultHeader, arrays: Any) -> bool:
            _reply(header, "masked_input")
            self.server.add_masked_input(
                MaskedInput(plan.run_id, plan.round_no, site, arrays[MASKED_TENSOR])
            )
            self._masked_digests[site] = header.update.digest
            return True

        collector = self._stage(STAGE_MASKED, tasks, self._stage_deadline(), add, payload=spec)

        def close(_: Mapping[str, Any]) -> UnmaskRequest:
            request = self.server.unmask_request()
            if len(request.survivors) < plan.quorum:
                raise self.server.abort(
                    STAGE_MASKED,
                    "below_quorum",
                    f"{len(request.survivors)} masked inputs, the round's quorum is {plan.quorum}",
                )
            return request

        return self._close(STAGE_MASKED, collector, close)

    def _unmask(self, request: UnmaskRequest) -> Any:
        plan = self.plan
        task = secagg_pb2.SecAggTask(
            session=self.session,
            unmask=secagg_pb2.SecAggUnmaskRequest(
                survivors=list(request.survivors), dropped=list(request.dropped)
            ),
        )

        def read(site: str, header: fleet_pb2.ResultHeader, _: Any) -> UnmaskResponse:
            msg = _reply(header, "unmask").unmask
            return UnmaskResponse(
                plan.run_id,
                plan.round_no,
                site,
                tuple(RevealedShare(s.owner, int(s.x), bytes(s.y)) for s in msg.seed_shares),
                tuple(RevealedShare(s.owner, int(s.x), bytes(s.y)) for s in msg.key_shares),
            )

        collector = self._stage(
            STAGE_UNMASK, {s: task for s in request.survivors}, self._stage_deadline(), read
        )
        return self._close(
            STAGE_UNMASK, collector, lambda r: self.server.receive_unmask(r.values())
        )

    def _close(self, stage: str, collector: StageCollector, finish: Callable[[Any], Any]) -> Any:
        """Hand the stage's replies to the server and record who survived it."""
        asked = sorted(collector.expected)
        t0 = time.time()
        try:
            value = finish(collector.replies)
        finally:
            record = next((r for r in self.server.stages if r.stage == stage), None)
            survivors = record.survivors if record is not None else ()
            rejected = dict(record.rejected) if record is not None else {}
            rejected.update(collector.rejections())
            seconds = self._stage_seconds.get(stage, 0.0) + time.time() - t0
            self.stages.add(stage, asked, survivors, collector, rejected, seconds)
        return value


def _reply(header: fleet_pb2.ResultHeader, stage: str) -> secagg_pb2.SecAggReply:
    """The result's secure-aggregation reply, which must be of ``stage``."""
    got = header.secagg.WhichOneof("stage") if header.HasField("secagg") else None
    if got != stage:
        raise InvalidMessage(f"expected a {stage} reply, got {got or 'none'}")
    return header.secagg


def _bundles(plan: SecureRoundPlan, msg: secagg_pb2.SecAggShares) -> tuple[EncryptedShares, ...]:
    return tuple(
        EncryptedShares(plan.run_id, plan.round_no, b.sender, b.receiver, bytes(b.ciphertext))
        for b in msg.bundles
    )
