"""Errors raised by the aggregation numerics."""

from __future__ import annotations


class InvalidUpdate(ValueError):
    """A site's update failed validation; ``reason`` is a short machine-readable tag.

    Reasons: ``missing_tensor``, ``unexpected_tensor``, ``dtype_mismatch``,
    ``shape_mismatch``, ``non_finite``, ``bad_weight``, ``norm_bound``.
    """

    def __init__(self, reason: str, detail: str):
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


class InsufficientUpdates(ValueError):
    """A round's accepted updates are too few for the strategy's rule (e.g. Krum with f
    Byzantine sites needs n >= 2f + 3); the round is not committed."""
