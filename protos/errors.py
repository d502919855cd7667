"""Errors raised while decoding what arrives over the wire."""


class PayloadError(ValueError):
    """A payload (header or chunk stream) is malformed, oversized or fails its digest."""
