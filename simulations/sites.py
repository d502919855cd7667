"""Simulated data sites: real gRPC clients hosted in worker processes.

Each worker process hosts every ``workers``-th site of the federation as a thread
running :func:`client_sdk.run_site` over its own channel to the coordinator on
127.0.0.1. A site's data and model are built lazily at its first task, and a worker
trains one site at a time, so ``simulation.workers`` bounds the training concurrency.
"""

from __future__ import annotations

import logging
import os
import threading
from multiprocessing.synchronize import Event as ProcessEvent
from typing import Any

import numpy as np

from client_sdk import Client, EvaluateResult, FitResult, run_site
from client_sdk.api import Arrays, Config
from coordinator.experiment import Experiment, parse_experiment
from coordinator.tasks import Task, load_task
from simulations.attacks import UPDATE_ATTACKS, attack_update, attackers
from strategies.drift import DataProfile
from strategies.secagg.messages import STAGE_MASKED, STAGE_SHARE, STAGE_UNMASK

DROP_STAGES = ("fit", STAGE_SHARE, STAGE_MASKED, STAGE_UNMASK)
"""Where a simulated site may drop out of a secure round."""


class SimulatedDropout(RuntimeError):
    """The simulation decided this site drops out of this round."""


def drifters(num_sites: int, count: int, seed: int, exclude: frozenset[int]) -> frozenset[int]:
    """Indices of the sites whose data drifts (honest sites, the same for the whole run)."""
    rng = np.random.default_rng([seed, 0xD21F7])
    honest = [int(i) for i in rng.permutation(num_sites) if int(i) not in exclude]
    return frozenset(honest[:count])


def site_name(index: int, num_sites: int) -> str:
    return f"site-{index:0{max(3, len(str(num_sites - 1)))}d}"


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
    ):
        self.task = task
        self.index = index
        self.exp = exp
        self.train_lock = train_lock
        self.attack = attack
        self.drifts = drifts
        self._clients: dict[bool, Client] = {}

    def client(self, config: Config) -> Client:
        """The site's client for the round of ``config``: over drifted data from
        ``federation.drift.from_round`` on, when this site drifts."""
        drift = self.exp.federation.drift
        drifted = self.drifts and int(config.get("round", 0)) >= drift.from_round
        if drifted not in self._clients:
            fed = self.exp.federation
            extra: dict[str, Any] = {"flip_labels": True} if self.attack == "label_flip" else {}
            if drifted:
                extra["shift"] = drift.kind
            self._clients[drifted] = self.task.make_client(
                self.index, fed.sites, fed.partition.spec(), self.exp.seed, **extra
            )
        return self._clients[drifted]

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
        self._maybe_drop("fit", config)
        with self.train_lock:
            result = self.client(config).fit(arrays, config)
        if self.attack not in UPDATE_ATTACKS:
            return result
        rng = np.random.default_rng([self.exp.seed, int(config.get("round", 0)), self.index, 2])
        poisoned = attack_update(self.attack, arrays, result.arrays, rng)
        return FitResult(poisoned, result.num_examples, result.metrics)

    def evaluate(self, arrays: Arrays, config: Config) -> EvaluateResult:
        with self.train_lock:
            return self.client(config).evaluate(arrays, config)

    def profile(self, config: Config) -> DataProfile | None:
        return self.client(config).profile(config)

    def before_stage(self, stage: str, config: Config) -> None:
        self._maybe_drop(stage, config)


def worker_main(
    worker: int, workers: int, experiment_json: str, address: str, stop: ProcessEvent
) -> None:
    """Entry point of one worker process (forked from the fork server, which never
    touched gRPC, so no gRPC state is inherited)."""
    import torch

    torch.set_num_threads(1)
    logging.basicConfig(
        level=logging.WARNING, format=f"[worker {worker}] %(levelname)s %(message)s"
    )
    for handler in logging.getLogger().handlers:  # a simulated dropout is no error
        handler.addFilter(lambda record: SimulatedDropout.__name__ not in record.getMessage())
    exp = parse_experiment(experiment_json, "simulation")
    task = load_task(exp.task.name, exp.task.model, exp.task.options, exp.seed)
    lock = threading.Lock()
    site_stop = threading.Event()
    n = exp.federation.sites
    byzantine = exp.federation.byzantine
    bad = attackers(n, byzantine.sites, exp.seed)
    drifting = drifters(n, exp.federation.drift.sites, exp.seed, bad)
    for index in range(worker, n, workers):
        attack = byzantine.attack if index in bad else None
        site = SimulatedSite(task, index, exp, lock, attack, drifts=index in drifting)
        threading.Thread(
            target=_serve_site,
            args=(site, address, site_name(index, n), site_stop),
            name=site_name(index, n),
            daemon=True,
        ).start()
    stop.wait()
    site_stop.set()
    os._exit(0)  # site threads may sit in a long poll; nothing of theirs needs flushing


def _serve_site(site: SimulatedSite, address: str, name: str, stop: threading.Event) -> None:
    try:
        run_site(
            site, address, name, insecure=True, stop=stop, poll_wait_s=10, max_unavailable_s=120
        )
    except Exception as exc:  # a dead site must not kill its worker's other sites
        logging.getLogger("fedcoord.simulation").error("%s stopped: %s", name, exc)
