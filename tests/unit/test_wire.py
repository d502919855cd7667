"""Chunk messages in wire form: what protobuf writes, and read back only when exact."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protos import codec, wire
from protos.errors import PayloadError
from protos.fedcoord.v1 import common_pb2, fleet_pb2

STREAM_MESSAGES = (fleet_pb2.TaskMessage, fleet_pb2.ResultMessage)


def data_of(n: int) -> bytes:
    return bytes(range(256)) * (n // 256) + bytes(n % 256)


@pytest.mark.parametrize("n", [0, 1, 127, 128, 16_384, codec.CHUNK_SIZE])
def test_pre_encoded_chunk_messages_are_what_protobuf_encodes(n):
    data = data_of(n)
    for message in STREAM_MESSAGES:
        encoded = message(chunk=common_pb2.Chunk(data=data)).SerializeToString()
        assert wire.chunk_message(memoryview(data)) == encoded
        assert wire.chunk_message_size(n) == len(encoded)
        assert bytes(wire.chunk_view(encoded)) == data
    payload = codec.encode({"a": np.arange(700_000, dtype=np.float32), "b": np.ones(3)})
    decoded = [bytes(wire.chunk_view(m)) for m in payload.chunk_messages()]
    assert decoded == list(payload.chunks())


def test_chunk_views_share_the_received_bytes():
    raw = wire.chunk_message(b"x" * 1000)
    view = wire.chunk_view(raw)
    assert view is not None and view.obj is raw and len(view) == 1000


def header_message() -> bytes:
    header = fleet_pb2.ResultHeader(site_id="s", task_id="t", num_examples=3)
    return fleet_pb2.ResultMessage(header=header).SerializeToString()


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        header_message(),
        wire.chunk_message(b"abc")[:-1],  # cut short
        wire.chunk_message(b"abc") + b"\x00",  # trailing byte
        wire.chunk_message(b"abc") * 2,  # two chunk fields: protobuf merges them
        b"\x12\x06\x0a\x02ab\x18\x01",  # a second field inside the chunk
        b"\x12\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",  # an overlong varint
        b"\x12",
    ],
)
def test_anything_but_one_exact_chunk_goes_to_protobuf(raw):
    assert wire.chunk_view(raw) is None


def test_a_non_minimal_length_is_still_a_chunk():
    raw = b"\x12\x85\x00\x0a\x03abc"  # outer length 5 written in two bytes
    assert fleet_pb2.TaskMessage.FromString(raw).chunk.data == b"abc"
    assert bytes(wire.chunk_view(raw)) == b"abc"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=40), st.binary(max_size=8))
def test_a_chunk_view_always_agrees_with_protobuf(body, prefix):
    for raw in (body, b"\x12" + prefix + body, wire.chunk_message(body) + prefix):
        view = wire.chunk_view(raw)
        if view is None:
            continue
        parsed = fleet_pb2.ResultMessage.FromString(raw)
        assert parsed.WhichOneof("kind") == "chunk" and parsed.chunk.data == bytes(view)


def test_deserializer_parses_what_is_not_a_chunk():
    read = wire.reading_chunks(fleet_pb2.ResultMessage.FromString)
    assert isinstance(read(header_message()), fleet_pb2.ResultMessage)
    assert bytes(read(wire.chunk_message(b"abc"))) == b"abc"
    assert wire.passing_bytes(fleet_pb2.ResultMessage.SerializeToString)(b"as is") == b"as is"


def test_chunk_data_refuses_a_header_in_the_middle_of_a_stream():
    parsed = fleet_pb2.ResultMessage.FromString(header_message())
    with pytest.raises(PayloadError, match="unexpected message"):
        wire.chunk_data(parsed)
    chunk = fleet_pb2.ResultMessage(chunk=common_pb2.Chunk(data=b"ab"))
    assert wire.chunk_data(chunk) == b"ab"
