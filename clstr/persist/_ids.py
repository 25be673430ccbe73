"""Request ids of persisted messages: one function, so that it can become a
snowflake (``clstr.ids``) in one place."""

from __future__ import annotations

import itertools
import os
import threading

__all__ = ["new_request_id"]


class _RequestIds:
    """64-bit ids as decimal strings: a random 31-bit part per generator, then a
    32-bit counter that starts at a random point (below 2^63, so an id fits a
    signed 64-bit integer in any language)."""

    def __init__(self) -> None:
        self._high = int.from_bytes(os.urandom(4), "big") >> 1 << 32
        self._count = itertools.count(int.from_bytes(os.urandom(4), "big"))

    def next_id(self) -> str:
        return str(self._high | (next(self._count) & 0xFFFF_FFFF))


_ids: _RequestIds | None = None
_ids_lock = threading.Lock()


def _forget_ids() -> None:
    # A forked child must not go on with its parent's counter.
    global _ids
    _ids = None


os.register_at_fork(after_in_child=_forget_ids)


def new_request_id() -> str:
    """A new request id for a persisted message: unique across the cluster's
    senders (a 64-bit integer in decimal).

    The one place ids are made: it becomes a snowflake (``clstr.ids``) once
    every sender has one.
    """
    global _ids
    if _ids is None:
        with _ids_lock:
            if _ids is None:
                _ids = _RequestIds()
    return _ids.next_id()
