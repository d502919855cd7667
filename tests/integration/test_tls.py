"""TLS and mutual TLS with certificates from ``fedcoord certs init``: a whole deployed run,
the clients a coordinator must refuse, the certificate-to-site-id binding, and the
transport flags' usage errors."""

from __future__ import annotations

import threading
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client_sdk import run_site
from client_sdk.errors import SiteError
from coordinator import certs
from coordinator.server import Coordinator
from coordinator.transport import ServerTLS
from protos.fedcoord.v1 import control_pb2, control_pb2_grpc, fleet_pb2, fleet_pb2_grpc
from simulations.cli import main
from tests.conftest import Processes, fedcoord, free_port, rounds_committed, wait_for
from tests.integration.clients import SlowSite
from tests.integration.test_deployment import experiment, verify_ledger

pytestmark = pytest.mark.integration

SITES = ("hospital-1", "hospital-2", "hospital-3")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``fedcoord certs init`` for three sites, plus ``other/``: a second, unrelated CA."""
    d = tmp_path_factory.mktemp("pki")
    done = fedcoord("certs", "init", str(d), *(f"--site={s}" for s in SITES), timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("wrote ") == 6 + 2 * len(SITES)
    certs.init(d / "other", sites=("hospital-1",))
    return d


def site_flags(pki: Path, name: str) -> list[str]:
    key = "operator" if name == "operator" else f"sites/{name}"
    return [
        *("--tls-ca", f"{pki}/ca.pem"),
        *("--tls-cert", f"{pki}/{key}.pem", "--tls-key", f"{pki}/{key}.key"),
    ]


def test_a_run_over_mutual_tls_works_end_to_end(tmp_path, processes: Processes, pki):
    port = free_port()
    address = f"127.0.0.1:{port}"
    data = tmp_path / "coord"
    serve = processes.start(
        "serve", "serve", "--data-dir", str(data), "--address", address, "--open-enrollment",
        "--tls-cert", f"{pki}/coordinator.pem", "--tls-key", f"{pki}/coordinator.key",
        "--tls-client-ca", f"{pki}/ca.pem",
    )  # fmt: skip
    processes.wait_for_log(serve, "serving on", "the coordinator to listen")
    assert "mutual TLS" in processes.log(serve) and "TLS is OFF" not in processes.log(serve)
    for i, name in enumerate(SITES, 1):
        processes.start(
            name, "site", "--coordinator", address, "--site-id", name,
            "--task", "digits", "--partition", f"{i}/3", *site_flags(pki, name),
        )  # fmt: skip
    run = processes.start(
        "run", "run", str(experiment(tmp_path, rounds=2, timeout_s=30)),
        "--coordinator", address, "--wait", *site_flags(pki, "operator"),
    )  # fmt: skip
    assert run.wait(timeout=120) == 0, processes.log(run)
    assert "finished after 2 round(s)" in processes.log(run)
    committed = rounds_committed(data)
    assert [c["round"] for c in committed] == [1, 2]
    assert all(c["participants"] == list(SITES) for c in committed)
    listed = fedcoord("sites", "list", "--coordinator", address, *site_flags(pki, "operator"))
    assert listed.returncode == 0 and listed.stdout.count("enrolled") == 3, listed.stderr
    plaintext = fedcoord("sites", "list", "--coordinator", address, "--insecure")
    assert plaintext.returncode == 1 and "UNAVAILABLE" in plaintext.stderr
    assert verify_ledger(data).returncode == 0


@pytest.fixture
def mtls_coordinator(tmp_path, pki):
    """An in-process coordinator over mutual TLS with the certificates of ``pki``."""
    tls = ServerTLS(
        (pki / "coordinator.pem").read_bytes(),
        (pki / "coordinator.key").read_bytes(),
        (pki / "ca.pem").read_bytes(),
    )
    c = Coordinator(tmp_path / "coord", "127.0.0.1:0", open_enrollment=True, tls=tls)
    c.start(run_engine=False)
    yield c
    c.stop(grace=0.5)


def channel(address: str, pki: Path, roots: str = "ca.pem", cert: str | None = None):
    pem = {} if cert is None else {
        "certificate_chain": (pki / f"{cert}.pem").read_bytes(),
        "private_key": (pki / f"{cert}.key").read_bytes(),
    }  # fmt: skip
    creds = grpc.ssl_channel_credentials((pki / roots).read_bytes(), **pem)
    return grpc.secure_channel(address, creds)


def site_pem(pki: Path, name: str) -> dict[str, bytes]:
    """``run_site``'s TLS arguments for site ``name``'s certificate."""
    return {
        "root_certificates": (pki / "ca.pem").read_bytes(),
        "certificate_chain": (pki / "sites" / f"{name}.pem").read_bytes(),
        "private_key": (pki / "sites" / f"{name}.key").read_bytes(),
    }


def health_check(ch: grpc.Channel) -> grpc.StatusCode:
    try:
        health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def test_clients_without_a_certificate_of_the_ca_are_refused(mtls_coordinator, pki):
    address = mtls_coordinator.address
    assert health_check(channel(address, pki, cert="sites/hospital-1")) == grpc.StatusCode.OK
    refused = {
        "plaintext": grpc.insecure_channel(address),
        "no certificate": channel(address, pki),
        "another CA's certificate": channel(address, pki, cert="other/sites/hospital-1"),
        "another CA as root": channel(address, pki, "other/ca.pem", cert="sites/hospital-1"),
    }
    for what, ch in refused.items():
        assert health_check(ch) == grpc.StatusCode.UNAVAILABLE, what


def test_only_the_operator_certificate_may_use_the_control_service(mtls_coordinator, pki):
    address = mtls_coordinator.address
    ask = control_pb2.ListRunsRequest()
    operator = control_pb2_grpc.ControlStub(channel(address, pki, cert="operator"))
    assert operator.ListRuns(ask, timeout=10).runs == []
    site = control_pb2_grpc.ControlStub(channel(address, pki, cert="sites/hospital-1"))
    with pytest.raises(grpc.RpcError) as refused:
        site.ListRuns(ask, timeout=10)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "for operators" in refused.value.details()
    with pytest.raises(grpc.RpcError) as minting:  # a site cannot mint enrollment tokens
        site.EnrollSite(control_pb2.EnrollSiteRequest(site_id="intruder"), timeout=10)
    assert minting.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_a_certificate_only_serves_its_own_site_id(mtls_coordinator, pki):
    address = mtls_coordinator.address
    control = control_pb2_grpc.ControlStub(channel(address, pki, cert="operator"))

    def listed() -> list[str]:
        return [s.site_id for s in control.ListSites(control_pb2.ListSitesRequest()).sites]

    stop = threading.Event()
    site = threading.Thread(
        target=run_site,
        args=(SlowSite(0, 3), address, "hospital-1"),
        kwargs={"stop": stop, "poll_wait_s": 1, **site_pem(pki, "hospital-1")},
        daemon=True,
    )
    site.start()
    try:
        wait_for(lambda: listed() == ["hospital-1"], 30, "hospital-1 to enroll with its own cert")
        stub = fleet_pb2_grpc.FleetStub(channel(address, pki, cert="sites/hospital-1"))
        for call in (
            lambda: stub.Enroll(fleet_pb2.EnrollRequest(site_id="hospital-2"), timeout=5),
            lambda: stub.Heartbeat(fleet_pb2.HeartbeatRequest(site_id="hospital-2"), timeout=5),
        ):
            with pytest.raises(grpc.RpcError) as exc:
                call()
            assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "certificate is for 'hospital-1', not site 'hospital-2'" in exc.value.details()
        assert listed() == ["hospital-1"]
    finally:
        stop.set()
        site.join(timeout=10)
    # a site started with another site's certificate stops with a clear error (no retrying)
    with pytest.raises(SiteError, match=r"UNAUTHENTICATED: .* not site 'hospital-2'"):
        run_site(
            SlowSite(0, 3), address, "hospital-2", max_unavailable_s=10,
            **site_pem(pki, "hospital-1"),
        )  # fmt: skip


def test_server_only_tls_authenticates_the_coordinator(tmp_path, pki):
    tls = ServerTLS((pki / "coordinator.pem").read_bytes(), (pki / "coordinator.key").read_bytes())
    c = Coordinator(tmp_path / "coord", "127.0.0.1:0", tls=tls)
    c.start(run_engine=False)
    try:
        assert health_check(channel(c.address, pki)) == grpc.StatusCode.OK
        assert health_check(channel(c.address, pki, "other/ca.pem")) == grpc.StatusCode.UNAVAILABLE
        assert health_check(grpc.insecure_channel(c.address)) == grpc.StatusCode.UNAVAILABLE
    finally:
        c.stop(grace=0.5)


@pytest.mark.parametrize(
    "flags, line",
    [
        ([], "--insecure: serve needs TLS"),
        (["--tls-cert", "{pki}/coordinator.pem"], "--tls-key: --tls-cert needs --tls-key"),
        (
            ["--tls-cert", "{pki}/coordinator.pem", "--tls-key", "{pki}/missing.key"],
            "--tls-key: cannot read {pki}/missing.key: No such file or directory",
        ),
        (
            ["--insecure", "--tls-cert", "{pki}/coordinator.pem", "--tls-key", "{pki}/ca.key"],
            "--insecure: cannot be combined with --tls-cert, --tls-key",
        ),
        (
            ["--tls-cert", "{pki}/coordinator.key", "--tls-key", "{pki}/coordinator.key"],
            "--tls-cert: {pki}/coordinator.key is not a PEM certificate",
        ),
        (
            ["--tls-cert", "{pki}/coordinator.pem", "--tls-key", "{pki}/coordinator.pem"],
            "--tls-key: {pki}/coordinator.pem is not an unencrypted PEM private key",
        ),
        (
            ["--tls-cert", "{pki}/coordinator.pem", "--tls-key", "{pki}/ca.key"],
            "--tls-key: {pki}/ca.key is not the key of the certificate given with it",
        ),
        (["--tls-client-ca", "{pki}/ca.pem"], "--tls-cert: --tls-client-ca needs --tls-cert"),
    ],
    ids=[
        "none",
        "no-key",
        "missing-key",
        "insecure-and-tls",
        "bad-cert",
        "bad-key",
        "wrong-key",
        "ca-only",
    ],
)
def test_serve_transport_errors_exit_2_with_one_line(tmp_path, capsys, pki, flags, line):
    args = [f.format(pki=pki) for f in flags]
    assert main(["serve", "--data-dir", str(tmp_path / "d"), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"fedcoord: error: {line.format(pki=pki)}"), err
    assert not (tmp_path / "d").exists()  # nothing was started


@pytest.mark.parametrize(
    "command",
    [
        ["run", "x.yaml", "--coordinator", "127.0.0.1:1"],
        ["sites", "list", "--coordinator", "127.0.0.1:1"],
        ["site", "--coordinator", "127.0.0.1:1", "--site-id", "s", "--client", "m:f"],
    ],
    ids=["run", "sites-list", "site"],
)
def test_dialling_commands_check_their_transport_flags(capsys, pki, command):
    cases = [
        (["--insecure", "--tls-ca", f"{pki}/ca.pem"], "--insecure: cannot be combined"),
        (["--tls-key", f"{pki}/operator.key"], "--tls-cert: --tls-key needs --tls-cert"),
        (["--tls-ca", f"{pki}/nope.pem"], f"--tls-ca: cannot read {pki}/nope.pem"),
    ]
    for flags, line in cases:
        assert main([*command, *flags]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"fedcoord: error: {line}"), err
