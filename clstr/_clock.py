"""The one monotonic clock deadlines are measured on.

Deadlines are compared with ``asyncio.timeout`` (the event loop's clock), so
they are kept on that clock too: ``loop.time()`` inside a running loop (a test
loop may run on virtual time), ``time.monotonic()`` outside one (the default
loop's own clock).
"""

from __future__ import annotations

import asyncio
import time

__all__ = ["monotonic"]


def monotonic() -> float:
    """Seconds on the running event loop's clock, or ``time.monotonic()`` without a loop."""
    try:
        return asyncio.get_running_loop().time()
    except RuntimeError:
        return time.monotonic()
