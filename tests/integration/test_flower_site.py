"""An unmodified Flower NumPyClient joins a real fedcoord coordinator as a site."""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np
import pytest
import torch

from client_sdk.flower import FlowerSite
from coordinator.server import Coordinator
from coordinator.tasks import load_task
from tests.integration.clients import start_site_threads

fl = pytest.importorskip("flwr.client")
pytestmark = pytest.mark.integration

EXPERIMENT = """
name: flower-interop
seed: 2
rounds: 3
task: {name: digits}
federation:
  sites: 3
  sampling: {min_sites: 3, timeout_s: 60}
training: {local_epochs: 1, batch_size: 16, optimizer: {name: sgd, lr: 0.05}}
"""


class DigitsNumPyClient(fl.NumPyClient):
    """A plain Flower client, written the way Flower's tutorials write them."""

    def __init__(self, partition: int):
        task = load_task("digits", None, {}, 0)
        self.inner = task.make_client(partition, 3, {"kind": "iid"}, 0)
        self.net = self.inner.model
        self.calls = 0

    def get_parameters(self, config):
        return [v.cpu().numpy() for v in self.net.state_dict().values()]

    def set_parameters(self, parameters):
        keys = self.net.state_dict().keys()
        state = OrderedDict((k, torch.tensor(v)) for k, v in zip(keys, parameters, strict=True))
        self.net.load_state_dict(state, strict=True)

    def fit(self, parameters, config):
        self.set_parameters(parameters)
        self.calls += 1
        named = {k: v.cpu().numpy() for k, v in self.net.state_dict().items()}
        result = self.inner.fit(named, config)
        self.set_parameters([result.arrays[k] for k in self.net.state_dict()])
        return (
            self.get_parameters({}),
            result.num_examples,
            {"loss": result.metrics["loss"], "note": "flower"},
        )

    def evaluate(self, parameters, config):
        self.set_parameters(parameters)
        named = {k: v.cpu().numpy() for k, v in self.net.state_dict().items()}
        result = self.inner.evaluate(named, config)
        return result.loss, result.num_examples, {"accuracy": result.metrics["accuracy"]}


def test_flower_numpy_clients_train_with_a_native_site(tmp_path):
    coordinator = Coordinator(tmp_path / "coord", "127.0.0.1:0", open_enrollment=True)
    coordinator.start(run_engine=False)
    inferred = DigitsNumPyClient(0)
    named = DigitsNumPyClient(1)
    sites = {
        "flower-inferred": FlowerSite(inferred),
        "flower-named": FlowerSite(named, names=list(named.net.state_dict())),
        "native": load_task("digits", None, {}, 0).make_client(2, 3, {"kind": "iid"}, 0),
    }
    stop = threading.Event()
    start_site_threads(coordinator.address, sites, stop)
    try:
        run = coordinator.engine.submit(EXPERIMENT)
        final = coordinator.engine.execute(run.run_id)
        entries = coordinator.db.ledger_entries()
    finally:
        stop.set()
        coordinator.stop(grace=0.5)
    assert final.status == "finished", final.error
    rounds = [e.payload for e in entries if e.kind == "round_committed"]
    assert [r["participants"] for r in rounds] == [sorted(sites)] * 3
    assert inferred.calls == 3 and named.calls == 3
    assert rounds[-1]["metrics"]["accuracy"] > 0.5


def test_ambiguous_layouts_need_names():
    class Twins(fl.NumPyClient):
        def get_parameters(self, config):
            return [np.zeros(3, np.float32), np.ones(3, np.float32)]

    site = FlowerSite(Twins())
    arrays = {"a": np.zeros(3, np.float32), "b": np.zeros(3, np.float32)}
    with pytest.raises(Exception, match="pass FlowerSite"):
        site.fit(arrays, {})
