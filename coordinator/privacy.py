"""Central differential privacy at the coordinator: accountant, budget, adaptive clipping.

A :class:`PrivacySession` lives as long as a run executes under ``privacy.dp``. Each
round it gives the engine a :class:`~strategies.privacy.aggregator.ClippedNoisedMean`
(clip to ``C``, fixed denominator ``m = q N``, noise ``z C / m`` drawn from a CSPRNG),
and after the round it records the spend in the accountant (one Poisson-subsampled
Gaussian step with rate ``q`` and multiplier ``z``) and, under adaptive clipping, moves
``C`` with the noised count of unclipped updates. Its state (accountant history and the
current ``C``) is stored with every committed round, so a resumed run continues the
same spend. Before a round starts, :meth:`PrivacySession.projected_epsilon` says what
the spend would be after it; the engine stops the run when that passes the budget.

With pooled data-drift checks (``drift.data`` under DP) every round also releases the
sum of the sampled sites' histograms as proportions (one site moves it by at most
``sqrt(F + 2)`` in L2, see :mod:`strategies.histogram`) plus Gaussian noise of std
``sigma_h sqrt(F + 2)`` (``sigma_h``: ``drift.data.noise_multiplier``). Both releases use
the same Poisson sample, so the round is one Gaussian mechanism with multiplier
``z_eff = (z^-2 + sigma_h^-2)^-1/2`` (:mod:`strategies.privacy.composition`); the
accountant steps with ``z_eff``, the budget projection uses it, and a ``target_epsilon``
search finds ``z_eff`` and leaves the model ``z = (z_eff^-2 - sigma_h^-2)^-1/2``.

What the epsilon covers: the sequence of models the coordinator publishes (and metrics
computed on its own held-out data), and the noised pooled histograms. Amplification by
sampling assumes an observer does not learn which sites took part in a round; the
ledger records exactly that, so it is an audit record for the operator and auditors,
not a public release.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from coordinator.errors import ConfigError
from coordinator.experiment import CentralDP, Experiment
from strategies.privacy.accountant import PrivacyAccountant, default_delta, noise_multiplier_for
from strategies.privacy.adaptive import AdaptiveClipping, noise_split
from strategies.privacy.aggregator import ClippedNoisedMean
from strategies.privacy.clipping import CLIENT_CLIP_KEY
from strategies.privacy.composition import composed_multiplier, remaining_multiplier
from strategies.privacy.noise import SecureGaussian
from strategies.secagg.vector import SecureMean


def run_delta(exp: Experiment) -> float:
    """The run's delta: the configured one, or the default for the population."""
    dp = exp.privacy.dp
    assert dp is not None
    return dp.delta if dp.delta is not None else default_delta(exp.federation.sites)


@dataclass
class PrivacySession:
    """The DP state of one executing run."""

    spec: CentralDP
    sample_rate: float
    noise_multiplier: float
    delta: float
    accountant: PrivacyAccountant
    clip_norm: float
    adaptive: AdaptiveClipping | None = None
    noise: SecureGaussian = field(default_factory=SecureGaussian)
    histogram_multiplier: float | None = None
    """``sigma_h`` of the pooled data histogram each round releases (``None``: none)."""

    @classmethod
    def start(cls, exp: Experiment) -> PrivacySession | None:
        """The session for ``exp`` (``None`` without ``privacy.dp``); for
        ``target_epsilon``, Opacus' search over the run's rounds gives the round's
        accounted multiplier, and the model gets what the pooled histogram leaves.

        Raises
        ------
        ConfigError
            When the pooled histogram's multiplier alone would spend ``target_epsilon``.
        """
        dp = exp.privacy.dp
        if dp is None:
            return None
        q = exp.federation.sampling.fraction
        delta = run_delta(exp)
        sigma_h = exp.drift.data.noise_multiplier if exp.data_check_scope() == "pooled" else None
        z = dp.noise_multiplier
        if z is None:
            assert dp.target_epsilon is not None
            z = noise_multiplier_for(dp.target_epsilon, delta, q, exp.rounds, dp.accountant)
            if sigma_h is not None:
                try:
                    z = remaining_multiplier(z, sigma_h)
                except ValueError:
                    raise ConfigError(
                        "drift.data.noise_multiplier",
                        f"must exceed {z:.4g}, the whole round's noise multiplier for "
                        f"target_epsilon {dp.target_epsilon:g} (the pooled histogram alone "
                        "would spend it); raise it or the target",
                    ) from None
        adaptive = None
        if dp.adaptive_clipping is not None:
            a = dp.adaptive_clipping
            adaptive = AdaptiveClipping(
                clip_norm=dp.clip_norm,
                target_quantile=a.target_quantile,
                learning_rate=a.learning_rate,
                count_stddev=a.count_stddev,
            )
        return cls(
            spec=dp,
            sample_rate=q,
            noise_multiplier=z,
            delta=delta,
            accountant=PrivacyAccountant(dp.accountant),
            clip_norm=dp.clip_norm,
            adaptive=adaptive,
            histogram_multiplier=sigma_h,
        )

    @property
    def accounted_multiplier(self) -> float:
        """The round's multiplier as the accountant records it: ``z`` composed with the
        pooled histogram's ``sigma_h`` (``z`` alone without one)."""
        if self.histogram_multiplier is None:
            return self.noise_multiplier
        return composed_multiplier(self.noise_multiplier, self.histogram_multiplier)

    # before a round -------------------------------------------------------------------
    def epsilon(self) -> float:
        """The spend so far at the run's delta."""
        return self.accountant.epsilon(self.delta)

    def projected_epsilon(self) -> float:
        """The spend after one more round."""
        return self.accountant.projected_epsilon(
            self.accounted_multiplier, self.sample_rate, self.delta
        )

    def over_budget(self) -> float | None:
        """The projected epsilon when one more round would pass ``epsilon_budget``."""
        budget = self.spec.epsilon_budget
        if budget is None:
            return None
        projected = self.projected_epsilon()
        return projected if projected > budget else None

    def round_config(self) -> dict[str, bool | int | float | str]:
        """What sites need: the clip norm, in client mode (they clip themselves)."""
        return {CLIENT_CLIP_KEY: self.clip_norm} if self.spec.mode == "client" else {}

    # the round --------------------------------------------------------------------------
    def denominator(self, population: int) -> float:
        """``m = q N``: the expected number of sampled sites."""
        return max(self.sample_rate * population, 1e-12)

    def model_noise_multiplier(self, population: int) -> float:
        """``z`` for the model update; under adaptive clipping the share left after the
        count query: ``(z^-2 - (2 sigma_b)^-2)^-1/2``, ``sigma_b`` by default ``m / 20``."""
        if self.adaptive is None:
            return self.noise_multiplier
        sigma_b = self.adaptive.count_stddev_for(self.denominator(population))
        return noise_split(self.noise_multiplier, sigma_b)

    def aggregator(
        self,
        reference: Mapping[str, np.ndarray],
        population: int,
        *,
        summed: SecureMean | None = None,
        sensitivity: float | None = None,
    ) -> ClippedNoisedMean:
        """The round's clipped, noised mean; over a secure sum (``summed``) the noise is
        calibrated to ``sensitivity`` (the clip norm plus the quantization's rounding)."""
        return ClippedNoisedMean(
            reference,
            self.clip_norm,
            self.denominator(population),
            self.model_noise_multiplier(population),
            self.noise,
            summed=summed,
            sensitivity=sensitivity,
        )

    def noise_histogram(self, vector: np.ndarray, sensitivity: float) -> float:
        """Add ``N(0, (sigma_h S)^2)`` to every value of the pooled histogram ``vector``
        (float64, in place; ``S`` its L2 sensitivity); returns that std."""
        if self.histogram_multiplier is None:
            raise RuntimeError("this run releases no pooled histogram")
        std = self.histogram_multiplier * float(sensitivity)
        self.noise.add_noise(vector, std)
        return std

    def after_round(self, aggregate: ClippedNoisedMean) -> dict[str, Any]:
        """Record the round's spend (one step at :attr:`accounted_multiplier`), move ``C``
        under adaptive clipping; the ledger's ``dp`` fields of the round (with the clip
        norm this round used)."""
        used = self.clip_norm
        self.accountant.step(self.accounted_multiplier, self.sample_rate)
        record: dict[str, Any] = {
            "mode": self.spec.mode,
            "noise_multiplier": self.noise_multiplier,
            "histogram_noise_multiplier": self.histogram_multiplier,
            "accounted_noise_multiplier": self.accounted_multiplier,
            "model_noise_multiplier": aggregate.noise_multiplier,
            "clip_norm": used,
            "sample_rate": self.sample_rate,
            "denominator": aggregate.denominator,
            "sensitivity": aggregate.sensitivity,
            "noise_std": aggregate.noise_std,
            "delta": self.delta,
            "epsilon": self.epsilon(),
            "accountant": self.spec.accountant,
            "steps": self.accountant.steps,
        }
        if self.adaptive is not None:
            sigma_b = self.adaptive.count_stddev_for(aggregate.denominator)
            noised = self.adaptive.noised_count(
                aggregate.unclipped, aggregate.count, aggregate.denominator, self.noise, sigma_b
            )
            self.clip_norm = self.adaptive.update(noised, aggregate.denominator)
            record["adaptive"] = {
                "count_stddev": sigma_b,
                "noised_unclipped_fraction": noised / aggregate.denominator,
                "next_clip_norm": self.clip_norm,
            }
        return record

    # persistence --------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """JSON-ready: the accountant's history and the current clip norm."""
        return {
            "accountant": self.accountant.state(),
            "clip_norm": self.clip_norm,
            "noise_multiplier": self.noise_multiplier,
        }

    def load_state(self, state: Mapping[str, Any]) -> None:
        """Continue from :meth:`state` of the last committed round."""
        self.accountant = PrivacyAccountant.from_state(state["accountant"])
        clip = float(state["clip_norm"])
        if not (math.isfinite(clip) and clip > 0):
            raise ValueError(f"stored clip norm {clip!r} is not a positive number")
        self.clip_norm = clip
        if self.adaptive is not None:
            self.adaptive.clip_norm = clip

    def describe(self) -> dict[str, Any]:
        """The run's DP settings, for the ``run_started`` ledger entry."""
        return {
            "mode": self.spec.mode,
            "noise_multiplier": self.noise_multiplier,
            "histogram_noise_multiplier": self.histogram_multiplier,
            "accounted_noise_multiplier": self.accounted_multiplier,
            "target_epsilon": self.spec.target_epsilon,
            "clip_norm": self.spec.clip_norm,
            "adaptive_clipping": self.spec.adaptive_clipping is not None,
            "sample_rate": self.sample_rate,
            "delta": self.delta,
            "epsilon_budget": self.spec.epsilon_budget,
            "accountant": self.spec.accountant,
        }

    def headline(self) -> str:
        """One line for the progress output."""
        budget = self.spec.epsilon_budget
        histogram = ""
        if self.histogram_multiplier is not None:
            histogram = (
                f" (pooled histogram {self.histogram_multiplier:.4g}: accounted "
                f"{self.accounted_multiplier:.4g} per round)"
            )
        return (
            f"{self.spec.mode} DP: noise multiplier {self.noise_multiplier:.4g}{histogram}, "
            f"clip norm {self.clip_norm:g}{' (adaptive)' if self.adaptive else ''}, "
            f"sampling rate {self.sample_rate:g}, delta {self.delta:.3g}, "
            f"epsilon budget {'none' if budget is None else f'{budget:g}'} "
            f"({self.spec.accountant} accountant)"
        )


def privacy_summary(
    exp: Experiment, state: Mapping[str, Any] | None, history: list[dict[str, Any]]
) -> dict[str, Any] | None:
    """The ``privacy`` object of ``summary.json`` (``None`` without DP): the central
    spend from the stored accountant state of the last committed round, and under local
    DP the largest epsilon any site reported (the sites' own claim)."""
    dp, local = exp.privacy.dp, exp.privacy.local_dp
    if dp is None and local is None:
        return None
    out: dict[str, Any] = {}
    if dp is not None:
        accountant = (
            PrivacyAccountant.from_state(state["accountant"])
            if state
            else PrivacyAccountant(dp.accountant)
        )
        delta = run_delta(exp)
        out = {
            "epsilon": accountant.epsilon(delta),
            "delta": delta,
            "accountant": dp.accountant,
            "mode": dp.mode,
            "noise_multiplier": state["noise_multiplier"] if state else dp.noise_multiplier,
            "histogram_noise_multiplier": (
                exp.drift.data.noise_multiplier if exp.data_check_scope() == "pooled" else None
            ),
            "clip_norm": state["clip_norm"] if state else dp.clip_norm,
            "sample_rate": exp.federation.sampling.fraction,
            "rounds_accounted": accountant.steps,
        }
    if local is not None:
        largest = max(
            (h["local_epsilon_max"] for h in history if "local_epsilon_max" in h), default=None
        )
        site_side = {
            "epsilon": largest,
            "delta": local.delta,
            "accountant": local.accountant,
            "reported_by": "sites",
        }
        if dp is None:
            out = {**site_side, "mode": "local"}
        else:
            out["local"] = site_side
    return out
