"""Export a run to MLflow off the round's critical path.

Every call of :class:`MlflowExporter` only puts a job on a queue; one daemon thread
talks to MLflow. A slow, broken or missing tracking server never slows or fails the
round loop: failures are logged on ``fedcoord.mlflow`` and kept in
:attr:`MlflowExporter.errors`. ``mlflow`` is imported in that thread (or by
:meth:`MlflowExporter.check_available`), never when this module is imported.

What is exported: the run (found again after a coordinator restart by its
``fedcoord.run_id`` tag) with the experiment as flattened params, per-round metrics
(step = round), and model files as artifacts under ``model/``, registered as versions
of ``register_as`` with provenance tags and, for the champion, the alias ``champion``.
"""

from __future__ import annotations

import json
import logging
import queue
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlparse

from coordinator.errors import ConfigError

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

    from coordinator.experiment import Mlflow

log = logging.getLogger("fedcoord.mlflow")

RUN_ID_TAG = "fedcoord.run_id"
DIGEST_TAG = "fedcoord.model_digest"
CHAMPION_ALIAS = "champion"
ARTIFACT_DIR = "model"

# Limits of the MLflow REST API (``mlflow.utils.validation``). Param values are cut to
# 500 characters, the limit of older tracking servers (newer ones accept 6000).
MAX_PARAM_VALUE = 500
MAX_TAG_VALUE = 5000
MAX_KEY = 250
PARAMS_PER_BATCH = 100
METRICS_PER_BATCH = 1000
# errors kept in ``MlflowExporter.errors``; later ones are only logged
MAX_ERRORS = 100

_STATUS = {"finished": "FINISHED", "failed": "FAILED", "stopped": "KILLED"}
_BAD_KEY_CHARS = re.compile(r"[^\w\-. /]")
_SAFE_RUN_ID = re.compile(r"[A-Za-z0-9._:-]{1,200}")
_INSTALL = "needs the mlflow package: pip install 'fedcoord[mlflow]'"
_DB_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")

T = TypeVar("T")


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Flatten nested mappings to dotted keys with string values.

    Parameters
    ----------
    d
        A (nested) mapping, e.g. an experiment's ``model_dump()``.
    prefix
        Put before every key (``"a."`` gives ``a.b``).

    Returns
    -------
    dict[str, str]
        Strings stay as they are; other values are compact JSON (``true``, ``null``,
        ``[1,2]``); an empty mapping becomes ``{}``.
    """
    out: dict[str, str] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{name}."))
        elif isinstance(value, str):
            out[name] = value
        else:
            out[name] = json.dumps(value, separators=(",", ":"), sort_keys=True, default=str)
    return out


def _cut(value: str, limit: int) -> str:
    return value if len(value) <= limit else value[: limit - 3] + "..."


def _key(key: str) -> str:
    """``key`` with characters MLflow refuses in names replaced by ``_``."""
    return _BAD_KEY_CHARS.sub("_", key)


def _chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _now_ms() -> int:
    return int(time.time() * 1000)


def _scheme(uri: str) -> str:
    return urlparse(uri).scheme.split("+", 1)[0].lower()


def _is_file_store(uri: str) -> bool:
    scheme = _scheme(uri)
    return scheme in ("", "file") or len(scheme) == 1  # a bare path or C:\... on Windows


def _artifact_location(uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: beside a SQLite file, in
    ``mlartifacts/`` (MLflow's own default, ``./mlruns``, depends on the current
    directory); the store's default for every other URI."""
    if _scheme(uri) != "sqlite" or not uri.startswith("sqlite:///"):
        return None
    path = uri.removeprefix("sqlite:///").split("?", 1)[0]
    if path in ("", ":memory:"):
        return None
    return (Path(path).resolve().parent / "mlartifacts").as_uri()


class MlflowExporter:
    """Exports one fedcoord run to MLflow from a background thread.

    Parameters
    ----------
    spec
        The experiment's ``mlflow`` section.
    experiment_name
        The MLflow experiment when ``spec.experiment`` is not set (the fedcoord
        experiment's name).

    Notes
    -----
    Calls return at once; jobs run in order on one daemon thread. A job that fails is
    logged and remembered in :attr:`errors` (at most ``MAX_ERRORS`` entries), never
    raised. When ``start_run`` fails, the next job that needs the MLflow run tries it
    again.
    """

    def __init__(self, spec: Mlflow, experiment_name: str) -> None:
        self.spec = spec
        self.experiment_name = spec.experiment or experiment_name
        self.errors: list[str] = []
        self._queue: queue.Queue[tuple[str, Callable[[], None]] | None] = queue.Queue()
        self._lock = threading.Lock()
        self._closed = False
        self._abandon = threading.Event()
        self._client: MlflowClient | None = None
        self._mlflow_run: str | None = None
        self._pending_start: tuple[str, dict[str, str], dict[str, str]] | None = None
        self._thread = threading.Thread(target=self._work, name="fedcoord-mlflow", daemon=True)
        self._thread.start()

    # availability ------------------------------------------------------------------------
    @staticmethod
    def check_available(spec: Mlflow | None = None) -> None:
        """Raise :class:`ConfigError` unless MLflow (and what ``spec`` needs) is installed.

        Parameters
        ----------
        spec
            When given, also check that its tracking store can be opened: a database
            URI needs SQLAlchemy and Alembic; recent MLflow refuses a ``file:`` store
            unless ``MLFLOW_ALLOW_FILE_STORE=true``.
        """
        try:
            import mlflow.environment_variables as env
        except ImportError:
            raise ConfigError("mlflow", _INSTALL) from None
        if spec is None:
            return
        uri = spec.tracking_uri
        if _scheme(uri) in _DB_SCHEMES and not (find_spec("sqlalchemy") and find_spec("alembic")):
            raise ConfigError(
                "mlflow.tracking_uri",
                f"a database store ({uri}) needs sqlalchemy and alembic: "
                "pip install 'fedcoord[mlflow]'",
            )
        allow = getattr(env, "MLFLOW_ALLOW_FILE_STORE", None)
        if _is_file_store(uri) and allow is not None and not allow.get():
            raise ConfigError(
                "mlflow.tracking_uri",
                f"this MLflow refuses a file store ({uri}): use sqlite:///PATH/mlflow.db "
                "or set MLFLOW_ALLOW_FILE_STORE=true",
            )

    # public API (called from the round loop) ----------------------------------------------
    def start_run(self, run_id: str, params: dict[str, Any], tags: dict[str, str]) -> None:
        """Create the MLflow run of fedcoord run ``run_id``, or find it again by its
        ``fedcoord.run_id`` tag, and log ``params`` (flattened) and ``tags``."""
        flat = flatten(params)
        tag_copy = {str(k): str(v) for k, v in tags.items()}
        self._submit(f"start_run {run_id}", lambda: self._start(run_id, flat, tag_copy))

    def log_round(self, round_no: int, metrics: dict[str, float]) -> None:
        """Log the metrics of round ``round_no`` (step = round)."""
        stamp = _now_ms()
        values = {str(k): float(v) for k, v in metrics.items()}
        self._submit(f"log_round {round_no}", lambda: self._round(round_no, values, stamp))

    def log_model(self, path: Path, digest: str, tags: dict[str, str], champion: bool) -> None:
        """Log the model file ``path`` under ``model/``; with ``register_as`` set,
        register it as a version carrying ``tags``, aliased ``champion`` if asked."""
        tag_copy = {str(k): str(v) for k, v in tags.items()}
        self._submit(
            f"log_model {digest}", lambda: self._model(Path(path), digest, tag_copy, champion)
        )

    def finish(self, status: str) -> None:
        """End the MLflow run.

        Parameters
        ----------
        status
            A fedcoord status (``finished``, ``failed``, ``stopped``) or an MLflow one
            (``FINISHED``, ``FAILED``, ``KILLED``).

        Raises
        ------
        ValueError
            For any other status (a programming error, raised at once).
        """
        mlflow_status = _STATUS.get(status, status)
        if mlflow_status not in _STATUS.values():
            raise ValueError(f"unknown run status {status!r}")
        self._submit(f"finish {status}", lambda: self._finish(mlflow_status))

    def close(self, timeout: float = 60) -> None:
        """Wait up to ``timeout`` seconds for the queued jobs, then stop the thread.

        Jobs still queued after ``timeout`` are dropped (and an error recorded). Safe to
        call more than once.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(None)
        self._thread.join(timeout)
        if self._thread.is_alive():
            self._abandon.set()
            left = max(0, self._queue.qsize() - 1)  # less the stop marker
            self._error(f"close: gave up after {timeout:g} s; {left} queued export(s) dropped")

    @property
    def pending(self) -> int:
        """Jobs queued and not yet started (approximate)."""
        return self._queue.qsize()

    # the worker thread ------------------------------------------------------------------
    def _submit(self, what: str, job: Callable[[], None]) -> None:
        with self._lock:
            if not self._closed:
                self._queue.put((what, job))
                return
        self._error(f"{what}: exporter already closed; dropped")

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None or self._abandon.is_set():
                return
            what, job = item
            try:
                job()
            except Exception as exc:  # any failure of MLflow must stay in this thread
                self._error(f"{what}: {type(exc).__name__}: {exc}", exc)

    def _error(self, message: str, exc: BaseException | None = None) -> None:
        message = _cut(" ".join(message.split()), 1000)
        debug = log.isEnabledFor(logging.DEBUG)
        log.warning("MLflow export failed: %s", message, exc_info=exc if debug else None)
        if len(self.errors) < MAX_ERRORS:
            self.errors.append(message)

    def _mlflow(self) -> MlflowClient:
        if self._client is None:
            try:
                from mlflow.tracking import MlflowClient
            except ImportError:
                raise ConfigError("mlflow", _INSTALL) from None
            uri = self.spec.tracking_uri
            self._client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        return self._client

    def _experiment_id(self, client: MlflowClient) -> str:
        from mlflow.exceptions import MlflowException

        found = client.get_experiment_by_name(self.experiment_name)
        if found is not None:
            return str(found.experiment_id)
        try:
            return str(
                client.create_experiment(
                    self.experiment_name,
                    artifact_location=_artifact_location(self.spec.tracking_uri),
                )
            )
        except MlflowException as exc:  # created meanwhile by another process
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            again = client.get_experiment_by_name(self.experiment_name)
            if again is None:
                raise
            return str(again.experiment_id)

    def _start(self, run_id: str, params: dict[str, str], tags: dict[str, str]) -> None:
        from mlflow.entities import Param, RunTag, ViewType

        self._pending_start = (run_id, params, tags)
        if not _SAFE_RUN_ID.fullmatch(run_id):
            self._pending_start = None
            raise ValueError(f"run id {run_id!r} has characters an MLflow filter cannot hold")
        client = self._mlflow()
        eid = self._experiment_id(client)
        runs = client.search_runs(
            [eid],
            filter_string=f"tags.`{RUN_ID_TAG}` = '{run_id}'",
            run_view_type=ViewType.ACTIVE_ONLY,
            max_results=1,
            order_by=["attributes.start_time DESC"],
        )
        if runs:
            run = runs[0]
            if run.info.status != "RUNNING":
                client.update_run(run.info.run_id, status="RUNNING")
            log.info("resuming MLflow run %s of %s", run.info.run_id, run_id)
        else:
            run = client.create_run(eid, tags={RUN_ID_TAG: run_id}, run_name=run_id)
        mlrun = run.info.run_id
        logged = run.data.params
        new: list[Param] = []
        changed: list[str] = []
        for key, value in params.items():
            k, v = _cut(_key(key), MAX_KEY), _cut(value, MAX_PARAM_VALUE)
            if k not in logged:
                new.append(Param(k, v))
            elif logged[k] != v:
                changed.append(k)
        run_tags = [
            RunTag(_cut(_key(k), MAX_KEY), _cut(v, MAX_TAG_VALUE))
            for k, v in {**tags, RUN_ID_TAG: run_id}.items()
        ]
        for batch in _chunks(new, PARAMS_PER_BATCH):
            client.log_batch(mlrun, params=batch)
        for tag_batch in _chunks(run_tags, PARAMS_PER_BATCH):
            client.log_batch(mlrun, tags=tag_batch)
        self._mlflow_run = mlrun
        self._pending_start = None
        if changed:
            raise ValueError(
                f"MLflow run {mlrun} already has other values for params {sorted(changed)}; "
                "kept the old ones"
            )

    def _run(self) -> str:
        if self._mlflow_run is None and self._pending_start is not None:
            self._start(*self._pending_start)  # the start failed before: try again
        if self._mlflow_run is None:
            raise RuntimeError("no MLflow run (start_run was not called or failed)")
        return self._mlflow_run

    def _round(self, round_no: int, metrics: dict[str, float], stamp: int) -> None:
        from mlflow.entities import Metric

        mlrun = self._run()
        items = [Metric(_cut(_key(k), MAX_KEY), v, stamp, round_no) for k, v in metrics.items()]
        for batch in _chunks(items, METRICS_PER_BATCH):
            self._mlflow().log_batch(mlrun, metrics=batch)

    def _model(self, path: Path, digest: str, tags: dict[str, str], champion: bool) -> None:
        from mlflow.exceptions import MlflowException

        mlrun = self._run()
        client = self._mlflow()
        client.log_artifact(mlrun, str(path), artifact_path=ARTIFACT_DIR)
        name = self.spec.register_as
        if name is None:
            return
        try:
            client.create_registered_model(name)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        # after a restart the same file may come again: reuse its version
        existing = [
            mv
            for mv in client.search_model_versions(f"run_id='{mlrun}'")
            if mv.name == name and mv.tags.get(DIGEST_TAG) == digest
        ]
        if existing:
            version = str(existing[0].version)
        else:
            artifact_uri = client.get_run(mlrun).info.artifact_uri.rstrip("/")
            source = f"{artifact_uri}/{ARTIFACT_DIR}/{path.name}"
            version = str(client.create_model_version(name, source=source, run_id=mlrun).version)
        for key, value in {**tags, DIGEST_TAG: digest}.items():
            client.set_model_version_tag(name, version, _key(key), _cut(value, MAX_TAG_VALUE))
        if champion:
            client.set_registered_model_alias(name, CHAMPION_ALIAS, version)

    def _finish(self, status: str) -> None:
        self._mlflow().set_terminated(self._run(), status=status)
