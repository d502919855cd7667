"""Who may call the Control service: the operator's certificate, or a client on the
coordinator's own host without a certificate."""

from __future__ import annotations

import grpc
import pytest

from coordinator.transport import OPERATOR_NAME, require_operator


class Refused(Exception):
    pass


class Context:
    """The two things the gate reads of a gRPC servicer context, and ``abort``."""

    def __init__(self, peer: str, cn: str | None = None):
        self._peer, self._cn = peer, cn

    def peer(self) -> str:
        return self._peer

    def auth_context(self) -> dict[str, list[bytes]]:
        return {} if self._cn is None else {"x509_common_name": [self._cn.encode()]}

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise Refused(code, details)


@pytest.mark.parametrize(
    "peer, cn",
    [("ipv4:127.0.0.1:5000", None), ("ipv6:[::1]:5000", None), ("unix:/tmp/s", None),
     ("ipv4:192.0.2.7:5000", OPERATOR_NAME), ("ipv4:127.0.0.1:5000", OPERATOR_NAME)],
)  # fmt: skip
def test_operators_pass(peer, cn):
    require_operator(Context(peer, cn))


@pytest.mark.parametrize(
    "peer, cn",
    [("ipv4:192.0.2.7:5000", None), ("ipv6:[fd00::2]:5000", None),
     ("ipv4:127.0.0.1:5000", "hospital-1"), ("ipv4:192.0.2.7:5000", "hospital-1")],
)  # fmt: skip
def test_remote_clients_and_site_certificates_are_refused(peer, cn):
    with pytest.raises(Refused) as refused:
        require_operator(Context(peer, cn))
    code, details = refused.value.args
    assert code == grpc.StatusCode.PERMISSION_DENIED and "for operators" in details
