"""Choosing the SecAgg+ degree ``k`` and Shamir threshold ``t`` for a round.

Model (after Bell et al. 2020, "Secure single-server aggregation with (poly)logarithmic
overhead"): ``n`` sites; ``C = floor(gamma * n)`` of them corrupt and colluding with the
coordinator (fixed before the graph seed is drawn); every site drops out independently
with probability ``delta`` somewhere during the round; the graph is the random Harary
graph of :mod:`strategies.secagg.graph`, so an honest site's neighbours are a uniformly
random ``k``-subset of the other ``n - 1`` sites. Three events must be unlikely:

* **Share leakage** (security). To learn an honest site's input, the adversary needs
  ``t`` shares of both its self-mask seed and its mask key. Honest neighbours reveal at
  most one of the two (a site never reveals both for one peer), so with ``c`` corrupt
  neighbours this needs ``2t <= k + c``. We require ``n * P[c >= 2t - k] <= eps_1`` with
  ``c ~ Hypergeometric(n - 1, C, k)``. This holds even when the coordinator lies about
  who dropped, and it implies ``t > k / 2``.
* **Disconnection** (security). If the honest surviving sites split into two
  components of the graph, the masks cancel inside each and the coordinator learns
  each component's partial sum. In the ring construction that needs two disjoint runs of
  ``k / 2`` consecutive corrupt-or-dropped sites; a run of ``m`` given positions is all
  bad with probability at most ``q^m``, ``q = C/n + (1 - C/n) * delta`` (the
  hypergeometric count of corrupt sites is dominated by the binomial in convex order),
  so ``P <= n(n - 1)/2 * q^k``. We require it ``<= eps_2``; ``eps_1 + eps_2`` is the
  security target (default ``2^-40``).
* **Abort** (correctness, i.e. liveness). Every secret to rebuild needs ``t`` shares from
  surviving neighbours: ``n * P[Binomial(k, 1 - delta) < t] <= eta`` (default ``1e-4``:
  an abort releases nothing and the round is redone, so this is a cost, not a risk).
  Failing this only aborts the round; it never leaks anything.

Search: the smallest even ``k < n - 1`` for which some ``t`` satisfies all three, with
``t`` the smallest secure threshold (most tolerant of dropouts). If no sparse ``k``
works, the complete graph is used: ``k = n - 1``, every honest site has exactly ``C``
corrupt neighbours, so ``t = floor((k + C) / 2) + 1`` (and ``t >= 2``) is secure with
certainty; its abort probability is reported and may exceed ``eta`` for a tiny ``n`` or
a large ``delta`` (the round then aborts more often; it stays private).
Tail probabilities are sums of exact binomial and hypergeometric terms evaluated in log
space (``math.lgamma``), accurate far below the targets; no normal approximation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

DEFAULT_SECURITY_TARGET = 2.0**-40
DEFAULT_CORRECTNESS_TARGET = 1e-4


@dataclass(frozen=True)
class SecAggParameters:
    """A round's degree ``k``, threshold ``t`` and the bounds they achieve.

    ``security_failure`` bounds the probability that the share-leakage or disconnection
    condition fails; ``abort_probability`` bounds the probability that dropouts alone
    leave some secret with fewer than ``t`` surviving holders."""

    sites: int
    k: int
    t: int
    complete: bool
    dropout_rate: float
    corrupt_fraction: float
    corrupt_sites: int
    security_failure: float
    abort_probability: float


def _log_comb(n: int, r: int) -> float:
    if r < 0 or r > n:
        return -math.inf
    return math.lgamma(n + 1) - math.lgamma(r + 1) - math.lgamma(n - r + 1)


def _binomial_pmf(k: int, p: float) -> list[float]:
    if p <= 0.0 or p >= 1.0:
        point = 0 if p <= 0.0 else k
        return [1.0 if i == point else 0.0 for i in range(k + 1)]
    lp, lq = math.log(p), math.log1p(-p)
    return [math.exp(_log_comb(k, i) + i * lp + (k - i) * lq) for i in range(k + 1)]


def _hypergeometric_pmf(population: int, marked: int, draws: int) -> list[float]:
    base = _log_comb(population, draws)
    return [
        math.exp(_log_comb(marked, i) + _log_comb(population - marked, draws - i) - base)
        for i in range(draws + 1)
    ]


def _suffix_sums(pmf: list[float]) -> list[float]:
    """``out[m] = sum(pmf[m:])`` (with ``out[len(pmf)] = 0``)."""
    out = [0.0] * (len(pmf) + 1)
    for i in range(len(pmf) - 1, -1, -1):
        out[i] = out[i + 1] + pmf[i]
    return out


def binomial_below(k: int, p: float, t: int) -> float:
    """``P[Binomial(k, p) < t]``."""
    return math.fsum(_binomial_pmf(k, p)[: max(t, 0)])


def hypergeometric_at_least(population: int, marked: int, draws: int, m: int) -> float:
    """``P[X >= m]`` for ``X ~ Hypergeometric(population, marked, draws)``."""
    return math.fsum(_hypergeometric_pmf(population, marked, draws)[max(m, 0) :])


def disconnection_bound(n: int, k: int, bad_rate: float) -> float:
    """``n(n - 1)/2 * bad_rate^k``: bound on two disjoint all-bad runs of ``k / 2``."""
    return min(1.0, n * (n - 1) / 2.0 * bad_rate**k)


def _check_rate(name: str, value: float, upper: float) -> float:
    v = float(value)
    if not (math.isfinite(v) and 0.0 <= v < upper):
        raise ValueError(f"{name} must be in [0, {upper}), got {value!r}")
    return v


def choose_parameters(
    sites: int,
    dropout_rate: float,
    corrupt_fraction: float,
    *,
    security_target: float = DEFAULT_SECURITY_TARGET,
    correctness_target: float = DEFAULT_CORRECTNESS_TARGET,
) -> SecAggParameters:
    """``(k, t)`` for ``sites`` sites by the method of the module docstring.

    Raises
    ------
    ValueError
        For fewer than 3 sites (a sum of two reveals each input to the other), rates out
        of range, or so many corrupt sites that even the complete graph cannot be secure.
    """
    n = int(sites)
    if n < 3:
        raise ValueError(f"secure aggregation needs at least 3 sites, got {sites}")
    delta = _check_rate("dropout_rate", dropout_rate, 1.0)
    gamma = _check_rate("corrupt_fraction", corrupt_fraction, 0.5)
    eps = _check_rate("security_target", security_target, 1.0)
    eta = _check_rate("correctness_target", correctness_target, 1.0)
    corrupt = math.floor(gamma * n)
    bad_rate = corrupt / n + (1.0 - corrupt / n) * delta
    for k in range(2, n - 1, 2):
        disconnect = disconnection_bound(n, k, bad_rate)
        if disconnect > eps:
            continue
        leak_tail = _suffix_sums(_hypergeometric_pmf(n - 1, corrupt, k))  # P[c >= m]
        alive = _binomial_pmf(k, 1.0 - delta)
        for t in range(max(k // 2 + 1, 2), k + 1):
            leakage = n * leak_tail[2 * t - k]
            if disconnect + leakage > eps:
                continue
            abort = n * math.fsum(alive[:t])
            if abort <= eta:
                return SecAggParameters(
                    sites=n,
                    k=k,
                    t=t,
                    complete=False,
                    dropout_rate=delta,
                    corrupt_fraction=gamma,
                    corrupt_sites=corrupt,
                    security_failure=disconnect + leakage,
                    abort_probability=min(1.0, abort),
                )
            break  # a larger t only raises the abort probability
    k = n - 1
    t = max((k + corrupt) // 2 + 1, 2)
    if t > k:
        raise ValueError(
            f"{n} sites with {corrupt} corrupt cannot be aggregated securely "
            f"(threshold {t} > {k} neighbours)"
        )
    return SecAggParameters(
        sites=n,
        k=k,
        t=t,
        complete=True,
        dropout_rate=delta,
        corrupt_fraction=gamma,
        corrupt_sites=corrupt,
        security_failure=0.0,
        abort_probability=min(1.0, n * binomial_below(k, 1.0 - delta, t)),
    )
