"""Cancelling tasks and waiting for them (one place for it)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any


async def cancel_and_wait(
    tasks: Iterable[asyncio.Task[Any]], grace: float | None = None
) -> set[asyncio.Task[Any]]:
    """Cancel ``tasks`` and wait up to ``grace`` seconds (``None``: no bound) for
    them to end; return those still running. Our own cancellation is never
    swallowed.

    A task may go on after one cancellation: on Python 3.11
    ``asyncio.wait_for`` (nats-py's ``request`` uses it) returns a result that
    arrived in the same loop turn instead of raising. Loops that must end
    therefore also check a flag of their own.
    """
    pending = {t for t in tasks if not t.done()}
    for task in pending:
        task.cancel()
    if not pending:
        return set()
    _, stuck = await asyncio.wait(pending, timeout=grace)
    return stuck
