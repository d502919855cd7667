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

from coordinator.certs import add_certs_commands
from coordinator.errors import ConfigError
from coordinator.experiment import load_experiment
from coordinator.limits import Limits, count_flag, rate_flag
from coordinator.logs import FORMATS, configure
from coordinator.metrics import address_flag
from coordinator.models_cli import add_models_commands
from coordinator.receipt_audit import add_verify_receipt
from coordinator.report import add_report_command
from coordinator.server import GRPC_OPTIONS, Coordinator
from coordinator.sites_cli import add_sites_commands
from coordinator.state import Database
from coordinator.transport import ServerTLS, add_transport_flags, client_tls, dial, server_tls
from protos.fedcoord.v1 import control_pb2, control_pb2_grpc

WARNING_BANNER = "!" * 78
RECONNECT_ON = (
    grpc.StatusCode.UNAVAILABLE,  # restarting
    grpc.StatusCode.CANCELLED,  # stopped after its grace period
    grpc.StatusCode.DEADLINE_EXCEEDED,  # past the server-side limit of a stream
)


def warn(lines: list[str]) -> None:
    print(
        WARNING_BANNER,
        *(f"!! {line}" for line in lines),
        WARNING_BANNER,
        sep="\n",
        file=sys.stderr,
        flush=True,
    )


def setup_logging(verbose: bool = False, fmt: str = "text") -> None:
    configure(logging.DEBUG if verbose else logging.INFO, fmt)


def control_stub(args: argparse.Namespace) -> control_pb2_grpc.ControlStub:
    """A Control stub for ``args.coordinator`` over the transport of ``args`` (the flags of
    ``add_transport_flags``)."""
    channel = dial(args.coordinator, client_tls(args), GRPC_OPTIONS)
    return control_pb2_grpc.ControlStub(channel)


# serve ---------------------------------------------------------------------------------
def cmd_serve(args: argparse.Namespace) -> int:
    tls = server_tls(args)
    setup_logging(args.verbose, args.log_format)
    notes: list[str] = []
    if tls is None:
        notes.append(
            "--insecure: TLS is OFF; traffic to this coordinator is readable on the network."
        )
    if args.open_enrollment:
        notes.append("--open-enrollment: ANY site may join without a token.")
    if notes:
        warn([*notes, "Use these flags for local experiments only."])
    coordinator = Coordinator(
        Path(args.data_dir), args.address, open_enrollment=args.open_enrollment, tls=tls,
        limits=Limits(max_streams_per_site=args.max_streams_per_site, rate_per_s=args.rate_limit),
        metrics_address=args.metrics_address,
    )  # fmt: skip
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    coordinator.start()
    key = coordinator.db.signing_key.public_key().public_bytes_raw().hex()
    print(
        f"fedcoord coordinator serving on {coordinator.address} "
        f"(data dir {args.data_dir}, {transport_name(tls)}); Ctrl-C to stop\n"
        f"ledger key (sites may pin it: fedcoord site --coordinator-key): {key}",
        flush=True,
    )
    if not args.open_enrollment:
        print(
            f"sites join with a token: fedcoord sites add NAME --data-dir {args.data_dir}",
            flush=True,
        )
    done.wait()
    print("shutting down: the current round is abandoned and redone on restart", flush=True)
    coordinator.stop()
    return 0


def transport_name(tls: ServerTLS | None) -> str:
    if tls is None:
        return "plaintext"
    return "mutual TLS" if tls.client_ca is not None else "TLS"


# run -----------------------------------------------------------------------------------
def cmd_run(args: argparse.Namespace) -> int:
    stub = control_stub(args)  # bad transport flags are refused first
    exp = load_experiment(args.experiment, args.set or ())
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
            if exc.code() not in RECONNECT_ON:
                raise
            down_since = down_since or time.time()
            if time.time() - down_since > patience_s:
                raise
            print("coordinator unavailable; reconnecting...", file=sys.stderr, flush=True)
            time.sleep(2.0)


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
            for k in ("run_id", "round", "output_model", "model", "check", "status", "site_id")
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
    p.add_argument("--log-format", choices=FORMATS, default="text", help="one JSON object a line")
    p.add_argument("--max-streams-per-site", type=count_flag, default=Limits.max_streams_per_site,
                   metavar="N", help="concurrent PullTask/PushResult streams per site")  # fmt: skip
    p.add_argument("--rate-limit", type=rate_flag, default=Limits.rate_per_s, metavar="R",
                   help="requests per second per site (bursts of 2R)")  # fmt: skip
    p.add_argument("--metrics-address", type=address_flag, metavar="HOST:PORT",
                   help="serve Prometheus metrics at HOST:PORT/metrics (default off)")  # fmt: skip
    add_transport_flags(p, server=True)
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

    add_sites_commands(sub, control_stub)

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
    add_verify_receipt(ledger)
    add_models_commands(sub)
    add_report_command(sub)
    add_certs_commands(sub)
