"""The experiment file: schema, loading, ``--set`` overrides and canonical form.

Every mapping forbids unknown keys and values are not coerced between types (``"3"`` is
not a number). Any problem becomes one :class:`ConfigError` whose key is the dotted path
of the offending setting. Settings this version cannot honour are refused,
never silently ignored.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from coordinator.errors import ConfigError
from protos.canonical import canonical_json, sha256_hex
from strategies.base import Strategy
from strategies.drift import MAX_LABELS, MAX_PROFILE_VALUES
from strategies.histogram import HistogramOverflow, histogram_scale
from strategies.registry import StrategyConfigError, make_strategy, strategy_class
from strategies.secagg import QuantizationOverflow, check_no_overflow
from strategies.secagg.quantize import max_levels

NOT_AVAILABLE = "not available in this version of fedcoord"

_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
_TASK_NAME = re.compile(r"[A-Za-z0-9_.-]+(:[A-Za-z_][A-Za-z0-9_.]*)?")


class KeyedError(ValueError):
    """A validator's complaint about ``key``, a dotted path below the model that raised it."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


# schema ----------------------------------------------------------------------------------
class Spec(BaseModel):
    """Base of every section: unknown keys refused, immutable, strict types, finite floats."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class TaskSpec(Spec):
    """What is learned: a built-in task name or ``package.module:callable``."""

    name: str
    model: Annotated[str, Field(min_length=1)] | None = None
    options: dict[str, Any] = Field(default_factory=dict)  # validated by the task itself

    @field_validator("name")
    @classmethod
    def _task_name(cls, value: str) -> str:
        if not _TASK_NAME.fullmatch(value):
            raise ValueError(
                f"must be a built-in task name or 'package.module:callable' (got {_show(value)})"
            )
        return value


class Partition(Spec):
    """How the training data is split across simulated sites."""

    kind: Literal["iid", "dirichlet", "shards"] = "iid"
    alpha: Annotated[float, Field(gt=0)] = 0.5
    labels_per_site: Annotated[int, Field(ge=1)] = 2

    def spec(self) -> dict[str, Any]:
        """The partitioner's spec: the kind and only that kind's parameters."""
        params: dict[str, Any] = {
            "iid": {},
            "dirichlet": {"alpha": self.alpha},
            "shards": {"labels_per_site": self.labels_per_site},
        }[self.kind]
        return {"kind": self.kind, **params}


class Sampling(Spec):
    """Which sites take part in a round, and how long the round waits for them: until
    every sampled site answered or ``timeout_s`` (the deadline); it commits with at least
    ``min_sites`` accepted updates (the quorum). A result after the round closed is
    never aggregated: ``late_results: record`` receives it, checks its digest and
    records it in the run's next ledger entry; ``refuse`` records it unread."""

    fraction: Annotated[float, Field(gt=0, le=1)] = 1.0
    method: Literal["poisson", "fixed"] = "fixed"
    min_sites: Annotated[int, Field(ge=1)] = 2
    timeout_s: Annotated[float, Field(gt=0)] = 60.0
    wait_for_sites_s: Annotated[float, Field(gt=0)] = 300.0
    late_results: Literal["record", "refuse"] = "record"


class Byzantine(Spec):
    """Simulated attackers."""

    sites: Annotated[int, Field(ge=0)] = 0
    attack: Literal["sign_flip", "gaussian", "scale", "nan", "label_flip"] = "sign_flip"


class SimulatedDrift(Spec):
    """Simulated drifting sites: from round ``from_round`` on, ``sites`` sites (chosen by
    the seed among the honest ones) see changed data. ``label_shift`` relabels y as
    (y + 1) mod classes (concept drift: labels and their histogram move);
    ``feature_shift`` moves every feature by one standard deviation of the data and
    adds noise (covariate drift)."""

    sites: Annotated[int, Field(ge=0)] = 0
    from_round: Annotated[int, Field(ge=1)] = 1
    kind: Literal["label_shift", "feature_shift"] = "label_shift"


class Federation(Spec):
    """The (simulated) population of sites."""

    sites: Annotated[int, Field(ge=1, le=100_000)] = 10
    partition: Partition = Partition()
    sampling: Sampling = Sampling()
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0
    byzantine: Byzantine = Byzantine()
    drift: SimulatedDrift = SimulatedDrift()

    @model_validator(mode="after")
    def _counts_fit(self) -> Federation:
        counts = {
            "sampling.min_sites": self.sampling.min_sites,
            "byzantine.sites": self.byzantine.sites,
            "drift.sites": self.drift.sites,
        }
        for key, count in counts.items():
            if count > self.sites:
                raise KeyedError(
                    key, f"must not exceed federation.sites = {self.sites} (got {count})"
                )
        if self.byzantine.sites + self.drift.sites > self.sites:
            raise KeyedError(
                "drift.sites",
                f"drifting and byzantine sites together exceed federation.sites = {self.sites}",
            )
        return self


class Optimizer(Spec):
    """The local optimizer each site builds for a round."""

    name: Literal["sgd", "adam"] = "sgd"
    lr: Annotated[float, Field(gt=0)] = 0.05
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.0
    weight_decay: Annotated[float, Field(ge=0)] = 0.0


class Training(Spec):
    """Local training at each site. ``site_evaluation``: each site evaluates the model it
    receives on its local data before training (per-site fairness in the ledger);
    ``null`` does so unless privatised."""

    local_epochs: Annotated[int, Field(ge=1, le=1000)] = 1
    batch_size: Annotated[int, Field(ge=1, le=1_000_000)] = 32
    optimizer: Optimizer = Optimizer()
    site_evaluation: bool | None = None


class StrategySpec(Spec):
    """The aggregation strategy: a built-in name or ``package.module:Class``, plus that
    strategy's own parameters (validated by its ``Params`` model; unknown ones refused)."""

    model_config = ConfigDict(extra="allow", frozen=True, strict=True, allow_inf_nan=False)

    name: str = "fedavg"

    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    @model_validator(mode="after")
    def _known_with_valid_params(self) -> StrategySpec:
        try:
            cls = strategy_class(self.name)
        except StrategyConfigError as exc:
            raise KeyedError(exc.key, exc.message) from None
        try:
            cls.Params.model_validate(self.params())
        except ValidationError as exc:
            err = exc.errors()[0]
            raise KeyedError(".".join(str(p) for p in err["loc"]), _message(err)) from None
        return self


class Validation(Spec):
    """Bounds every update must respect, besides matching the global model's names,
    shapes and dtypes and holding only finite values."""

    max_examples: Annotated[int, Field(ge=1)] = 10_000_000
    max_update_norm: Annotated[float, Field(gt=0)] | None = None


class SecureAggregation(Spec):
    """Secure aggregation (SecAgg+): the coordinator learns only each round's sum.

    Sites clip every delta value to ``[-clip_range, clip_range]`` (under ``privacy.dp``
    in client mode: the delta's L2 norm to the clip norm, and the range is that norm),
    weigh it by ``min(examples, max_examples) / max_examples`` (``null``: unweighted),
    quantize it to ``levels`` levels (default: the most that cannot overflow the ring
    ``Z_2^ring_bits`` for the round's sites) and mask it. The graph degree ``k`` and the
    threshold ``t`` follow from the round's sites, the ``dropout_rate`` the rounds must
    survive and the ``corrupt_fraction`` of sites assumed to collude with the
    coordinator. Each stage after training waits at most ``stage_timeout_s``.
    """

    enabled: bool = False
    clip_range: Positive = 1.0
    ring_bits: Annotated[int, Field(ge=8, le=32)] = 32
    levels: Annotated[int, Field(ge=2)] | None = None
    max_examples: Annotated[int, Field(ge=1)] | None = 100_000
    dropout_rate: Annotated[float, Field(ge=0, lt=1)] = 0.05
    corrupt_fraction: Annotated[float, Field(ge=0, lt=0.5)] = 0.05
    stage_timeout_s: Positive = 30.0


Probability = Annotated[float, Field(gt=0, lt=1)]
Positive = Annotated[float, Field(gt=0)]


class AdaptiveClippingSpec(Spec):
    """Adaptive clipping (Andrew et al. 2021): ``C`` follows the ``target_quantile`` of
    the update norms, moved geometrically by ``learning_rate`` with a noised count of
    unclipped updates (std ``count_stddev``; default ``m / 20``)."""

    target_quantile: Probability = 0.5
    learning_rate: Positive = 0.2
    count_stddev: Positive | None = None


class CentralDP(Spec):
    """User-level DP of the published models: clipping, noise, accountant and budget.

    ``central``: the coordinator clips every update to ``clip_norm`` and adds the
    noise. ``client``: sites clip (the round config carries ``dp_clip_norm``) and the
    coordinator adds the noise to the sum it sees (the mode secure aggregation needs).
    Exactly one of ``noise_multiplier`` and ``target_epsilon`` (the coordinator then
    searches the multiplier that spends it over ``rounds``).
    """

    mode: Literal["central", "client"] = "central"
    noise_multiplier: Positive | None = None
    target_epsilon: Positive | None = None
    clip_norm: Positive = 1.0
    adaptive_clipping: AdaptiveClippingSpec | None = None
    delta: Probability | None = None
    epsilon_budget: Positive | None = None
    accountant: Literal["rdp", "prv"] = "rdp"

    @model_validator(mode="after")
    def _consistent(self) -> CentralDP:
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise KeyedError(
                "noise_multiplier", "give exactly one of noise_multiplier and target_epsilon"
            )
        if self.adaptive_clipping is not None and self.mode == "client":
            raise KeyedError("adaptive_clipping", "needs mode: central (sites clip in client mode)")
        if (
            self.target_epsilon is not None
            and self.epsilon_budget is not None
            and self.target_epsilon > self.epsilon_budget
        ):
            raise KeyedError("target_epsilon", f"exceeds epsilon_budget ({self.epsilon_budget})")
        return self


class LocalDP(Spec):
    """Example-level DP-SGD at every site (Opacus): per-sample clipping to
    ``max_grad_norm``, noise ``noise_multiplier``, Poisson-sampled batches; each site
    accounts its own spend at ``delta`` and refuses to train past ``epsilon_budget``."""

    noise_multiplier: Positive
    max_grad_norm: Positive = 1.0
    delta: Probability = 1e-5
    epsilon_budget: Positive | None = None
    accountant: Literal["rdp", "prv"] = "rdp"

    def round_config(self) -> dict[str, bool | int | float | str]:
        config: dict[str, bool | int | float | str] = {
            "local_dp_noise_multiplier": self.noise_multiplier,
            "local_dp_max_grad_norm": self.max_grad_norm,
            "local_dp_delta": self.delta,
            "local_dp_accountant": self.accountant,
        }
        if self.epsilon_budget is not None:
            config["local_dp_epsilon_budget"] = self.epsilon_budget
        return config


class Privacy(Spec):
    """Differential privacy (central and/or local) and secure aggregation."""

    dp: CentralDP | None = None
    local_dp: LocalDP | None = None
    secure_aggregation: SecureAggregation = SecureAggregation()


class UpdateDrift(Spec):
    """Per-site update statistics (update norm, cosine to the mean direction of the other
    sites' updates, training loss) checked against the site's own last ``history``
    rounds (after ``min_history`` of them) and against the other sites of the round
    (when at least ``min_sites`` reported). A value fires when it is more than
    ``z_threshold`` robust deviations (median / MAD, the deviation at least
    ``min_scale``) on the bad side: larger norm or loss, smaller cosine. Norm and loss
    are compared as logarithms (a site's scale is its own; ``min_scale`` 0.3 is a factor
    of 1.35). ``enabled: null`` runs the checks whenever the coordinator sees individual
    updates (not under DP, local DP or secure aggregation)."""

    enabled: bool | None = None
    z_threshold: Positive = 6.0
    min_history: Annotated[int, Field(ge=2)] = 3
    history: Annotated[int, Field(ge=2, le=1000)] = 10
    min_sites: Annotated[int, Field(ge=3)] = 5
    min_scale: Positive = 0.3


class DataDrift(Spec):
    """Data drift from the histograms sites report with each fit result: labels, and each
    feature over ``bins`` equal bins of ``feature_range`` (values outside land in the end
    bins; no feature histograms without a range). Each report is compared with the site's
    reference, the mean of its first ``reference_rounds`` reports: PSI over
    ``psi_threshold``, or a two-sample KS test with p < ``ks_alpha`` (Bonferroni over the
    features) and statistic over ``ks_threshold``, fires. Reports with fewer than
    ``min_samples`` examples are not checked.

    Under secure aggregation or ``privacy.dp`` the check is *pooled*: the round's sites'
    histograms are summed (in the secure sum; under DP as proportions, noised with
    multiplier ``noise_multiplier`` and accounted with the model) and the pooled
    histogram is compared with the mean of the first ``reference_rounds`` pooled ones.
    Every site's histogram then has one agreed shape: ``labels`` label ids and, with a
    feature range, ``features`` features. ``enabled: null``: per site unless privatised;
    pooled under secure aggregation or DP when those keys are set; off under local DP."""

    enabled: bool | None = None
    bins: Annotated[int, Field(ge=2, le=100)] = 10
    feature_range: list[float] | None = None
    reference_rounds: Annotated[int, Field(ge=1)] = 1
    psi_threshold: Positive = 0.25
    ks_alpha: Probability = 0.01
    ks_threshold: Annotated[float, Field(gt=0, le=1)] = 0.1
    min_samples: Annotated[int, Field(ge=1)] = 50
    labels: Annotated[int, Field(ge=1, le=MAX_LABELS)] | None = None
    features: Annotated[int, Field(ge=1)] | None = None
    noise_multiplier: Positive | None = None

    @field_validator("feature_range")
    @classmethod
    def _range(cls, value: list[float] | None) -> list[float] | None:
        if value is not None and (len(value) != 2 or not value[0] < value[1]):
            raise ValueError(f"must be [low, high] with low < high (got {_show(value)})")
        return value

    @model_validator(mode="after")
    def _features_fit(self) -> DataDrift:
        if self.features is not None and self.feature_range is None:
            raise KeyedError("features", "needs drift.data.feature_range (no feature histograms)")
        if self.features is not None and self.features * self.bins > MAX_PROFILE_VALUES:
            raise KeyedError(
                "features", f"features x bins must be at most {MAX_PROFILE_VALUES} values"
            )
        return self


class EvaluationDrift(Spec):
    """Regression of the central evaluation: fires when ``metric`` is worse than the best
    version so far by more than ``max_drop`` (absolute)."""

    enabled: bool = True
    metric: Annotated[str, Field(min_length=1)] = "accuracy"
    higher_is_better: bool = True
    max_drop: Positive = 0.05


class Drift(Spec):
    """Drift checks run after every round; each alert is a ``drift_alert`` ledger entry and
    stays open (blocks promotion) for ``open_rounds`` rounds."""

    updates: UpdateDrift = UpdateDrift()
    data: DataDrift = DataDrift()
    evaluation: EvaluationDrift = EvaluationDrift()
    open_rounds: Annotated[int, Field(ge=1)] = 5


class Promotion(Spec):
    """The gate a version passes to become ``champion``: its central ``metric`` at least
    ``threshold`` (at most, when lower is better) and no drift alert open. With ``auto``
    the run's final version is put through the gate when the run finishes."""

    metric: Annotated[str, Field(min_length=1)] = "accuracy"
    threshold: float
    higher_is_better: bool = True
    auto: bool = False


class Mlflow(Spec):
    """Export to MLflow, off the round loop: parameters, per-round metrics (step = round),
    epsilon, and the promoted (or else the final) model, registered as ``register_as``
    (alias ``champion`` when promoted) with provenance tags. ``experiment`` defaults to
    the experiment's name."""

    tracking_uri: Annotated[str, Field(min_length=1)]
    experiment: Annotated[str, Field(min_length=1)] | None = None
    register_as: Annotated[str, Field(min_length=1)] | None = None


RAY_ONLY = ("ray_address", "cpus_per_site", "gpus_per_site")
"""Settings of ``simulation`` that only the ray backend reads."""


class Simulation(Spec):
    """How ``fedcoord simulate`` runs the sites: ``workers`` processes (local) or Ray
    actors (ray), each hosting every ``workers``-th site and training one at a time."""

    backend: Literal["local", "ray"] = "local"
    workers: Annotated[int, Field(ge=1, le=256)] = 2
    ray_address: Annotated[str, Field(min_length=1, max_length=512)] | None = None
    """None: start a local Ray instance; else the address of a running cluster."""
    cpus_per_site: Annotated[float, Field(gt=0, le=1024)] = 1.0
    gpus_per_site: Annotated[float, Field(ge=0, le=64)] = 0.0
    client_cache: Annotated[int, Field(ge=1, le=100_000)] = 64
    """Built site clients (data + model) a worker keeps; older ones are rebuilt on use."""

    @model_validator(mode="after")
    def _ray_settings_need_ray(self) -> Simulation:
        if self.backend != "ray":
            for key in RAY_ONLY:  # a default, as canonical JSON writes it, is no setting
                default = type(self).model_fields[key].default
                if key in self.model_fields_set and getattr(self, key) != default:
                    raise KeyedError(key, "only the ray backend reads it (simulation.backend: ray)")
        return self


class Experiment(Spec):
    """One experiment file, every default filled in."""

    name: str
    seed: Annotated[int, Field(ge=0, le=2**63 - 1)] = 0
    rounds: Annotated[int, Field(ge=1, le=100_000)]
    task: TaskSpec
    federation: Federation = Federation()
    training: Training = Training()
    strategy: StrategySpec = StrategySpec()
    validation: Validation = Validation()
    privacy: Privacy = Privacy()
    mlflow: Mlflow | None = None
    drift: Drift = Drift()
    promotion: Promotion | None = None
    simulation: Simulation = Simulation()

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME.fullmatch(value):
            raise ValueError(f"must be 1 to 64 of A-Z a-z 0-9 . _ - (got {_show(value)})")
        return value

    @model_validator(mode="after")
    def _scaffold_needs_sgd(self) -> Experiment:
        if self.strategy.name == "scaffold" and self.training.optimizer.name != "sgd":
            raise KeyedError("strategy.name", "scaffold needs training.optimizer.name: sgd")
        return self

    @model_validator(mode="after")
    def _dp_is_honourable(self) -> Experiment:
        dp = self.privacy.dp
        if dp is None:
            return self
        if self.federation.sampling.method != "poisson":
            raise KeyedError(
                "federation.sampling.method",
                "privacy.dp needs poisson sampling (the accountant assumes each site "
                "joins a round independently with probability federation.sampling.fraction)",
            )
        if not self.make_strategy().supports_dp:
            raise KeyedError(
                "strategy.name",
                f"{self.strategy.name} cannot run under privacy.dp (its rule needs the "
                "individual updates); use fedavg, fedavgm, fedprox, fedadam, fedyogi or fedadagrad",
            )
        bound = 1.0 / self.federation.sites
        if dp.delta is not None and dp.delta >= bound:
            raise KeyedError(
                "privacy.dp.delta", f"must be < 1/federation.sites = {bound:.3g} (got {dp.delta})"
            )
        return self

    @model_validator(mode="after")
    def _secure_aggregation_is_honourable(self) -> Experiment:
        secagg = self.privacy.secure_aggregation
        if not secagg.enabled:
            return self
        if not self.make_strategy().supports_secagg:
            raise KeyedError(
                "strategy.name",
                f"{self.strategy.name} cannot run under secure aggregation (its rule needs "
                "the individual updates); use fedavg, fedavgm, fedprox, fedadam, fedyogi, "
                "fedadagrad or scaffold",
            )
        dp = self.privacy.dp
        if dp is not None and dp.mode == "central":
            raise KeyedError(
                "privacy.dp.mode",
                "central DP clips each update at the coordinator, which secure aggregation "
                "hides from it; use mode: client (sites clip, the coordinator noises the sum)",
            )
        sites = self.federation.sites
        if sites < 3:
            raise KeyedError(
                "federation.sites",
                f"secure aggregation needs at least 3 sites (a sum of two reveals each to "
                f"the other), got {sites}",
            )
        if secagg.levels is not None:
            try:
                check_no_overflow(sites, secagg.levels, secagg.ring_bits)
            except QuantizationOverflow as exc:
                raise KeyedError("privacy.secure_aggregation.levels", str(exc)) from None
        elif max_levels(sites, secagg.ring_bits) < 2:
            raise KeyedError(
                "privacy.secure_aggregation.ring_bits",
                f"Z_2^{secagg.ring_bits} cannot hold a sum of {sites} sites; use 32",
            )
        return self

    @model_validator(mode="after")
    def _site_checks_are_honourable(self) -> Experiment:
        hidden_by = self.privatised()
        if self.drift.data.noise_multiplier is not None and self.privacy.dp is None:
            raise KeyedError(
                "drift.data.noise_multiplier",
                "noises the pooled histogram under privacy.dp; without privacy.dp nothing "
                "would be noised (remove it)",
            )
        if hidden_by is None:
            return self
        wanted = {
            "drift.updates.enabled": self.drift.updates.enabled,
            "training.site_evaluation": self.training.site_evaluation,
        }
        for key, on in wanted.items():
            if on:
                raise KeyedError(
                    key,
                    f"would record per-site statistics that {hidden_by} keeps from the "
                    "coordinator; leave it unset (off under privacy) or false",
                )
        blocker = self._pooled_data_blocker()
        if blocker is not None and self.drift.data.enabled:
            raise KeyedError(*blocker)
        if blocker is None and self.drift.data.enabled is not False:
            self._pooled_data_fits_the_ring()
        return self

    def _pooled_data_blocker(self) -> tuple[str, str] | None:
        """Under privacy: the key (and why) that keeps pooled data checks off, or None."""
        data, privacy = self.drift.data, self.privacy
        if privacy.local_dp is not None:
            return (
                "drift.data.enabled",
                "would release histograms of the sites' examples outside the example-level "
                "guarantee of privacy.local_dp (the sites' own accountant does not cover "
                "them); leave it unset (off under local DP) or false",
            )
        under = "privacy.dp" if privacy.dp is not None else "privacy.secure_aggregation"
        if data.labels is None:
            return (
                "drift.data.labels",
                f"is required for data-drift checks under {under}: the number of label ids "
                "(0 .. labels - 1), so every site's histogram has the same length",
            )
        if data.feature_range is not None and data.features is None:
            return (
                "drift.data.features",
                f"is required for feature histograms under {under}: the number of features "
                "per example (or remove drift.data.feature_range: labels only)",
            )
        if privacy.dp is not None and data.noise_multiplier is None:
            return (
                "drift.data.noise_multiplier",
                "is required for data-drift checks under privacy.dp: the noise multiplier "
                "of the pooled histogram, accounted together with the model's",
            )
        if privacy.dp is None and privacy.secure_aggregation.max_examples is None:
            return (
                "privacy.secure_aggregation.max_examples",
                "bounds each site's histogram counts in the secure sum; data-drift checks "
                "under secure aggregation need it (or set drift.data.enabled: false)",
            )
        return None

    def _pooled_data_fits_the_ring(self) -> None:
        """Under secure aggregation: the sum of every site's histogram cannot wrap."""
        secagg = self.privacy.secure_aggregation
        if not secagg.enabled:
            return
        sites, bits = self.federation.sites, secagg.ring_bits
        if self.privacy.dp is not None:
            try:
                histogram_scale(sites, bits)
            except HistogramOverflow as exc:
                raise KeyedError("privacy.secure_aggregation.ring_bits", str(exc)) from None
            return
        cap = secagg.max_examples
        assert cap is not None
        if sites * cap > (1 << bits) - 1:
            raise KeyedError(
                "privacy.secure_aggregation.max_examples",
                f"{sites} sites x {cap} examples overflow the ring Z_2^{bits} of the pooled "
                f"histogram counts; use max_examples <= {((1 << bits) - 1) // sites} (or "
                "drift.data.enabled: false)",
            )

    @model_validator(mode="after")
    def _strategy_fits_federation(self) -> Experiment:
        need = self.make_strategy().min_updates()
        if need > self.federation.sites:
            key = "strategy.f" if "f" in self.strategy.params() else "strategy.name"
            raise KeyedError(
                key,
                f"{self.strategy.name} needs at least {need} updates per round but "
                f"federation.sites is {self.federation.sites}",
            )
        return self

    def make_strategy(self) -> Strategy:
        """A fresh instance of the configured strategy."""
        return make_strategy(self.strategy.name, self.strategy.params())

    def simulated_behaviour(self) -> list[str]:
        """Keys set to behaviour only ``fedcoord simulate`` can produce (a coordinator
        serving real sites must refuse them rather than ignore them)."""
        keys = []
        if self.federation.dropout > 0:
            keys.append("federation.dropout")
        if self.federation.byzantine.sites > 0:
            keys.append("federation.byzantine.sites")
        if self.federation.drift.sites > 0:
            keys.append("federation.drift.sites")
        return keys

    def privatised(self) -> str | None:
        """What keeps individual updates and site statistics from the coordinator's
        record (DP, local DP or secure aggregation), or None."""
        if self.privacy.secure_aggregation.enabled:
            return "privacy.secure_aggregation"
        if self.privacy.dp is not None:
            return "privacy.dp"
        if self.privacy.local_dp is not None:
            return "privacy.local_dp"
        return None

    def site_evaluation(self) -> bool:
        """Whether sites report their evaluation of the received model."""
        wanted = self.training.site_evaluation
        return self.privatised() is None if wanted is None else wanted

    def site_checks(self) -> tuple[bool, bool]:
        """Whether per-site update checks and per-site data-drift checks run."""
        visible = self.privatised() is None
        updates = self.drift.updates.enabled
        return (visible if updates is None else updates, self.data_check_scope() == "site")

    def data_check_scope(self) -> Literal["site", "pooled"] | None:
        """How data drift is checked: per site (the coordinator sees each profile), on the
        pooled histogram (secure aggregation or DP, with the keys they need) or not."""
        if self.drift.data.enabled is False:
            return None
        if self.privatised() is None:
            return "site"
        return "pooled" if self._pooled_data_blocker() is None else None

    def canonical_json(self) -> str:
        """Every setting, defaults filled in, sorted keys, compact: the form that is hashed."""
        return canonical_json(self.model_dump(mode="json"))

    def config_digest(self) -> str:
        """``sha256:<hex>`` of :meth:`canonical_json`."""
        return "sha256:" + sha256_hex(self.canonical_json())

    def round_config(self) -> dict[str, bool | int | float | str]:
        """The flat configuration sites receive with every fit task."""
        opt = self.training.optimizer
        config: dict[str, bool | int | float | str] = {
            "local_epochs": self.training.local_epochs,
            "batch_size": self.training.batch_size,
            "optimizer": opt.name,
            "lr": opt.lr,
            "momentum": opt.momentum,
            "weight_decay": opt.weight_decay,
            "seed": self.seed,
        }
        if self.privacy.local_dp is not None:
            config.update(self.privacy.local_dp.round_config())
        return config


# validation errors -> one ConfigError -----------------------------------------------------
_EXPECTED_TYPE = {
    "int_type": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "finite_number": "a finite number",
    "string_type": "a string",
    "bool_type": "true or false",
    "model_type": "a mapping",
    "dict_type": "a mapping",
}
_BOUNDS = {
    "greater_than": ("gt", ">"),
    "greater_than_equal": ("ge", ">="),
    "less_than": ("lt", "<"),
    "less_than_equal": ("le", "<="),
}


def _show(value: Any, limit: int = 60) -> str:
    """A value as the user wrote it (JSON/YAML spelling), shortened."""
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _message(err: dict[str, Any]) -> str:
    """A short human message for one pydantic error."""
    kind, ctx, got = err["type"], err.get("ctx") or {}, _show(err.get("input"))
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required key is missing"
    if kind == "literal_error":
        choices = ", ".join(re.findall(r"'([^']*)'", str(ctx.get("expected", ""))))
        return f"must be one of: {choices} (got {got})"
    if kind in _BOUNDS:
        name, op = _BOUNDS[kind]
        bound = ctx[name]
        if isinstance(bound, float) and bound.is_integer():
            bound = int(bound)
        return f"must be {op} {bound} (got {got})"
    if kind in _EXPECTED_TYPE:
        return f"must be {_EXPECTED_TYPE[kind]} (got {got})"
    if kind == "string_too_short":
        return "must not be empty"
    if kind == "value_error":
        return str(ctx.get("error", err["msg"]))
    return f"{err['msg'][:1].lower()}{err['msg'][1:]} (got {got})"


def config_error(exc: ValidationError) -> ConfigError:
    """The first error of ``exc`` as a ConfigError keyed by its dotted location."""
    err = exc.errors()[0]
    parts = [str(p) for p in err["loc"]]
    cause = (err.get("ctx") or {}).get("error")
    if isinstance(cause, KeyedError):
        parts.append(cause.key)
    return ConfigError(".".join(parts), _message(err))


# YAML and overrides ----------------------------------------------------------------------
class _Loader(yaml.SafeLoader):
    """Safe YAML that refuses duplicate keys and reads ``1e-3`` as a number (YAML 1.2)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key: the base class reports it
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _read_yaml(text: str, source: str) -> Any:
    """Parse YAML text; syntax errors become a ConfigError with line and column."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError("", f"{source}: YAML syntax error{where}: {problem}") from None
    except RecursionError:
        raise ConfigError("", f"{source}: YAML is nested too deeply") from None


def _override_value(text: str) -> Any:
    """The value of ``--set key=VALUE``: a YAML scalar, or the raw text if it is not YAML."""
    if not text.strip():
        return ""
    try:
        return yaml.load(text, Loader=_Loader)
    except (yaml.YAMLError, RecursionError):
        return text


def apply_override(data: dict[str, Any], override: str) -> None:
    """Apply one ``key.path=value`` to ``data``, creating intermediate mappings."""
    key, sep, text = override.partition("=")
    parts = [part.strip() for part in key.split(".")]
    if not sep or not all(parts):
        raise ConfigError("--set", f"expected KEY.PATH=VALUE, got {override!r}")
    node = data
    for i, part in enumerate(parts[:-1]):
        if node.get(part) is None:
            node[part] = {}
        if not isinstance(node[part], dict):
            where = ".".join(parts[: i + 1])
            raise ConfigError(where, f"is not a mapping, so --set {override!r} cannot apply")
        node = node[part]
    node[parts[-1]] = _override_value(text)


def parse_experiment(
    text: str, source: str = "<experiment>", overrides: Sequence[str] = ()
) -> Experiment:
    """Validate an experiment given as YAML (or JSON) text, after applying ``overrides``."""
    data = _read_yaml(text, source)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        kind = type(data).__name__
        raise ConfigError("", f"{source}: an experiment must be a mapping of settings (got {kind})")
    for override in overrides:
        apply_override(data, override)
    try:
        return Experiment.model_validate(data)
    except ValidationError as exc:
        raise config_error(exc) from None


def load_experiment(path: str | Path, overrides: Sequence[str] = ()) -> Experiment:
    """Read and validate an experiment file; an unreadable file is a ConfigError."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError("", f"cannot read experiment file {p}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError("", f"cannot read experiment file {p}: not UTF-8 text") from None
    return parse_experiment(text, str(p), overrides)
