"""Coordinator fan-in: how many connected sites one coordinator holds, and how many
control-plane requests per second it answers meanwhile.

For each ``N`` a fresh :class:`coordinator.server.Coordinator` (open enrollment, no run)
serves in this process, and ``N`` sites connect from 2 worker processes: each site is a
:class:`client_sdk.connection.SiteSession` (the session ``run_site`` drives: its own
Ed25519 key, every call signed) and the sites of a worker share a few gRPC channels
(``--channels`` per worker). Every site enrolls, then holds a long poll open
(``PullTask`` with ``wait_s`` 10, the ``run_site`` default, polled again when it
returns empty), as idle sites of a deployment do. With the ``N`` polls held, the
benchmark measures

* the coordinator's CPU (its process, all threads) and RSS while idle,
* heartbeats per second (signed ``Heartbeat`` calls for an unknown task, spread over
  all ``N`` sites so no site nears its rate limit) from ``--load-threads`` threads per
  worker, for ``--seconds``,
* empty polls per second (signed ``PullTask`` with ``wait_s`` 0) the same way,

with the coordinator's CPU per request. The load generators run on the same cores as
the coordinator, so the rates are what the pair reaches on this machine, a lower bound
for a coordinator with the cores to itself. The server gets one thread per held poll
(``max_workers = N + 64 + load threads``, as ``fedcoord simulate`` sizes it): gRPC's
synchronous server parks a thread in each long poll.

``--quick`` runs N = 20 for 1 s per phase (for tests). Writes
``benchmarks/results/fan_in.json`` and its section of ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from benchmarks.common import (
    RESULTS_DIR,
    RESULTS_MD,
    describe_machine,
    markdown_table,
    text_table,
    utc_now,
    write_json,
    write_section,
)
from client_sdk import Client, EvaluateResult, FitResult
from client_sdk.api import Arrays, Config

NAME = "fan_in"
SITES = (100, 500, 1000, 2000)
QUICK_SITES = (20,)
WORKERS = 2
POLL_WAIT_S = 10
LOAD_KINDS = ("heartbeat", "empty_poll")
HOLD_TIMEOUT_S = 60.0
"""How long N sites get to enroll and all hold a poll; past it the N is recorded as not
held (signed requests queued longer than 60 s are refused as stale)."""


# --- the sites' side (worker processes) -------------------------------------------------------
class IdleClient(Client):
    """Never asked to train: the coordinator runs no round."""

    def fit(self, arrays: Arrays, config: Config) -> FitResult:
        return FitResult(dict(arrays), num_examples=1)

    def evaluate(self, arrays: Arrays, config: Config) -> EvaluateResult:
        return EvaluateResult(loss=0.0, num_examples=1)


def worker_main(address: str, names: list[str], channels: int, conn: Connection) -> None:
    """Enroll ``names`` over ``channels`` shared channels, hold one long poll per site,
    and generate load when told; replies go back over ``conn``."""
    import grpc

    from client_sdk.connection import CHANNEL_OPTIONS, SiteSession, fleet_stub
    from protos.fedcoord.v1 import fleet_pb2

    chans = [grpc.insecure_channel(address, options=CHANNEL_OPTIONS) for _ in range(channels)]
    stubs = [fleet_stub(c) for c in chans]
    client = IdleClient()
    sessions = [
        SiteSession(client, stubs[i % channels], name, None, POLL_WAIT_S)
        for i, name in enumerate(names)
    ]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda s: s.enroll(), sessions))
    enroll_s = time.perf_counter() - t0
    stop = threading.Event()
    lock = threading.Lock()
    state = {"in_flight": 0, "poll_errors": 0, "polls": 0}

    def hold(session: SiteSession) -> None:
        while not stop.is_set():
            with lock:
                state["in_flight"] += 1
            try:
                session.pull()
                with lock:
                    state["polls"] += 1
            except (grpc.RpcError, ValueError):  # ValueError: its channel closed
                if stop.is_set():
                    break
                with lock:
                    state["poll_errors"] += 1
                stop.wait(0.5)
            finally:
                with lock:
                    state["in_flight"] -= 1

    for s in sessions:
        threading.Thread(target=hold, args=(s,), daemon=True).start()
    conn.send({"enroll_s": enroll_s, "sites": len(sessions)})

    def load(kind: str, seconds: float, threads: int) -> dict[str, Any]:
        counts: Counter[str] = Counter()
        count_lock = threading.Lock()
        end = time.perf_counter() + seconds

        def one(offset: int) -> None:
            local: Counter[str] = Counter()
            i = offset
            while time.perf_counter() < end:
                session = sessions[i % len(sessions)]
                i += threads
                try:
                    if kind == "heartbeat":
                        request = fleet_pb2.HeartbeatRequest(
                            site_id=session.site_id, task_id="fan-in-benchmark"
                        )
                        session.stub.Heartbeat(request, timeout=10)
                    else:
                        poll = fleet_pb2.PullTaskRequest(site_id=session.site_id, wait_s=0)
                        for _ in session.stub.PullTask(poll, timeout=10):
                            pass
                    local["ok"] += 1
                except grpc.RpcError as exc:
                    local[exc.code().name] += 1
            with count_lock:
                counts.update(local)

        workers = [threading.Thread(target=one, args=(k,)) for k in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        with lock:
            held = state["in_flight"]
        return {"counts": dict(counts), "polls_in_flight": held}

    while True:
        command = conn.recv()
        if command[0] == "load":
            conn.send(load(command[1], command[2], command[3]))
            continue
        if command[0] == "state":
            with lock:
                conn.send(dict(state))
            continue
        break
    stop.set()
    for c in chans:
        c.close()
    conn.send("stopped")


# --- the coordinator's side ------------------------------------------------------------------
def rss_bytes() -> int:
    """This process's resident memory (Linux ``/proc``; 0 elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def server_threads() -> int:
    """gRPC server threads of this process (the coordinator's handler pool)."""
    return sum(1 for t in threading.enumerate() if t.name.startswith("grpc"))


def _wait_for(predicate: Any, timeout: float) -> bool:
    """Whether ``predicate()`` came true within ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            return False
        time.sleep(0.1)
    return True


def measure(
    n: int, channels: int, load_threads: int, seconds: float, idle_s: float
) -> dict[str, Any]:
    """Fan-in of one coordinator with ``n`` connected sites."""
    from coordinator.server import Coordinator

    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="fedcoord-fan-in-") as tmp:
        rss_empty = rss_bytes()
        coordinator = Coordinator(
            Path(tmp), open_enrollment=True, max_workers=n + 64 + WORKERS * load_threads * 2
        )
        coordinator.start(run_engine=False)
        names = [f"site-{i:05d}" for i in range(n)]
        pipes: list[Connection] = []
        procs = []
        try:
            t0 = time.perf_counter()
            cpu0 = time.process_time()
            for w in range(WORKERS):
                mine, theirs = ctx.Pipe()
                p = ctx.Process(
                    target=worker_main,
                    args=(coordinator.address, names[w::WORKERS], channels, theirs),
                    daemon=True,
                )
                p.start()
                procs.append(p)
                pipes.append(mine)
            ready = [pipe.recv() for pipe in pipes]
            held = _wait_for(
                lambda: len(coordinator.dispatcher.online()) >= n and server_threads() >= n,
                HOLD_TIMEOUT_S,
            )
            connect_s = time.perf_counter() - t0
            connect_cpu = time.process_time() - cpu0
            time.sleep(1.0)
            cpu0, w0 = time.process_time(), time.perf_counter()
            time.sleep(idle_s)
            idle_cpu = (time.process_time() - cpu0) / (time.perf_counter() - w0)
            row: dict[str, Any] = {
                "sites": n,
                "held": held,
                "channels": WORKERS * channels,
                "connect_s": connect_s if held else None,
                "connect_coordinator_cpu_s": connect_cpu,
                "enroll_s_per_worker": [r["enroll_s"] for r in ready],
                "online": len(coordinator.dispatcher.online()),
                "server_threads": server_threads(),
                "idle_cpu_fraction": idle_cpu,
                "rss_bytes": rss_bytes(),
                "rss_before_bytes": rss_empty,
            }
            for kind in LOAD_KINDS if held else ():
                cpu0, w0 = time.process_time(), time.perf_counter()
                for pipe in pipes:
                    pipe.send(("load", kind, seconds, load_threads))
                replies = [pipe.recv() for pipe in pipes]
                wall = time.perf_counter() - w0
                cpu = time.process_time() - cpu0
                counts: Counter[str] = Counter()
                for r in replies:
                    counts.update(r["counts"])
                ok = counts.pop("ok", 0)
                row[kind] = {
                    "requests": ok,
                    "per_s": ok / wall,
                    "errors": dict(counts),
                    "coordinator_cpu_fraction": cpu / wall,
                    "coordinator_cpu_us_per_request": cpu / ok * 1e6 if ok else None,
                    "polls_in_flight": sum(r["polls_in_flight"] for r in replies),
                    "seconds": wall,
                }
                print(
                    f"  {kind}: {ok / wall:,.0f}/s, coordinator CPU {cpu / wall:.0%}, "
                    f"errors {dict(counts) or 'none'}",
                    flush=True,
                )
            row["rss_after_load_bytes"] = rss_bytes()
            for pipe in pipes:
                pipe.send(("state",))
            states = [pipe.recv() for pipe in pipes]
            row["poll_errors"] = sum(s["poll_errors"] for s in states)
        finally:
            for pipe in pipes:
                with contextlib.suppress(OSError):
                    pipe.send(("stop",))
            coordinator.stop(grace=1.0)
            for p in procs:
                p.join(timeout=15)
                if p.is_alive():
                    p.kill()
                    p.join()
    return row


HEADERS = (
    "sites",
    "channels",
    "connect s",
    "online",
    "server threads",
    "idle CPU",
    "RSS MiB",
    "heartbeats/s",
    "CPU us/heartbeat",
    "empty polls/s",
    "CPU us/poll",
    "errors",
)


def _errors(row: dict[str, Any]) -> str:
    errors: Counter[str] = Counter()
    for kind in LOAD_KINDS:
        if kind in row:
            errors.update(row[kind]["errors"])
    if row["poll_errors"]:
        errors["long-poll"] += row["poll_errors"]
    return ", ".join(f"{k} {v}" for k, v in sorted(errors.items())) or "none"


def table_rows(rows: Sequence[dict[str, Any]]) -> list[list[str]]:
    def us(x: float | None) -> str:
        return "-" if x is None else f"{x:,.0f}"

    out = []
    for r in rows:
        hb, ep = r.get("heartbeat"), r.get("empty_poll")
        out.append(
            [
                f"{r['sites']:,}",
                str(r["channels"]),
                f"{r['connect_s']:.1f}" if r["held"] else f"not held in {HOLD_TIMEOUT_S:.0f} s",
                f"{r['online']:,}",
                f"{r['server_threads']:,}",
                f"{r['idle_cpu_fraction']:.0%}",
                f"{r['rss_bytes'] / 2**20:,.0f}",
                f"{hb['per_s']:,.0f}" if hb else "-",
                us(hb["coordinator_cpu_us_per_request"]) if hb else "-",
                f"{ep['per_s']:,.0f}" if ep else "-",
                us(ep["coordinator_cpu_us_per_request"]) if ep else "-",
                _errors(r),
            ]
        )
    return out


def markdown(rows: Sequence[dict[str, Any]], config: dict[str, Any], machine_line: str) -> str:
    title = "## Coordinator fan-in (`benchmarks/fan_in.py`)"
    if config["quick"]:
        title += " (quick smoke run)"
    return (
        f"{title}\n\n"
        "`python -m benchmarks.fan_in`. One coordinator (this process, open enrollment, no "
        f"run) and N sites in {WORKERS} worker processes, each site a `SiteSession` with its "
        f"own Ed25519 key (every call signed), {config['channels']} gRPC channels per worker "
        f"shared by its sites. Every site enrolls and then holds a long poll (`PullTask`, "
        f"wait {POLL_WAIT_S} s, polled again when it returns empty). connect s: from the "
        "workers' start to all N enrolled and polling (within "
        f"{HOLD_TIMEOUT_S:.0f} s, else the larger N are not tried); online: sites the "
        "coordinator heard from in the last 60 s; server threads: the coordinator's "
        "gRPC handler threads (one parked in each held poll); idle CPU: the coordinator "
        f"process's CPU over {config['idle_s']:g} s with the N polls held (100 % = one "
        "core); RSS: the coordinator process with N sites connected. Then, polls still "
        f"held, {config['load_threads']} threads per worker send signed heartbeats (unknown "
        "task) and then empty polls (`PullTask`, wait 0), spread over all N sites, for "
        f"{config['seconds']:g} s each: requests answered per second and the coordinator's "
        "CPU per request. The load generators share the machine's cores with the "
        "coordinator, so the rates are what the pair reaches here; CPU per request "
        "includes the held polls' own upkeep. errors: refused calls by status, and "
        "long polls refused (e.g. as stale: a signed request queued over 60 s).\n\n"
        + markdown_table(HEADERS, table_rows(rows))
        + f"\n\nMachine: {machine_line}\n"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="N = 20, 1 s phases (tests)")
    parser.add_argument("--sites", type=int, nargs="+", default=None, help="the N to try")
    parser.add_argument("--channels", type=int, default=4, help="channels per worker")
    parser.add_argument("--load-threads", type=int, default=4, help="per worker")
    parser.add_argument("--seconds", type=float, default=None, help="per load phase")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--results-md", type=Path, default=RESULTS_MD)
    args = parser.parse_args(argv)
    sites = args.sites or list(QUICK_SITES if args.quick else SITES)
    seconds = args.seconds or (1.0 if args.quick else 5.0)
    idle_s = 1.0 if args.quick else 5.0
    if min(sites) < WORKERS or args.channels < 1 or args.load_threads < 1 or seconds <= 0:
        parser.error(f"need N >= {WORKERS}, --channels/--load-threads >= 1, --seconds > 0")
    machine = describe_machine()
    print(f"machine: {machine.line()}", flush=True)
    rows = []
    for n in sites:
        print(f"{n:,} sites over {WORKERS * args.channels} channels ...", flush=True)
        row = measure(n, args.channels, args.load_threads, seconds, idle_s)
        connected = f"connected in {row['connect_s']:.1f} s" if row["held"] else "NOT all held"
        print(
            f"  {connected}, {row['server_threads']:,} server threads, idle CPU "
            f"{row['idle_cpu_fraction']:.0%}, RSS {row['rss_bytes'] / 2**20:,.0f} MiB",
            flush=True,
        )
        rows.append(row)
        if not row["held"]:
            break  # a larger N holds no more
    print(text_table(HEADERS, table_rows(rows)))
    config = {
        "quick": args.quick,
        "sites": sites,
        "workers": WORKERS,
        "channels": args.channels,
        "load_threads": args.load_threads,
        "seconds": seconds,
        "idle_s": idle_s,
        "poll_wait_s": POLL_WAIT_S,
    }
    payload = {
        "benchmark": NAME,
        "created_utc": utc_now(),
        "quick": args.quick,
        "machine": machine.as_dict(),
        "config": config,
        "rows": rows,
    }
    path = write_json(NAME, payload, args.out_dir)
    print(f"wrote {path}")
    write_section(NAME, markdown(rows, config, machine.line()), args.results_md)
    print(f"updated {args.results_md}")
    return 0


if __name__ == "__main__":
    # Run the importable copy, so the spawned workers find ``worker_main`` by its name.
    from benchmarks import fan_in

    raise SystemExit(fan_in.main())
