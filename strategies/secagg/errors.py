"""Errors raised by the secure-aggregation numerics and protocol state machines.

Every error is a :class:`SecAggError` (a ``ValueError``), so the gRPC layer can map the
whole family to one status code and show the message as one clear line.
"""

from __future__ import annotations


class SecAggError(ValueError):
    """Base class of every secure-aggregation error."""


class SecAggAborted(SecAggError):
    """The round stops without releasing any sum (not even a partial one).

    ``stage`` names the protocol stage (``advertise_keys``, ``share_keys``,
    ``masked_input``, ``unmask``), ``reason`` is a short machine-readable tag
    (``below_threshold``, ``too_few_shares``, ``reconstruction_failed``, ...).
    """

    def __init__(self, stage: str, reason: str, detail: str):
        self.stage = stage
        self.reason = reason
        self.detail = detail
        super().__init__(f"secure aggregation aborted at {stage} ({reason}): {detail}")


class ProtocolViolation(SecAggError):
    """A message or request that the protocol forbids: wrong stage, wrong round, a
    request that would make a site reveal both shares of one peer, and the like."""


class InvalidMessage(SecAggError):
    """A site's message failed validation; the site is treated as dropped."""


class InvalidPublicKey(SecAggError):
    """A public key of the wrong length, the all-zero key or another low-order X25519
    point (whose shared secret would be all zeros, i.e. known to everyone)."""


class DuplicatePublicKey(SecAggError):
    """The same public key appears twice in a round (two sites, or both keys of one
    site): a replayed or substituted key."""


class ShareDecryptionError(SecAggError):
    """An encrypted share bundle failed authentication (wrong key, sender, receiver,
    run, round or a tampered ciphertext)."""


class ShamirError(SecAggError):
    """Bad Shamir input: too few shares, duplicate or zero x coordinates, malformed
    share values, a threshold out of range."""


class ReconstructionError(SecAggError):
    """Shares were well formed but did not reconstruct a consistent secret."""


class QuantizationOverflow(SecAggError):
    """``sites * (levels - 1)`` does not fit the ring: the modular sum would wrap and
    the aggregate would be silently wrong."""
