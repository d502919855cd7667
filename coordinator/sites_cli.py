"""``fedcoord sites add|revoke|list``: enrollment tokens and revocation.

Each command works either on a data directory (``--data-dir``, also while its
coordinator runs: the change is one short SQLite transaction, and the coordinator reads
a site's row on each of its requests) or through a running coordinator's Control
service (``--coordinator``; ``list`` then also shows which sites are online).
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

import grpc

from coordinator import enrollment
from coordinator.errors import ConfigError, UnknownSite
from coordinator.state import Database
from coordinator.transport import add_transport_flags
from protos.fedcoord.v1 import control_pb2, control_pb2_grpc
from protos.signing import key_fingerprint

StubFactory = Callable[[argparse.Namespace], control_pb2_grpc.ControlStub]
_DURATION = re.compile(r"^([0-9]+(?:\.[0-9]+)?)([smhd]?)\Z")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_ttl(text: str) -> float:
    """``7d``, ``12h``, ``30m``, ``90s`` or plain seconds (argparse type)."""
    match = _DURATION.match(text.strip())
    if not match:
        raise argparse.ArgumentTypeError(
            f"expected a duration such as 7d, 12h, 30m or 90s, got {text!r}"
        )
    return float(match.group(1)) * _UNITS[match.group(2)]


def utc(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def open_data_dir(path: str) -> Database:
    d = Path(path)
    if not (d / "ledger.db").is_file() or not (d / "keys").is_dir():
        raise ConfigError(
            "--data-dir",
            f"{d} is not a fedcoord data directory (start `fedcoord serve --data-dir {d}` once)",
        )
    return Database(d)


def _refused(exc: grpc.RpcError, key: str) -> Exception:
    """A Control refusal as the user error it is (other failures stay runtime errors)."""
    if exc.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND):
        return ConfigError(key, exc.details() or "refused by the coordinator")
    return exc


def cmd_add(args: argparse.Namespace, stub: StubFactory) -> int:
    for key, check, value in (
        ("NAME", enrollment.check_site_id, args.name),
        ("--ttl", enrollment.check_ttl, args.ttl),
    ):
        try:
            check(value)
        except ValueError as exc:
            raise ConfigError(key, str(exc)) from None
    if args.data_dir:
        db = open_data_dir(args.data_dir)
        try:
            invitation = enrollment.invite(db, args.name, args.ttl)
        finally:
            db.close()
        token, expires, status = invitation.token, invitation.expires, invitation.status
    else:
        request = control_pb2.EnrollSiteRequest(site_id=args.name, ttl_s=args.ttl)
        try:
            reply = stub(args).EnrollSite(request, timeout=30)
        except grpc.RpcError as exc:
            raise _refused(exc, "NAME") from None
        token, expires, status = reply.token, reply.expires_unix, reply.status
    note = " (it replaces the site's key when used)" if status != "pending" else ""
    print(
        f"enrollment token for site {args.name}, valid until {utc(expires)}{note}; it is "
        f"shown only this once: fedcoord site --site-id {args.name} --token TOKEN ...",
        file=sys.stderr,
    )
    print(token, flush=True)
    return 0


def cmd_revoke(args: argparse.Namespace, stub: StubFactory) -> int:
    if args.data_dir:
        db = open_data_dir(args.data_dir)
        try:
            _, changed = enrollment.revoke(db, args.name)
        except UnknownSite as exc:
            raise ConfigError("NAME", str(exc)) from None
        finally:
            db.close()
    else:
        request = control_pb2.RevokeSiteRequest(site_id=args.name)
        try:
            changed = stub(args).RevokeSite(request, timeout=30).changed
        except grpc.RpcError as exc:
            raise _refused(exc, "NAME") from None
    print(f"site {args.name} {'revoked' if changed else 'was already revoked'}")
    return 0


def cmd_list(args: argparse.Namespace, stub: StubFactory) -> int:
    """One line a site: id, status, online (``-`` without a coordinator), key
    fingerprint and an outstanding token's expiry."""
    rows: list[tuple[str, str, str, str, float]] = []
    if args.data_dir:
        db = open_data_dir(args.data_dir)
        try:
            for r in db.site_rows():
                fp = "" if r.public_key is None else key_fingerprint(r.public_key)
                rows.append((r.site_id, r.status, "-", fp, r.token_expires or 0.0))
        finally:
            db.close()
    else:
        reply = stub(args).ListSites(control_pb2.ListSitesRequest(), timeout=30)
        for s in reply.sites:
            online = "online" if s.online else "offline"
            rows.append((s.site_id, s.status, online, s.key_fingerprint, s.token_expires_unix))
    for site_id, status, online, fp, expires in rows:
        token = f"token until {utc(expires)}" if expires else "-"
        print(f"{site_id}\t{status}\t{online}\t{fp[:23] or '-'}\t{token}")
    return 0


def add_sites_commands(sub: argparse._SubParsersAction, stub: StubFactory) -> None:
    """``fedcoord sites``; ``stub`` builds a Control stub from the transport flags."""
    sites = sub.add_parser("sites", help="enroll, revoke and list data sites").add_subparsers(
        dest="sites_command", required=True
    )
    commands = (
        ("add", cmd_add, "issue a one-time enrollment token for a site (printed once)"),
        ("revoke", cmd_revoke, "revoke a site at once (also mid-round)"),
        ("list", cmd_list, "sites: pending, enrolled or revoked (and online)"),
    )
    for name, fn, text in commands:
        p = sites.add_parser(name, help=text)
        if name != "list":
            p.add_argument("name", metavar="NAME", help="the site id")
        where = p.add_mutually_exclusive_group(required=True)
        where.add_argument("--data-dir", help="work on this coordinator data directory")
        where.add_argument("--coordinator", metavar="HOST:PORT", help="ask a running coordinator")
        if name == "add":
            p.add_argument(
                "--ttl",
                type=parse_ttl,
                default=enrollment.DEFAULT_TTL_S,
                metavar="DURATION",
                help="how long the token stays valid: 7d (default), 12h, 30m, 90s",
            )
        add_transport_flags(p)
        p.set_defaults(func=lambda args, fn=fn: fn(args, stub))
