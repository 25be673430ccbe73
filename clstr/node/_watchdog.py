"""Event-loop stall detection: one loop timer that measures how late it fires.

asyncio cannot preempt a callback: a handler that computes, or calls
something blocking, holds the whole loop (every key, every reply, every
heartbeat) until it returns. Nothing inside the loop can see that while it
happens, but it can tell afterwards: a timer due every ``interval`` seconds
that fires ``d`` seconds late means the loop did not get back to its timers
for ``d`` seconds.

The watchdog is a single :class:`asyncio.TimerHandle` at a time, re-armed by
its own callback: no task, no thread, about ``1 / interval`` callbacks a
second. Its owner starts and stops it (:meth:`LoopWatchdog.start`,
:meth:`LoopWatchdog.stop`); a stopped watchdog leaves nothing scheduled.

What it reports is a lower bound: a stall of ``B`` seconds shows as a
lateness between ``B - interval`` and ``B``. So a stall shorter than
``threshold`` is never reported and one longer than ``threshold +
interval`` always is. The report comes once the loop runs again, after the
stall, never during it.

It measures the loop's own clock (``loop.time()``): on virtual time
(:mod:`clstr.testing`) it sees the virtual clock, which real blocking does
not move, so it reports nothing there.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Final

import structlog

from ..errors import ConfigurationError, LifecycleError

__all__ = ["DEFAULT_STALL_THRESHOLD", "LoopWatchdog", "StallCallback"]

#: Lateness, in seconds, past which a loop stall is reported by default.
DEFAULT_STALL_THRESHOLD: Final = 0.1
# The longest tick by default: a timer 10 times a second costs nothing measurable.
_MAX_INTERVAL: Final = 0.1

#: Called with the stall's duration in seconds (the timer's lateness), on the
#: loop, right after the stall ended. Its return value is ignored.
StallCallback = Callable[[float], object]

_log = structlog.get_logger("clstr.watchdog")


class LoopWatchdog:
    """Reports event-loop stalls longer than ``threshold`` seconds to ``on_stall``.

    A timer due every ``interval`` seconds (default: half the threshold, at
    most 0.1 s) checks how late it fired; past ``threshold`` it calls
    ``on_stall(lateness)``. An exception raised by ``on_stall`` is logged
    (``"stall callback raised"``) and the watchdog goes on.

    Raises :class:`~clstr.ConfigurationError` when ``threshold`` or
    ``interval`` is not a positive number.
    """

    __slots__ = (
        "_due",
        "_handle",
        "_loop",
        "interval",
        "longest",
        "on_stall",
        "stalled",
        "stalls",
        "threshold",
    )

    def __init__(
        self,
        on_stall: StallCallback,
        *,
        threshold: float = DEFAULT_STALL_THRESHOLD,
        interval: float | None = None,
    ) -> None:
        if not threshold > 0:
            raise ConfigurationError(f"threshold must be > 0 seconds, got {threshold!r}")
        if interval is None:
            interval = min(threshold / 2, _MAX_INTERVAL)
        elif not interval > 0:
            raise ConfigurationError(f"interval must be > 0 seconds, got {interval!r}")
        self.on_stall = on_stall
        self.threshold = float(threshold)
        self.interval = float(interval)
        #: Stalls reported since construction.
        self.stalls = 0
        #: Their total duration, and the longest one, in seconds.
        self.stalled = 0.0
        self.longest = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._due = 0.0

    @property
    def running(self) -> bool:
        """Whether the watchdog's timer is armed."""
        return self._handle is not None

    def start(self) -> None:
        """Arm the timer on the running loop.

        Raises :class:`~clstr.LifecycleError` when it is running already, and
        :class:`RuntimeError` outside a running loop. A stopped watchdog may
        start again.
        """
        if self._handle is not None:
            raise LifecycleError("the loop watchdog is running already; stop() it first")
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._arm(loop.time())

    def stop(self) -> None:
        """Cancel the timer; nothing of the watchdog stays scheduled. Idempotent."""
        handle, self._handle = self._handle, None
        if handle is not None:
            handle.cancel()

    def _arm(self, now: float) -> None:
        assert self._loop is not None
        self._due = now + self.interval
        self._handle = self._loop.call_at(self._due, self._tick)

    def _tick(self) -> None:
        assert self._loop is not None
        now = self._loop.time()
        late = now - self._due
        # Re-armed first: the callback may raise, or stop the watchdog.
        self._arm(now)
        if late > self.threshold:
            self.stalls += 1
            self.stalled += late
            self.longest = max(self.longest, late)
            try:
                self.on_stall(late)
            except Exception as exc:
                _log.error("stall callback raised", error=repr(exc), exc_info=True)
