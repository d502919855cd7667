"""The experiment schema: defaults, overrides, canonical form and named errors."""

from __future__ import annotations

import json
from pathlib import Path

import pydantic
import pytest

from coordinator.errors import ConfigError
from coordinator.experiment import Drift, Experiment, load_experiment, parse_experiment
from tests.conftest import ROOT

BASE = "name: t\nrounds: 2\ntask: {name: digits}\n"

# The DESIGN.md example, with what this version refuses (DP) switched off.
FULL = """\
name: digits-fedavg
seed: 7
rounds: 20
task: {name: digits, model: mlp, options: {hidden: [64]}}
federation:
  sites: 10
  partition: {kind: dirichlet, alpha: 0.5}
  sampling: {fraction: 1.0, method: poisson, min_sites: 2, timeout_s: 60}
  dropout: 0.0
  byzantine: {sites: 0, attack: sign_flip}
training: {local_epochs: 1, batch_size: 32, optimizer: {name: sgd, lr: 0.05}}
strategy: {name: fedavg}
privacy:
  dp: null
  local_dp: null
  secure_aggregation: {enabled: false}
mlflow: null
drift: {}
simulation: {backend: local, workers: 2}
"""


def error_of(text: str, overrides: tuple[str, ...] = ()) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_experiment(text, overrides=overrides)
    return info.value


# valid input -----------------------------------------------------------------------------
def test_the_full_design_example_parses():
    exp = parse_experiment(FULL)
    assert (exp.name, exp.seed, exp.rounds) == ("digits-fedavg", 7, 20)
    assert exp.task.model == "mlp" and exp.task.options == {"hidden": [64]}
    assert exp.federation.partition.spec() == {"kind": "dirichlet", "alpha": 0.5}
    assert exp.federation.sampling.method == "poisson"
    assert exp.federation.sampling.timeout_s == 60.0
    assert isinstance(exp.federation.sampling.timeout_s, float)
    assert exp.privacy.dp is None and exp.mlflow is None and exp.drift == Drift()


def test_defaults_are_filled_in():
    exp = parse_experiment(BASE)
    assert exp.seed == 0 and exp.task.model is None and exp.task.options == {}
    fed = exp.federation
    assert fed.sites == 10 and fed.dropout == 0.0
    assert fed.partition.kind == "iid" and fed.partition.spec() == {"kind": "iid"}
    assert (fed.partition.alpha, fed.partition.labels_per_site) == (0.5, 2)
    assert (fed.sampling.fraction, fed.sampling.method) == (1.0, "fixed")
    assert (fed.sampling.min_sites, fed.sampling.timeout_s) == (2, 60.0)
    assert (fed.byzantine.sites, fed.byzantine.attack) == (0, "sign_flip")
    assert (exp.training.local_epochs, exp.training.batch_size) == (1, 32)
    opt = exp.training.optimizer
    assert (opt.name, opt.lr, opt.momentum, opt.weight_decay) == ("sgd", 0.05, 0.0, 0.0)
    assert exp.strategy.name == "fedavg"
    assert exp.privacy.dp is None and exp.privacy.local_dp is None
    assert exp.privacy.secure_aggregation.enabled is False
    assert (exp.simulation.backend, exp.simulation.workers) == ("local", 2)


def test_the_demo_experiment_loads():
    exp = load_experiment(ROOT / "examples" / "digits.yaml")
    assert (exp.name, exp.seed, exp.rounds) == ("digits-fedavg", 7, 20)
    assert (exp.task.name, exp.task.model) == ("digits", "mlp")
    assert exp.federation.sites == 10
    assert exp.federation.partition.spec() == {"kind": "dirichlet", "alpha": 0.5}
    sampling = exp.federation.sampling
    assert (sampling.fraction, sampling.method, sampling.min_sites) == (1.0, "fixed", 2)
    assert exp.training.local_epochs == 2 and exp.training.optimizer.name == "sgd"
    assert exp.strategy.name == "fedavg" and exp.simulation.workers == 2


def test_exponent_floats_are_numbers_and_the_canonical_form_parses_back():
    exp = parse_experiment(BASE + "training: {optimizer: {lr: 1e-5, weight_decay: 5E-4}}\n")
    assert exp.training.optimizer.lr == 1e-5 and exp.training.optimizer.weight_decay == 5e-4
    assert '"lr":1e-05' in exp.canonical_json()  # JSON spelling PyYAML alone reads as text
    assert parse_experiment(exp.canonical_json()) == exp


def test_integers_are_accepted_for_floats():
    exp = parse_experiment(BASE + "training: {optimizer: {lr: 1}}\n")
    assert exp.training.optimizer.lr == 1.0 and isinstance(exp.training.optimizer.lr, float)


def test_settings_are_immutable():
    exp = parse_experiment(BASE)
    with pytest.raises(pydantic.ValidationError):
        exp.rounds = 3  # type: ignore[misc]


def test_round_config_is_flat_and_complete():
    exp = parse_experiment(
        BASE.replace("rounds", "seed: 5\nrounds")
        + "training: {local_epochs: 3, batch_size: 8, optimizer: {name: adam, lr: 0.01}}\n"
    )
    assert exp.round_config() == {
        "local_epochs": 3,
        "batch_size": 8,
        "optimizer": "adam",
        "lr": 0.01,
        "momentum": 0.0,
        "weight_decay": 0.0,
        "seed": 5,
    }


# invalid input ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, key",
    [
        (BASE + "trainig: {local_epochs: 1}\n", "trainig"),
        (BASE + "training: {optimiser: {name: sgd}}\n", "training.optimiser"),
        (BASE + "training: {optimizer: {betas: [0.9, 0.99]}}\n", "training.optimizer.betas"),
        (BASE + "federation: {sampling: {rate: 0.5}}\n", "federation.sampling.rate"),
        (BASE.replace("{name: digits}", "{name: digits, data: x}"), "task.data"),
        (BASE + "privacy: {secure_aggregation: {mode: full}}\n", "privacy.secure_aggregation.mode"),
        (BASE + "strategy: {name: fedavg, mu: 0.1}\n", "strategy.mu"),
    ],
)
def test_unknown_keys_are_named_by_their_full_path(text, key):
    err = error_of(text)
    assert (err.key, err.message) == (key, "unknown key")
    assert str(err) == f"{key}: unknown key"


@pytest.mark.parametrize(
    "text, key, message",
    [
        (BASE.replace("rounds: 2", "rounds: many"), "rounds", 'must be an integer (got "many")'),
        (BASE.replace("rounds: 2", "rounds: 2.5"), "rounds", "must be an integer (got 2.5)"),
        (BASE + "seed: '3'\n", "seed", 'must be an integer (got "3")'),
        (BASE + "federation: {sites: true}\n", "federation.sites", "must be an integer"),
        (BASE + "training: {optimizer: {lr: fast}}\n", "training.optimizer.lr", "must be a number"),
        (BASE + "federation: [1, 2]\n", "federation", "must be a mapping (got [1, 2])"),
        (BASE + "federation:\n", "federation", "must be a mapping (got null)"),
        (BASE.replace("{name: digits}", "{name: digits, options: [1]}"), "task.options", "mapping"),
        (BASE.replace("name: t", "name: 12"), "name", "must be a string (got 12)"),
        (
            BASE + "privacy: {secure_aggregation: {enabled: 'no'}}\n",
            "privacy.secure_aggregation.enabled",
            "must be true or false",
        ),
    ],
)
def test_wrong_types_are_refused_not_coerced(text, key, message):
    err = error_of(text)
    assert err.key == key and message in err.message


@pytest.mark.parametrize(
    "text, key, message",
    [
        (
            BASE + "federation: {sampling: {fraction: 1.5}}\n",
            "federation.sampling.fraction",
            "must be <= 1 (got 1.5)",
        ),
        (BASE + "federation: {sampling: {fraction: 0}}\n", "federation.sampling.fraction", "> 0"),
        (BASE + "federation: {sampling: {timeout_s: .inf}}\n", "federation.sampling.timeout_s", ""),
        (BASE + "training: {optimizer: {lr: .nan}}\n", "training.optimizer.lr", "finite"),
        (BASE + "training: {optimizer: {lr: -1}}\n", "training.optimizer.lr", "must be > 0"),
        (BASE + "training: {optimizer: {momentum: 1.0}}\n", "training.optimizer.momentum", "< 1"),
        (BASE + "federation: {dropout: 1.0}\n", "federation.dropout", "must be < 1 (got 1.0)"),
        (BASE + "federation: {sites: 0}\n", "federation.sites", "must be >= 1 (got 0)"),
        (BASE + "federation: {partition: {alpha: 0}}\n", "federation.partition.alpha", "> 0"),
        (BASE.replace("rounds: 2", "rounds: 100001"), "rounds", "must be <= 100000"),
        (BASE + "seed: -1\n", "seed", "must be >= 0 (got -1)"),
        (BASE + "simulation: {workers: 257}\n", "simulation.workers", "<= 256"),
        (BASE + "training: {batch_size: 0}\n", "training.batch_size", ">= 1"),
        (BASE.replace("name: t", "name: 'bad name!'"), "name", 'got "bad name!"'),
        (BASE.replace("name: t", f"name: {'x' * 65}"), "name", "1 to 64"),
        (BASE.replace("{name: digits}", "{name: 'my tasks:build'}"), "task.name", "callable"),
        (BASE.replace("{name: digits}", "{name: digits, model: ''}"), "task.model", "empty"),
    ],
)
def test_out_of_range_values_are_refused(text, key, message):
    err = error_of(text)
    assert err.key == key and message in err.message


@pytest.mark.parametrize(
    "text, key, choices",
    [
        (
            BASE + "federation: {partition: {kind: random}}\n",
            "federation.partition.kind",
            "iid, dirichlet, shards",
        ),
        (
            BASE + "federation: {sampling: {method: all}}\n",
            "federation.sampling.method",
            "poisson, fixed",
        ),
        (
            BASE + "federation: {byzantine: {attack: x}}\n",
            "federation.byzantine.attack",
            "sign_flip, gaussian, scale, nan, label_flip",
        ),
        (BASE + "training: {optimizer: {name: lbfgs}}\n", "training.optimizer.name", "sgd, adam"),
        (BASE + "simulation: {backend: dask}\n", "simulation.backend", "local"),
    ],
)
def test_bad_choices_list_the_allowed_values(text, key, choices):
    err = error_of(text)
    assert err.key == key and err.message.startswith(f"must be one of: {choices}")


def test_unknown_strategies_list_the_built_in_ones():
    err = error_of(BASE + "strategy: {name: no_such_rule}\n")
    assert err.key == "strategy.name" and "built-in: " in err.message and "fedavg" in err.message


@pytest.mark.parametrize(
    "text, key",
    [
        ("rounds: 2\ntask: {name: digits}\n", "name"),
        ("name: t\ntask: {name: digits}\n", "rounds"),
        ("name: t\nrounds: 2\n", "task"),
        ("name: t\nrounds: 2\ntask: {model: mlp}\n", "task.name"),
        ("", "name"),
    ],
)
def test_missing_required_keys_are_named(text, key):
    err = error_of(text)
    assert (err.key, err.message) == (key, "required key is missing")


def test_the_first_problem_in_file_order_is_reported():
    err = error_of("name: 'a b'\nrounds: 0\ntask: {name: digits}\n")
    assert err.key == "name"


@pytest.mark.parametrize(
    "text, key",
    [
        (
            BASE + "federation: {sites: 3, sampling: {min_sites: 4}}\n",
            "federation.sampling.min_sites",
        ),
        (BASE + "federation: {sites: 3, byzantine: {sites: 4}}\n", "federation.byzantine.sites"),
    ],
)
def test_site_counts_must_fit_the_federation(text, key):
    err = error_of(text)
    assert err.key == key and "federation.sites = 3 (got 4)" in err.message


@pytest.mark.parametrize(
    "text, key, need",
    [
        (BASE + "strategy: {name: krum, f: 4}\n", "strategy.f", 11),
        (BASE + "strategy: {name: bulyan, f: 2}\n", "strategy.f", 11),
        (BASE + "federation: {sites: 2}\nstrategy: {name: krum}\n", "strategy.name", 3),
        (BASE + "strategy: {name: multikrum, f: 1, m: 10}\n", "strategy.f", 11),
    ],
)
def test_robust_strategies_must_fit_the_federation(text, key, need):
    err = error_of(text)
    assert err.key == key
    assert f"needs at least {need} updates per round" in err.message


def test_validation_bounds_parse_and_are_checked():
    exp = parse_experiment(BASE + "validation: {max_examples: 5000, max_update_norm: 3}\n")
    assert (exp.validation.max_examples, exp.validation.max_update_norm) == (5000, 3.0)
    assert parse_experiment(BASE).validation.max_update_norm is None
    err = error_of(BASE + "validation: {max_update_norm: 0}\n")
    assert err.key == "validation.max_update_norm" and err.message.startswith("must be > 0")
    assert error_of(BASE + "validation: {norm: 1}\n").key == "validation.norm"


def test_ray_backend_settings_parse_with_defaults():
    sim = parse_experiment(BASE + "simulation: {backend: ray, gpus_per_site: 0.5}\n").simulation
    assert (sim.backend, sim.ray_address, sim.cpus_per_site, sim.gpus_per_site) == (
        "ray",
        None,
        1.0,
        0.5,
    )
    assert parse_experiment(BASE).simulation.client_cache == 64


@pytest.mark.parametrize("key", ["ray_address: auto", "cpus_per_site: 2", "gpus_per_site: 1"])
def test_ray_settings_are_refused_under_the_local_backend(key):
    err = error_of(BASE + f"simulation: {{{key}}}\n")
    assert err.key == f"simulation.{key.split(':')[0]}" and "ray backend" in err.message


POISSON = "federation: {sampling: {method: poisson, fraction: 0.5}}\n"


def test_central_dp_parses_with_defaults():
    exp = parse_experiment(BASE + POISSON + "privacy: {dp: {noise_multiplier: 1.1}}\n")
    dp = exp.privacy.dp
    assert dp is not None and (dp.mode, dp.clip_norm, dp.accountant) == ("central", 1.0, "rdp")
    assert dp.delta is None and dp.epsilon_budget is None and dp.adaptive_clipping is None


@pytest.mark.parametrize(
    "text, key, message",
    [
        (
            BASE + "privacy: {dp: {noise_multiplier: 1}}\n",
            "federation.sampling.method",
            "privacy.dp needs poisson sampling",
        ),
        (
            BASE + POISSON + "privacy: {dp: {}}\n",
            "privacy.dp.noise_multiplier",
            "give exactly one of noise_multiplier and target_epsilon",
        ),
        (
            BASE + POISSON + "privacy: {dp: {noise_multiplier: 1, target_epsilon: 2}}\n",
            "privacy.dp.noise_multiplier",
            "give exactly one",
        ),
        (
            BASE + POISSON + "strategy: {name: krum}\nprivacy: {dp: {noise_multiplier: 1}}\n",
            "strategy.name",
            "krum cannot run under privacy.dp",
        ),
        (
            BASE + POISSON + "privacy: {dp: {noise_multiplier: 1, delta: 0.5}}\n",
            "privacy.dp.delta",
            "must be < 1/federation.sites",
        ),
        (
            BASE
            + POISSON
            + "privacy: {dp: {noise_multiplier: 1, mode: client, adaptive_clipping: {}}}\n",
            "privacy.dp.adaptive_clipping",
            "needs mode: central",
        ),
        (
            BASE + POISSON + "privacy: {dp: {target_epsilon: 5, epsilon_budget: 3}}\n",
            "privacy.dp.target_epsilon",
            "exceeds epsilon_budget",
        ),
        (
            BASE + POISSON + "privacy: {dp: {noise_multiplier: 1, accountant: gdp}}\n",
            "privacy.dp.accountant",
            "must be one of: rdp, prv",
        ),
        (BASE + "privacy: {local_dp: {}}\n", "privacy.local_dp.noise_multiplier", "required"),
    ],
)
def test_dp_settings_that_cannot_be_honoured_are_refused(text, key, message):
    err = error_of(text)
    assert err.key == key and message in err.message


def test_local_dp_reaches_the_round_config():
    exp = parse_experiment(
        BASE + "privacy: {local_dp: {noise_multiplier: 0.8, epsilon_budget: 5}}\n"
    )
    config = exp.round_config()
    assert config["local_dp_noise_multiplier"] == 0.8 and config["local_dp_epsilon_budget"] == 5
    assert config["local_dp_max_grad_norm"] == 1.0 and config["local_dp_accountant"] == "rdp"


def test_yaml_syntax_errors_give_the_line():
    err = error_of("name: t\nrounds: [\n")
    assert err.key == "" and "YAML syntax error at line 3" in err.message
    assert err.message.startswith("<experiment>:")


def test_duplicate_keys_are_refused_with_their_line():
    err = error_of(BASE + "rounds: 3\n")
    assert "line 4" in err.message and "duplicate key 'rounds'" in err.message


@pytest.mark.parametrize("text", ["- a\n- b\n", "just text\n", "3\n"])
def test_the_top_level_must_be_a_mapping(text):
    err = error_of(text)
    assert err.key == "" and "must be a mapping" in err.message


def test_unsafe_yaml_tags_are_refused():
    err = error_of(BASE + "seed: !!python/object/apply:os.getcwd []\n")
    assert "YAML syntax error at line 4" in err.message


# overrides -------------------------------------------------------------------------------
def test_overrides_parse_yaml_scalars_and_create_mappings():
    exp = parse_experiment(
        BASE + "privacy: {dp: null}\n",
        overrides=[
            "rounds=5",
            "training.optimizer.lr=0.2",
            "federation.partition.kind=shards",
            "seed=11",
            "task.name=breast_cancer",
            "task.options.hidden=64",
            "privacy.dp=null",
            " simulation.workers = 4",
        ],
    )
    assert exp.rounds == 5 and exp.training.optimizer.lr == 0.2 and exp.seed == 11
    assert exp.federation.partition.spec() == {"kind": "shards", "labels_per_site": 2}
    assert exp.task.name == "breast_cancer" and exp.task.options == {"hidden": 64}
    assert exp.simulation.workers == 4 and exp.privacy.dp is None


def test_later_overrides_win_and_the_text_is_not_changed():
    text = BASE
    exp = parse_experiment(text, overrides=["rounds=5", "rounds=6"])
    assert exp.rounds == 6 and parse_experiment(text).rounds == 2


def test_overrides_can_choose_the_ray_backend():
    exp = parse_experiment(BASE, overrides=["simulation.backend=ray"])
    assert exp.simulation.backend == "ray"


SECAGG = BASE + "privacy: {secure_aggregation: {enabled: true}}\n"


def test_secure_aggregation_defaults():
    secagg = parse_experiment(SECAGG).privacy.secure_aggregation
    assert secagg.enabled and secagg.ring_bits == 32 and secagg.levels is None
    assert (secagg.clip_range, secagg.max_examples, secagg.stage_timeout_s) == (1.0, 100_000, 30.0)
    assert parse_experiment(BASE).privacy.secure_aggregation.enabled is False


@pytest.mark.parametrize(
    "text, key, message",
    [
        (SECAGG + "strategy: {name: krum}\n", "strategy.name", "cannot run under secure"),
        (SECAGG + "strategy: {name: fedmedian}\n", "strategy.name", "individual updates"),
        (
            SECAGG.replace("enabled: true", "enabled: true, levels: 1000000000"),
            "privacy.secure_aggregation.levels",
            "overflow",
        ),
        (
            SECAGG.replace("enabled: true", "enabled: true, ring_bits: 4"),
            "privacy.secure_aggregation.ring_bits",
            "must be >= 8",
        ),
        (
            SECAGG.replace("enabled: true", "enabled: true, corrupt_fraction: 0.5"),
            "privacy.secure_aggregation.corrupt_fraction",
            "must be < 0.5",
        ),
        (
            SECAGG + "federation: {sites: 2}\n",
            "federation.sites",
            "at least 3 sites",
        ),
        (
            SECAGG.replace("}}\n", "}, dp: {noise_multiplier: 1.0}}\n")
            + "federation: {sampling: {method: poisson}}\n",
            "privacy.dp.mode",
            "use mode: client",
        ),
    ],
)
def test_secure_aggregation_settings_it_cannot_honour_are_refused(text, key, message):
    err = error_of(text)
    assert err.key == key and message in err.message, (err.key, err.message)


def test_secure_aggregation_runs_with_client_side_dp_and_scaffold():
    text = SECAGG.replace("}}\n", "}, dp: {noise_multiplier: 1.0, mode: client}}\n")
    exp = parse_experiment(text + "federation: {sampling: {method: poisson}}\n")
    assert exp.privacy.dp is not None and exp.privacy.dp.mode == "client"
    assert parse_experiment(SECAGG + "strategy: {name: scaffold}\n").strategy.name == "scaffold"


@pytest.mark.parametrize(
    "override, key",
    [
        ("rounds", "--set"),
        ("=3", "--set"),
        ("a..b=1", "--set"),
        ("training.=1", "--set"),
        ("name.inner=3", "name"),
        ("federation.sites=-1", "federation.sites"),
        ("federation.sites=ten", "federation.sites"),
        ("training.optimiser.lr=0.1", "training.optimiser"),
    ],
)
def test_bad_overrides_name_the_problem(override, key):
    err = error_of(BASE, (override,))
    assert err.key == key
    if key == "--set":
        assert repr(override) in err.message


# canonical form --------------------------------------------------------------------------
def test_canonical_form_ignores_layout_and_tracks_values():
    a = parse_experiment(BASE + "training: {local_epochs: 2, batch_size: 8}\n")
    b = parse_experiment(
        "task: {name: digits}\ntraining:\n  batch_size: 8\n  local_epochs: 2\nrounds: 2\nname: t\n"
    )
    c = parse_experiment(BASE + "training: {local_epochs: 3, batch_size: 8}\n")
    assert a.canonical_json() == b.canonical_json() and a.config_digest() == b.config_digest()
    assert a.config_digest() != c.config_digest()
    assert parse_experiment(a.canonical_json()) == a  # the canonical form parses back


def test_canonical_form_fills_defaults_and_is_compact_sorted_json():
    exp = parse_experiment(BASE)
    text = exp.canonical_json()
    data = json.loads(text)
    assert text == json.dumps(data, sort_keys=True, separators=(",", ":"))
    assert data == exp.model_dump(mode="json")
    assert data["federation"]["sampling"]["timeout_s"] == 60.0 and data["privacy"]["dp"] is None
    # Spelling a default out, or an integer for a float, changes nothing.
    same = parse_experiment(BASE + "seed: 0\nfederation: {sampling: {timeout_s: 60}}\n")
    assert same.config_digest() == exp.config_digest()


def test_config_digest_is_a_sha256_of_the_canonical_form():
    digest = parse_experiment(BASE).config_digest()
    assert digest.startswith("sha256:") and len(digest) == len("sha256:") + 64
    assert digest != parse_experiment(BASE.replace("name: t", "name: u")).config_digest()


# files -----------------------------------------------------------------------------------
def test_load_experiment_reads_a_file_with_overrides(tmp_path: Path):
    path = tmp_path / "exp.yaml"
    path.write_text(BASE)
    exp = load_experiment(path, ["rounds=4"])
    assert isinstance(exp, Experiment) and exp.rounds == 4
    err = error_of_file(path.with_name("other.yaml"))
    assert "cannot read experiment file" in err.message and "other.yaml" in err.message


def test_load_experiment_names_the_file_in_syntax_errors(tmp_path: Path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: [\n")
    assert error_of_file(path).message.startswith(f"{path}: YAML syntax error at line")


def test_unreadable_files_are_config_errors(tmp_path: Path):
    assert "cannot read experiment file" in error_of_file(tmp_path).message
    binary = tmp_path / "model.bin"
    binary.write_bytes(b"\xff\xfe\x00\x81")
    assert "not UTF-8" in error_of_file(binary).message


def error_of_file(path: Path) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_experiment(path)
    return info.value
