"""The committed gRPC/protobuf code must match what `make protos` generates."""

from __future__ import annotations

from pathlib import Path

import pytest

protoc = pytest.importorskip("grpc_tools.protoc")

ROOT = Path(__file__).resolve().parents[2]
PROTO_DIR = Path("protos/fedcoord/v1")


def test_committed_generated_code_is_current(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    sources = sorted(str(p) for p in PROTO_DIR.glob("*.proto"))
    assert sources, "no .proto files found"
    args = [
        "protoc",
        "-I.",
        f"--python_out={tmp_path}",
        f"--pyi_out={tmp_path}",
        f"--grpc_python_out={tmp_path}",
        *sources,
    ]
    assert protoc.main(args) == 0
    generated = sorted((tmp_path / PROTO_DIR).glob("*_pb2*.py*"))
    assert generated
    stale = [
        g.name for g in generated if g.read_bytes() != (ROOT / PROTO_DIR / g.name).read_bytes()
    ]
    assert not stale, f"stale generated code: {stale}; run `make protos` and commit the result"
