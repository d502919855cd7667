"""``fedcoord models list|export|promote``: the model versions of a data directory."""

from __future__ import annotations

import argparse
import dataclasses
import getpass
import json
import os
import shutil
from pathlib import Path

from pydantic import ValidationError

from coordinator.errors import ConfigError
from coordinator.experiment import Promotion
from coordinator.promotion import describe, promote, run_gate_settings
from coordinator.state import Database
from coordinator.versions import ModelVersion, find_version, list_versions, resolve_digest


def _open(path: str) -> Database:
    # coordinator.cli imports this module to register the commands: import it late.
    from coordinator.cli import open_data_dir

    return open_data_dir(path)


def _number(value: object) -> str:
    return f"{value:.4f}" if isinstance(value, int | float) else "-"


def version_table(versions: list[ModelVersion]) -> list[str]:
    """The rows of ``models list``, header first."""
    run_width = max([3, *(len(v.run_id) for v in versions)])
    rows = [("DIGEST", "RUN", "ROUND", "PARENT", "ACCURACY", "LOSS", "EPSILON", "")]
    for v in versions:
        parent = "-" if v.parent is None else v.parent.removeprefix("sha256:")[:12]
        rows.append(
            (
                v.short,
                v.run_id,
                str(v.round),
                parent,
                _number(v.metrics.get("accuracy")),
                _number(v.metrics.get("loss")),
                _number(v.epsilon),
                "champion" if v.champion else "",
            )
        )
    return [
        f"{d:<12}  {r:<{run_width}}  {n:>5}  {p:<12}  {a:>8}  {lo:>8}  {e:>7}  {c}".rstrip()
        for d, r, n, p, a, lo, e, c in rows
    ]


def cmd_models_list(args: argparse.Namespace) -> int:
    versions = list_versions(_open(args.dir), args.run)
    if args.run is not None and not versions:
        raise ConfigError("--run", f"no run {args.run!r} in {args.dir}")
    if args.json:
        for v in versions:
            print(json.dumps(dataclasses.asdict(v), sort_keys=True))
    else:
        print("\n".join(version_table(versions)))
    return 0


def cmd_models_export(args: argparse.Namespace) -> int:
    db = _open(args.dir)
    digest = resolve_digest(list_versions(db), args.digest)
    out = Path(args.out)
    if out.is_dir():
        raise ConfigError("--out", f"{out} is a directory; name the file to write")
    if out.exists() and not args.force:
        raise ConfigError("--out", f"{out} exists; pass --force to overwrite it")
    if not out.parent.is_dir():
        raise ConfigError("--out", f"directory {out.parent} does not exist")
    db.models.verify(digest)  # LedgerError (exit 1) when the stored file was altered
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    shutil.copyfile(db.models.path(digest), tmp)
    os.replace(tmp, out)
    print(f"wrote {out} ({out.stat().st_size} bytes): model {digest}, digest verified")
    return 0


def gate_spec(
    base: Promotion | None,
    run_id: str,
    metric: str | None,
    threshold: float | None,
    higher_is_better: bool | None,
) -> Promotion:
    """The run's ``promotion:`` settings with the command line's overrides.

    Raises
    ------
    ConfigError
        ``--threshold`` when neither the run's experiment nor the command line gives one
        for the metric; the flag of an invalid value.
    """
    if threshold is None and (base is None or (metric is not None and metric != base.metric)):
        why = "has no promotion: block" if base is None else f"gates on {base.metric!r}"
        raise ConfigError("--threshold", f"required: the experiment of run {run_id} {why}")
    fields = {} if base is None else base.model_dump()
    given = {"metric": metric, "threshold": threshold, "higher_is_better": higher_is_better}
    fields.update({k: v for k, v in given.items() if v is not None})
    try:
        return Promotion.model_validate(fields)
    except ValidationError as exc:
        error = exc.errors()[0]
        flag = "--" + str(error["loc"][0]).replace("_", "-") if error["loc"] else "promotion"
        raise ConfigError(flag, error["msg"]) from None


def _actor() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):  # no login name (e.g. a container without passwd entry)
        return "cli"


def cmd_models_promote(args: argparse.Namespace) -> int:
    db = _open(args.dir)
    version = find_version(db, args.digest, run_id=args.run)
    base, open_rounds = run_gate_settings(db.ledger_entries(), version.run_id)
    spec = gate_spec(base, version.run_id, args.metric, args.threshold, args.higher_is_better)
    decision = promote(db, version, spec, open_rounds, args.by or _actor())
    print(describe(decision))
    for reason in decision.reasons:
        print(f"  - {reason}")
    print(f"recorded as ledger entry {decision.ledger_seq} ({decision.kind})")
    return 0 if decision.promoted else 1


def add_models_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``fedcoord models list|export|promote``."""
    models = sub.add_parser("models", help="model versions, export, promotion").add_subparsers(
        dest="models_command", required=True
    )
    p = models.add_parser("list", help="every model version with its lineage and metrics")
    p.add_argument("dir", help="a run directory or coordinator data directory")
    p.add_argument("--run", metavar="RUN_ID", help="only the versions of this run")
    p.add_argument("--json", action="store_true", help="JSON Lines, one version a line")
    p.set_defaults(func=cmd_models_list)

    p = models.add_parser("export", help="copy a verified model file out of the store")
    p.add_argument("dir", help="a run directory or coordinator data directory")
    p.add_argument("digest", metavar="DIGEST", help="sha256:<hex> or a unique hex prefix (>= 8)")
    p.add_argument("--out", required=True, help="the .safetensors file to write")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.set_defaults(func=cmd_models_export)

    p = models.add_parser("promote", help="put a version through the promotion gate")
    p.add_argument("dir", help="a run directory or coordinator data directory")
    p.add_argument("digest", metavar="DIGEST", help="sha256:<hex> or a unique hex prefix (>= 8)")
    p.add_argument("--run", metavar="RUN_ID", help="the run, when several share the model")
    p.add_argument("--metric", help="central metric to gate on (default: the experiment's)")
    p.add_argument("--threshold", type=float, help="required unless the experiment has one")
    side = p.add_mutually_exclusive_group()
    side.add_argument(
        "--lower-is-better", dest="higher_is_better", action="store_false", default=None
    )
    side.add_argument(
        "--higher-is-better", dest="higher_is_better", action="store_true", default=None
    )
    p.add_argument("--by", help="who promotes, recorded in the ledger (default cli:<login>)")
    p.set_defaults(func=cmd_models_promote)
