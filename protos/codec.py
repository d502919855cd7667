"""Named numpy arrays <-> payload streams: canonical layout, chunking, SHA-256 digests.

A payload is the tensors of a ``dict[str, np.ndarray]`` sorted by name, each laid out
as raw little-endian bytes starting at a multiple of :data:`ALIGN` bytes (zero padding
between them). Its digest is SHA-256 over a canonical description of the tensors
(name, dtype, shape) followed by the stream bytes, so one digest names a model or an
update on the wire, in the model store and in the ledger. Nothing is ever pickled.

Senders call :func:`encode` and stream :meth:`EncodedPayload.chunk_messages` (or the
bare :meth:`EncodedPayload.chunks`); receivers feed chunks to a
:class:`PayloadAssembler`, which copies them into one preallocated buffer and returns
zero-copy views into it once the digest checks out.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np

from protos.errors import PayloadError
from protos.fedcoord.v1 import common_pb2
from protos.wire import chunk_message

CHUNK_SIZE = 1 << 20
"""Largest chunk put on the wire (1 MiB)."""
ALIGN = 64
"""Every tensor starts at a multiple of this many bytes of the stream."""
MAX_TENSORS = 100_000
MAX_NAME_LEN = 512
DIGEST_PREFIX = "sha256:"
_DOMAIN = b"fedcoord.payload.v1\n"

ALLOWED_DTYPES = frozenset(
    {
        "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
        "float16", "float32", "float64",
    }
)  # fmt: skip

Arrays = Mapping[str, np.ndarray]


@dataclass(frozen=True)
class TensorLayout:
    """Where one tensor lives in the payload stream."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def plan_layout(specs: list[tuple[str, str, tuple[int, ...]]]) -> tuple[list[TensorLayout], int]:
    """Validate (name, dtype, shape) specs and place them; returns the layouts and the total.

    Raises
    ------
    PayloadError
        On duplicate, empty or overlong names, unknown dtypes or negative dimensions.
    """
    if len(specs) > MAX_TENSORS:
        raise PayloadError(f"payload has {len(specs)} tensors, more than {MAX_TENSORS}")
    layouts: list[TensorLayout] = []
    offset = 0
    seen: set[str] = set()
    for name, dtype_name, shape in sorted(specs, key=lambda s: s[0]):
        if not name or len(name) > MAX_NAME_LEN or not name.isprintable():
            raise PayloadError(f"invalid tensor name {name[:40]!r}")
        if name in seen:
            raise PayloadError(f"duplicate tensor name {name!r}")
        seen.add(name)
        if dtype_name not in ALLOWED_DTYPES:
            raise PayloadError(f"tensor {name!r}: dtype {dtype_name!r} is not allowed")
        if any(d < 0 for d in shape):
            raise PayloadError(f"tensor {name!r}: negative dimension in shape {list(shape)}")
        dtype = np.dtype(dtype_name).newbyteorder("<")
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize if shape else dtype.itemsize
        offset = _aligned(offset)
        layouts.append(TensorLayout(name, dtype, tuple(int(d) for d in shape), offset, nbytes))
        offset += nbytes
    return layouts, offset


def _spec_bytes(layouts: list[TensorLayout]) -> bytes:
    desc = [[t.name, t.dtype.name, list(t.shape)] for t in layouts]
    return _DOMAIN + json.dumps(desc, separators=(",", ":")).encode()


def _little_endian_contiguous(a: np.ndarray) -> np.ndarray:
    if a.dtype.byteorder == ">" or (a.dtype.byteorder == "=" and np.little_endian is False):
        a = a.astype(a.dtype.newbyteorder("<"))
    return a if a.flags.c_contiguous else a.copy(order="C")


class EncodedPayload:
    """A payload ready to stream: header, digest, and chunks produced on demand.

    Holds references to the (contiguous, little-endian) arrays, never a copy of the
    whole stream.
    """

    def __init__(self, arrays: Arrays):
        arrays = {k: _little_endian_contiguous(np.asarray(v)) for k, v in arrays.items()}
        specs = [(k, v.dtype.name, v.shape) for k, v in arrays.items()]
        self.layouts, self.total_bytes = plan_layout(specs)
        self._buffers = [
            memoryview(arrays[t.name].reshape(-1).view(np.uint8)) for t in self.layouts
        ]
        h = hashlib.sha256(_spec_bytes(self.layouts))
        for piece in self._pieces():
            h.update(piece)
        self.digest = DIGEST_PREFIX + h.hexdigest()

    def _pieces(self) -> Iterator[memoryview | bytes]:
        """The stream as consecutive pieces: tensor bytes and zero padding."""
        pos = 0
        for t, buf in zip(self.layouts, self._buffers, strict=True):
            if t.offset > pos:
                yield bytes(t.offset - pos)
            if t.nbytes:
                yield buf
            pos = t.offset + t.nbytes

    def header(self) -> common_pb2.PayloadHeader:
        return common_pb2.PayloadHeader(
            tensors=[
                common_pb2.TensorSpec(name=t.name, dtype=t.dtype.name, shape=t.shape)
                for t in self.layouts
            ],
            total_bytes=self.total_bytes,
            digest=self.digest,
        )

    def chunks(self, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
        """Yield the stream in chunks of exactly ``chunk_size`` bytes (the last may be shorter)."""
        for piece in self._chunk_views(chunk_size):
            yield bytes(piece)

    def chunk_messages(self, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
        """:meth:`chunks`, each already encoded as the ``TaskMessage``/``ResultMessage``
        that carries it (:func:`protos.wire.chunk_message`): one copy per chunk, where
        building and serializing a message object costs three."""
        for piece in self._chunk_views(chunk_size):
            yield chunk_message(piece)

    def _chunk_views(self, chunk_size: int) -> Iterator[memoryview | bytes]:
        """The chunks as views of the arrays where a chunk lies within one tensor."""
        pending = bytearray()
        for piece in self._pieces():
            view = memoryview(piece)
            while len(view):
                take = min(chunk_size - len(pending), len(view))
                if not pending and take == chunk_size:
                    yield view[:take]
                else:
                    pending += view[:take]
                    if len(pending) == chunk_size:
                        yield bytes(pending)
                        pending.clear()
                view = view[take:]
        if pending:
            yield bytes(pending)


def encode(arrays: Arrays) -> EncodedPayload:
    return EncodedPayload(arrays)


def digest_arrays(arrays: Arrays) -> str:
    """The payload digest (``sha256:<hex>``) of named arrays."""
    return EncodedPayload(arrays).digest


class PayloadAssembler:
    """Receives one payload: checks its header, collects chunks, verifies the digest.

    Parameters
    ----------
    header
        The announced payload header.
    max_bytes
        Refuse payloads whose stream would be larger.
    """

    def __init__(self, header: common_pb2.PayloadHeader, max_bytes: int):
        if not header.digest.startswith(DIGEST_PREFIX) or len(header.digest) != 71:
            raise PayloadError(f"malformed payload digest {header.digest[:80]!r}")
        specs = [(t.name, t.dtype, tuple(t.shape)) for t in header.tensors]
        self.layouts, total = plan_layout(specs)
        if total != header.total_bytes:
            raise PayloadError(
                f"payload announces {header.total_bytes} bytes but its tensors need {total}"
            )
        if total > max_bytes:
            raise PayloadError(f"payload of {total} bytes exceeds the limit of {max_bytes}")
        self.expected_digest = header.digest
        self.total_bytes = total
        self._buffer = np.empty(total, dtype=np.uint8)
        self._view = memoryview(self._buffer)
        self._received = 0
        self._hash = hashlib.sha256(_spec_bytes(self.layouts))

    @property
    def received(self) -> int:
        return self._received

    def add(self, data: bytes) -> None:
        end = self._received + len(data)
        if end > self.total_bytes:
            raise PayloadError(f"payload stream longer than the announced {self.total_bytes} bytes")
        if len(data) > CHUNK_SIZE:
            raise PayloadError(f"chunk of {len(data)} bytes exceeds {CHUNK_SIZE}")
        self._view[self._received : end] = data
        self._hash.update(data)
        self._received = end

    def finish(self) -> dict[str, np.ndarray]:
        """Check length, digest and padding; return arrays viewing the received buffer."""
        if self._received != self.total_bytes:
            raise PayloadError(
                f"payload truncated: {self._received} of {self.total_bytes} bytes received"
            )
        digest = DIGEST_PREFIX + self._hash.hexdigest()
        if digest != self.expected_digest:
            raise PayloadError(
                f"payload digest mismatch: got {digest}, expected {self.expected_digest}"
            )
        arrays: dict[str, np.ndarray] = {}
        pos = 0
        for t in self.layouts:
            if t.offset > pos and self._buffer[pos : t.offset].any():
                raise PayloadError("non-zero padding in payload stream")
            raw = self._buffer[t.offset : t.offset + t.nbytes]
            arrays[t.name] = raw.view(t.dtype).reshape(t.shape)
            pos = t.offset + t.nbytes
        return arrays


def decode(
    header: common_pb2.PayloadHeader, chunks: Iterator[bytes], max_bytes: int
) -> dict[str, np.ndarray]:
    """Assemble a whole payload from its header and chunk iterator."""
    assembler = PayloadAssembler(header, max_bytes)
    for data in chunks:
        assembler.add(data)
    return assembler.finish()
