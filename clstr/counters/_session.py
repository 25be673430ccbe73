"""A writer's side of the counters' exactly-once rule (see ``_entity``): its id,
its operation numbers, and per key the lowest one it still waits for.

Every writer leaves a session in the record of each key it writes, kept for
up to :data:`~clstr.counters.WRITER_TTL`: so writers are few and long-lived.
The :class:`~clstr.counters.StrictCounter` objects of one transport and
namespace share one (:func:`shared_session`): a process that makes a counter
object per request still writes each key as one writer.
"""

from __future__ import annotations

import base64
import os
import weakref
from collections.abc import Iterable

__all__ = ["Session", "shared_session"]


class Session:
    """Numbers the operations of one writer.

    :meth:`open` hands out the next number for one message to each of some keys
    (a flush's items share one); :meth:`close` says the message of a key has its
    answer (or was given up); :meth:`low` is the lowest number still open on a
    key, sent with every message to it so that the key can forget the replies
    below it. Per key: a message that waits long on one key (its owner is
    down) does not make the records of the writer's other keys grow.
    """

    def __init__(self) -> None:
        #: 64 random bits, base64url: unique among writers as a UUID would be.
        self.writer = base64.urlsafe_b64encode(os.urandom(8)).decode().rstrip("=")
        self._next = 1
        self._open: dict[str, dict[int, int]] = {}  # key -> number -> messages unanswered

    def open(self, keys: Iterable[str]) -> int:
        """A new number for one message to each of ``keys``."""
        number = self._next
        self._next += 1
        for key in keys:
            numbers = self._open.setdefault(key, {})
            numbers[number] = numbers.get(number, 0) + 1
        return number

    def close(self, key: str, number: int) -> None:
        """The message of ``number`` to ``key`` is answered (or given up for good)."""
        numbers = self._open.get(key)
        if numbers is None:
            return
        left = numbers.get(number, 0) - 1
        if left > 0:
            numbers[number] = left
        else:
            numbers.pop(number, None)
            if not numbers:
                del self._open[key]

    def low(self, key: str) -> int:
        """The lowest number still open on ``key`` (the next one when none is)."""
        numbers = self._open.get(key)
        return min(numbers) if numbers else self._next


# One session per transport and namespace; it goes with its transport.
_shared: weakref.WeakKeyDictionary[object, dict[str, Session]] = weakref.WeakKeyDictionary()


def shared_session(transport: object, namespace: str) -> Session:
    """The writer session of ``namespace``'s strict counters on ``transport``."""
    sessions = _shared.setdefault(transport, {})
    session = sessions.get(namespace)
    if session is None:
        session = sessions[namespace] = Session()
    return session
