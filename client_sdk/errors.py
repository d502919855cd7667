"""Errors a site can meet; each reaches the user as one clear line."""


class SiteError(Exception):
    """Base class of client SDK errors."""


class CoordinatorUnavailable(SiteError):
    """The coordinator could not be reached within the retry budget."""


class TaskRejected(SiteError):
    """The coordinator refused a result (e.g. the task had expired)."""


class ClientError(SiteError):
    """The site's own Client raised or returned something unusable."""


class LocalBudgetExhausted(ClientError):
    """A fit would take the site's local DP epsilon past its budget; nothing was trained."""
