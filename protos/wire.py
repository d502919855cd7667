"""Fleet's chunk messages in their wire form, without protobuf objects.

A payload streams as ``TaskMessage``/``ResultMessage`` messages whose ``chunk`` holds
up to 1 MiB. Building, serializing and parsing such a message through protobuf copies
the megabyte two or three times and, in upb, allocates (and frees) a megabyte-sized
arena per message. Here a chunk message is written directly (byte-identical to what
protobuf writes) and read back as a view of the received bytes; every other message
still goes through protobuf. gRPC (de)serializers built from these helpers are installed
for ``PullTask`` and ``PushResult`` at both ends.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from protos.errors import PayloadError

CHUNK_FIELD = 2
"""Field number of ``chunk`` in ``fleet.v1.TaskMessage`` and ``ResultMessage`` (and
``data`` is field 1 of ``Chunk``): what :func:`chunk_message` encodes."""
_CHUNK_TAG = CHUNK_FIELD << 3 | 2
_DATA_TAG = 1 << 3 | 2
_MAX_VARINT_BYTES = 10

M = TypeVar("M")


def _length_delimited(field: int, n: int) -> bytes:
    """Tag and length of a length-delimited field of ``n`` bytes (field < 16)."""
    length = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        length.append(byte | (0x80 if n else 0))
        if not n:
            return bytes([field << 3 | 2]) + bytes(length)


def chunk_message(data: memoryview | bytes) -> bytes:
    """The wire form of a ``TaskMessage``/``ResultMessage`` whose ``chunk`` holds ``data``."""
    inner = _length_delimited(1, len(data)) if len(data) else b""
    outer = _length_delimited(CHUNK_FIELD, len(inner) + len(data))
    return b"".join((outer, inner, data))


def chunk_message_size(n: int) -> int:
    """``len(chunk_message(data))`` for ``n`` bytes of data, without building it."""
    inner = len(_length_delimited(1, n)) + n if n else 0
    return len(_length_delimited(CHUNK_FIELD, inner)) + inner


def _varint(view: memoryview, pos: int) -> tuple[int, int] | None:
    """The varint at ``pos`` and the position after it; None when it is cut short."""
    value = shift = 0
    for i in range(pos, min(len(view), pos + _MAX_VARINT_BYTES)):
        value |= (view[i] & 0x7F) << shift
        if not view[i] & 0x80:
            return value, i + 1
        shift += 7
    return None


def _field(view: memoryview, pos: int, tag: int) -> int | None:
    """Where the data of the length-delimited field ``tag`` at ``pos`` starts, when that
    field runs exactly to the end of ``view``; None otherwise."""
    if pos >= len(view) or view[pos] != tag:
        return None
    length = _varint(view, pos + 1)
    if length is None or length[1] + length[0] != len(view):
        return None
    return length[1]


def chunk_view(raw: bytes) -> memoryview | None:
    """The data of ``raw`` as a view into it when ``raw`` is exactly one chunk field
    holding one data field (any valid varint form); None for every other message."""
    view = memoryview(raw)
    start = _field(view, 0, _CHUNK_TAG)
    if start is None:
        return None
    if start == len(view):  # an empty chunk: protobuf writes no data field
        return view[start:]
    data = _field(view, start, _DATA_TAG)
    return None if data is None else view[data:]


def reading_chunks(parse: Callable[[bytes], M]) -> Callable[[bytes], M | memoryview]:
    """A deserializer that hands chunk messages over as views of their data
    (:func:`chunk_view`) and parses every other message with ``parse``."""

    def deserialize(raw: bytes) -> M | memoryview:
        view = chunk_view(raw)
        return view if view is not None else parse(raw)

    return deserialize


def passing_bytes(serialize: Callable[[Any], bytes]) -> Callable[[Any], bytes]:
    """A serializer that sends pre-encoded messages (``bytes``) as they are."""
    return lambda message: message if isinstance(message, bytes) else serialize(message)


def chunk_data(message: Any) -> memoryview | bytes:
    """The data a payload stream's message carries: a view :func:`reading_chunks` handed
    over, or a parsed message's chunk. Raises :class:`PayloadError` for any other
    message."""
    if isinstance(message, memoryview):
        return message
    if message.WhichOneof("kind") != "chunk":
        raise PayloadError("unexpected message after the header")
    return message.chunk.data
