"""A writer's side of the counters' exactly-once rule (see ``_entity``): its id,
its operation numbers, and the lowest one it still waits for."""

from __future__ import annotations

import base64
import heapq
import os

__all__ = ["Session"]


class Session:
    """Numbers the operations of one writer (a counter object, for its life).

    :meth:`open` hands out the next number for ``count`` messages (a flush's
    items share one); :meth:`close` says one of them has its answer (or was
    given up); :attr:`low` is the lowest number still open, sent with every
    message so that the counters can forget the replies below it.
    """

    def __init__(self) -> None:
        #: 64 random bits, base64url: unique among writers as a UUID would be.
        self.writer = base64.urlsafe_b64encode(os.urandom(8)).decode().rstrip("=")
        self._next = 1
        self._open: dict[int, int] = {}  # number -> messages still unanswered
        self._heap: list[int] = []

    def open(self, count: int = 1) -> int:
        """A new number for ``count`` messages."""
        number = self._next
        self._next += 1
        self._open[number] = count
        heapq.heappush(self._heap, number)
        return number

    def close(self, number: int) -> None:
        """One message of ``number`` is answered (or given up for good)."""
        left = self._open.get(number, 0) - 1
        if left > 0:
            self._open[number] = left
        else:
            self._open.pop(number, None)

    @property
    def low(self) -> int:
        """The lowest number still open (the next one when none is)."""
        heap = self._heap
        while heap and heap[0] not in self._open:
            heapq.heappop(heap)
        return heap[0] if heap else self._next
