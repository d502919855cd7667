"""Unambiguous byte encoding of the labels bound into key derivations and AEAD data.

Every HKDF ``info``, PRG context and AEAD associated-data string is built with
:func:`pack_fields`, so ``("ab", "c")`` and ``("a", "bc")`` never encode alike: each field
is a type tag, a 4-byte big-endian length and the field's bytes (strings in UTF-8,
integers as 8-byte big-endian unsigned).
"""

from __future__ import annotations

DOMAIN = b"fedcoord/secagg/v1"
"""Version label that starts every encoded string (bump it when the format changes)."""

_EIGHT = (8).to_bytes(4, "big")


def pack_fields(*fields: str | bytes | int) -> bytes:
    """``DOMAIN`` followed by each field, tagged and length-prefixed.

    Raises
    ------
    ValueError
        For an integer outside ``[0, 2^64)``.
    TypeError
        For a field whose type is not exactly ``str``, ``bytes`` or ``int`` (``bool``
        and NumPy integers are refused, so nothing encodes ambiguously).
    """
    parts = [DOMAIN]
    for field in fields:
        if type(field) is str:
            data = field.encode("utf-8")
            parts += (b"s", len(data).to_bytes(4, "big"), data)
        elif type(field) is bytes:
            parts += (b"b", len(field).to_bytes(4, "big"), field)
        elif type(field) is int:
            if not 0 <= field < 1 << 64:
                raise ValueError(f"integer field out of range [0, 2^64): {field}")
            parts += (b"i", _EIGHT, field.to_bytes(8, "big"))
        else:
            name = type(field).__name__
            raise TypeError(f"cannot encode a field of type {name} (str, bytes, int only)")
    return b"".join(parts)
