"""Model versions of a data directory and their lineage, read from the ledger.

Every ``run_started`` entry makes a version of its ``initial_model`` (round 0, no
parent, no metrics) and every ``round_committed`` entry one of its ``output_model``
(parent: the round's ``input_model``). The champion of an experiment name is the
version named by the latest ``model_promoted`` entry among the runs of that name.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from coordinator.errors import ConfigError
from coordinator.ledger import Entry
from coordinator.state import Database
from protos.codec import DIGEST_PREFIX

MIN_PREFIX = 8
"""The fewest hex characters a digest prefix may have."""
_HEX = frozenset("0123456789abcdef")


@dataclass(frozen=True)
class ModelVersion:
    """One global model of one run: the initial model (round 0) or a round's output."""

    digest: str
    run_id: str
    name: str
    round: int
    parent: str | None
    metrics: dict[str, Any] = field(default_factory=dict)
    epsilon: float | None = None
    ledger_seq: int = 0
    champion: bool = False

    @property
    def short(self) -> str:
        """The first 12 hex characters of the digest."""
        return short_digest(self.digest)


def short_digest(digest: str | None, length: int = 12) -> str:
    """``digest`` without ``sha256:``, cut to ``length`` hex characters (``-`` for None)."""
    return "-" if digest is None else digest.removeprefix(DIGEST_PREFIX)[:length]


def champions(entries: Iterable[Entry]) -> dict[str, tuple[str, int]]:
    """``{experiment name: (run_id, round)}`` of the latest ``model_promoted`` entries."""
    names: dict[str, str] = {}
    chosen: dict[str, tuple[str, int]] = {}
    for e in entries:
        if e.kind == "run_started":
            names.setdefault(e.payload["run_id"], e.payload["name"])
        elif e.kind == "model_promoted":
            run_id = e.payload["run_id"]
            chosen[names.get(run_id, run_id)] = (run_id, int(e.payload["round"]))
    return chosen


def versions_from_entries(entries: list[Entry]) -> list[ModelVersion]:
    """Every version the entries record, in ledger order (the first entry of a run's
    round wins should a run or round appear twice)."""
    names: dict[str, str] = {}
    seen: set[tuple[str, int]] = set()
    found: list[ModelVersion] = []
    for e in entries:
        p = e.payload
        if e.kind == "run_started":
            key, digest, parent, metrics = (p["run_id"], 0), p["initial_model"], None, {}
            names.setdefault(p["run_id"], p["name"])
        elif e.kind == "round_committed":
            key = (p["run_id"], int(p["round"]))
            digest, parent, metrics = p["output_model"], p["input_model"], p.get("metrics") or {}
        else:
            continue
        if key in seen:
            continue
        seen.add(key)
        epsilon = metrics.get("epsilon")
        found.append(
            ModelVersion(
                digest=digest,
                run_id=key[0],
                name=names.get(key[0], key[0]),
                round=key[1],
                parent=parent,
                metrics=dict(metrics),
                epsilon=None if epsilon is None else float(epsilon),
                ledger_seq=e.seq,
            )
        )
    champ = set(champions(entries).values())
    return [replace(v, champion=(v.run_id, v.round) in champ) for v in found]


def list_versions(db: Database, run_id: str | None = None) -> list[ModelVersion]:
    """The data directory's model versions in ledger order, of one run when given."""
    found = versions_from_entries(db.ledger_entries())
    return [v for v in found if run_id is None or v.run_id == run_id]


def resolve_digest(versions: list[ModelVersion], ref: str) -> str:
    """The full digest among ``versions`` that ``ref`` names.

    ``ref`` is ``sha256:<hex>``, or ``<hex>`` / ``sha256:<hex>`` cut to at least
    :data:`MIN_PREFIX` characters.

    Raises
    ------
    ConfigError
        ``DIGEST``: malformed, too short, unknown, or a prefix of several digests.
    """
    hexd = ref.strip().lower().removeprefix(DIGEST_PREFIX)
    if not hexd or not set(hexd) <= _HEX or len(hexd) > 64:
        raise ConfigError("DIGEST", f"{ref!r} is not a sha256:<hex> digest or a hex prefix")
    if len(hexd) < MIN_PREFIX:
        raise ConfigError("DIGEST", f"prefix {ref!r} is too short; give at least {MIN_PREFIX} hex")
    matches = sorted({v.digest for v in versions if short_digest(v.digest, 64).startswith(hexd)})
    if not matches:
        raise ConfigError("DIGEST", f"no model version {ref!r} in this data directory")
    if len(matches) > 1:
        shown = ", ".join(short_digest(d, 16) for d in matches[:5])
        raise ConfigError("DIGEST", f"prefix {ref!r} is ambiguous: {shown}; give more characters")
    return matches[0]


def find_version(db: Database, ref: str, *, run_id: str | None = None) -> ModelVersion:
    """The version ``ref`` (a digest or unique prefix, see :func:`resolve_digest`) names.

    A model that several rounds of one run produced (an unchanged round) is its first
    version. A model that several runs share (same seed, same initial model) needs
    ``run_id``.

    Raises
    ------
    ConfigError
        ``DIGEST`` as :func:`resolve_digest`; ``--run`` when the model belongs to several
        runs and ``run_id`` is None, or not to ``run_id``.
    """
    versions = list_versions(db)
    digest = resolve_digest(versions, ref)
    same = [v for v in versions if v.digest == digest]
    if run_id is not None:
        same = [v for v in same if v.run_id == run_id]
        if not same:
            raise ConfigError("--run", f"model {short_digest(digest)} is not a version of {run_id}")
    runs = sorted({v.run_id for v in same})
    if len(runs) > 1:
        listed = ", ".join(runs)
        raise ConfigError("--run", f"model {short_digest(digest)} is a version of runs {listed}")
    return same[0]
