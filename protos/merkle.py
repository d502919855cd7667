"""Merkle tree over a round's accepted update digests, and inclusion proofs into it.

Leaves are ``SHA-256(0x00 || "<site_id>\\n<digest>")`` sorted by site id; a parent is
``SHA-256(0x01 || left || right)``; a level of odd length pairs its last node with
itself. The root of no updates is ``SHA-256("")``. A proof lists, leaf to root, each
sibling (hex) and the side it sits on: ``"L"`` (the sibling is the left child) or
``"R"``.
"""

from __future__ import annotations

import hashlib
import re

LEAF_PREFIX = b"\x00"
NODE_PREFIX = b"\x01"
SIDES = ("L", "R")
MAX_PROOF_STEPS = 64
"""Deeper than any real round (2**64 sites); longer proofs are refused unread."""
_HEX32 = re.compile(r"^[0-9a-f]{64}$")

ProofStep = tuple[str, str]


def leaf(site_id: str, digest: str) -> bytes:
    """The leaf hash of one site's update digest."""
    return hashlib.sha256(LEAF_PREFIX + f"{site_id}\n{digest}".encode()).digest()


def _parent(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(NODE_PREFIX + left + right).digest()


def _levels(updates: dict[str, str]) -> list[list[bytes]]:
    """Every level of the tree, leaves first (odd levels not yet padded)."""
    levels = [[leaf(s, d) for s, d in sorted(updates.items())]]
    while len(levels[-1]) > 1:
        level = levels[-1]
        padded = [*level, level[-1]] if len(level) % 2 else level
        levels.append([_parent(padded[i], padded[i + 1]) for i in range(0, len(padded), 2)])
    return levels


def merkle_root(updates: dict[str, str]) -> str:
    """Root (hex) over ``{site_id: update digest}``; the hash of nothing when empty."""
    if not updates:
        return hashlib.sha256(b"").hexdigest()
    return _levels(updates)[-1][0].hex()


def inclusion_proof(updates: dict[str, str], site_id: str) -> list[ProofStep]:
    """The path from ``site_id``'s leaf to the root of ``updates``.

    Raises
    ------
    KeyError
        When ``site_id`` has no update in ``updates``.
    """
    if site_id not in updates:
        raise KeyError(f"site {site_id!r} has no update in this tree")
    index = sorted(updates).index(site_id)
    proof: list[ProofStep] = []
    for level in _levels(updates)[:-1]:
        sibling = index ^ 1
        node = level[sibling] if sibling < len(level) else level[index]  # odd: itself
        proof.append((node.hex(), "L" if index % 2 else "R"))
        index //= 2
    return proof


def root_from_proof(site_id: str, digest: str, proof: list[ProofStep]) -> str:
    """The root (hex) that ``proof`` leads to from the leaf of ``(site_id, digest)``.

    Raises
    ------
    ValueError
        A malformed proof: too long, a sibling that is not 64 lowercase hex digits, or
        a side other than ``"L"``/``"R"``.
    """
    if len(proof) > MAX_PROOF_STEPS:
        raise ValueError(f"proof has {len(proof)} steps, more than {MAX_PROOF_STEPS}")
    node = leaf(site_id, digest)
    for i, step in enumerate(proof):
        if not (isinstance(step, tuple | list) and len(step) == 2):
            raise ValueError(f"proof step {i} is not a (sibling, side) pair")
        sibling, side = step
        if not (isinstance(sibling, str) and _HEX32.match(sibling)):
            raise ValueError(f"proof step {i}: sibling is not 64 lowercase hex digits")
        if side not in SIDES:
            raise ValueError(f"proof step {i}: side must be 'L' or 'R'")
        other = bytes.fromhex(sibling)
        node = _parent(other, node) if side == "L" else _parent(node, other)
    return node.hex()
