"""The experiment file: schema, loading, ``--set`` overrides and canonical form.

Every mapping forbids unknown keys; any problem becomes one :class:`ConfigError` whose
key is the dotted path of the offending setting. Settings this version cannot honour
(DP, secure aggregation, MLflow, drift checks, the Ray backend) are refused, never
silently ignored.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from coordinator.canonical import canonical_json
from coordinator.errors import ConfigError

NOT_AVAILABLE = "is not available in this version of fedcoord"


class Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TaskSpec(Spec):
    name: str = Field(min_length=1)
    model: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)


class Partition(Spec):
    kind: Literal["iid", "dirichlet", "shards"] = "iid"
    alpha: Annotated[float, Field(gt=0)] = 0.5
    labels_per_site: Annotated[int, Field(ge=1)] = 2

    def spec(self) -> dict[str, Any]:
        """The partitioner's spec: the kind and only that kind's parameters."""
        params = {
            "iid": {},
            "dirichlet": {"alpha": self.alpha},
            "shards": {"labels_per_site": self.labels_per_site},
        }[self.kind]
        return {"kind": self.kind, **params}


class Sampling(Spec):
    fraction: Annotated[float, Field(gt=0, le=1)] = 1.0
    method: Literal["poisson", "fixed"] = "fixed"
    min_sites: Annotated[int, Field(ge=1)] = 2
    timeout_s: Annotated[float, Field(gt=0)] = 60.0
    wait_for_sites_s: Annotated[float, Field(gt=0)] = 300.0


class Byzantine(Spec):
    sites: Annotated[int, Field(ge=0)] = 0
    attack: Literal["sign_flip", "gaussian", "scale", "nan", "label_flip"] = "sign_flip"


class Federation(Spec):
    sites: Annotated[int, Field(ge=1, le=100_000)] = 10
    partition: Partition = Partition()
    sampling: Sampling = Sampling()
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0
    byzantine: Byzantine = Byzantine()

    @model_validator(mode="after")
    def _fits(self) -> Federation:
        """Cross-field checks (raised directly: pydantic would lose the key)."""
        if self.sampling.min_sites > self.sites:
            raise ConfigError(
                "federation.sampling.min_sites", f"must be <= federation.sites ({self.sites})"
            )
        if self.byzantine.sites > self.sites:
            raise ConfigError(
                "federation.byzantine.sites", f"must be <= federation.sites ({self.sites})"
            )
        return self


class Optimizer(Spec):
    name: Literal["sgd", "adam"] = "sgd"
    lr: Annotated[float, Field(gt=0)] = 0.05
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.0
    weight_decay: Annotated[float, Field(ge=0)] = 0.0


class Training(Spec):
    local_epochs: Annotated[int, Field(ge=1, le=1000)] = 1
    batch_size: Annotated[int, Field(ge=1, le=1_000_000)] = 32
    optimizer: Optimizer = Optimizer()


class StrategySpec(Spec):
    name: Literal["fedavg"] = "fedavg"


class SecureAggregation(Spec):
    enabled: bool = False

    @field_validator("enabled")
    @classmethod
    def _off(cls, v: bool) -> bool:
        if v:
            raise ValueError(f"secure aggregation {NOT_AVAILABLE}")
        return v


class Privacy(Spec):
    dp: Any = None
    local_dp: Any = None
    secure_aggregation: SecureAggregation = SecureAggregation()

    @field_validator("dp", "local_dp")
    @classmethod
    def _none(cls, v: Any) -> None:
        if v is not None:
            raise ValueError(f"differential privacy {NOT_AVAILABLE}")
        return None


class Simulation(Spec):
    backend: Literal["local", "ray"] = "local"
    workers: Annotated[int, Field(ge=1, le=256)] = 2

    @field_validator("backend")
    @classmethod
    def _local(cls, v: str) -> str:
        if v != "local":
            raise ValueError(f"the {v!r} backend {NOT_AVAILABLE}")
        return v


class Experiment(Spec):
    name: str = Field(pattern=r"^[A-Za-z0-9._-]{1,64}$")
    seed: Annotated[int, Field(ge=0)] = 0
    rounds: Annotated[int, Field(ge=1, le=100_000)]
    task: TaskSpec
    federation: Federation = Federation()
    training: Training = Training()
    strategy: StrategySpec = StrategySpec()
    privacy: Privacy = Privacy()
    mlflow: Any = None
    drift: dict[str, Any] = Field(default_factory=dict)
    simulation: Simulation = Simulation()

    @field_validator("mlflow")
    @classmethod
    def _no_mlflow(cls, v: Any) -> None:
        if v is not None:
            raise ValueError(f"mlflow export {NOT_AVAILABLE}")
        return None

    @field_validator("drift")
    @classmethod
    def _no_drift(cls, v: dict[str, Any]) -> dict[str, Any]:
        if v:
            raise ValueError(f"drift checks {NOT_AVAILABLE}")
        return v

    def canonical_json(self) -> str:
        """Every setting, defaults filled in, in one canonical byte form."""
        return canonical_json(self.model_dump(mode="json"))

    def config_digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.canonical_json().encode()).hexdigest()

    def round_config(self) -> dict[str, bool | int | float | str]:
        """The flat configuration sites receive with every fit task."""
        opt = self.training.optimizer
        return {
            "local_epochs": self.training.local_epochs,
            "batch_size": self.training.batch_size,
            "optimizer": opt.name,
            "lr": opt.lr,
            "momentum": opt.momentum,
            "weight_decay": opt.weight_decay,
            "seed": self.seed,
        }


# loading ---------------------------------------------------------------------------------
def _message(err: dict[str, Any]) -> str:
    kind, ctx, got = err["type"], err.get("ctx", {}), err.get("input")
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required key is missing"
    if kind == "literal_error":
        return f"must be one of: {ctx.get('expected', '').replace(chr(39), '')} (got {got!r})"
    bounds = {
        "greater_than": "> {gt}",
        "greater_than_equal": ">= {ge}",
        "less_than": "< {lt}",
        "less_than_equal": "<= {le}",
    }
    if kind in bounds:
        return f"must be {bounds[kind].format(**ctx)} (got {got!r})"
    if kind == "string_pattern_mismatch":
        return f"must match {ctx.get('pattern')} (got {got!r})"
    if kind == "value_error":
        return str(ctx.get("error", err["msg"]))
    return f"{err['msg'].lower()} (got {got!r})"


def _to_config_error(exc: ValidationError) -> ConfigError:
    err = exc.errors()[0]
    return ConfigError(".".join(str(p) for p in err["loc"]), _message(err))


def apply_override(data: dict[str, Any], override: str) -> None:
    """Apply one ``key.path=value`` (value parsed as a YAML scalar) to ``data``."""
    key, sep, text = override.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(parts):
        raise ConfigError("--set", f"expected KEY.PATH=VALUE, got {override!r}")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(".".join(parts[: i + 1]), "is not a mapping; cannot --set inside it")
        node = child
    node[parts[-1]] = value


def parse_experiment(
    text: str, source: str = "<experiment>", overrides: Sequence[str] = ()
) -> Experiment:
    """Validate an experiment given as YAML (or JSON) text."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError("", f"{source}: YAML syntax error{where}: {problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError("", f"{source}: an experiment must be a mapping of settings")
    for override in overrides:
        apply_override(data, override)
    try:
        return Experiment.model_validate(data)
    except ValidationError as exc:
        raise _to_config_error(exc) from None


def load_experiment(path: str | Path, overrides: Sequence[str] = ()) -> Experiment:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError("", f"cannot read experiment file {p}: {exc.strerror}") from None
    return parse_experiment(text, str(p), overrides)
