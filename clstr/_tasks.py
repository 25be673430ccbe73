"""Cancelling tasks and waiting for them (one place for it)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any, Final

#: How long ``insist`` waits before cancelling a task that went on again.
_RECANCEL_AFTER: Final = 0.1


async def cancel_and_wait(
    tasks: Iterable[asyncio.Task[Any]], grace: float | None = None, *, insist: bool = False
) -> set[asyncio.Task[Any]]:
    """Cancel ``tasks`` and wait up to ``grace`` seconds (``None``: no bound) for
    them to end; return those still running. Our own cancellation is never
    swallowed.

    A task may go on after one cancellation: on Python 3.11
    ``asyncio.wait_for`` (nats-py's ``request`` uses it) returns a result that
    arrived in the same loop turn instead of raising. With ``insist`` the
    cancellation is repeated every 0.1 s until the task ends (for clstr's own
    tasks; a user's handler gets one, as ``asyncio.timeout`` gives).
    """
    pending = {t for t in tasks if not t.done()}
    loop = asyncio.get_running_loop()
    deadline = None if grace is None else loop.time() + grace
    while pending:
        for task in pending:
            task.cancel()
        wait = None if deadline is None else deadline - loop.time()
        if insist:
            wait = _RECANCEL_AFTER if wait is None else min(wait, _RECANCEL_AFTER)
        if wait is not None and wait <= 0:
            break
        _, pending = await asyncio.wait(pending, timeout=wait)
        if not insist:
            break
    return pending
