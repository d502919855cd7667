"""Payload codec: round trips, canonical digests, and refusal of malformed streams."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from protos import codec
from protos.errors import PayloadError
from protos.fedcoord.v1 import common_pb2

DTYPES = ["float32", "float64", "int64", "int32", "uint32", "uint8", "bool", "float16"]


def roundtrip(arrays, chunk_size=codec.CHUNK_SIZE):
    payload = codec.encode(arrays)
    return codec.decode(payload.header(), payload.chunks(chunk_size), 1 << 32)


@settings(max_examples=60, deadline=None)
@given(
    st.dictionaries(
        st.text("abcdefghij._", min_size=1, max_size=8),
        st.sampled_from(DTYPES).flatmap(
            lambda d: hnp.arrays(
                d, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5)
            )
        ),
        max_size=5,
    ),
    st.integers(1, 300),
)
def test_roundtrip_preserves_names_dtypes_shapes_and_bits(arrays, chunk_size):
    out = roundtrip(arrays, chunk_size)
    assert out.keys() == arrays.keys()
    for name, a in arrays.items():
        assert out[name].dtype == a.dtype and out[name].shape == a.shape
        assert out[name].tobytes() == a.tobytes()  # bit-exact, NaN payloads included


def test_digest_is_canonical_and_content_sensitive():
    a = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.zeros(3, np.int64)}
    reordered = {"b": a["b"], "w": np.asfortranarray(a["w"])}
    assert codec.digest_arrays(a) == codec.digest_arrays(reordered)
    assert codec.digest_arrays(a) != codec.digest_arrays({**a, "w": a["w"].reshape(3, 2)})
    assert codec.digest_arrays(a) != codec.digest_arrays({**a, "b": a["b"].astype(np.int32)})
    flipped = a["w"].copy()
    flipped.reshape(-1).view(np.uint8)[5] ^= 1
    assert codec.digest_arrays(a) != codec.digest_arrays({**a, "w": flipped})


def test_big_endian_input_is_sent_little_endian():
    big = np.arange(4, dtype=">i4")
    out = roundtrip({"x": big})
    assert out["x"].dtype == np.dtype("<i4") and out["x"].tolist() == [0, 1, 2, 3]


def test_chunks_are_at_most_one_mib_and_decoding_is_zero_copy():
    arrays = {"a": np.ones(700_000, np.float32), "b": np.ones(300_001, np.float64)}
    payload = codec.encode(arrays)
    chunks = list(payload.chunks())
    assert all(len(c) <= codec.CHUNK_SIZE for c in chunks)
    assert sum(map(len, chunks)) == payload.total_bytes
    out = codec.decode(payload.header(), iter(chunks), 1 << 30)
    assert np.shares_memory(out["a"], out["b"]) is False
    assert out["a"].base is not None and out["b"].base is not None  # views, not copies
    assert out["b"].ctypes.data % codec.ALIGN == out["a"].ctypes.data % codec.ALIGN


def corrupt(header_edit=None, chunks_edit=None):
    payload = codec.encode({"w": np.arange(100, dtype=np.float32)})
    header = payload.header()
    chunks = list(payload.chunks(64))
    if header_edit:
        header_edit(header)
    if chunks_edit:
        chunks = chunks_edit(chunks)
    return codec.decode(header, iter(chunks), 1 << 20)


@pytest.mark.parametrize(
    "header_edit, chunks_edit, message",
    [
        (None, lambda c: c[:-1], "truncated"),
        (None, lambda c: [*c, b"x"], "longer"),
        (None, lambda c: [c[0][:-1] + b"\x01", *c[1:]], "digest mismatch"),
        (lambda h: setattr(h, "total_bytes", 4), None, "announces"),
        (lambda h: setattr(h, "digest", "md5:abc"), None, "malformed payload digest"),
        (lambda h: setattr(h.tensors[0], "dtype", "object"), None, "not allowed"),
        (lambda h: h.tensors[0].shape.__setitem__(0, -100), None, "negative"),
        (lambda h: h.tensors.add(name="w", dtype="float32"), None, "duplicate"),
        (lambda h: setattr(h.tensors[0], "name", ""), None, "invalid tensor name"),
    ],
)
def test_malformed_payloads_are_refused(header_edit, chunks_edit, message):
    with pytest.raises(PayloadError, match=message):
        corrupt(header_edit, chunks_edit)


def test_size_limit_is_checked_before_allocating():
    header = common_pb2.PayloadHeader(
        tensors=[common_pb2.TensorSpec(name="x", dtype="float64", shape=[1 << 40])],
        total_bytes=8 << 40,
        digest="sha256:" + "0" * 64,
    )
    with pytest.raises(PayloadError, match="exceeds the limit"):
        codec.PayloadAssembler(header, max_bytes=1 << 30)


def test_oversized_chunk_is_refused():
    payload = codec.encode({"x": np.zeros(codec.CHUNK_SIZE, np.float32)})
    assembler = codec.PayloadAssembler(payload.header(), 1 << 30)
    with pytest.raises(PayloadError, match="exceeds"):
        assembler.add(bytes(codec.CHUNK_SIZE + 1))


@pytest.mark.slow
def test_payload_beyond_2_gib_roundtrips():
    """gRPC caps one message at 2 GiB; chunked payloads have no such limit."""
    n = (1 << 31) // 4 + 1024  # just over 2 GiB of float32
    big = np.zeros(n, dtype=np.float32)
    big[::4096] = np.arange(big[::4096].size, dtype=np.float32)
    payload = codec.encode({"big": big, "small": np.ones(3, np.int64)})
    assert payload.total_bytes > 1 << 31
    assembler = codec.PayloadAssembler(payload.header(), max_bytes=1 << 32)
    count = 0
    for chunk in payload.chunks():
        assembler.add(chunk)
        count += 1
    out = assembler.finish()
    assert count == -(-payload.total_bytes // codec.CHUNK_SIZE)
    assert np.array_equal(out["big"][::4096], big[::4096]) and out["small"].tolist() == [1, 1, 1]
