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
