"""The privacy accountant: Opacus' RDP (default) or PRV accountant, with state that persists.

Every round of central DP is one Poisson-subsampled Gaussian mechanism: each site joins
independently with probability ``q`` and the noised mean has multiplier ``z``. The
accountant composes those steps and converts them to ``(epsilon, delta)``. Both Opacus
accountants assume exactly that Poisson sampling: the engine must sample sites that way
(fixed-size sampling without replacement needs another analysis and gives another
epsilon for the same ``q``), and ``m = q N`` is an expected, not a fixed, count. The
state is the Opacus history, a list of ``(noise_multiplier, sample_rate, steps)``,
stored as JSON with every committed round.

RDP converts at Opacus' default orders; PRV returns Opacus' upper bound with
``eps_error`` :data:`PRV_EPS_ERROR` and ``delta_error = delta / 1000``.

Opacus (and so torch, ~2 s) is imported only when an epsilon is computed.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np

Kind = Literal["rdp", "prv"]
KINDS: tuple[Kind, ...] = ("rdp", "prv")
History = list[tuple[float, float, int]]

LOCAL_DP_METRICS = frozenset({"epsilon", "delta"})
"""The metrics in which a site reports its own local DP spend (``client_sdk.local_dp``):
recorded per site, never averaged, and still reported under secure aggregation."""

PRV_EPS_ERROR = 0.01
"""Accuracy asked of the PRV accountant (Opacus' default); the bound it returns is the
upper end of its error interval."""


def _check_kind(kind: object) -> Kind:
    if kind not in KINDS:
        raise ValueError(f"unknown accountant {kind!r}; use one of {', '.join(KINDS)}")
    return kind  # type: ignore[return-value]


def _is_real(x: object) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _check_step(noise_multiplier: float, sample_rate: float, steps: int) -> None:
    z, q = noise_multiplier, sample_rate
    if not (_is_real(z) and math.isfinite(z) and z > 0):
        raise ValueError(f"noise multiplier must be a finite number > 0, got {z!r}")
    if not (_is_real(q) and 0 < q <= 1):
        raise ValueError(f"sample rate must be a number in (0, 1], got {q!r}")
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")


def _check_delta(delta: float) -> float:
    d = float(delta)
    if not 0.0 < d < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    return d


def epsilon_of(kind: Kind, history: Sequence[tuple[float, float, int]], delta: float) -> float:
    """Opacus' epsilon at ``delta`` for a history of ``(z, q, steps)`` (0.0 when empty)."""
    kind = _check_kind(kind)
    delta = _check_delta(delta)
    if not history:
        return 0.0
    from opacus.accountants import PRVAccountant, RDPAccountant

    if kind == "rdp":
        rdp = RDPAccountant()
        rdp.history = [tuple(h) for h in history]
        with warnings.catch_warnings():  # the bound is valid, only possibly loose
            warnings.filterwarnings("ignore", "Optimal order is the largest alpha")
            return float(rdp.get_epsilon(delta=delta))
    prv = PRVAccountant()
    prv.history = [tuple(h) for h in history]
    with np.errstate(divide="ignore"):  # log(1 - q) at q = 1 is harmless there
        return float(prv.get_epsilon(delta=delta, eps_error=PRV_EPS_ERROR))


class PrivacyAccountant:
    """Composes Poisson-subsampled Gaussian steps; :meth:`epsilon` is the spend so far.

    Parameters
    ----------
    kind
        ``"rdp"`` (default) or ``"prv"``.
    history
        Steps already taken, as ``(noise_multiplier, sample_rate, steps)``.
    """

    def __init__(self, kind: Kind = "rdp", history: Sequence[Sequence[Any]] | None = None):
        self.kind: Kind = _check_kind(kind)
        self._history: History = []
        for entry in history or ():
            if not isinstance(entry, Sequence) or len(entry) != 3:
                raise ValueError(f"history entries are [z, q, steps], got {entry!r}")
            self.step(*entry)

    @property
    def history(self) -> History:
        """``(noise_multiplier, sample_rate, steps)`` runs, consecutive equal settings merged."""
        return list(self._history)

    @property
    def steps(self) -> int:
        """Mechanism invocations so far (rounds, for central DP; not ``len(history)``)."""
        return sum(n for _, _, n in self._history)

    def step(self, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        """Record ``steps`` more invocations with multiplier ``z`` at sampling rate ``q``."""
        _check_step(noise_multiplier, sample_rate, steps)
        z, q, n = float(noise_multiplier), float(sample_rate), int(steps)
        if self._history and self._history[-1][:2] == (z, q):
            self._history[-1] = (z, q, self._history[-1][2] + n)
        else:
            self._history.append((z, q, n))

    def epsilon(self, delta: float) -> float:
        """The epsilon spent so far at ``delta`` (0.0 before any step)."""
        return epsilon_of(self.kind, self._history, delta)

    def projected_epsilon(
        self, noise_multiplier: float, sample_rate: float, delta: float, steps: int = 1
    ) -> float:
        """The epsilon after ``steps`` more invocations; this accountant is not changed."""
        future = PrivacyAccountant(self.kind, self._history)
        future.step(noise_multiplier, sample_rate, steps)
        return future.epsilon(delta)

    def state(self) -> dict[str, Any]:
        """JSON-ready state: ``{"kind": ..., "history": [[z, q, steps], ...]}``."""
        return {"kind": self.kind, "history": [list(h) for h in self._history]}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> PrivacyAccountant:
        """Rebuild from :meth:`state`.

        Raises
        ------
        ValueError
            For a state that is not ``{"kind", "history"}``, an unknown kind, or a
            history entry that is not ``[z > 0, q in (0, 1], steps >= 1]``.
        """
        if not isinstance(state, Mapping) or set(state) != {"kind", "history"}:
            raise ValueError("accountant state must be {'kind': ..., 'history': [...]}")
        history = state["history"]
        if not isinstance(history, list | tuple):
            raise ValueError(f"accountant history must be a list, got {type(history).__name__}")
        for i, entry in enumerate(history):
            if not isinstance(entry, list | tuple) or len(entry) != 3:
                raise ValueError(f"accountant history entry {i} is not [z, q, steps]: {entry!r}")
            try:
                _check_step(*entry)
            except ValueError as e:
                raise ValueError(f"accountant history entry {i}: {e}") from None
        return cls(_check_kind(state["kind"]), history)


def noise_multiplier_for(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    kind: Kind = "rdp",
    tolerance: float = 0.01,
) -> float:
    """The noise multiplier that spends at most ``target_epsilon`` (and within
    ``tolerance`` of it) at ``delta`` over ``steps`` invocations at rate ``q``: Opacus'
    search (``get_noise_multiplier``) with this module's accountant settings.

    Raises
    ------
    ValueError
        For bad arguments, or when no multiplier up to Opacus' limit (1e6) reaches the
        target.
    """
    from opacus.accountants.utils import MAX_SIGMA, get_noise_multiplier

    kind = _check_kind(kind)
    delta = _check_delta(delta)
    target = float(target_epsilon)
    if not (math.isfinite(target) and target > 0):
        raise ValueError(f"target epsilon must be a finite number > 0, got {target_epsilon!r}")
    _check_step(1.0, sample_rate, steps)
    if not (math.isfinite(tolerance) and tolerance > 0):
        raise ValueError(f"tolerance must be a finite number > 0, got {tolerance!r}")
    extra = {"eps_error": PRV_EPS_ERROR} if kind == "prv" else {}
    try:
        with np.errstate(divide="ignore"), warnings.catch_warnings():
            # the search probes tiny multipliers whose best RDP order is the largest one
            warnings.filterwarnings("ignore", "Optimal order is the largest alpha")
            z = float(
                get_noise_multiplier(
                    target_epsilon=target,
                    target_delta=delta,
                    sample_rate=float(sample_rate),
                    steps=int(steps),
                    accountant=kind,
                    epsilon_tolerance=tolerance,
                    **extra,
                )
            )
    except ValueError as e:
        if "too low" not in str(e):  # Opacus: "The privacy budget is too low."
            raise
        raise ValueError(
            f"target epsilon {target:g} cannot be reached at delta {delta:g} over {steps} "
            f"steps at sample rate {sample_rate:g}: it needs a noise multiplier above "
            f"{MAX_SIGMA:g} ({e})"
        ) from None
    if epsilon_of(kind, [(z, float(sample_rate), int(steps))], delta) > target:
        raise ValueError(f"no noise multiplier found that reaches epsilon {target:g}")
    return z


def default_delta(population: int) -> float:
    """delta when none is configured: ``min(1e-5, 1 / (10 N))`` for ``N`` sites.

    delta bounds the probability of an outright failure of the guarantee; a mechanism that
    publishes one random site's data whole is ``(0, 1/N)``-DP, so delta must sit well
    below ``1/N``. The tenth of ``1/N`` matters from ``N`` = 10,000 sites on; below that
    the customary 1e-5 is already far smaller.
    """
    if isinstance(population, bool) or not isinstance(population, int) or population < 1:
        raise ValueError(f"population must be an integer >= 1, got {population!r}")
    return min(1e-5, 1.0 / (10 * population))
