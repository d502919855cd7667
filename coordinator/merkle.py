"""Merkle root over a round's accepted update digests (leaves sorted by site id)."""

from __future__ import annotations

import hashlib


def leaf(site_id: str, digest: str) -> bytes:
    return hashlib.sha256(b"\x00" + f"{site_id}\n{digest}".encode()).digest()


def merkle_root(updates: dict[str, str]) -> str:
    """Root (hex) over ``{site_id: update digest}``; the hash of nothing when empty."""
    level = [leaf(s, d) for s, d in sorted(updates.items())]
    if not level:
        return hashlib.sha256(b"").hexdigest()
    while len(level) > 1:
        if len(level) % 2:
            level.append(level[-1])
        level = [
            hashlib.sha256(b"\x01" + level[i] + level[i + 1]).digest()
            for i in range(0, len(level), 2)
        ]
    return level[0].hex()
