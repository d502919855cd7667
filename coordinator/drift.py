"""Drift checks after every round, from what the coordinator saw and the run's ledger.

Three families (thresholds in the experiment's ``drift:`` block):

- **updates**: each site's update norm, cosine to the mean direction of the other sites'
  updates and training loss, against the site's own recent history and against the
  other sites of the round (norms and losses as logarithms);
- **data**: each site's label and feature histograms against its reference (the mean
  of its first reports), by PSI and a two-sample KS test; under secure aggregation or DP
  the same comparison on the round's *pooled* histogram (the sum over its sites, exact
  from the secure sum or noised under DP) against the pooled reference;
- **evaluation**: the central metric against the best version of the run so far.

Everything a check needs from earlier rounds is in the ``drift`` record of each
``round_committed`` entry (profiles by digest in the model store), so the monitor is
rebuilt from the ledger after a restart.

The pooled histogram mixes the sites of each round: when the sampled sites differ from
round to round and their data is not IID, the pooled proportions move with the sample
alone. Pooled checks suit full or large participation; the reference averages
``reference_rounds`` rounds to damp this.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from coordinator.experiment import Drift, Experiment
from coordinator.ledger import Entry
from coordinator.model_store import ModelStore
from strategies.drift import (
    EVAL_PREFIX,
    PROFILE_BINS,
    PROFILE_HIGH,
    PROFILE_LOW,
    SITE_EVALUATION,
    DataProfile,
    cosine,
    ks_from_counts,
    leave_one_out_scores,
    psi,
    robust_score,
)
from strategies.histogram import HistogramSpec, PooledHistogram, histogram_scale

UPDATE_STATS = ("norm", "cosine", "loss")
"""Per-site update statistics; a larger norm or loss, a smaller cosine is the bad side."""
CHECK_NAMES = {"norm": "update_norm", "cosine": "update_cosine", "loss": "train_loss"}


def _bad_side(stat: str) -> float:
    """-1 where a small value is the bad side (cosines), +1 where a large one is."""
    return -1.0 if stat == "cosine" else 1.0


def _scale(stat: str, value: float) -> float:
    """Where a statistic is compared: norms and losses as logarithms, cosines as is."""
    return value if stat == "cosine" else float(np.log(max(value, 1e-12)))


@dataclass
class SiteReport:
    """What one accepted site brought to the checks."""

    num_examples: int
    metrics: Mapping[str, float]
    norm: float | None = None
    sketch: np.ndarray | None = None
    profile: DataProfile | None = None


class HistogramNoise(Protocol):
    """Adds the DP noise to a pooled histogram (``coordinator.privacy.PrivacySession``)."""

    def noise_histogram(self, vector: np.ndarray, sensitivity: float) -> float: ...


@dataclass
class DriftResult:
    """The ``drift`` record of a round and the ``drift_alert`` payloads it raised."""

    record: dict[str, Any]
    alerts: list[dict[str, Any]] = field(default_factory=list)


def histogram_spec(exp: Experiment) -> HistogramSpec | None:
    """The layout of the pooled histogram (``None`` unless pooled data checks run):
    exact counts capped at ``privacy.secure_aggregation.max_examples`` under secure
    aggregation alone, proportions (count coordinate capped at ``min_samples``) under DP."""
    if exp.data_check_scope() != "pooled":
        return None
    data, privacy = exp.drift.data, exp.privacy
    assert data.labels is not None
    features = (data.features or 0) if data.feature_range else 0
    bins = data.bins if features else 0
    secagg = privacy.secure_aggregation
    if privacy.dp is None:
        assert secagg.max_examples is not None
        return HistogramSpec(data.labels, features, bins, "counts", secagg.max_examples)
    scale = histogram_scale(exp.federation.sites, secagg.ring_bits if secagg.enabled else None)
    return HistogramSpec(data.labels, features, bins, "proportions", data.min_samples, scale)


def site_requests(exp: Experiment) -> dict[str, bool | int | float | str]:
    """Round config keys asking sites for their evaluation and data profile (and, for
    pooled checks, the histogram layout they must fit)."""
    config: dict[str, bool | int | float | str] = {}
    if exp.site_evaluation():
        config[SITE_EVALUATION] = True
    if exp.data_check_scope() is not None:
        data = exp.drift.data
        config[PROFILE_BINS] = data.bins if data.feature_range else 0
        if data.feature_range:
            config[PROFILE_LOW], config[PROFILE_HIGH] = data.feature_range
        spec = histogram_spec(exp)
        if spec is not None:
            config.update(spec.round_config())
    return config


def site_evaluation(reports: Mapping[str, SiteReport]) -> dict[str, Any] | None:
    """Per-site evaluation of the round's input model (fairness): each site's values,
    the worst site, the example-weighted mean and the spread of the accuracy."""
    sites = {
        s: {
            "loss": r.metrics[f"{EVAL_PREFIX}loss"],
            "num_examples": int(r.metrics.get(f"{EVAL_PREFIX}examples", r.num_examples)),
            **(
                {"accuracy": r.metrics[f"{EVAL_PREFIX}accuracy"]}
                if f"{EVAL_PREFIX}accuracy" in r.metrics
                else {}
            ),
        }
        for s, r in sorted(reports.items())
        if f"{EVAL_PREFIX}loss" in r.metrics
    }
    if not sites:
        return None
    key, worst_of = (
        ("accuracy", min) if all("accuracy" in v for v in sites.values()) else ("loss", max)
    )
    values = {s: float(v[key]) for s, v in sites.items()}
    worst = worst_of(values, key=values.__getitem__)
    weights = np.array([sites[s]["num_examples"] for s in values], dtype=np.float64)
    mean = float(np.average(list(values.values()), weights=weights)) if weights.sum() else 0.0
    return {
        "sites": sites,
        "metric": key,
        "worst": {"site": worst, key: values[worst]},
        f"mean_{key}": mean,
        "spread": max(values.values()) - min(values.values()),
    }


class DriftMonitor:
    """The drift checks of one run.

    Parameters
    ----------
    exp
        The run's experiment (thresholds and which checks run).
    store
        Where data profiles are kept by digest.
    """

    def __init__(self, exp: Experiment, store: ModelStore):
        self.spec: Drift = exp.drift
        self.run_id = ""
        self.updates_on, self.data_on = exp.site_checks()
        self.histogram = histogram_spec(exp)
        """The pooled histogram's layout; ``None`` unless pooled data checks run."""
        self.secure = exp.privacy.secure_aggregation.enabled
        self.store = store
        self._history: dict[str, dict[str, deque[float]]] = {}
        self._profiles: dict[str, list[str]] = {}
        self._references: dict[str, DataProfile] = {}
        self._pooled: list[tuple[str, int, int]] = []
        """``(digest, num_examples, sample_size)`` of every pooled histogram so far."""
        self._pooled_reference: DataProfile | None = None
        self._best: float | None = None

    # replay -------------------------------------------------------------------------
    def replay(self, entries: Iterable[Entry], run_id: str) -> DriftMonitor:
        """Take in the committed rounds of ``run_id`` (in ledger order)."""
        self.run_id = run_id
        for e in entries:
            if e.kind == "round_committed" and e.payload.get("run_id") == run_id:
                drift = e.payload.get("drift") or {}
                for site, values in (drift.get("sites") or {}).items():
                    self._remember(site, values)
                for site, digest in (drift.get("profiles") or {}).items():
                    self._profiles.setdefault(site, []).append(digest)
                pooled = drift.get("pooled") or {}
                if pooled.get("digest"):
                    n = int(pooled["num_examples"])
                    self._pooled.append((pooled["digest"], n, int(pooled.get("sample_size", n))))
                self._note_evaluation(e.payload.get("metrics") or {})
        return self

    def _remember(self, site: str, values: Mapping[str, float | None]) -> None:
        history = self._history.setdefault(
            site, {k: deque(maxlen=self.spec.updates.history) for k in UPDATE_STATS}
        )
        for k in UPDATE_STATS:
            value = values.get(k)
            if value is not None:
                history[k].append(float(value))

    def _note_evaluation(self, metrics: Mapping[str, Any]) -> None:
        spec = self.spec.evaluation
        value = metrics.get(spec.metric)
        if isinstance(value, int | float):
            better = max if spec.higher_is_better else min
            self._best = value if self._best is None else better(self._best, value)

    # one round ----------------------------------------------------------------------
    def pool(
        self,
        secure_sum: np.ndarray | None,
        profiles: Iterable[DataProfile | None],
        sites: int,
        noise: HistogramNoise | None,
    ) -> PooledHistogram | str | None:
        """The round's pooled histogram (``None`` when pooled checks are off).

        Under secure aggregation it is the secure sum's histogram tail (``secure_sum``;
        ``None``: no sum, zeros); otherwise (DP, the coordinator sees each profile) the
        sum of the sites' ``profiles`` in the same encoding. Decoded over ``sites`` sites
        and, under DP, noised by ``noise`` (every round, whatever it holds: the
        accountant charges every round). A reason instead when exact counts do not add
        up (a site sent a malformed histogram).
        """
        spec = self.histogram
        if spec is None:
            return None
        if self.secure:
            total = np.zeros(spec.size, np.int64) if secure_sum is None else secure_sum
        else:
            total = np.zeros(spec.size, np.int64)
            for profile in profiles:
                with contextlib.suppress(ValueError):  # refused on arrival (bad_profile)
                    total += spec.encode(profile)
        try:
            vector = spec.decode(total, sites)
        except ValueError as exc:
            return str(exc)
        noise_std = None
        if spec.encoding == "proportions":
            assert noise is not None, "a proportions histogram is released only noised"
            noise_std = noise.noise_histogram(vector, spec.sensitivity)
        return spec.pooled(vector, sites, noise_std)

    def check(
        self,
        round_no: int,
        reports: Mapping[str, SiteReport],
        metrics: Mapping[str, float],
        pooled: PooledHistogram | str | None = None,
    ) -> DriftResult:
        """Run the checks of round ``round_no`` and fold its values into the history
        (``pooled``: the round's pooled histogram from :meth:`pool`)."""
        result = DriftResult({"checks": []})
        if self.updates_on:
            self._check_updates(round_no, reports, result)
        if self.data_on:
            self._check_data(round_no, reports, result)
        if self.histogram is not None:
            self._check_pooled(round_no, pooled, result)
        if self.spec.evaluation.enabled:
            self._check_evaluation(round_no, metrics, result)
        result.record["alerts"] = len(result.alerts)
        return result

    def _alert(
        self,
        result: DriftResult,
        round_no: int,
        check: str,
        scope: str,
        site: str | None,
        value: float,
        baseline: float,
        threshold: float,
        message: str,
    ) -> None:
        result.alerts.append({
            "run_id": self.run_id, "round": round_no, "check": check, "scope": scope,
            "site_id": site, "value": value, "baseline": baseline, "threshold": threshold,
            "message": message,
        })  # fmt: skip

    def _check_updates(
        self, round_no: int, reports: Mapping[str, SiteReport], result: DriftResult
    ) -> None:
        spec = self.spec.updates
        result.record["checks"].append("updates")
        units = {
            s: r.sketch / n
            for s, r in reports.items()
            if r.sketch is not None and (n := float(np.linalg.norm(r.sketch))) > 0
        }
        total = sum(units.values()) if units else None
        values: dict[str, dict[str, float | None]] = {}
        for site, r in sorted(reports.items()):
            loss = r.metrics.get("loss")
            others = None if total is None or len(units) < 2 else total - units.get(site, 0.0)
            values[site] = {
                "norm": r.norm,
                "cosine": None if others is None or r.sketch is None else cosine(r.sketch, others),
                "loss": None if loss is None else float(loss),
            }
        cross = {k: self._cross_site_scores(k, values) for k in UPDATE_STATS}
        for site, v in values.items():
            history = self._history.get(site)
            for k in UPDATE_STATS:
                value = v[k]
                if value is None:
                    continue
                past = list(history[k]) if history else []
                if len(past) >= spec.min_history:
                    score = self._score(k, value, past)
                    self._outlier(result, round_no, site, k, value, score, past, "site_history")
                score = cross[k].get(site)
                if score is not None and _bad_side(k) * score > spec.z_threshold:  # others: text
                    others = [o[k] for s, o in values.items() if s != site and o[k] is not None]
                    self._outlier(result, round_no, site, k, value, score, others, "cross_site")  # type: ignore[arg-type]
        for site, v in values.items():
            self._remember(site, v)
        result.record["sites"] = values

    def _score(self, stat: str, value: float, baseline: list[float]) -> float:
        scaled = [_scale(stat, b) for b in baseline]
        return robust_score(_scale(stat, value), scaled, self.spec.updates.min_scale)

    def _cross_site_scores(
        self, stat: str, values: Mapping[str, Mapping[str, float | None]]
    ) -> dict[str, float]:
        """Each site's score of ``stat`` against the other sites' (when at least
        ``min_sites`` sites have it), all in one vectorised pass."""
        have = {s: v[stat] for s, v in values.items() if v[stat] is not None}
        if not have or len(have) < self.spec.updates.min_sites:
            return {}
        scaled = np.array([_scale(stat, x) for x in have.values()])  # type: ignore[arg-type]
        scores = leave_one_out_scores(scaled, self.spec.updates.min_scale)
        return dict(zip(have, scores.tolist(), strict=True))

    def _outlier(
        self,
        result: DriftResult,
        round_no: int,
        site: str,
        stat: str,
        value: float,
        score: float,
        baseline: list[float],
        scope: str,
    ) -> None:
        """Alert when ``value``'s score against ``baseline`` is past the threshold on
        the bad side of ``stat`` (below for cosines, above for the others)."""
        spec = self.spec.updates
        sign = _bad_side(stat)
        if sign * score <= spec.z_threshold:
            return
        score = sign * score
        median = float(np.median(baseline))
        against = "its own last rounds" if scope == "site_history" else "the other sites"
        side = "below" if sign < 0 else "above"
        self._alert(
            result, round_no, CHECK_NAMES[stat], scope, site, value, median, spec.z_threshold,
            f"{site} {CHECK_NAMES[stat].replace('_', ' ')} {value:.4g} is {score:.1f} robust "
            f"deviations {side} {against} (median {median:.4g}; threshold {spec.z_threshold:g})",
        )  # fmt: skip

    def _check_data(
        self, round_no: int, reports: Mapping[str, SiteReport], result: DriftResult
    ) -> None:
        spec = self.spec.data
        result.record["checks"].append("data")
        profiles = {s: r.profile for s, r in sorted(reports.items()) if r.profile is not None}
        stored = dict(zip(profiles, self._store(*profiles.values()), strict=True))
        skipped: dict[str, str] = {}
        for site, profile in profiles.items():
            reference = self._reference(site)
            self._profiles.setdefault(site, []).append(stored[site])
            if reference is None:
                skipped[site] = "building reference"
                continue
            if min(reference.num_examples, profile.num_examples) < spec.min_samples:
                skipped[site] = f"fewer than {spec.min_samples} examples"
                continue
            self._compare(result, round_no, "site_reference", site, site, reference, profile)
        result.record["profiles"] = stored
        if skipped:
            result.record["data_skipped"] = skipped

    def _check_pooled(
        self, round_no: int, pooled: PooledHistogram | str | None, result: DriftResult
    ) -> None:
        """The pooled histogram against the mean of the first ``reference_rounds`` pooled
        histograms with at least ``min_samples`` examples (noised under DP)."""
        spec = self.spec.data
        result.record["checks"].append("pooled_data")
        if not isinstance(pooled, PooledHistogram):
            result.record["pooled"] = {"skipped": pooled or "no pooled histogram this round"}
            return
        n = pooled.num_examples
        (digest,) = self._store(DataProfile(n, pooled.labels, pooled.features))
        record: dict[str, Any] = {
            "digest": digest, "num_examples": n, "sample_size": pooled.sample_size,
            "sites": pooled.sites, "encoding": pooled.encoding, "noise_std": pooled.noise_std,
        }  # fmt: skip
        result.record["pooled"] = record
        reference = self._pooled_reference_profile()
        self._pooled.append((digest, n, pooled.sample_size))
        if n < spec.min_samples:
            record["skipped"] = f"fewer than {spec.min_samples} examples"
        elif reference is None:
            record["skipped"] = "building reference"
        else:
            size = min(pooled.sample_size, reference.num_examples)
            ks = size >= spec.min_samples
            if not ks:  # under DP the noise leaves too small a sample for a KS test
                record["ks_skipped"] = f"sample size {size} below {spec.min_samples}"
            current = pooled.profile()
            self._compare(result, round_no, "pooled", None, "pooled", reference, current, ks)

    def _pooled_reference_profile(self) -> DataProfile | None:
        """The mean proportions (as pseudo-counts of the mean sample size) of the first
        ``reference_rounds`` pooled histograms with at least ``min_samples`` examples."""
        if self._pooled_reference is not None:
            return self._pooled_reference
        spec = self.spec.data
        usable = [(d, s) for d, n, s in self._pooled if n >= spec.min_samples]
        if len(usable) < spec.reference_rounds:
            return None
        loaded = [self.store.get(d) for d, _ in usable[: spec.reference_rounds]]
        n = int(np.mean([s for _, s in usable[: spec.reference_rounds]]))
        labels = np.mean([a["labels"] for a in loaded], axis=0) * n
        features = None
        if all("features" in a for a in loaded):
            features = np.mean([a["features"] for a in loaded], axis=0) * n
        self._pooled_reference = DataProfile(n, labels, features)
        return self._pooled_reference

    def _compare(
        self,
        result: DriftResult,
        round_no: int,
        scope: str,
        site: str | None,
        who: str,
        reference: DataProfile,
        profile: DataProfile,
        ks: bool = True,
    ) -> None:
        """PSI of the labels, worst-feature PSI and (``ks``) per-feature KS of ``profile``
        against ``reference``; alerts of ``scope`` for ``site`` (``who`` names it)."""
        spec = self.spec.data
        label_psi = psi(reference.labels, profile.labels)
        if label_psi > spec.psi_threshold:
            self._alert(
                result, round_no, "label_psi", scope, site, label_psi, 0.0,
                spec.psi_threshold,
                f"{who} label histogram moved: PSI {label_psi:.3f} against its reference "
                f"(threshold {spec.psi_threshold:g})",
            )  # fmt: skip
        if reference.features is None or profile.features is None:
            return
        if reference.features.shape != profile.features.shape:
            self._alert(
                result, round_no, "feature_psi", scope, site, float("inf"), 0.0,
                spec.psi_threshold, f"{who} now reports {profile.features.shape[0]} features, "
                f"its reference {reference.features.shape[0]}",
            )  # fmt: skip
            return
        scores = [psi(a, b) for a, b in zip(reference.features, profile.features, strict=True)]
        worst = int(np.argmax(scores))
        if scores[worst] > spec.psi_threshold:
            self._alert(
                result, round_no, "feature_psi", scope, site, scores[worst], 0.0,
                spec.psi_threshold,
                f"{who} feature {worst} histogram moved: PSI {scores[worst]:.3f} against "
                f"its reference (threshold {spec.psi_threshold:g})",
            )  # fmt: skip
        if not ks:
            return
        pairs = zip(reference.features, profile.features, strict=True)
        tests = [ks_from_counts(a, b) for a, b in pairs]
        alpha = spec.ks_alpha / len(tests)
        hits = [(s, p, i) for i, (s, p) in enumerate(tests) if p < alpha and s > spec.ks_threshold]
        if hits:
            stat, p, feature = max(hits)
            self._alert(
                result, round_no, "feature_ks", scope, site, stat, 0.0,
                spec.ks_threshold,
                f"{who} feature {feature} distribution moved: KS {stat:.3f} (p {p:.2g} < "
                f"{alpha:.2g}, Bonferroni over {len(tests)} features)",
            )  # fmt: skip

    def _store(self, *profiles: DataProfile) -> list[str]:
        """Store the profiles content-addressed (in one batch); their digests."""
        batch = []
        for p in profiles:
            arrays = {"labels": p.labels, "num_examples": np.array([p.num_examples])}
            if p.features is not None:
                arrays["features"] = p.features
            batch.append(arrays)
        return self.store.add_many(batch)

    def _reference(self, site: str) -> DataProfile | None:
        """The mean of the site's first ``reference_rounds`` profiles, once it has them."""
        if site in self._references:
            return self._references[site]
        digests = self._profiles.get(site, [])[: self.spec.data.reference_rounds]
        if len(digests) < self.spec.data.reference_rounds:
            return None
        loaded = [self.store.get(d) for d in digests]
        width = max(len(a["labels"]) for a in loaded)
        labels = np.mean([np.pad(a["labels"], (0, width - len(a["labels"]))) for a in loaded], 0)
        features = None
        if all("features" in a for a in loaded):
            features = np.mean([a["features"] for a in loaded], axis=0)
        n = int(np.mean([int(a["num_examples"][0]) for a in loaded]))
        self._references[site] = DataProfile(n, labels, features)
        return self._references[site]

    def _check_evaluation(
        self, round_no: int, metrics: Mapping[str, float], result: DriftResult
    ) -> None:
        spec = self.spec.evaluation
        value = metrics.get(spec.metric)
        if value is None:
            return
        result.record["checks"].append("evaluation")
        best = self._best
        if best is not None:
            drop = best - value if spec.higher_is_better else value - best
            if drop > spec.max_drop:
                self._alert(
                    result, round_no, "evaluation_regression", "central", None, value, best,
                    spec.max_drop,
                    f"central {spec.metric} {value:.4f} is {drop:.4f} worse than the best "
                    f"version so far ({best:.4f}; allowed {spec.max_drop:g})",
                )  # fmt: skip
        self._note_evaluation(metrics)
