"""Simulated sites share a host's bounded client cache: a participation (the pre-fit
evaluation, the data profile, the fit) builds its client at most once, also when other
sites' builds evict it in between, and the cache stays bounded once the fit is done."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from coordinator.experiment import parse_experiment
from coordinator.tasks import load_task
from simulations.sites import ClientCache, SimulatedSite
from strategies.drift import PROFILE_BINS, SITE_EVALUATION

EXPERIMENT = """\
name: cache
seed: 5
rounds: 2
task: {name: synthetic, options: {num_features: 4, samples_per_site: 20, test_samples: 20}}
federation: {sites: 4}
training: {local_epochs: 1, batch_size: 10, optimizer: {name: sgd, lr: 0.1}}
"""


def make_sites(capacity: int) -> tuple[list[SimulatedSite], ClientCache, dict]:
    exp = parse_experiment(EXPERIMENT)
    task = load_task(exp.task.name, exp.task.model, exp.task.options, exp.seed)
    cache, lock = ClientCache(capacity), threading.Lock()
    sites = [SimulatedSite(task, i, exp, lock, cache=cache) for i in range(exp.federation.sites)]
    return sites, cache, task.initial_arrays()


def participate_until_fit(site: SimulatedSite, model: dict, config: dict) -> None:
    site.evaluate(model, config)
    site.profile(config)


def test_one_participation_builds_its_client_once_though_evicted_before_its_fit():
    sites, cache, model = make_sites(capacity=1)
    config = {"round": 1, SITE_EVALUATION: True, PROFILE_BINS: 0}
    participate_until_fit(sites[0], model, config)
    participate_until_fit(sites[1], model, config)  # evicts site 0's client from the cache
    sites[0].fit(model, config)
    sites[1].fit(model, config)
    assert cache.builds == 2 and len(cache) == 1
    sites[0].fit(model, {"round": 2})  # the fit released it: evicted, so built again
    assert cache.builds == 3


def test_an_evaluation_task_of_its_own_keeps_nothing():
    sites, cache, model = make_sites(capacity=1)
    sites[0].evaluate(model, {"round": 1})
    sites[1].evaluate(model, {"round": 1})
    sites[0].evaluate(model, {"round": 1})
    assert cache.builds == 3


def test_a_failed_pre_fit_evaluation_keeps_nothing():
    sites, cache, model = make_sites(capacity=1)
    config = {"round": 1, SITE_EVALUATION: True}
    wrong = {name: np.zeros(1, np.float32) for name in model}  # shapes the model refuses
    with pytest.raises(Exception):  # noqa: B017 - whatever the model raises
        sites[0].evaluate(wrong, config)
    sites[1].evaluate(model, {"round": 1})  # evicts site 0's client from the cache
    sites[0].evaluate(model, {"round": 1})  # not held by the failed participation: rebuilt
    assert cache.builds == 3
