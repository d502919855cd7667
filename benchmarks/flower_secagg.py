"""Flower 1.41's own SecAgg+ as a reference: seconds per round, and a check of its result.

:func:`flower_round_seconds` runs ``num_clients`` Flower clients through rounds of
Flower's SecAgg+ (``flwr.server.workflow.SecAggPlusWorkflow`` on the server,
``flwr.client.mod.secaggplus_mod`` on every client), or with ``secagg=False`` through the
plain FedAvg round of ``DefaultWorkflow``, and times each round. A client's "training"
returns a fixed update drawn once from ``(seed, partition id)`` (``num_params`` float32
values in a few arrays) and a fixed example count, so a round costs only the protocol:
quantization, masks, key agreement, Shamir shares, (de)serialization and FedAvg. After
every round Flower's global parameters are compared with the exact weighted mean of the
updates, within the error Flower's quantization allows.

Engines
    ``"inprocess"`` (default)
        Flower's ``ServerApp``, ``DefaultWorkflow``, ``SecAggPlusWorkflow``, ``FedAvg``,
        ``ClientApp`` and ``secaggplus_mod`` run unchanged in this thread; only the
        transport is ours: a :class:`LoopbackGrid` that runs the destination node's
        ``ClientApp`` on a copy of each message at once and copies the reply back. The
        copy is a deep copy (``transport="copy"``, the default: protocol cost only) or a
        round trip through Flower's protobuf serde (``"protobuf"``: plus the encoding a
        deployment pays). Clients run one after the other, so a round is the sum of all
        clients' work plus the server's; the parts spent in clients and in copying are
        reported too. No Ray, no polling, no sleeps.
    ``"simulation"``
        Flower's own Simulation Runtime (``flwr.simulation.run_simulation``, which needs
        ``ray``; ``flwr[simulation]`` 1.41 pins ``ray==2.55.1``), one Ray actor per CPU
        (``client_resources = {"num_cpus": 1}``). Ray keeps its files in a temporary
        directory; it is shut down, and its processes have exited, before the function
        returns. Its rounds include Flower's polling
        (``InMemoryGrid`` pulls replies every 0.1 s, the runtime fetches messages every
        0.1 s) and Ray's pickling, as a Flower user would see them.

SecAgg+ parameters
    ``num_shares`` counts the client itself (Flower's neighbourhood is the client and its
    ``num_shares - 1`` ring neighbours); ``reconstruction_threshold`` is the number of
    those shares needed to rebuild a secret. Floats are Flower's proportions (of the
    clients, and of the shares). The defaults, ``0.4`` and ``0.53``, give 21 shares and a
    threshold of 11 for 50 clients: fedcoord's ``choose_parameters(50, dropout_rate=0.05,
    corrupt_fraction=0.0)`` picks ``k = 20`` neighbours and ``t = 11``, which is Flower's
    ``(k + 1, t)``; each neighbourhood then survives 10 dropouts. For 10 clients they give
    5 shares and a threshold of 3. Flower's own example uses ``3`` and ``2`` (one
    dropout per neighbourhood of three); pass those to compare with that setting.
    ``clipping_range`` (8.0), ``quantization_range`` (``2**22``), ``max_weight`` (1000)
    and ``modulus_range`` (``2**32``) are Flower's defaults.

``python -m benchmarks.flower_secagg`` times 10 and 50 clients x 1M parameters, plain and
SecAgg+, and prints a table (``--quick``: 10 clients x 10k; ``--transport protobuf``;
``--engine simulation`` for Flower's Ray runtime). It writes no file; the exit status is
1 when a check fails.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import logging
import math
import os
import random
import signal
import statistics
import sys
import tempfile
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Literal
from unittest import mock

import numpy as np
from flwr.app import Context, Message, RecordDict
from flwr.client import Client, NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import NDArrays, Scalar, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.constant import NUM_PARTITIONS_KEY, PARTITION_ID_KEY, SUPERLINK_NODE_ID
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.compat.common import recorddict_compat as compat
from flwr.proto.message_pb2 import Message as ProtoMessage  # pylint: disable=E0611
from flwr.server import LegacyContext, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_PARAMS_RECORD
from flwr.server.workflow.default_workflows import default_fit_workflow
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import telemetry
from flwr.supercore.run import Run, RunNotRunningException
from flwr.supercore.task_identity import TaskIdentity

from benchmarks.common import describe_machine, text_table

Engine = Literal["inprocess", "simulation"]
Transport = Literal["copy", "protobuf"]
Workflow = Callable[[Grid, Context], None]

MAX_WEIGHT = 1000.0
"""Flower's default ``max_weight``; every client's example count is at most this."""
MODULUS_RANGE = 2**32
"""Flower's default ``modulus_range``."""
UPDATE_SCALE = 0.05
"""Standard deviation of the clients' update values (far inside any clipping range)."""
EXAMPLES_RANGE = (100, 1000)
"""Inclusive range of the clients' example counts (the FedAvg weights)."""
NUM_ARRAYS = 4
"""How many arrays a model's parameters are split into."""


@dataclass(frozen=True)
class FlowerRoundTiming:
    """Seconds per Flower round and the check of Flower's aggregate.

    ``seconds`` is the median of ``round_seconds`` without the first round when there is
    more than one (``first_round_excluded``): the first round pays Ray's start-up in the
    simulation engine and first-call costs in-process. ``client_seconds`` and
    ``wire_seconds`` (in-process only, else empty) are the parts of each round spent in
    the clients' ``ClientApp`` and in encoding/decoding messages; the rest is the server.
    ``checked`` says the aggregate was compared with the exact weighted mean after every
    round; ``correct`` that every round was within ``error_bound`` (largest
    ``max_abs_error`` over the rounds).
    """

    engine: str
    transport: str
    secagg: bool
    num_clients: int
    num_params: int
    num_arrays: int
    num_shares: int | None
    threshold: int | None
    clipping_range: float | None
    quantization_range: int | None
    round_seconds: tuple[float, ...]
    client_seconds: tuple[float, ...]
    wire_seconds: tuple[float, ...]
    first_round_excluded: bool
    seconds: float
    checked: bool
    correct: bool
    max_abs_error: float
    error_bound: float
    call_seconds: float
    versions: dict[str, str] = field(default_factory=dict)

    @property
    def first_round_seconds(self) -> float:
        """The first round (start-up included)."""
        return self.round_seconds[0]

    @property
    def label(self) -> str:
        """``plain`` or ``SecAgg+ n/t`` (shares / threshold)."""
        return f"SecAgg+ {self.num_shares}/{self.threshold}" if self.secagg else "plain"


# --- the clients' fixed updates ------------------------------------------------------------


def array_sizes(num_params: int, num_arrays: int = NUM_ARRAYS) -> list[int]:
    """Sizes of the (at most ``num_arrays``) arrays a model of ``num_params`` is cut into."""
    if num_params < 1:
        raise ValueError(f"num_params must be at least 1, got {num_params}")
    parts = max(1, min(num_arrays, num_params))
    base, extra = divmod(num_params, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


@functools.cache
def client_update(
    seed: int, partition: int, num_params: int, num_arrays: int = NUM_ARRAYS
) -> tuple[tuple[np.ndarray, ...], int]:
    """Partition ``partition``'s fixed update (read-only float32 arrays, values of standard
    deviation :data:`UPDATE_SCALE`) and its example count in :data:`EXAMPLES_RANGE`.

    Cached, so a client's "training" costs nothing after its first call;
    :func:`flower_round_seconds` clears the cache before it returns (Ray actors lose
    theirs when they exit).
    """
    rng = np.random.default_rng([seed, partition])
    flat = rng.standard_normal(num_params, dtype=np.float32)
    flat *= np.float32(UPDATE_SCALE)
    flat.setflags(write=False)
    arrays: list[np.ndarray] = []
    offset = 0
    for size in array_sizes(num_params, num_arrays):
        arrays.append(flat[offset : offset + size])
        offset += size
    examples = int(rng.integers(EXAMPLES_RANGE[0], EXAMPLES_RANGE[1] + 1))
    return tuple(arrays), examples


class FixedUpdateClient(NumPyClient):
    """A Flower client whose ``fit`` returns the same update whatever the global model."""

    def __init__(self, arrays: Sequence[np.ndarray], examples: int) -> None:
        self.arrays = list(arrays)
        self.examples = examples

    def get_parameters(self, config: dict[str, Scalar]) -> NDArrays:
        """The update (Flower asks for initial parameters only without a strategy's)."""
        return list(self.arrays)

    def fit(
        self, parameters: NDArrays, config: dict[str, Scalar]
    ) -> tuple[NDArrays, int, dict[str, Scalar]]:
        """The fixed update and example count; no training."""
        return list(self.arrays), self.examples, {}

    def evaluate(
        self, parameters: NDArrays, config: dict[str, Scalar]
    ) -> tuple[float, int, dict[str, Scalar]]:
        """A zero loss (federated evaluation is not part of the measured round)."""
        return 0.0, self.examples, {}


@dataclass(frozen=True)
class ClientFn:
    """Flower ``client_fn`` (picklable, for Ray): the client of the node's
    ``partition-id``."""

    seed: int
    num_params: int
    num_arrays: int

    def __call__(self, context: Context) -> Client:
        partition = int(context.node_config[PARTITION_ID_KEY])
        arrays, examples = client_update(self.seed, partition, self.num_params, self.num_arrays)
        return FixedUpdateClient(arrays, examples).to_client()


def _client_app(seed: int, num_params: int, num_arrays: int, secagg: bool) -> ClientApp:
    """The ``ClientApp`` of every node, with ``secaggplus_mod`` when ``secagg``."""
    client_fn = ClientFn(seed, num_params, num_arrays)
    return ClientApp(client_fn=client_fn, mods=[secaggplus_mod] if secagg else [])


# --- the expected aggregate -----------------------------------------------------------------


@dataclass(frozen=True)
class Expected:
    """The exact (float64) weighted mean of the updates, flat, and how far Flower's
    aggregate may be from it (largest absolute difference of one parameter)."""

    mean: np.ndarray
    bound: float


def expected_aggregate(
    seed: int,
    num_clients: int,
    num_params: int,
    *,
    secagg: bool,
    num_arrays: int = NUM_ARRAYS,
    clipping_range: float = 8.0,
    quantization_range: int = 2**22,
) -> Expected:
    """The weighted mean of the clients' updates (weights: example counts) and the bound.

    Flower returns the FedAvg weighted mean in both modes. Plain FedAvg
    (``aggregate_inplace``) accumulates in float32: at most ``2 (n + 1) eps32 max|x|``.
    SecAgg+ stochastically rounds each client's ``r_i x_i`` (``r_i``: its example count
    over ``max_weight``, rounded to ``1 / quantization_range``) to a step
    ``s = 2 clipping_range / quantization_range``, computing it in float32 (at most one
    more step), and divides the sum by ``sum r_i``: at most ``2 n s / sum r_i``, plus
    ``max|x| * sum_i |r_i / sum r - w_i / sum w|`` for the rounded weights.

    Raises
    ------
    ValueError
        When an update leaves ``[-clipping_range, clipping_range]`` (Flower would clip it).
    """
    acc = np.zeros(num_params, dtype=np.float64)
    weights: list[int] = []
    peak = 0.0
    for partition in range(num_clients):
        arrays, examples = client_update(seed, partition, num_params, num_arrays)
        flat = np.concatenate(arrays)
        peak = max(peak, float(np.max(np.abs(flat))))
        acc += examples * flat.astype(np.float64)
        weights.append(examples)
    total = float(sum(weights))
    acc /= total
    n = num_clients
    if not secagg:
        return Expected(acc, 2.0 * (n + 1) * float(np.finfo(np.float32).eps) * peak + 1e-12)
    if peak > clipping_range:
        raise ValueError(
            f"updates reach {peak:.3g}, beyond clipping_range={clipping_range}: "
            "Flower would clip them and the check would fail"
        )
    ratios = [round(w / MAX_WEIGHT * quantization_range) / quantization_range for w in weights]
    ratio_sum = math.fsum(ratios)
    step = 2.0 * clipping_range / quantization_range
    weight_error = math.fsum(
        abs(r / ratio_sum - w / total) for r, w in zip(ratios, weights, strict=True)
    )
    return Expected(acc, 2.0 * n * step / ratio_sum + peak * weight_error + 1e-9)


# --- Flower's SecAgg+ share count and threshold, resolved as its setup stage does ---------


def resolve_secaggplus(
    num_clients: int, num_shares: int | float, reconstruction_threshold: int | float
) -> tuple[int, int]:
    """The ``(num_shares, threshold)`` Flower 1.41's ``SecAggPlusWorkflow`` uses for
    ``num_clients`` sampled clients (its int/float rules, repeated here for the record)."""
    if isinstance(num_shares, int) and num_shares == 1:
        num_shares = 1.0
    if isinstance(reconstruction_threshold, int) and reconstruction_threshold == 1:
        reconstruction_threshold = 1.0
    if isinstance(num_shares, float):
        shares = round(num_shares * num_clients)
        if shares < num_clients and shares & 1 == 0:
            shares += 1
        if shares <= 2:
            shares = num_clients
    else:
        shares = num_shares
    if isinstance(reconstruction_threshold, float):
        threshold = max(round(reconstruction_threshold * shares), 2)
    else:
        threshold = reconstruction_threshold
    if num_clients != shares and shares & 1 == 0:
        shares += 1
    return shares, threshold


# --- an in-process Grid ---------------------------------------------------------------------


class LoopbackGrid(Grid):
    """A Flower ``Grid`` that hands every message to its node's ``ClientApp`` at once.

    Every message and reply crosses the "wire" as a copy, so a node never shares mutable
    objects with the server: a deep copy (``transport="copy"``; Flower keeps arrays as
    immutable ``bytes``, which the copy shares, so it costs next to nothing) or bytes of
    Flower's protobuf encoding, decoded again (``"protobuf"``, as a deployment would pay).
    Node contexts (where ``secaggplus_mod`` keeps its state) live for the whole run, as on
    a SuperNode. ``client_seconds`` and ``wire_seconds`` add up the time spent in
    ``ClientApp`` calls and in copying.
    """

    def __init__(
        self,
        client_app: ClientApp,
        node_ids: Sequence[int],
        run: Run,
        transport: Transport = "copy",
    ) -> None:
        if transport not in ("copy", "protobuf"):
            raise ValueError(f"transport must be 'copy' or 'protobuf', got {transport!r}")
        self._client_app = client_app
        self._transport = transport
        self._run = run
        self._contexts = {
            node_id: Context(
                run_id=run.run_id,
                node_id=node_id,
                node_config={PARTITION_ID_KEY: i, NUM_PARTITIONS_KEY: len(node_ids)},
                state=RecordDict(),
                run_config={},
            )
            for i, node_id in enumerate(node_ids)
        }
        self._replies: dict[str, Message] = {}
        self._closed = False
        self.client_seconds = 0.0
        self.wire_seconds = 0.0

    def close(self) -> None:
        """End the run: Flower's node-watching thread stops at its next look."""
        self._closed = True

    def set_run(self, run: Run) -> None:
        """Set the run."""
        self._run = run

    @property
    def run(self) -> Run:
        """The run."""
        return self._run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        """A new instruction message (Flower's deprecated helper)."""
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> list[int]:
        """Every node of the run.

        Raises
        ------
        RunNotRunningException
            After :meth:`close`.
        """
        if self._closed:
            raise RunNotRunningException
        return list(self._contexts)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        """Deliver each message, run its node's ``ClientApp`` and keep the reply.

        Raises
        ------
        RuntimeError
            When a ``ClientApp`` raises (the round would otherwise go on without it).
        """
        ids: list[str] = []
        for message in messages:
            message_id = uuid.uuid4().hex
            message.metadata.__dict__["_message_id"] = message_id  # as Flower's grids do
            delivered = self._wire(message)
            node_id = delivered.metadata.dst_node_id
            start = time.perf_counter()
            try:
                reply = self._client_app(delivered, self._contexts[node_id])
            except Exception as exc:
                raise RuntimeError(f"ClientApp of node {node_id} failed: {exc}") from exc
            self.client_seconds += time.perf_counter() - start
            reply.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            self._replies[message_id] = self._wire(reply)
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        """The replies to ``message_ids`` (each handed out once)."""
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        """Push, then pull: every reply is ready when the push returns."""
        return self.pull_messages(self.push_messages(messages))

    def _wire(self, message: Message) -> Message:
        """The copy of ``message`` that arrives at the other end."""
        start = time.perf_counter()
        if self._transport == "protobuf":
            data = message_to_proto(message).SerializeToString()
            arrived = message_from_proto(ProtoMessage.FromString(data))
        else:
            arrived = copy.deepcopy(message)
        self.wire_seconds += time.perf_counter() - start
        return arrived


# --- the server side --------------------------------------------------------------------


@dataclass
class _Record:
    """What the ServerApp measured, round by round."""

    seconds: list[float] = field(default_factory=list)
    client_seconds: list[float] = field(default_factory=list)
    wire_seconds: list[float] = field(default_factory=list)
    errors: list[float] = field(default_factory=list)
    shapes_ok: list[bool] = field(default_factory=list)


def _server_app(
    *,
    num_clients: int,
    rounds: int,
    initial: NDArrays,
    expected: Expected,
    fit_workflow: Workflow,
    record: _Record,
    on_finish: Callable[[], None] | None = None,
) -> ServerApp:
    """A ``ServerApp`` running ``DefaultWorkflow`` with ``fit_workflow`` timed and its
    result checked after every round, and no federated evaluation; ``on_finish`` is
    called after the last round."""
    sizes = [a.size for a in initial]

    def timed_fit(grid: Grid, context: Context) -> None:
        loopback = grid if isinstance(grid, LoopbackGrid) else None
        client0 = loopback.client_seconds if loopback else 0.0
        wire0 = loopback.wire_seconds if loopback else 0.0
        start = time.perf_counter()
        fit_workflow(grid, context)
        record.seconds.append(time.perf_counter() - start)
        if loopback:
            record.client_seconds.append(loopback.client_seconds - client0)
            record.wire_seconds.append(loopback.wire_seconds - wire0)
        params = compat.arrayrecord_to_parameters(
            context.state.array_records[MAIN_PARAMS_RECORD], keep_input=True
        )
        arrays = parameters_to_ndarrays(params)
        record.shapes_ok.append([a.size for a in arrays] == sizes)
        if record.shapes_ok[-1]:
            flat = np.concatenate([a.ravel().astype(np.float64) for a in arrays])
            record.errors.append(float(np.max(np.abs(flat - expected.mean))))
        else:
            record.errors.append(math.inf)

    def no_evaluation(grid: Grid, context: Context) -> None:
        """Federated evaluation is not part of the measured round."""

    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = FedAvg(
            fraction_fit=1.0,
            fraction_evaluate=0.0,
            min_fit_clients=num_clients,
            min_available_clients=num_clients,
            initial_parameters=ndarrays_to_parameters(initial),
            fit_metrics_aggregation_fn=lambda metrics: {},
        )
        legacy = LegacyContext(
            context=context, config=ServerConfig(num_rounds=rounds), strategy=strategy
        )
        DefaultWorkflow(fit_workflow=timed_fit, evaluate_workflow=no_evaluation)(grid, legacy)
        if on_finish is not None:
            on_finish()

    return app


# --- engines ------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_flower() -> Iterator[None]:
    """Flower's logger at WARNING without its deprecation notices, and no telemetry
    (no network, nothing written to ``~/.flwr``)."""
    logger = logging.getLogger("flwr")
    level = logger.level

    def not_deprecation(record: logging.LogRecord) -> bool:
        return "deprecated" not in record.getMessage()

    logger.setLevel(logging.WARNING)
    logger.addFilter(not_deprecation)
    try:
        with mock.patch.object(telemetry, "create_event", lambda *_a, **_k: "disabled"):
            yield
    finally:
        logger.removeFilter(not_deprecation)
        logger.setLevel(level)


@contextlib.contextmanager
def _task_identity(run_id: int | None = None) -> Iterator[None]:
    """Flower's process-wide task identity (new messages take their ``run_id`` from it),
    set to the SuperLink's for ``run_id`` when given, and restored afterwards."""
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    if run_id is not None:
        TaskIdentity.task_id = 1
        TaskIdentity.run_id = run_id
        TaskIdentity.node_id = SUPERLINK_NODE_ID
    try:
        yield
    finally:
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def _run_inprocess(
    server_app: ServerApp,
    client_app: ClientApp,
    num_clients: int,
    seed: int,
    transport: Transport,
) -> None:
    """Run the apps over a :class:`LoopbackGrid` in this thread."""
    rng = random.Random(seed)
    run_id = rng.randrange(1, 2**63)
    node_ids = rng.sample(range(SUPERLINK_NODE_ID + 1, 2**63), num_clients)
    grid = LoopbackGrid(client_app, node_ids, Run.create_empty(run_id), transport)
    context = Context(run_id=run_id, node_id=0, node_config={}, state=RecordDict(), run_config={})
    try:
        with _task_identity(run_id):
            server_app(grid=grid, context=context)
    finally:
        grid.close()


@contextlib.contextmanager
def _environment(
    values: dict[str, str], also_restore: Sequence[str] = ("PYTHONPATH",)
) -> Iterator[None]:
    """Set environment variables for the duration, then restore them and ``also_restore``
    (Flower's Ray backend rewrites ``PYTHONPATH``)."""
    names = {*values, *also_restore}
    saved = {name: os.environ.get(name) for name in names}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _process_table() -> dict[int, tuple[int, str]]:
    """``pid -> (parent pid, start time)`` of every live (not zombie) process, from
    Linux's ``/proc`` (empty elsewhere)."""
    table: dict[int, tuple[int, str]] = {}
    proc = Path("/proc")
    if not proc.is_dir():
        return table
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # state, ppid, ..., starttime
        if fields[0] not in ("Z", "X"):
            table[int(entry.name)] = (int(fields[1]), fields[19])
    return table


def descendant_processes(root: int | None = None, marker: bytes = b"") -> dict[int, str]:
    """``pid -> start time`` of every live descendant of process ``root`` (this one) whose
    command line contains ``marker``."""
    table = _process_table()
    found: dict[int, str] = {}
    frontier = [os.getpid() if root is None else root]
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, start) in table.items():
            if ppid == parent and pid not in found:
                found[pid] = start
                frontier.append(pid)
    return {pid: start for pid, start in found.items() if marker in _cmdline(pid)}


def _cmdline(pid: int) -> bytes:
    """The raw command line of process ``pid`` (empty once it has gone)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _reap(processes: dict[int, str], timeout: float = 15.0) -> None:
    """Wait up to ``timeout`` seconds for ``processes`` to exit, then kill those left
    (each checked by its start time, so a reused pid is never touched)."""
    deadline = time.monotonic() + timeout
    while True:
        table = _process_table()
        alive = [pid for pid, start in processes.items() if table.get(pid, (0, ""))[1] == start]
        if not alive:
            return
        if time.monotonic() >= deadline:
            break
        time.sleep(0.1)
    for pid in alive:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def _run_simulation(
    server_app: ServerApp,
    client_app: ClientApp,
    num_clients: int,
    scratch: Path,
    ray_processes: dict[int, str],
) -> None:
    """Run the apps in Flower's Simulation Runtime (Ray, one actor per CPU), with Ray's
    files under ``scratch``; Ray is shut down, and the processes in ``ray_processes``
    (filled in while Ray runs) have exited, before returning."""
    try:
        import ray
    except ImportError as exc:
        raise RuntimeError(
            "engine='simulation' needs ray (flwr[simulation] 1.41 pins ray==2.55.1)"
        ) from exc
    from flwr.simulation import run_simulation

    if ray.is_initialized():
        raise RuntimeError("Ray is already running in this process; shut it down first")
    backend_config = {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {
            "num_cpus": os.cpu_count() or 1,
            "num_gpus": 0,
            "include_dashboard": False,
            "logging_level": logging.WARNING,
            "log_to_driver": False,
            "_temp_dir": str(scratch / "ray"),
        },
    }
    env = {"RAY_USAGE_STATS_ENABLED": "0", "FLWR_HOME": str(scratch / "flwr")}
    restore = ("PYTHONPATH", "PYTHONBREAKPOINT")  # Flower's backend and ray.init set them
    try:
        with _environment(env, restore), _task_identity(), warnings.catch_warnings():
            # Ray's notice about accelerator environment variables (there are none here)
            warnings.filterwarnings("ignore", category=FutureWarning, module="ray")
            run_simulation(
                server_app=server_app,
                client_app=client_app,
                num_supernodes=num_clients,
                backend_config=backend_config,  # type: ignore[arg-type]
            )
    finally:
        if ray.is_initialized():
            ray.shutdown()
        _reap(ray_processes)


def _join_new_threads(before: set[threading.Thread], timeout: float = 10.0) -> None:
    """Wait (up to ``timeout`` seconds in all) for threads started since ``before``."""
    deadline = time.monotonic() + timeout
    for thread in set(threading.enumerate()) - before:
        if thread is not threading.current_thread():
            thread.join(max(0.0, deadline - time.monotonic()))


# --- the function -------------------------------------------------------------------------


def flower_round_seconds(
    num_clients: int,
    num_params: int,
    *,
    secagg: bool,
    rounds: int = 2,
    num_shares: int | float = 0.4,
    reconstruction_threshold: int | float = 0.53,
    clipping_range: float = 8.0,
    quantization_range: int = 2**22,
    engine: Engine = "inprocess",
    transport: Transport = "copy",
    num_arrays: int = NUM_ARRAYS,
    seed: int = 0,
) -> FlowerRoundTiming:
    """Seconds per round of Flower 1.41's SecAgg+ round (or plain FedAvg round), checked.

    Parameters
    ----------
    num_clients, num_params
        Clients in every round, and float32 parameters of each client's update.
    secagg
        ``SecAggPlusWorkflow`` + ``secaggplus_mod`` when true, else Flower's plain
        ``default_fit_workflow`` (FedAvg) on the same clients.
    rounds
        Rounds to run; the first is left out of the median when there are two or more.
    num_shares, reconstruction_threshold, clipping_range, quantization_range
        ``SecAggPlusWorkflow``'s arguments (unused when ``secagg`` is false); see the
        module docstring for the defaults.
    engine
        ``"inprocess"`` (Flower's apps over a :class:`LoopbackGrid`) or ``"simulation"``
        (Flower's Ray Simulation Runtime).
    transport
        In-process only: how messages cross, ``"copy"`` (protocol cost only) or
        ``"protobuf"`` (plus Flower's wire encoding); see :class:`LoopbackGrid`.
    num_arrays, seed
        Arrays per model, and the seed of the clients' updates.

    Returns
    -------
    FlowerRoundTiming
        The per-round times, their median and the result of the aggregate check.

    Raises
    ------
    ValueError
        For fewer than 3 clients, no rounds, or SecAgg+ parameters Flower cannot run.
    RuntimeError
        When a client fails, Flower runs fewer rounds, or ``ray`` is missing.
    """
    if num_clients < 3:
        raise ValueError(f"need at least 3 clients, got {num_clients}")
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    if engine not in ("inprocess", "simulation"):
        raise ValueError(f"engine must be 'inprocess' or 'simulation', got {engine!r}")
    if transport not in ("copy", "protobuf"):
        raise ValueError(f"transport must be 'copy' or 'protobuf', got {transport!r}")
    started = time.perf_counter()
    threads_before = set(threading.enumerate())
    shares: int | None = None
    threshold: int | None = None
    if secagg:
        shares, threshold = resolve_secaggplus(num_clients, num_shares, reconstruction_threshold)
        if not 2 <= threshold <= shares <= num_clients:
            raise ValueError(
                f"{num_clients} clients with num_shares={num_shares!r} and "
                f"reconstruction_threshold={reconstruction_threshold!r} resolve to "
                f"{shares} shares and a threshold of {threshold}; Flower needs "
                "2 <= threshold <= shares <= clients"
            )
    record = _Record()
    initial: NDArrays = [np.zeros(n, np.float32) for n in array_sizes(num_params, num_arrays)]
    try:
        expected = expected_aggregate(
            seed,
            num_clients,
            num_params,
            secagg=secagg,
            num_arrays=num_arrays,
            clipping_range=clipping_range,
            quantization_range=quantization_range,
        )
        with _quiet_flower():
            fit_workflow: Workflow = (
                SecAggPlusWorkflow(
                    num_shares=num_shares,
                    reconstruction_threshold=reconstruction_threshold,
                    max_weight=MAX_WEIGHT,
                    clipping_range=clipping_range,
                    quantization_range=quantization_range,
                    modulus_range=MODULUS_RANGE,
                )
                if secagg
                else default_fit_workflow
            )
            ray_processes: dict[int, str] = {}
            earlier = descendant_processes() if engine == "simulation" else {}

            def note_ray_processes() -> None:
                """Ray's processes (while Ray runs), to wait for after its shutdown."""
                found = descendant_processes(marker=b"ray")
                ray_processes.update({p: t for p, t in found.items() if earlier.get(p) != t})

            server_app = _server_app(
                num_clients=num_clients,
                rounds=rounds,
                initial=initial,
                expected=expected,
                fit_workflow=fit_workflow,
                record=record,
                on_finish=note_ray_processes if engine == "simulation" else None,
            )
            client_app = _client_app(seed, num_params, num_arrays, secagg)
            if engine == "inprocess":
                _run_inprocess(server_app, client_app, num_clients, seed, transport)
            else:
                with tempfile.TemporaryDirectory(
                    prefix="flwr-", ignore_cleanup_errors=True
                ) as scratch:
                    _run_simulation(
                        server_app, client_app, num_clients, Path(scratch), ray_processes
                    )
    finally:
        client_update.cache_clear()
    _join_new_threads(threads_before)
    if len(record.seconds) != rounds:
        raise RuntimeError(f"Flower ran {len(record.seconds)} of {rounds} rounds")
    timed = record.seconds[1:] if rounds > 1 else record.seconds
    max_error = max(record.errors)
    versions = ["flwr", "numpy"] + (["ray"] if engine == "simulation" else [])
    return FlowerRoundTiming(
        engine=engine,
        transport=transport if engine == "inprocess" else "ray",
        secagg=secagg,
        num_clients=num_clients,
        num_params=num_params,
        num_arrays=len(initial),
        num_shares=shares,
        threshold=threshold,
        clipping_range=clipping_range if secagg else None,
        quantization_range=quantization_range if secagg else None,
        round_seconds=tuple(record.seconds),
        client_seconds=tuple(record.client_seconds),
        wire_seconds=tuple(record.wire_seconds),
        first_round_excluded=rounds > 1,
        seconds=statistics.median(timed),
        checked=True,
        correct=all(record.shapes_ok) and max_error <= expected.bound,
        max_abs_error=max_error,
        error_bound=expected.bound,
        call_seconds=time.perf_counter() - started,
        versions={name: metadata.version(name) for name in versions},
    )


# --- command line -----------------------------------------------------------------------


HEADERS = (
    "engine",
    "transport",
    "clients",
    "params",
    "round",
    "s/round",
    "1st round s",
    "in clients s",
    "wire s",
    "max err",
    "bound",
    "ok",
    "call s",
)


def _median_after_first(values: tuple[float, ...]) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values[1:] if len(values) > 1 else values):.3f}"


def table_row(t: FlowerRoundTiming) -> list[object]:
    """One row of the command-line table (columns :data:`HEADERS`)."""
    return [
        t.engine,
        t.transport,
        t.num_clients,
        f"{t.num_params:,}",
        t.label,
        f"{t.seconds:.3f}",
        f"{t.first_round_seconds:.3f}",
        _median_after_first(t.client_seconds),
        _median_after_first(t.wire_seconds),
        f"{t.max_abs_error:.2e}",
        f"{t.error_bound:.2e}",
        "yes" if t.correct else "NO",
        f"{t.call_seconds:.1f}",
    ]


def main(argv: Sequence[str] | None = None) -> int:
    """Time Flower's plain and SecAgg+ rounds and print a table (status 1 on a bad check)."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10 clients x 10k parameters")
    parser.add_argument("--engine", choices=("inprocess", "simulation"), default="inprocess")
    parser.add_argument("--transport", choices=("copy", "protobuf"), default="copy")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per run (default 2)")
    args = parser.parse_args(argv)
    sizes = [(10, 10_000)] if args.quick else [(10, 1_000_000), (50, 1_000_000)]
    results: list[FlowerRoundTiming] = []
    for clients, params in sizes:
        for secagg in (False, True):
            timing = flower_round_seconds(
                clients,
                params,
                secagg=secagg,
                rounds=args.rounds,
                engine=args.engine,
                transport=args.transport,
            )
            results.append(timing)
            print(
                f"flower_secagg: {clients} x {params:,} {timing.label}: "
                f"{timing.seconds:.3f} s/round, check {'ok' if timing.correct else 'FAILED'}",
                file=sys.stderr,
                flush=True,
            )
    print(f"Machine: {describe_machine().line()}")
    timed = f"rounds 2..{args.rounds}" if args.rounds > 1 else "the only round"
    print(
        f"Flower {results[0].versions['flwr']}: s/round is the median of {timed}; "
        "'in clients' and 'wire' are the parts spent in ClientApps and in moving messages "
        "(in-process only)"
    )
    print(text_table(HEADERS, [table_row(t) for t in results]))
    return 0 if all(t.correct for t in results) else 1


if __name__ == "__main__":
    # Run the importable copy of this module, so Ray's workers can unpickle its clients.
    from benchmarks import flower_secagg

    raise SystemExit(flower_secagg.main())
