"""Small helpers shared by the tests."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


async def eventually(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait until ``predicate()`` holds, checking once per loop turn; fail after ``timeout``.

    For conditions that have no event to wait on (a node's queue length).
    """
    async with asyncio.timeout(timeout):
        while not predicate():  # noqa: ASYNC110 - these conditions have no event to await
            await asyncio.sleep(0.001)
