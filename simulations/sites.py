"""Simulated data sites: real gRPC clients hosted in worker processes or Ray actors.

A :class:`SiteHost` hosts every ``workers``-th site of the federation, each as a small
thread running :func:`client_sdk.run_site` over one channel the host's sites share. An
idle site costs its thread and its long poll only: its data and model (its client) are
built when it gets a task, and a host keeps at most ``simulation.client_cache`` built
clients, rebuilding older ones on use (their SCAFFOLD variate and local DP spend kept in
state files); a site mid-participation holds its client until its fit. A host trains
one site at a time, so ``simulation.workers`` bounds the training concurrency.
"""

from __future__ import annotations

import logging
import os
import resource
import shutil
import sys
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Event as ProcessEvent
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from client_sdk import Client, EvaluateResult, FitResult, run_site
from client_sdk.api import Arrays, Config
from client_sdk.connection import CHANNEL_OPTIONS
from coordinator.experiment import Experiment, parse_experiment
from coordinator.tasks import Task, load_task
from simulations.attacks import UPDATE_ATTACKS, attack_update, attackers
from strategies.drift import SITE_EVALUATION, DataProfile
from strategies.secagg.messages import STAGE_MASKED, STAGE_SHARE, STAGE_UNMASK

DROP_STAGES = ("fit", STAGE_SHARE, STAGE_MASKED, STAGE_UNMASK)
"""Where a simulated site may drop out of a secure round."""
SITE_STACK_BYTES = 2 << 20
"""Stack of a site thread (the default is 8 MiB): enough for torch training, and a
thousand of them reserve 2 GiB of address space, not 8."""
POLL_WAIT_S = 10


class SimulatedDropout(RuntimeError):
    """The simulation decided this site drops out of this round."""


def drifters(num_sites: int, count: int, seed: int, exclude: frozenset[int]) -> frozenset[int]:
    """Indices of the sites whose data drifts (honest sites, the same for the whole run)."""
    rng = np.random.default_rng([seed, 0xD21F7])
    honest = [int(i) for i in rng.permutation(num_sites) if int(i) not in exclude]
    return frozenset(honest[:count])


def site_name(index: int, num_sites: int) -> str:
    return f"site-{index:0{max(3, len(str(num_sites - 1)))}d}"


class ClientCache:
    """A host's built site clients, keyed by (site index, drifted), least recently used
    dropped past ``capacity``.

    When ``spill`` is set (the host has more clients than fit), a client that can keep
    state in a file (``use_state_file``, as :class:`client_sdk.torch.TorchClient`) gets
    one in a scratch folder, so a rebuilt client resumes its SCAFFOLD variate and local
    DP spend; its data shuffling restarts from its seed.
    """

    def __init__(self, capacity: int, spill: bool = False):
        self.capacity = capacity
        self.spill = spill
        self.builds = 0
        self._clients: OrderedDict[tuple[int, bool], Client] = OrderedDict()
        self._lock = threading.Lock()
        self._state_dir: Path | None = None

    def get(self, key: tuple[int, bool], build: Callable[[], Client]) -> Client:
        with self._lock:  # builds are serialized: a host trains one site at a time anyway
            client = self._clients.get(key)
            if client is None:
                client = build()
                self.builds += 1
                if self.spill and hasattr(client, "use_state_file"):
                    client.use_state_file(self._scratch() / f"{key[0]}-{int(key[1])}.safetensors")
                self._clients[key] = client
                while len(self._clients) > self.capacity:
                    self._clients.popitem(last=False)
            self._clients.move_to_end(key)
            return client

    def __len__(self) -> int:
        return len(self._clients)

    def _scratch(self) -> Path:
        if self._state_dir is None:
            self._state_dir = Path(tempfile.mkdtemp(prefix="fedcoord-sites-"))
        return self._state_dir

    def close(self) -> None:
        """Drop every client and the state files."""
        with self._lock:
            self._clients.clear()
            if self._state_dir is not None:
                shutil.rmtree(self._state_dir, ignore_errors=True)
                self._state_dir = None


class SimulatedSite(Client):
    """A task's client for one partition, built at first use, with simulated dropouts
    and, for the sites chosen as attackers, the configured Byzantine attack."""

    def __init__(
        self,
        task: Task,
        index: int,
        exp: Experiment,
        train_lock: threading.Lock,
        attack: str | None = None,
        drifts: bool = False,
        cache: ClientCache | None = None,
    ):
        self.task = task
        self.index = index
        self.exp = exp
        self.train_lock = train_lock
        self.attack = attack
        self.drifts = drifts
        self.cache = cache if cache is not None else ClientCache(2)
        self._kept: tuple[tuple[int, bool], Client] | None = None

    def client(self, config: Config, keep: bool = False) -> Client:
        """The site's client for the round of ``config``: over drifted data from
        ``federation.drift.from_round`` on, when this site drifts. With ``keep`` (a call
        before the task's fit) the site holds it until that fit, so other sites' builds
        evicting it from the cache in between cannot make one participation build twice."""
        drift = self.exp.federation.drift
        drifted = self.drifts and int(config.get("round", 0)) >= drift.from_round
        key = (self.index, drifted)
        if self._kept is not None and self._kept[0] == key:
            return self._kept[1]
        client = self.cache.get(key, lambda: self._build(drifted))
        if keep:
            self._kept = (key, client)
        return client

    def _build(self, drifted: bool) -> Client:
        fed = self.exp.federation
        extra: dict[str, Any] = {"flip_labels": True} if self.attack == "label_flip" else {}
        if drifted:
            extra["shift"] = fed.drift.kind
        return self.task.make_client(
            self.index, fed.sites, fed.partition.spec(), self.exp.seed, **extra
        )

    def _drop_stage(self, config: Config) -> str | None:
        """Where this site drops out of this round, if it does: at training, or under
        secure aggregation at any stage (so every dropout path is exercised). Seeded by
        the round and the attempt: a redone round sees other dropouts, as in life."""
        p = self.exp.federation.dropout
        if p <= 0.0:
            return None
        key = [self.exp.seed, int(config.get("round", 0)), self.index, 1]
        attempt = int(config.get("attempt", 1))
        rng = np.random.default_rng(key if attempt == 1 else [*key, attempt])  # a redo differs
        if rng.random() >= p:
            return None
        if not self.exp.privacy.secure_aggregation.enabled:
            return "fit"
        return DROP_STAGES[int(rng.integers(len(DROP_STAGES)))]

    def _maybe_drop(self, stage: str, config: Config) -> None:
        if self._drop_stage(config) == stage:
            p = self.exp.federation.dropout
            raise SimulatedDropout(f"simulated dropout at {stage} (p={p})")

    def fit(self, arrays: Arrays, config: Config) -> FitResult:
        try:
            self._maybe_drop("fit", config)
            with self.train_lock:
                result = self.client(config).fit(arrays, config)
        finally:
            self._kept = None
        if self.attack not in UPDATE_ATTACKS:
            return result
        rng = np.random.default_rng([self.exp.seed, int(config.get("round", 0)), self.index, 2])
        poisoned = attack_update(self.attack, arrays, result.arrays, rng)
        return FitResult(poisoned, result.num_examples, result.metrics)

    def evaluate(self, arrays: Arrays, config: Config) -> EvaluateResult:
        before_fit = bool(config.get(SITE_EVALUATION))  # else an evaluation task of its own
        with self.train_lock, self._released_on_error():
            return self.client(config, keep=before_fit).evaluate(arrays, config)

    def profile(self, config: Config) -> DataProfile | None:
        with self._released_on_error():
            return self.client(config, keep=True).profile(config)  # asked for before a fit

    @contextmanager
    def _released_on_error(self) -> Iterator[None]:
        """A pre-fit step that fails ends the participation: no fit will release its client."""
        try:
            yield
        except BaseException:
            self._kept = None
            raise

    def before_stage(self, stage: str, config: Config) -> None:
        self._maybe_drop(stage, config)


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes there, KiB here


class SiteHost:
    """Worker ``worker`` of ``workers``: hosts sites ``worker, worker + workers, ...`` of
    the experiment, each a thread running :func:`run_site` against ``address``."""

    def __init__(self, worker: int, workers: int, experiment_json: str, address: str):
        self.worker = worker
        self.exp = parse_experiment(experiment_json, "simulation")
        self.address = address
        fed = self.exp.federation
        self.indices = range(worker, fed.sites, workers)
        clients = len(self.indices) * (2 if fed.drift.sites > 0 else 1)
        capacity = self.exp.simulation.client_cache
        self.cache = ClientCache(capacity, spill=clients > capacity)
        self.stop_event = threading.Event()
        self.channel: grpc.Channel | None = None

    def start(self) -> None:
        """Build the task and start the site threads (they enroll and poll at once)."""
        exp, fed = self.exp, self.exp.federation
        task = load_task(exp.task.name, exp.task.model, exp.task.options, exp.seed)
        self.channel = grpc.insecure_channel(self.address, options=CHANNEL_OPTIONS)
        lock = threading.Lock()
        bad = attackers(fed.sites, fed.byzantine.sites, exp.seed)
        drifting = drifters(fed.sites, fed.drift.sites, exp.seed, bad)
        threading.stack_size(SITE_STACK_BYTES)  # for the threads of this process from now
        for index in self.indices:
            attack = fed.byzantine.attack if index in bad else None
            site = SimulatedSite(
                task, index, exp, lock, attack, drifts=index in drifting, cache=self.cache
            )
            name = site_name(index, fed.sites)
            threading.Thread(target=self._serve, args=(site, name), name=name, daemon=True).start()

    def _serve(self, site: SimulatedSite, name: str) -> None:
        try:
            run_site(
                site, self.address, name, insecure=True, stop=self.stop_event,
                poll_wait_s=POLL_WAIT_S, max_unavailable_s=120, channel=self.channel,
            )  # fmt: skip
        except Exception as exc:  # a dead site must not kill its host's other sites
            logging.getLogger("fedcoord.simulation").error("%s stopped: %s", name, exc)

    def stop(self) -> None:
        """Ask the sites to stop (a site in a long poll ends with it) and drop the state."""
        self.stop_event.set()
        self.cache.close()

    def stats(self) -> dict[str, int]:
        """Peak memory of this process, clients built so far and held now."""
        return {"peak_rss_bytes": peak_rss_bytes(), "builds": self.cache.builds,
                "cached": len(self.cache)}  # fmt: skip


def quiet_dropouts(prefix: str) -> None:
    """Log warnings and errors with ``prefix``, leaving out simulated dropouts (no error)."""
    logging.basicConfig(level=logging.WARNING, format=f"{prefix} %(levelname)s %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(lambda record: SimulatedDropout.__name__ not in record.getMessage())


def worker_main(
    worker: int,
    workers: int,
    experiment_json: str,
    address: str,
    stop: ProcessEvent,
    report: Connection,
) -> None:
    """Entry point of one local worker process (forked from the fork server, which never
    touched gRPC, so no gRPC state is inherited); sends its :meth:`SiteHost.stats` on
    ``report`` once ``stop`` is set."""
    import torch

    torch.set_num_threads(1)
    quiet_dropouts(f"[worker {worker}]")
    host = SiteHost(worker, workers, experiment_json, address)
    host.start()
    stop.wait()
    host.stop()
    report.send(host.stats())
    os._exit(0)  # site threads may sit in a long poll; nothing of theirs needs flushing
