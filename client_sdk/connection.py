"""The site's connection loop: enroll, long-poll tasks, train, push results, repeat.

Sites only dial out. Transient failures (coordinator down or restarting, network
blips) are retried with capped exponential backoff and jitter; the site re-enrolls
after an outage. Ctrl-C (or ``stop.set()``) ends the loop cleanly.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from client_sdk.api import Arrays, Client, Config, EvaluateResult, FitResult
from client_sdk.errors import ClientError, CoordinatorUnavailable, SiteError
from client_sdk.identity import SignedFleet, SiteIdentity
from client_sdk.receipts import ReceiptBook
from client_sdk.secagg import SecAggSite
from protos.codec import EncodedPayload, PayloadAssembler, encode
from protos.errors import PayloadError
from protos.fedcoord.v1 import fleet_pb2, fleet_pb2_grpc
from protos.signing import fleet_method
from protos.wire import chunk_data, passing_bytes, reading_chunks
from strategies.drift import EVAL_PREFIX, PROFILE_BINS, SITE_EVALUATION, profile_settings
from strategies.histogram import HistogramSpec
from strategies.privacy.accountant import LOCAL_DP_METRICS
from strategies.privacy.clipping import CLIENT_CLIP_KEY, clip_update
from strategies.scaffold import CONTROL as SCAFFOLD_CONTROL

log = logging.getLogger("fedcoord.site")

TRANSIENT = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
    }
)
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 4 << 20),
    ("grpc.max_send_message_length", 4 << 20),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
]
MAX_MODEL_BYTES = 1 << 40
MAX_CACHED_MODEL_BYTES = 512 << 20
"""A received model larger than this is let go once a fit has used it (before the
upload), not kept for a later task with the same model: a site then holds one model
(its module) plus its update while uploading, not two."""
TRANSFER_TIMEOUT_S = 3600.0


@dataclass
class Backoff:
    """Capped exponential backoff with full jitter."""

    initial: float = 0.25
    cap: float = 10.0
    attempt: int = 0

    def next_delay(self) -> float:
        self.attempt += 1
        return random.uniform(0, min(self.cap, self.initial * 2**self.attempt))

    def reset(self) -> None:
        self.attempt = 0


@dataclass
class Task:
    header: fleet_pb2.TaskHeader
    arrays: Arrays
    config: Config


def parse_config(text: str) -> Config:
    """The round config: a flat JSON object of scalars."""
    try:
        config = json.loads(text) if text else {}
    except ValueError as exc:
        raise ClientError(f"round config is not valid JSON: {exc}") from None
    if not isinstance(config, dict) or not all(
        isinstance(v, bool | int | float | str) for v in config.values()
    ):
        raise ClientError("round config must be a flat JSON object of scalars")
    return config


def make_channel(
    coordinator: str,
    *,
    insecure: bool,
    root_certificates: bytes | None,
    certificate_chain: bytes | None = None,
    private_key: bytes | None = None,
) -> grpc.Channel:
    if insecure:
        return grpc.insecure_channel(coordinator, options=CHANNEL_OPTIONS)
    creds = grpc.ssl_channel_credentials(root_certificates, private_key, certificate_chain)
    return grpc.secure_channel(coordinator, creds, options=CHANNEL_OPTIONS)


def fleet_stub(channel: grpc.Channel) -> fleet_pb2_grpc.FleetStub:
    """A Fleet stub whose payload streams skip protobuf objects for chunks
    (:mod:`protos.wire`): ``PullTask`` hands each chunk over as a view of the received
    bytes, ``PushResult`` sends pre-encoded chunk messages as they are."""
    stub = fleet_pb2_grpc.FleetStub(channel)
    stub.PullTask = channel.unary_stream(
        fleet_method("PullTask"),
        request_serializer=fleet_pb2.PullTaskRequest.SerializeToString,
        response_deserializer=reading_chunks(fleet_pb2.TaskMessage.FromString),
        _registered_method=True,
    )
    stub.PushResult = channel.stream_unary(
        fleet_method("PushResult"),
        request_serializer=passing_bytes(fleet_pb2.ResultMessage.SerializeToString),
        response_deserializer=fleet_pb2.PushReply.FromString,
        _registered_method=True,
    )
    return stub


class SiteSession:
    """One site's conversation with the coordinator over one channel (``stub``: from
    :func:`fleet_stub`, which its uploads need)."""

    def __init__(
        self,
        client: Client,
        stub: fleet_pb2_grpc.FleetStub,
        site_id: str,
        token: str | None,
        poll_wait_s: int,
        *,
        coordinator_public_key: bytes | None = None,
        receipts_path: Path | None = None,
        identity: SiteIdentity | None = None,
        coordinator_key_path: Path | None = None,
    ):
        self.client = client
        self.identity = identity or SiteIdentity.generate()
        """The site's key: it signs every call (a fresh in-memory key when None)."""
        self.stub = SignedFleet(stub, self.identity, site_id)
        self.site_id = site_id
        self.token = token or ""
        self.poll_wait_s = poll_wait_s
        self.heartbeat_interval_s = 5.0
        self._cached: tuple[str, Arrays] | None = None
        self.secagg = SecAggSite(site_id)
        self.receipt_book = ReceiptBook(
            site_id, coordinator_public_key, receipts_path, coordinator_key_path
        )
        self.receipts = self.receipt_book.records
        """Outcomes of the inclusion receipts checked so far (see :mod:`client_sdk.receipts`)."""

    def enroll(self) -> None:
        request = fleet_pb2.EnrollRequest(
            site_id=self.site_id, token=self.token, public_key=self.identity.public_key
        )
        reply = self.stub.Enroll(request, timeout=30)
        self.heartbeat_interval_s = float(reply.heartbeat_interval_s or 5)
        self.receipt_book.pin(reply.coordinator_public_key)
        log.info("site %s enrolled", self.site_id)

    def pull(self) -> Task | None:
        """Long-poll for a task; receive and verify its model unless cached."""
        cached = self._cached[0] if self._cached else ""
        stream: Iterator[fleet_pb2.TaskMessage] = self.stub.PullTask(
            fleet_pb2.PullTaskRequest(
                site_id=self.site_id, cached_model_digest=cached, wait_s=self.poll_wait_s
            ),
            timeout=self.poll_wait_s + TRANSFER_TIMEOUT_S,
        )
        first = next(stream, None)
        if not isinstance(first, fleet_pb2.TaskMessage) or first.WhichOneof("kind") != "header":
            return None
        header = first.header
        if header.kind == fleet_pb2.TASK_KIND_SECAGG:  # a protocol stage: no model
            return Task(header, {}, parse_config(header.config_json))
        if header.HasField("model"):
            assembler = PayloadAssembler(header.model, MAX_MODEL_BYTES)
            for message in stream:
                assembler.add(chunk_data(message))
            arrays = assembler.finish()
            if header.model.digest != header.model_digest:
                raise PayloadError("task model digest does not match its payload")
            for a in arrays.values():
                a.flags.writeable = False
            self._cached = (header.model_digest, arrays)
        elif self._cached is None or self._cached[0] != header.model_digest:
            raise PayloadError("coordinator sent no model and the cached one does not match")
        return Task(header, self._cached[1], parse_config(header.config_json))

    def run_task(self, task: Task) -> None:
        """Do the task under heartbeats, then push the result (or the error)."""
        h = task.header
        self.receipt_book.saw_round(h.run_id, h.round)
        done = threading.Event()
        beat = threading.Thread(target=self._heartbeat, args=(h.task_id, done), daemon=True)
        beat.start()
        t0 = time.time()
        try:
            header, payload, what = self._answer(task)
        except Exception as exc:
            log.error(
                "site %s round %d: client failed: %s: %s",
                self.site_id,
                h.round,
                type(exc).__name__,
                exc,
            )
            self._push(h.task_id, fleet_pb2.ResultHeader(error=f"{type(exc).__name__}: {exc}"))
            return
        finally:
            done.set()
        self._release_large_model(task)
        chunks = payload.chunk_messages() if payload is not None else None
        reply = self._push(h.task_id, header, chunks)
        if reply.accepted and header.HasField("update"):  # owed a receipt once it commits
            self.receipt_book.expect(h.run_id, h.round, header.update.digest)
        log.info(
            "site %s round %d: %s in %.2fs; %s",
            self.site_id,
            h.round,
            what,
            time.time() - t0,
            "accepted" if reply.accepted else f"not accepted ({reply.reason})",
        )

    def _release_large_model(self, task: Task) -> None:
        """After a plain fit, drop a received model above :data:`MAX_CACHED_MODEL_BYTES`
        (the next round brings a new one anyway)."""
        h = task.header
        if h.kind != fleet_pb2.TASK_KIND_FIT or h.HasField("secagg"):
            return
        if sum(a.nbytes for a in task.arrays.values()) > MAX_CACHED_MODEL_BYTES:
            if self._cached is not None and self._cached[1] is task.arrays:
                self._cached = None
            task.arrays = {}

    def _answer(self, task: Task) -> tuple[fleet_pb2.ResultHeader, EncodedPayload | None, str]:
        """The result header of a task, its payload and a few words for the log."""
        h = task.header
        if h.kind == fleet_pb2.TASK_KIND_SECAGG:
            stage = self.secagg.stage(h)
            self.client.before_stage(stage, task.config)
            reply, payload = self.secagg.answer(h)
            header = fleet_pb2.ResultHeader(secagg=reply)
            if payload is not None:
                header.update.CopyFrom(payload.header())
            return header, payload, f"secure aggregation: {stage}"
        extras = self._before_fit(task) if h.kind == fleet_pb2.TASK_KIND_FIT else {}
        result = self._call_client(task)
        what = f"{'trained' if isinstance(result, FitResult) else 'evaluated'} on "
        what += f"{result.num_examples} examples"
        if isinstance(result, FitResult) and h.HasField("secagg"):
            reply = self.secagg.begin(h, task.arrays, result, extras.get("histogram"))
            spend = {k: float(v) for k, v in result.metrics.items() if k in LOCAL_DP_METRICS}
            header = fleet_pb2.ResultHeader(metrics=spend, secagg=reply)
            return header, None, what + " (update kept for secure aggregation)"
        header, payload = self._result(task, result)
        for name, value in extras.get("metrics", {}).items():
            header.metrics[name] = value
        if "profile" in extras:
            header.profile.CopyFrom(extras["profile"])
        return header, payload, what

    def _before_fit(self, task: Task) -> dict[str, Any]:
        """What the round asks for besides training: the received model's evaluation on
        local data (``eval_*`` metrics) and a profile of the local data; when the round
        asks for a pooled histogram (secure aggregation, DP), the profile must fit its
        layout (a label id beyond ``profile_labels`` is an error the site reports) and
        its encoding goes into the secure sum."""
        config, extras = task.config, {}
        if config.get(SITE_EVALUATION):
            model = {k: v for k, v in task.arrays.items() if not k.startswith(SCAFFOLD_CONTROL)}
            ev = self.client.evaluate(model, config)
            if not isinstance(ev, EvaluateResult):
                raise ClientError(f"evaluate() returned {type(ev).__name__}, not EvaluateResult")
            metrics = {f"{EVAL_PREFIX}{k}": float(v) for k, v in ev.metrics.items()}
            metrics.update(eval_loss=float(ev.loss), eval_examples=float(ev.num_examples))
            extras["metrics"] = metrics
        if PROFILE_BINS in config:
            profile = self.client.profile(config)
            try:
                spec = HistogramSpec.from_config(config)
                if spec is not None:
                    extras["histogram"] = (spec, spec.encode(profile))
            except ValueError as exc:
                raise ClientError(f"cannot report a data profile: {exc}") from None
            if profile is not None:
                bins = profile_settings(config)[0]
                extras["profile"] = fleet_pb2.DataProfile(
                    num_examples=int(profile.num_examples),
                    label_counts=profile.labels.tolist(),
                    bins=bins or 0,
                    feature_counts=[] if profile.features is None else profile.features.ravel(),
                )
        return extras

    def _call_client(self, task: Task) -> FitResult | EvaluateResult:
        if task.header.kind == fleet_pb2.TASK_KIND_FIT:
            result = self.client.fit(task.arrays, task.config)
            if not isinstance(result, FitResult):
                raise ClientError(f"fit() returned {type(result).__name__}, not FitResult")
            return result
        if task.header.kind == fleet_pb2.TASK_KIND_EVALUATE:
            result = self.client.evaluate(task.arrays, task.config)
            if not isinstance(result, EvaluateResult):
                raise ClientError(
                    f"evaluate() returned {type(result).__name__}, not EvaluateResult"
                )
            return result
        raise ClientError(f"unknown task kind {task.header.kind}")

    @staticmethod
    def _result(
        task: Task, result: FitResult | EvaluateResult
    ) -> tuple[fleet_pb2.ResultHeader, EncodedPayload | None]:
        metrics = {k: float(v) for k, v in result.metrics.items()}
        header = fleet_pb2.ResultHeader(num_examples=int(result.num_examples), metrics=metrics)
        if isinstance(result, EvaluateResult):
            header.metrics["loss"] = float(result.loss)
            return header, None
        arrays = {k: np.asarray(v) for k, v in result.arrays.items()}
        if CLIENT_CLIP_KEY in task.config:  # client-side DP: the update leaves the site clipped
            arrays = clip_update(arrays, task.arrays, float(task.config[CLIENT_CLIP_KEY]))
        payload = encode(arrays)
        header.update.CopyFrom(payload.header())
        return header, payload

    def _push(
        self, task_id: str, header: fleet_pb2.ResultHeader, chunks: Iterator[bytes] | None = None
    ) -> fleet_pb2.PushReply:
        """Send ``header`` and then ``chunks``, pre-encoded chunk messages
        (:meth:`~protos.codec.EncodedPayload.chunk_messages`)."""
        header.site_id = self.site_id
        header.task_id = task_id
        messages = itertools.chain([fleet_pb2.ResultMessage(header=header)], chunks or ())
        return self.stub.PushResult(messages, timeout=TRANSFER_TIMEOUT_S)

    def check_receipts(self) -> None:
        """Ask for and verify the inclusion receipts that are due (never raises)."""
        self.receipt_book.poll(self.stub)

    def _heartbeat(self, task_id: str, done: threading.Event) -> None:
        while not done.wait(self.heartbeat_interval_s):
            with contextlib.suppress(grpc.RpcError, ValueError):  # a missed beat is harmless
                self.stub.Heartbeat(
                    fleet_pb2.HeartbeatRequest(site_id=self.site_id, task_id=task_id), timeout=10
                )


def run_site(
    client: Client,
    coordinator: str,
    site_id: str,
    token: str | None = None,
    *,
    insecure: bool = False,
    root_certificates: bytes | None = None,
    certificate_chain: bytes | None = None,
    private_key: bytes | None = None,
    stop: threading.Event | None = None,
    poll_wait_s: int = 10,
    max_unavailable_s: float | None = 300.0,
    coordinator_public_key: bytes | None = None,
    receipts_path: str | Path | None = None,
    key_path: str | Path | None = None,
    coordinator_key_path: str | Path | None = None,
    channel: grpc.Channel | None = None,
) -> None:
    """Serve as a data site until ``stop`` is set or Ctrl-C.

    Parameters
    ----------
    client
        The site's :class:`~client_sdk.api.Client`.
    coordinator
        ``host:port`` of the coordinator's gRPC endpoint.
    site_id
        This site's name (1-64 characters of letters, digits, ``.``, ``_``, ``-``).
    token
        One-time enrollment token (not needed under ``--open-enrollment``).
    insecure
        Plaintext channel (no TLS). Otherwise TLS with ``root_certificates`` (system
        roots when None) and, for mutual TLS, ``certificate_chain`` + ``private_key``.
    stop
        Set it to end the loop: the site's own channel is closed at once, which ends a
        poll or transfer in flight (with a shared ``channel``: between polls, which last
        ``poll_wait_s``). ``fedcoord site`` sets it on SIGINT and SIGTERM.
    max_unavailable_s
        Give up with :class:`CoordinatorUnavailable` after this long without reaching
        the coordinator (None: retry forever).
    coordinator_public_key
        The coordinator's raw Ed25519 key (32 bytes) to pin; None: trust the key it
        presents at the first enrollment. Receipts signed by another key are refused.
    receipts_path
        Append each checked inclusion receipt here as a JSON line (None: keep them in
        memory only, on the session's ``receipts``).
    key_path
        The site's Ed25519 key file (PEM, mode 0600), created on first use. The key is
        registered at enrollment and signs every request; None: a key kept in memory
        for this process only (a restarted site then needs a new token to enroll).
    coordinator_key_path
        Keep the coordinator key pinned on first use here (hex) and start from it, so a
        restarted site still refuses receipts signed by another key (None: the pin
        lasts this process). Unused when ``coordinator_public_key`` is given.
    channel
        An open channel to ``coordinator`` to use instead of dialing one (e.g. one
        shared by many simulated sites); the TLS arguments are then unused and the
        channel is left open at the end.

    Raises
    ------
    CoordinatorUnavailable
        The coordinator stayed unreachable for ``max_unavailable_s``.
    SiteError
        The coordinator refused the site for good (e.g. enrollment denied).
    """
    stop = stop or threading.Event()
    identity = SiteIdentity.load_or_create(key_path) if key_path else SiteIdentity.generate()
    own_channel = channel is None
    channel = channel or make_channel(
        coordinator,
        insecure=insecure,
        root_certificates=root_certificates,
        certificate_chain=certificate_chain,
        private_key=private_key,
    )
    session = SiteSession(
        client, fleet_stub(channel), site_id, token, poll_wait_s,
        coordinator_public_key=coordinator_public_key,
        receipts_path=None if receipts_path is None else Path(receipts_path),
        identity=identity,
        coordinator_key_path=None if coordinator_key_path is None else Path(coordinator_key_path),
    )  # fmt: skip
    backoff = Backoff()
    enrolled = False
    down_since: float | None = None
    ended = threading.Event()
    if own_channel:
        threading.Thread(
            target=_close_when_stopped, args=(channel, stop, ended), name="site-stop", daemon=True
        ).start()
    try:
        while not stop.is_set():
            try:
                if not enrolled:
                    session.enroll()
                    enrolled = True
                task = session.pull()
                down_since = None
                backoff.reset()
                if task is not None and not stop.is_set():
                    session.run_task(task)
                if not stop.is_set():
                    session.check_receipts()
            except PayloadError as exc:
                log.warning("site %s: discarded a malformed task: %s", site_id, exc)
                stop.wait(backoff.next_delay())
            except ValueError:  # "Cannot invoke RPC on closed channel!"
                if stop.is_set():  # the stop closed the channel between two calls
                    break
                raise
            except grpc.RpcError as exc:
                if stop.is_set():  # the call was cut by the stop
                    break
                code = exc.code()
                if code == grpc.StatusCode.PERMISSION_DENIED:
                    enrolled = False  # e.g. the coordinator lost track of us: enroll again
                elif code not in TRANSIENT:
                    raise SiteError(
                        f"coordinator refused site {site_id}: {code.name}: {exc.details()}"
                    ) from None
                else:
                    enrolled = enrolled and code != grpc.StatusCode.UNAVAILABLE
                now = time.time()
                down_since = down_since or now
                if max_unavailable_s is not None and now - down_since > max_unavailable_s:
                    raise CoordinatorUnavailable(
                        f"coordinator {coordinator} unreachable for {now - down_since:.0f}s "
                        f"({code.name}: {exc.details()})"
                    ) from None
                delay = backoff.next_delay()
                log.info(
                    "site %s: coordinator %s (%s); retrying in %.1fs",
                    site_id,
                    coordinator,
                    code.name,
                    delay,
                )
                stop.wait(delay)
    except KeyboardInterrupt:
        pass
    finally:
        ended.set()
        if own_channel:
            channel.close()
    log.info("site %s: stopped", site_id)


def _close_when_stopped(
    channel: grpc.Channel, stop: threading.Event, ended: threading.Event
) -> None:
    """Close ``channel`` once ``stop`` is set (cancelling the call in flight), unless
    the site ``ended`` first."""
    while not ended.is_set():
        if stop.wait(0.5):
            channel.close()
            return
