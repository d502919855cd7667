"""MLflow export against a real local MLflow store (SQLite), and against a tracking
server that accepts connections but never answers."""

from __future__ import annotations

import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import mlflow.environment_variables
import numpy as np
import pytest
from mlflow.artifacts import download_artifacts
from mlflow.tracking import MlflowClient  # slow: imported once for the module

from coordinator.errors import ConfigError
from coordinator.experiment import Mlflow
from coordinator.mlflow_export import MAX_PARAM_VALUE, MlflowExporter, flatten
from coordinator.model_store import ModelStore
from protos import codec
from tests.conftest import wait_for

# MLflow's SQL store uses SQLAlchemy APIs that SQLAlchemy 2.1 deprecates
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:mlflow.*")

REGISTERED = "digits-mlp"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One SQLite tracking + registry store for the module (creating one takes seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture
def model(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A real safetensors model file from the model store, and its digest."""
    arrays = {
        "w": np.arange(12, dtype=np.float32).reshape(3, 4),
        "b": np.full(4, 0.5, dtype=np.float32),
    }
    digest = codec.encode(arrays).digest
    yield ModelStore(tmp_path / "models").put(arrays, digest), digest


def one_run(client: MlflowClient, experiment: str, run_id: str) -> str:
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None
    runs = client.search_runs([exp.experiment_id], f"tags.`fedcoord.run_id` = '{run_id}'")
    assert len(runs) == 1, runs
    return runs[0].info.run_id


def test_flatten() -> None:
    nested = {"a": {"b": 1, "c": {"d": "x"}}, "e": None, "f": [1, 2], "g": {}, "h": True}
    assert flatten(nested) == {
        "a.b": "1",
        "a.c.d": "x",
        "e": "null",
        "f": "[1,2]",
        "g": "{}",
        "h": "true",
    }
    assert flatten({"k": 0.05}, prefix="p.") == {"p.k": "0.05"}


def test_check_available(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    MlflowExporter.check_available()
    MlflowExporter.check_available(Mlflow(tracking_uri=f"sqlite:///{tmp_path}/m.db"))
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    if hasattr(mlflow.environment_variables, "MLFLOW_ALLOW_FILE_STORE"):  # MLflow 3
        with pytest.raises(ConfigError) as refused:
            MlflowExporter.check_available(Mlflow(tracking_uri=tmp_path.as_uri()))
        assert refused.value.key == "mlflow.tracking_uri"
    monkeypatch.setitem(sys.modules, "mlflow.environment_variables", None)
    with pytest.raises(ConfigError) as missing:
        MlflowExporter.check_available()
    assert missing.value.key == "mlflow"
    assert "pip install 'fedcoord[mlflow]'" in missing.value.message


def test_run_metrics_and_champion_model_reach_mlflow(
    store: str, model: tuple[Path, str], tmp_path: Path
) -> None:
    path, digest = model
    run_id = "digits-fedavg-20261201T000000Z-a1b2c3"
    params = {
        "name": "digits-fedavg",
        "seed": 7,
        "training": {"local_epochs": 1, "optimizer": {"name": "sgd", "lr": 0.05}},
        "privacy": None,
        "notes": "n" * 700,  # longer than a param value may be
        "task": {"options": {f"opt{i}": i for i in range(150)}},  # more than one batch
    }
    version_tags = {
        "fedcoord.ledger_head": "ab" * 32,
        "fedcoord.model_digest": digest,
        "fedcoord.sites": "site-0,site-1,site-2",
        "fedcoord.rounds": "3",
        "fedcoord.epsilon": "1.5",
        "fedcoord.secure_aggregation": "false",
        "fedcoord.run_id": run_id,
    }
    exporter = MlflowExporter(Mlflow(tracking_uri=store, register_as=REGISTERED), "digits-fedavg")
    exporter.start_run(run_id, params, {"fedcoord.version": "0.1.0"})
    for r in (1, 2, 3):
        exporter.log_round(r, {"loss": 1.0 / r, "accuracy": 0.5 + 0.1 * r, "epsilon": 0.5 * r})
    exporter.log_model(path, digest, version_tags, champion=True)
    exporter.finish("finished")
    exporter.close()
    exporter.close()  # a second close is harmless
    assert exporter.errors == []

    client = MlflowClient(store)
    mlrun = one_run(client, "digits-fedavg", run_id)
    run = client.get_run(mlrun)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == run_id
    assert run.data.tags["fedcoord.version"] == "0.1.0"
    got = run.data.params
    assert got["seed"] == "7"
    assert got["training.optimizer.lr"] == "0.05"
    assert got["privacy"] == "null"
    assert got["task.options.opt149"] == "149"
    assert len(got["notes"]) == MAX_PARAM_VALUE
    assert len(got) == 7 + 150
    for name, expect in {
        "loss": [1.0, 0.5, 1 / 3],
        "accuracy": [0.6, 0.7, 0.8],
        "epsilon": [0.5, 1.0, 1.5],
    }.items():
        history = sorted(client.get_metric_history(mlrun, name), key=lambda m: m.step)
        assert [m.step for m in history] == [1, 2, 3]
        assert [m.value for m in history] == pytest.approx(expect)

    assert [a.path for a in client.list_artifacts(mlrun, "model")] == [f"model/{path.name}"]
    version = client.get_model_version_by_alias(REGISTERED, "champion")
    assert version.run_id == mlrun
    assert {k: version.tags[k] for k in version_tags} == version_tags
    fetched = download_artifacts(artifact_uri=version.source, dst_path=str(tmp_path / "dl"))
    assert Path(fetched).read_bytes() == path.read_bytes()
    # artifacts lie beside the database, not in the current directory
    assert Path(fetched).exists() and not (Path.cwd() / "mlruns").exists()


def test_a_restarted_coordinator_continues_the_same_mlflow_run(
    store: str, model: tuple[Path, str]
) -> None:
    path, digest = model
    run_id = "restarts-20261201T000000Z-d4e5f6"
    spec = Mlflow(tracking_uri=store, experiment="fedcoord-restarts", register_as=REGISTERED)
    params = {"seed": 3, "rounds": 5}
    tags = {"fedcoord.model_digest": digest, "fedcoord.run_id": run_id}

    before = MlflowExporter(spec, "ignored-name")
    before.start_run(run_id, params, {})
    before.log_round(1, {"loss": 0.9})
    before.log_model(path, digest, tags, champion=False)
    before.close()  # the coordinator dies here: no finish
    after = MlflowExporter(spec, "ignored-name")
    after.start_run(run_id, params, {})
    after.log_round(2, {"loss": 0.4})
    after.log_model(path, digest, tags, champion=True)  # the same file again
    after.finish("stopped")
    after.close()
    assert before.errors == [] and after.errors == []

    client = MlflowClient(store)
    mlrun = one_run(client, "fedcoord-restarts", run_id)
    assert client.get_run(mlrun).info.status == "KILLED"
    assert [m.step for m in client.get_metric_history(mlrun, "loss")] == [1, 2]
    versions = client.search_model_versions(f"run_id='{mlrun}'")
    assert len(versions) == 1
    assert client.get_model_version_by_alias(REGISTERED, "champion").run_id == mlrun

    changed = MlflowExporter(spec, "ignored-name")
    changed.start_run(run_id, {"seed": 4, "rounds": 5}, {})
    changed.close()
    assert len(changed.errors) == 1 and "['seed']" in changed.errors[0]
    assert client.get_run(mlrun).data.params["seed"] == "3"


def test_calls_never_wait_for_a_tracking_server_that_does_not_answer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "1")
    with socket.socket() as silent:  # completes TCP handshakes, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)
        uri = f"http://127.0.0.1:{silent.getsockname()[1]}"
        exporter = MlflowExporter(Mlflow(tracking_uri=uri, register_as="m"), "silent")
        start = time.perf_counter()
        exporter.start_run("silent-1", {"seed": 1}, {})
        for r in range(1, 101):
            exporter.log_round(r, {"loss": 1.0 / r})
        exporter.finish("failed")
        assert time.perf_counter() - start < 0.5
        wait_for(lambda: exporter.errors, 15, "the first export to fail")
        assert exporter.errors[0].startswith("start_run silent-1:")
        begin = time.perf_counter()
        exporter.close(timeout=0.2)
        assert time.perf_counter() - begin < 1.0
        assert "gave up" in exporter.errors[-1]
