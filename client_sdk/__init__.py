"""What a data site embeds: the Client API and the connection loop (``run_site``)."""

from client_sdk.api import Arrays, Client, Config, EvaluateResult, FitResult
from client_sdk.connection import run_site

__all__ = ["Arrays", "Client", "Config", "EvaluateResult", "FitResult", "run_site"]
