"""The experiment schema: defaults, overrides, canonical form and named errors."""

from __future__ import annotations

import pytest

from coordinator.errors import ConfigError
from coordinator.experiment import load_experiment, parse_experiment
from tests.conftest import ROOT

BASE = "name: t\nrounds: 2\ntask: {name: digits}\n"


def test_defaults_are_filled_in():
    exp = parse_experiment(BASE)
    assert exp.seed == 0 and exp.federation.sites == 10
    assert exp.federation.sampling.method == "fixed" and exp.federation.sampling.timeout_s == 60
    assert exp.training.optimizer.name == "sgd" and exp.strategy.name == "fedavg"
    assert exp.privacy.dp is None and exp.privacy.secure_aggregation.enabled is False
    assert exp.simulation.workers == 2


def test_the_demo_experiment_loads():
    exp = load_experiment(ROOT / "examples" / "digits.yaml")
    assert exp.name == "digits-fedavg" and exp.rounds == 20 and exp.federation.sites == 10
    assert exp.federation.partition.spec() == {"kind": "dirichlet", "alpha": 0.5}
    assert exp.round_config()["lr"] == 0.05


def test_overrides_parse_yaml_scalars_and_create_mappings():
    exp = parse_experiment(
        BASE,
        overrides=[
            "rounds=5",
            "training.optimizer.lr=0.2",
            "federation.partition.kind=shards",
            "seed=11",
        ],
    )
    assert exp.rounds == 5 and exp.training.optimizer.lr == 0.2 and exp.seed == 11
    assert exp.federation.partition.spec() == {"kind": "shards", "labels_per_site": 2}


@pytest.mark.parametrize(
    "override, key",
    [
        ("rounds", "--set"),
        ("=3", "--set"),
        ("a..b=1", "--set"),
        ("name.inner=3", "name"),
        ("federation.sites=-1", "federation.sites"),
    ],
)
def test_bad_overrides_name_the_problem(override, key):
    with pytest.raises(ConfigError) as info:
        parse_experiment(BASE, overrides=[override])
    assert info.value.key == key


def test_canonical_form_ignores_layout_and_tracks_values():
    a = parse_experiment(BASE + "training: {local_epochs: 2, batch_size: 8}\n")
    b = parse_experiment(
        "task: {name: digits}\ntraining:\n  batch_size: 8\n  local_epochs: 2\nrounds: 2\nname: t\n"
    )
    c = parse_experiment(BASE + "training: {local_epochs: 3, batch_size: 8}\n")
    assert a.canonical_json() == b.canonical_json() and a.config_digest() == b.config_digest()
    assert a.config_digest() != c.config_digest()
    assert parse_experiment(a.canonical_json()) == a  # the canonical form parses back


@pytest.mark.parametrize(
    "text, key",
    [
        (
            BASE + "federation: {sites: 3, sampling: {min_sites: 4}}\n",
            "federation.sampling.min_sites",
        ),
        (BASE + "federation: {sites: 3, byzantine: {sites: 4}}\n", "federation.byzantine.sites"),
        (BASE + "federation: {dropout: 1.0}\n", "federation.dropout"),
        (BASE + "mlflow: {tracking_uri: x}\n", "mlflow"),
        (BASE + "drift: {psi: 0.2}\n", "drift"),
        (BASE + "privacy: {local_dp: {epsilon: 1}}\n", "privacy.local_dp"),
        (BASE.replace("name: t", "name: 'bad name!'"), "name"),
        (BASE + "training: {optimizer: {name: lbfgs}}\n", "training.optimizer.name"),
        (BASE + "strategy: {name: krum}\n", "strategy.name"),
        (BASE + "training: {optimizer: {momentum: 1.0}}\n", "training.optimizer.momentum"),
    ],
)
def test_invalid_settings_raise_with_their_key(text, key):
    with pytest.raises(ConfigError) as info:
        parse_experiment(text)
    assert info.value.key == key
