"""Log records with run, round and site context; plain text or one JSON object a line.

The engine and the gRPC layer set the context with :func:`log_context` (a
``contextvars`` variable, so each thread, and each task of a thread, sees its own);
:class:`ContextFilter` copies it onto every record a handler emits.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections.abc import Hashable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, TextIO

FIELDS = ("run_id", "round", "site_id")
"""Context keys a record may carry, in the order they are shown."""
FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(context)s%(message)s"

_EMPTY: Mapping[str, Any] = MappingProxyType({})
_context: ContextVar[Mapping[str, Any]] = ContextVar("fedcoord_log_context", default=_EMPTY)


@contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    """Add ``fields`` (``run_id``, ``round``, ``site_id``; ``None`` values are left out)
    to the records logged inside the block."""
    known = {k: v for k, v in fields.items() if v is not None}
    token = _context.set(MappingProxyType({**_context.get(), **known}))
    try:
        yield
    finally:
        _context.reset(token)


def current_context() -> dict[str, Any]:
    return dict(_context.get())


def context_label(context: Mapping[str, Any]) -> str:
    """``"[<run> round <n> site <s>] "`` for the known parts, or ``""``."""
    parts = []
    if "run_id" in context:
        parts.append(str(context["run_id"]))
    if "round" in context:
        parts.append(f"round {context['round']}")
    if "site_id" in context:
        parts.append(f"site {context['site_id']}")
    return f"[{' '.join(parts)}] " if parts else ""


class ContextFilter(logging.Filter):
    """Puts the current context on each record (``record.run_id`` etc., ``None`` when
    unknown; values passed with ``extra=`` win) and ``record.context`` for text."""

    def filter(self, record: logging.LogRecord) -> bool:
        context = dict(_context.get())
        for key in FIELDS:
            value = getattr(record, key, None)
            if value is None:
                value = context.get(key)
            setattr(record, key, value)
            if value is not None:
                context[key] = value
        record.context = context_label(context)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``time`` (UTC, ISO 8601), ``level``, ``logger``,
    ``message``, the known context fields and ``exception`` when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in FIELDS:
            value = getattr(record, key, None)
            if value is not None:
                out[key] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def make_handler(fmt: str = "text", stream: TextIO | None = None) -> logging.Handler:
    """A stream handler with the context filter and the ``text`` or ``json`` format."""
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(ContextFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    return handler


def configure(level: int = logging.INFO, fmt: str = "text") -> None:
    """Log to stderr in ``fmt`` (does nothing when the root logger already has handlers,
    like :func:`logging.basicConfig`)."""
    logging.basicConfig(level=level, handlers=[make_handler(fmt)])


class LogThrottle:
    """Says whether a message with a given key may be logged: at most once per key every
    ``every_s`` seconds, so a flood of refusals does not flood the log too."""

    def __init__(self, every_s: float = 10.0, max_keys: int = 10_000):
        self.every_s = every_s
        self.max_keys = max_keys
        self._last: dict[Hashable, float] = {}
        self._lock = threading.Lock()

    def allow(self, key: Hashable) -> bool:
        now = time.monotonic()
        with self._lock:
            if len(self._last) > self.max_keys:
                self._last.clear()
            if now - self._last.get(key, -self.every_s) < self.every_s:
                return False
            self._last[key] = now
            return True
