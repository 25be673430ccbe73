"""Calling a handler: under its envelope's deadline, interruptible by its caller.

A handler runs in the worker task that took its message (the node awaits it
between :meth:`Calls.begin` and :meth:`Calls.end`). Two things may cancel
that task while the handler runs, and each becomes the handler's outcome:

* its deadline passes (one shared timer per millisecond, :class:`Timeouts`):
  ``timeout`` (:class:`~clstr.HandlerTimeoutError`);
* its caller interrupts it (:meth:`Calls.interrupt`): ``interrupted``
  (:class:`~clstr.RequestInterruptedError`).

Any other cancellation (the node stopping, a shard moving) propagates.
"""

from __future__ import annotations

import asyncio
from typing import Final

import structlog

from .._clock import Timeouts
from .._tasks import cancel_and_wait
from ..envelope import Envelope
from ..errors import HandlerTimeoutError, RequestError, RequestInterruptedError

__all__ = ["Calls", "cancel_tasks"]

# How long cancelled handlers get to end before stop (or a handoff) goes on
# without them: stop() returns within stop_timeout plus twice this.
_CANCEL_GRACE: Final = 1.0


class Calls:
    """Runs handlers for one node (see the module docstring)."""

    def __init__(self) -> None:
        self._timeouts: Timeouts[asyncio.Task[None]] | None = None
        # Workers cancelled for their handler's deadline, or by an interrupt.
        self._overdue: set[asyncio.Task[None]] = set()
        self._interrupted: set[asyncio.Task[None]] = set()

    def begin(self, env: Envelope, me: asyncio.Task[None]) -> int:
        """Start ``env``'s deadline for the handler about to run in worker ``me``;
        returns the slot to give :meth:`end` (0: no deadline).

        Not a coroutine wrapping the handler (a frame per message): the node
        awaits the handler itself, between :meth:`begin` and :meth:`end`, and
        asks :meth:`outcome` what a cancellation stands for."""
        deadline = env.deadline
        if deadline is None:
            return 0
        # Not an asyncio.timeout (a context manager, a current_task(), a timer
        # handle and loop look-ups per message).
        timeouts = self._timeouts
        if timeouts is None:
            timeouts = self._timeouts = Timeouts(asyncio.get_running_loop(), self._overrun)
        return timeouts.add(deadline, me)

    def outcome(self, env: Envelope, me: asyncio.Task[None]) -> RequestError | None:
        """What a ``CancelledError`` in worker ``me``'s handler stands for:
        :class:`HandlerTimeoutError` past the deadline,
        :class:`RequestInterruptedError` when interrupted, ``None`` otherwise
        (the node stopping, a shard moving: let it propagate)."""
        if me in self._overdue:
            me.uncancel()
            return HandlerTimeoutError(
                f"handler for {env.type!r} ran past the deadline "
                f"({env.ttl:.3f}s TTL) and was cancelled"
            )
        if me in self._interrupted:
            me.uncancel()
            return RequestInterruptedError(
                f"the caller interrupted {env.type!r} while its handler ran"
            )
        return None

    def end(self, slot: int, me: asyncio.Task[None]) -> None:
        """The handler of worker ``me`` returned or raised: stop its deadline."""
        if slot:
            self._timeouts.discard(slot, me)  # type: ignore[union-attr]
        if self._overdue or self._interrupted:
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


async def cancel_tasks(tasks: list[asyncio.Task[None]], grace: float = _CANCEL_GRACE) -> None:
    """Cancel ``tasks`` and wait up to ``grace`` seconds for them to end, without
    swallowing our own cancellation. A task still running then (a handler that
    catches CancelledError and goes on) is logged and left to finish on its own:
    asyncio cannot force it, and waiting for it would hang ``stop`` forever."""
    stuck = await cancel_and_wait(tasks, grace)
    if stuck:
        structlog.get_logger("clstr.node").error(
            "tasks ignored cancellation; left running (a handler catches CancelledError?)",
            tasks=sorted(t.get_name() for t in stuck),
            grace=grace,
        )
