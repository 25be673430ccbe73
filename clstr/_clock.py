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
