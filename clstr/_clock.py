"""The one monotonic clock deadlines are measured on.

Deadlines are compared with ``asyncio.timeout`` (the event loop's clock), so
they are kept on that clock too: ``loop.time()`` inside a running loop (a test
loop may run on virtual time), ``time.monotonic()`` outside one (the default
loop's own clock).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, Generic, TypeVar

__all__ = ["Timeouts", "expire", "monotonic"]


#: How many virtual-time loops (clstr.testing) run now. While none does, every
#: loop's clock is time.monotonic() and no running-loop look-up is needed: on
#: CPython 3.11 each asyncio.get_running_loop() makes a getpid() system call.
#: (uvloop's loop.time() is the same clock, read once per loop turn in whole ms.)
_virtual_loops = 0


def monotonic() -> float:
    """Seconds on the running event loop's clock, or ``time.monotonic()`` without a loop."""
    if not _virtual_loops:
        return time.monotonic()
    try:
        return asyncio.get_running_loop().time()
    except RuntimeError:
        return time.monotonic()


T = TypeVar("T")


class Timeouts(Generic[T]):
    """Items that time out at a deadline (loop time), with one loop timer per
    millisecond in use instead of one per item.

    A ``call_at`` per message (a handle, a heap push, a cancel and the heap
    clean-up) was a tenth of the request path. Here an item joins the set of
    its millisecond; one timer per millisecond fires the items still in it.
    Items fire up to 1 ms after their deadline, never before it.

    A millisecond whose items all finished keeps its timer (cancelling it
    would cost what this saves) unless more than ``max_timers`` are live:
    then it is cancelled, so that long deadlines under steady traffic (an
    hour: 3.6 million milliseconds) cannot pile up idle timers.
    """

    __slots__ = ("_fire", "_max_timers", "_slots", "_timers", "loop")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        fire: Callable[[T], object],
        *,
        max_timers: int = 10_000,
    ) -> None:
        self.loop = loop
        self._fire = fire
        self._max_timers = max_timers
        self._slots: dict[int, set[T]] = {}
        self._timers: dict[int, asyncio.TimerHandle] = {}

    def add(self, deadline: float, item: T) -> int:
        """Fire ``item`` at ``deadline``; returns the slot to :meth:`discard` it from."""
        slot = -int(-deadline * 1000.0 // 1)  # ceil, without a math look-up
        items = self._slots.get(slot)
        if items is None:
            self._slots[slot] = {item}
            self._timers[slot] = self.loop.call_at(slot / 1000.0, self._expire, slot)
        else:
            items.add(item)
        return slot

    def discard(self, slot: int, item: T) -> None:
        """Do not fire ``item`` (it finished in time)."""
        items = self._slots.get(slot)
        if items is not None:
            items.discard(item)
            if not items and len(self._timers) > self._max_timers:
                del self._slots[slot]
                self._timers.pop(slot).cancel()

    def __len__(self) -> int:
        """How many loop timers are live."""
        return len(self._timers)

    def close(self) -> None:
        """Cancel every timer: nothing fires any more."""
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        self._slots.clear()

    def _expire(self, slot: int) -> None:
        self._timers.pop(slot, None)
        for item in self._slots.pop(slot, ()):
            self._fire(item)


def expire(future: asyncio.Future[Any]) -> None:
    """Fail ``future`` with ``TimeoutError`` unless it is done (a request's timeout)."""
    if not future.done():
        future.set_exception(TimeoutError())
