"""Errors a user can cause at the coordinator; each reaches the user as one clear line."""

from __future__ import annotations


class CoordinatorError(Exception):
    """Base class of coordinator errors."""


class ConfigError(CoordinatorError):
    """An experiment file, override or task option is invalid.

    ``key`` is the dotted path of the offending setting (e.g. ``federation.sites``).
    """

    def __init__(self, key: str, message: str):
        self.key = key
        self.message = message
        super().__init__(f"{key}: {message}" if key else message)


class UnknownRun(CoordinatorError):
    """No run with the given id exists."""


class UnknownSite(CoordinatorError):
    """A request names a site that is not enrolled."""


class QuorumNotReached(CoordinatorError):
    """A round ended at its deadline with fewer accepted results than ``min_sites``."""


class LedgerError(CoordinatorError):
    """The ledger or a model file does not verify; the message names the first bad item."""
