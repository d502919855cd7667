"""The SecAgg+ communication graph: a random k-regular Harary graph over a round's sites.

Construction (Bell et al. 2020, as in Google's and Flower's SecAgg+): sort the site ids,
permute them with a permutation drawn from ``seed`` (sort by 64-bit AES-CTR words of
:func:`strategies.secagg.prg.expand`), place them on a ring and join every site to the
``k / 2`` sites on each side. The result is ``k``-regular and symmetric, and each site's
neighbour set is a uniformly random ``k``-subset of the others, which is what
:mod:`strategies.secagg.params` assumes. Small rounds, or ``k >= n - 1``, use the
complete graph.

Who picks the seed: the coordinator draws a fresh 32-byte seed per round from its CSPRNG
(``os.urandom``) and sends it with the roster; every site rebuilds the same graph from
(roster, k, seed) and so knows its neighbours without trusting a list. Corrupt sites are
assumed fixed before the seed is drawn; a coordinator that colludes with sites and
grinds seeds could place them next to a victim, which the honest-but-curious
coordinator of our threat model does not do (a malicious one would need a jointly drawn
seed, e.g. commit-and-reveal among the sites).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from strategies.secagg.encoding import pack_fields
from strategies.secagg.prg import expand

_GRAPH_CONTEXT = pack_fields("harary-permutation")


@dataclass(frozen=True, eq=False)
class CommunicationGraph:
    """Who masks with whom: ``sites`` (sorted), the degree ``k`` (``n - 1`` when
    ``complete``), each site's neighbour set and each site's Shamir x coordinate (its
    1-based position among the sorted sites)."""

    sites: tuple[str, ...]
    k: int
    complete: bool
    neighbours: Mapping[str, frozenset[str]]
    indices: Mapping[str, int]

    def of(self, site: str) -> frozenset[str]:
        """The neighbours of ``site`` (KeyError for a site outside the graph)."""
        return self.neighbours[site]

    def index(self, site: str) -> int:
        """``site``'s Shamir x coordinate (KeyError for a site outside the graph)."""
        return self.indices[site]


def _check_sites(sites: Iterable[str]) -> tuple[str, ...]:
    ordered = tuple(sorted(sites))
    if len(set(ordered)) != len(ordered):
        raise ValueError("site ids in a round must be distinct")
    if any(not isinstance(s, str) or not s for s in ordered):
        raise ValueError("site ids must be non-empty strings")
    if len(ordered) < 2:
        raise ValueError("a communication graph needs at least 2 sites")
    return ordered


def ring_order(sites: Iterable[str], seed: bytes) -> tuple[str, ...]:
    """The sorted ``sites`` permuted by ``seed`` (deterministic, uniform)."""
    ordered = _check_sites(sites)
    keys = expand(seed, len(ordered), _GRAPH_CONTEXT, dtype=np.uint64)
    return tuple(ordered[i] for i in np.argsort(keys, kind="stable"))


def build_graph(sites: Iterable[str], k: int, seed: bytes) -> CommunicationGraph:
    """The Harary graph of degree ``k`` over ``sites`` placed on a ring by ``seed``, or
    the complete graph when ``k >= n - 1``.

    Raises
    ------
    ValueError
        For fewer than 2 or repeated sites, ``k < 1``, an odd ``k < n - 1`` (a
        ``k``-regular Harary graph needs ``k`` even here) or a bad seed.
    """
    ordered = _check_sites(sites)
    n = len(ordered)
    indices = {s: i + 1 for i, s in enumerate(ordered)}
    if k < 1:
        raise ValueError(f"the degree k must be >= 1, got {k}")
    if k >= n - 1:
        every = frozenset(ordered)
        return CommunicationGraph(
            sites=ordered,
            k=n - 1,
            complete=True,
            neighbours={s: every - {s} for s in ordered},
            indices=indices,
        )
    if k % 2:
        raise ValueError(f"a sparse Harary graph needs an even degree k, got {k}")
    ring = ring_order(ordered, seed)
    half = k // 2
    neighbours = {
        site: frozenset(ring[(pos + d) % n] for d in range(-half, half + 1) if d != 0)
        for pos, site in enumerate(ring)
    }
    return CommunicationGraph(
        sites=ordered, k=k, complete=False, neighbours=neighbours, indices=indices
    )
