"""The ``fedcoord`` command. It sits at the top of the import graph, so it can offer the
operator commands (from ``coordinator.cli``), ``site`` and ``simulate`` in one tool.

Exit codes: 0 ok, 1 runtime failure, 2 bad usage or bad configuration (one line on
stderr naming the offending key or flag, never a traceback).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import NoReturn

import grpc

from client_sdk import Client, run_site
from client_sdk.errors import SiteError
from client_sdk.flower import FlowerSite, is_numpy_client
from coordinator.cli import add_operator_commands
from coordinator.errors import ConfigError, CoordinatorError
from coordinator.experiment import load_experiment
from coordinator.tasks import load_task
from coordinator.transport import ClientTLS, add_transport_flags, client_tls
from protos.errors import PayloadError
from protos.signing import SITE_ID, SITE_ID_RULE
from simulations.local import default_out_dir, simulate


class Parser(argparse.ArgumentParser):
    """Usage errors as one line on stderr, exit code 2."""

    def error(self, message: str) -> NoReturn:
        print(f"fedcoord: error: {message} (see '{self.prog} --help')", file=sys.stderr)
        raise SystemExit(2)


def cmd_simulate(args: argparse.Namespace) -> int:
    exp = load_experiment(args.experiment, args.set or ())
    out = Path(args.out) if args.out else default_out_dir(exp)
    summary = simulate(exp, out)
    print(f"summary: {out / 'summary.json'}")
    return 0 if summary.get("status") == "finished" else 1


def parse_partition(text: str) -> tuple[int, int]:
    """``I/N`` with 1 <= I <= N."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ConfigError("--partition", f"expected I/N such as 1/3, got {text!r}") from None
    if not 1 <= i <= n:
        raise ConfigError("--partition", f"I must be between 1 and N, got {text!r}")
    return i, n


def load_client(spec: str) -> Client:
    """``module:callable`` returning a Client or a Flower ``NumPyClient`` (or either
    instance itself)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError("--client", f"expected module:callable, got {spec!r}")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError("--client", f"cannot load {spec!r}: {exc}") from None
    client = obj if isinstance(obj, Client) or is_numpy_client(obj) else obj()
    if is_numpy_client(client) and not isinstance(client, Client):
        return FlowerSite(client)  # an unmodified Flower NumPyClient
    if not isinstance(client, Client):
        raise ConfigError(
            "--client", f"{spec!r} gave neither a client_sdk.Client nor a Flower NumPyClient"
        )
    return client


def cmd_site(args: argparse.Namespace) -> int:
    tls = client_tls(args)  # bad TLS files are refused before the task is built
    pem = tls or ClientTLS()  # all None under --insecure
    if not SITE_ID.match(args.site_id):
        raise ConfigError("--site-id", f"must be {SITE_ID_RULE}, got {args.site_id[:80]!r}")
    state = Path(args.state_dir) if args.state_dir else None
    key_path = state / f"{args.site_id}.ed25519.pem" if state else None
    if args.task:
        if not args.partition:
            raise ConfigError("--partition", "--task needs --partition I/N")
        i, n = parse_partition(args.partition)
        import torch  # only here: other commands should not pay for importing torch

        torch.set_num_threads(args.threads)
        task = load_task(args.task, args.model, {}, args.seed)
        client = task.make_client(i - 1, n, {"kind": "iid"}, args.seed)
        if state:
            client.use_state_file(state / f"{args.site_id}.safetensors")
    else:
        client = load_client(args.client)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    stop = threading.Event()  # Ctrl-C and SIGTERM stop the site, cancelling its call
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    run_site(
        client,
        args.coordinator,
        args.site_id,
        args.token,
        insecure=tls is None,
        root_certificates=pem.root_certificates,
        certificate_chain=pem.certificate_chain,
        private_key=pem.private_key,
        max_unavailable_s=args.max_unavailable,
        receipts_path=args.receipts,
        coordinator_public_key=bytes.fromhex(args.coordinator_key)
        if args.coordinator_key
        else None,
        key_path=key_path,
        coordinator_key_path=state / f"{args.site_id}.coordinator-key" if state else None,
        stop=stop,
    )
    return 0


def hex_key(text: str) -> str:
    """A 32-byte key in hex (argparse type)."""
    try:
        if len(bytes.fromhex(text)) == 32:
            return text
    except ValueError:
        pass
    raise argparse.ArgumentTypeError("must be 64 hex digits (a 32-byte Ed25519 key)")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="fedcoord", description="federated learning coordination service")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("simulate", help="run a whole federation on this machine")
    p.add_argument("experiment", help="experiment YAML file")
    p.add_argument("--out", help="run directory (default runs/<name>-<utc time>)")
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY.PATH=VALUE",
        help="override a setting of the experiment (repeatable)",
    )
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("site", help="run one data site")
    p.add_argument("--coordinator", required=True, help="HOST:PORT of the coordinator")
    p.add_argument("--site-id", required=True)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--task", help="a built-in task (digits, breast_cancer, synthetic)")
    source.add_argument("--client", help="module:callable returning a client_sdk.Client")
    p.add_argument("--partition", help="with --task: this site's share I/N of the data (iid)")
    p.add_argument("--model", help="with --task: model name (default: the task's)")
    p.add_argument("--seed", type=int, default=0, help="with --task: partitioning seed")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="with --task: torch threads for local training (default 1, so "
        "several demo sites can share one machine)",
    )
    p.add_argument(
        "--state-dir",
        help="keep the site's Ed25519 key (NAME.ed25519.pem, mode 0600), the coordinator "
        "key it pinned (NAME.coordinator-key) and, with --task, its training state "
        "(SCAFFOLD control variate) here, so all survive a restart (without it the key "
        "lives in memory: a restarted site needs a new token)",
    )
    p.add_argument(
        "--token",
        help="one-time enrollment token from `fedcoord sites add` (not needed once the "
        "key in --state-dir is enrolled, nor under --open-enrollment)",
    )
    p.add_argument(
        "--receipts",
        metavar="FILE",
        help="append the site's verified inclusion receipts here (JSON Lines)",
    )
    p.add_argument(
        "--coordinator-key",
        metavar="HEX",
        type=hex_key,
        help="the coordinator's Ed25519 public key (32 bytes, hex) to trust for receipts "
        "(default: the key it presents at enrollment)",
    )
    p.add_argument(
        "--max-unavailable",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="give up after this long without reaching the coordinator",
    )
    add_transport_flags(p)
    p.set_defaults(func=cmd_site)

    add_operator_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"fedcoord: error: {exc}", file=sys.stderr)
        return 2
    except (CoordinatorError, SiteError, PayloadError) as exc:
        print(f"fedcoord: error: {exc}", file=sys.stderr)
        return 1
    except grpc.RpcError as exc:
        print(
            f"fedcoord: error: coordinator said {exc.code().name}: {exc.details()}", file=sys.stderr
        )
        return 1
    except KeyboardInterrupt:
        print("fedcoord: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `fedcoord ledger export DIR | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
