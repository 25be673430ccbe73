"""Calling a handler: under its envelope's deadline, interruptible by its caller.

A handler runs in the worker task that took its message. Two things may cancel
that task while the handler runs, and each becomes the handler's outcome:

* its deadline passes (one shared timer per millisecond, :class:`Timeouts`):
  ``timeout`` (:class:`~clstr.HandlerTimeoutError`);
* its caller interrupts it (:meth:`Calls.interrupt`): ``interrupted``
  (:class:`~clstr.RequestInterruptedError`).

Any other cancellation (the node stopping, a shard moving) propagates.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from .._clock import Timeouts
from ..envelope import Envelope
from ..errors import HandlerTimeoutError, RequestInterruptedError

__all__ = ["Calls"]


class Calls:
    """Runs handlers for one node (see the module docstring)."""

    def __init__(self) -> None:
        self._timeouts: Timeouts[asyncio.Task[None]] | None = None
        # Workers cancelled for their handler's deadline, or by an interrupt.
        self._overdue: set[asyncio.Task[None]] = set()
        self._interrupted: set[asyncio.Task[None]] = set()

    async def call(
        self,
        handler: Callable[[Envelope], Awaitable[bytes | None]],
        env: Envelope,
        me: asyncio.Task[None],
    ) -> bytes | None:
        """``await handler(env)`` in worker ``me``; raises the handler's error,
        :class:`HandlerTimeoutError` past the deadline, or
        :class:`RequestInterruptedError` when interrupted."""
        deadline = env.deadline
        slot = 0
        if deadline is not None:
            # Not an asyncio.timeout (a context manager, a current_task(), a
            # timer handle and loop look-ups per message).
            timeouts = self._timeouts
            if timeouts is None:
                timeouts = self._timeouts = Timeouts(asyncio.get_running_loop(), self._overrun)
            slot = timeouts.add(deadline, me)
        try:
            return await handler(env)
        except asyncio.CancelledError:
            if me in self._overdue:
                me.uncancel()
                raise HandlerTimeoutError(
                    f"handler for {env.type!r} ran past the deadline "
                    f"({env.ttl:.3f}s TTL) and was cancelled"
                ) from None
            if me in self._interrupted:
                me.uncancel()
                raise RequestInterruptedError(
                    f"the caller interrupted {env.type!r} while its handler ran"
                ) from None
            raise
        finally:
            if deadline is not None:
                self._timeouts.discard(slot, me)  # type: ignore[union-attr]
            for cancelled in (self._overdue, self._interrupted):
                if me in cancelled:  # (also when the handler swallowed the cancellation)
                    cancelled.discard(me)
                    if me.cancelling():
                        me.uncancel()

    def interrupt(self, task: asyncio.Task[None]) -> None:
        """Cancel the handler running in ``task``: it ends ``interrupted``."""
        self._interrupted.add(task)
        task.cancel()

    def _overrun(self, task: asyncio.Task[None]) -> None:
        """A handler's deadline passed: cancel its worker."""
        self._overdue.add(task)
        task.cancel()

    def close(self) -> None:
        """Cancel the deadline timers (the node stops)."""
        if self._timeouts is not None:
            self._timeouts.close()
