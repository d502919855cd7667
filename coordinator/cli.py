"""Operator commands of ``fedcoord``: serve, run, sites, ledger."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
from pathlib import Path

import grpc

from coordinator.errors import ConfigError
from coordinator.experiment import load_experiment
from coordinator.server import GRPC_OPTIONS, Coordinator
from coordinator.state import Database
from protos.fedcoord.v1 import control_pb2, control_pb2_grpc

WARNING_BANNER = "!" * 78


def warn(lines: list[str]) -> None:
    print(
        WARNING_BANNER,
        *(f"!! {line}" for line in lines),
        WARNING_BANNER,
        sep="\n",
        file=sys.stderr,
        flush=True,
    )


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def add_transport_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--insecure",
        action="store_true",
        help="plaintext gRPC without TLS (local experiments only)",
    )


def require_insecure(args: argparse.Namespace) -> None:
    if not args.insecure:
        raise ConfigError(
            "--insecure",
            "TLS options are not available in this version; pass --insecure to run without TLS",
        )


def control_stub(address: str) -> control_pb2_grpc.ControlStub:
    return control_pb2_grpc.ControlStub(grpc.insecure_channel(address, options=GRPC_OPTIONS))


# serve ---------------------------------------------------------------------------------
def cmd_serve(args: argparse.Namespace) -> int:
    require_insecure(args)
    setup_logging(args.verbose)
    notes = ["--insecure: TLS is OFF; traffic to this coordinator is readable on the network."]
    if args.open_enrollment:
        notes.append("--open-enrollment: ANY site may join without a token.")
    warn([*notes, "Use these flags for local experiments only."])
    coordinator = Coordinator(
        Path(args.data_dir), args.address, open_enrollment=args.open_enrollment
    )
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    coordinator.start()
    print(
        f"fedcoord coordinator serving on {coordinator.address} "
        f"(data dir {args.data_dir}); Ctrl-C to stop",
        flush=True,
    )
    done.wait()
    print("shutting down: the current round is abandoned and redone on restart", flush=True)
    coordinator.stop()
    return 0


# run -----------------------------------------------------------------------------------
def cmd_run(args: argparse.Namespace) -> int:
    require_insecure(args)
    exp = load_experiment(args.experiment, args.set or ())
    stub = control_stub(args.coordinator)
    try:
        info = stub.SubmitRun(
            control_pb2.SubmitRunRequest(experiment_yaml=exp.canonical_json()), timeout=60
        )
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
            raise ConfigError("", exc.details() or "experiment refused") from None
        raise
    print(f"submitted run {info.run_id}", flush=True)
    if not args.wait:
        return 0
    follow_run(stub, info.run_id)
    final = stub.GetRun(control_pb2.GetRunRequest(run_id=info.run_id), timeout=30)
    if final.summary_json:
        print(final.summary_json)
    return 0 if final.status == "finished" else 1


def follow_run(stub: control_pb2_grpc.ControlStub, run_id: str, patience_s: float = 300) -> None:
    """Print the run's events until it finishes; ride out coordinator restarts by
    reconnecting and resuming from the last event seen (for up to ``patience_s``)."""
    next_seq = 0
    down_since: float | None = None
    while True:
        try:
            request = control_pb2.StreamEventsRequest(run_id=run_id, from_seq=next_seq)
            for event in stub.StreamEvents(request):
                down_since = None
                print(event.message, flush=True)
                next_seq = event.seq + 1
                if event.kind == "run_finished":
                    return
            return
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE:
                raise
            down_since = down_since or time.time()
            if time.time() - down_since > patience_s:
                raise
            print("coordinator unavailable; reconnecting...", file=sys.stderr, flush=True)
            time.sleep(2.0)


# sites ---------------------------------------------------------------------------------
def cmd_sites_list(args: argparse.Namespace) -> int:
    reply = control_stub(args.coordinator).ListSites(control_pb2.ListSitesRequest(), timeout=30)
    for s in reply.sites:
        print(f"{s.site_id}\t{s.status}\t{'online' if s.online else 'offline'}")
    return 0


# ledger --------------------------------------------------------------------------------
def open_data_dir(path: str) -> Database:
    d = Path(path)
    if not (d / "ledger.db").is_file() or not (d / "keys").is_dir():
        raise ConfigError("DIR", f"{d} is not a fedcoord data directory (no ledger.db or keys/)")
    return Database(d)


def cmd_ledger_verify(args: argparse.Namespace) -> int:
    db = open_data_dir(args.dir)
    count = db.verify_ledger()
    print(
        f"ledger OK: {count} entries, signatures and model files verified; head {db.ledger_head()}"
    )
    return 0


def cmd_ledger_show(args: argparse.Namespace) -> int:
    for e in open_data_dir(args.dir).ledger_entries():
        brief = {
            k: e.payload[k]
            for k in ("run_id", "round", "output_model", "status", "site_id")
            if k in e.payload
        }
        print(f"{e.seq:>6}  {e.kind:<16} {json.dumps(brief)}  {e.hash[:16]}")
    return 0


def cmd_ledger_export(args: argparse.Namespace) -> int:
    for e in open_data_dir(args.dir).ledger_entries():
        sys.stdout.write(json.dumps(e.as_json(), sort_keys=True) + "\n")
    return 0


def add_operator_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run a coordinator")
    p.add_argument("--data-dir", required=True, help="ledger.db, models/ and keys/ live here")
    p.add_argument("--address", default="127.0.0.1:7070", help="HOST:PORT to listen on")
    p.add_argument(
        "--open-enrollment",
        action="store_true",
        help="let any site join without a token (local experiments only)",
    )
    p.add_argument("-v", "--verbose", action="store_true")
    add_transport_flags(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("run", help="submit an experiment to a running coordinator")
    p.add_argument("experiment", help="experiment YAML file")
    p.add_argument("--coordinator", required=True, help="HOST:PORT of the coordinator")
    p.add_argument("--wait", action="store_true", help="follow progress until the run ends")
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY.PATH=VALUE",
        help="override a setting of the experiment (repeatable)",
    )
    add_transport_flags(p)
    p.set_defaults(func=cmd_run)

    sites = sub.add_parser("sites", help="manage data sites").add_subparsers(
        dest="sites_command", required=True
    )
    p = sites.add_parser("list", help="enrolled sites and whether they are online")
    p.add_argument("--coordinator", required=True)
    p.set_defaults(func=cmd_sites_list)

    ledger = sub.add_parser("ledger", help="audit the round ledger").add_subparsers(
        dest="ledger_command", required=True
    )
    for name, fn, text in (
        ("verify", cmd_ledger_verify, "re-check hash chain, signatures and model files"),
        ("show", cmd_ledger_show, "one line per entry"),
        ("export", cmd_ledger_export, "JSON Lines on stdout"),
    ):
        p = ledger.add_parser(name, help=text)
        p.add_argument("dir", help="a run directory or coordinator data directory")
        p.set_defaults(func=fn)
