"""Deliberate crashes at named points, for the crash-safety tests.

``FEDCOORD_CRASH_AT="point:n"`` (comma-separated for several) makes this process kill
itself with SIGKILL the ``n``-th time it reaches :func:`crash_point` ``point``: no
cleanup, no flush, exactly as ``kill -9`` or a power cut would. Unset, a crash point
costs one dictionary lookup.

Points: ``upload`` (a result stream has delivered its first chunk), ``before_commit``
(the round's model file is stored, its transaction not begun), ``in_commit`` (inside the
round's transaction, after its rows and ledger entries, before COMMIT),
``after_commit`` (committed, before the round's event is announced).
"""

from __future__ import annotations

import os
import signal
import threading

ENV = "FEDCOORD_CRASH_AT"


def _parse(text: str) -> dict[str, int]:
    points: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, count = item.partition(":")
        points[name] = int(count or 1)
    return points


_armed = _parse(os.environ.get(ENV, ""))
_lock = threading.Lock()


def crash_point(name: str) -> None:
    """Die here by SIGKILL if ``name`` is armed and this is its n-th arrival."""
    if name not in _armed:
        return
    with _lock:
        _armed[name] -= 1
        if _armed[name] == 0:
            os.kill(os.getpid(), signal.SIGKILL)
