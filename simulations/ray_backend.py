"""``simulation.backend: ray``: the simulated sites in Ray actors.

The coordinator stays in the ``fedcoord simulate`` process. Each of the
``simulation.workers`` actors hosts a :class:`~simulations.sites.SiteHost` (every
``workers``-th site, trained one at a time, all over real gRPC to the coordinator) and
reserves ``simulation.cpus_per_site`` CPUs and ``simulation.gpus_per_site`` GPUs: what
the one site it trains at a time needs. The built-in tasks train on the CPU; a GPU is
only reserved (Ray sets the actor's ``CUDA_VISIBLE_DEVICES``).

With ``simulation.ray_address: null`` a local Ray instance is started with as many CPUs
as the actors reserve, and the coordinator listens on 127.0.0.1. With an address
(``auto``, ``HOST:PORT``, ``ray://HOST:PORT``) the run joins that cluster; the
coordinator then listens on 0.0.0.0 and the actors dial this host's address as Ray
sees it (``ray.util.get_node_ip_address()``), so that address must be reachable from
every node, and every node needs fedcoord (the same version) installed. Ray is
imported only here, and only when the backend is used.
"""

from __future__ import annotations

import importlib
import logging
import math
import os
import sys
import threading
import warnings
from collections.abc import Callable
from types import ModuleType
from typing import Any

from coordinator.errors import ConfigError
from coordinator.experiment import Experiment
from simulations.sites import SiteHost, quiet_dropouts

STATS_TIMEOUT_S = 10.0
"""How long to wait for the stopping actors' statistics."""


def import_ray() -> ModuleType:
    """The ``ray`` module, or a ConfigError naming the extra that installs it."""
    try:
        return importlib.import_module("ray")
    except ImportError:
        raise ConfigError(
            "simulation.backend",
            "ray needs Ray installed: pip install 'fedcoord[ray]' (or use backend: local)",
        ) from None


class SiteActor:
    """The body of one Ray actor: a :class:`SiteHost` in the actor's process."""

    def __init__(self, worker: int, workers: int, experiment_json: str, address: str, threads: int):
        import torch

        torch.set_num_threads(threads)
        quiet_dropouts(f"[ray worker {worker}]")
        self.host = SiteHost(worker, workers, experiment_json, address)
        self.host.start()

    def ready(self) -> bool:
        return True

    def stop(self) -> dict[str, int]:
        """Stop the sites; the host's statistics."""
        self.host.stop()
        return self.host.stats()


class RayWorkers:
    """The sites of an experiment in ``simulation.workers`` Ray actors."""

    kind = "Ray actor(s)"

    def __init__(self, exp: Experiment):
        self.exp = exp
        self.ray = import_ray()
        sim = exp.simulation
        self.local = sim.ray_address is None
        self.listen_address = "127.0.0.1:0" if self.local else "0.0.0.0:0"
        self.count = min(sim.workers, exp.federation.sites)
        self.actors: list[Any] = []
        self.started_ray = False
        self.stats: list[dict[str, int]] = []

    def prepare(self) -> None:
        """Start or join Ray and check that the actors fit in it."""
        ray = self.ray
        options: dict[str, Any] = {
            "log_to_driver": False,  # the sites' warnings stay in Ray's log files
            "logging_level": logging.WARNING,
        }
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # nothing reported home
        if not ray.is_initialized():
            with warnings.catch_warnings():  # Ray's notice on accelerator variables
                warnings.filterwarnings("ignore", category=FutureWarning, module="ray")
                self._init(options)
        try:
            self._check_fits(ray.cluster_resources())
        except ConfigError:
            self.stop()
            raise

    def _init(self, options: dict[str, Any]) -> None:
        ray, sim = self.ray, self.exp.simulation
        if self.local:
            cpus = math.ceil(self.count * sim.cpus_per_site)
            ray.init(num_cpus=cpus, include_dashboard=False, **options)
            self.started_ray = True
            return
        try:
            ray.init(address=sim.ray_address, **options)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise ConfigError(
                "simulation.ray_address",
                f"cannot join Ray at {sim.ray_address!r}: {str(exc).splitlines()[0]}",
            ) from None

    def _check_fits(self, have: dict[str, float]) -> None:
        sim = self.exp.simulation
        for what, per_site in (("CPU", sim.cpus_per_site), ("GPU", sim.gpus_per_site)):
            need = self.count * per_site
            if need > have.get(what, 0.0) + 1e-9:
                key = "simulation.cpus_per_site" if what == "CPU" else "simulation.gpus_per_site"
                raise ConfigError(
                    key,
                    f"{self.count} actor(s) x {per_site:g} {what} need {need:g} {what}s; the "
                    f"Ray cluster has {have.get(what, 0.0):g} (lower simulation.workers?)",
                )

    def start(self, port: int, on_failure: Callable[[str], None]) -> int:
        """Start the actors against the coordinator on ``port``; ``on_failure`` hears of an
        actor that could not start (or was not placed within the site wait)."""
        ray, sim = self.ray, self.exp.simulation
        host = "127.0.0.1" if self.local else ray.util.get_node_ip_address()
        address = f"{host}:{port}"
        actor = ray.remote(SiteActor)
        threads = max(1, int(sim.cpus_per_site))
        for w in range(self.count):
            options = actor.options(num_cpus=sim.cpus_per_site, num_gpus=sim.gpus_per_site)
            self.actors.append(
                options.remote(w, sim.workers, self.exp.canonical_json(), address, threads)
            )
        wait_s = self.exp.federation.sampling.wait_for_sites_s
        refs = [a.ready.remote() for a in self.actors]
        threading.Thread(
            target=self._watch, args=(refs, wait_s, on_failure), name="ray-watch", daemon=True
        ).start()
        return len(self.actors)

    def _watch(self, refs: list[Any], wait_s: float, on_failure: Callable[[str], None]) -> None:
        try:
            self.ray.get(refs, timeout=wait_s)
        except self.ray.exceptions.GetTimeoutError:
            on_failure(f"Ray did not start every site actor within {wait_s:g}s")
        except Exception as exc:  # an actor died in its constructor
            on_failure(f"a Ray site actor failed: {str(exc).strip().splitlines()[-1]}")

    def stop(self) -> list[dict[str, int]]:
        """Stop and kill the actors (their statistics first); shut Ray down if started."""
        ray = self.ray
        if self.actors:
            try:
                done = ray.get([a.stop.remote() for a in self.actors], timeout=STATS_TIMEOUT_S)
                self.stats.extend(done)
            except Exception as exc:  # a dead actor has no statistics to give
                print(f"fedcoord: Ray actors' statistics lost: {exc}", file=sys.stderr)
            for a in self.actors:
                ray.kill(a)
            self.actors = []
        if self.started_ray:
            ray.shutdown()
            self.started_ray = False
        return self.stats
