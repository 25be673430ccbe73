"""Streamed replies, as handlers see them.

A request may ask for a streamed reply (``client.key(k).stream(...)``); its
handler then sends chunks to :func:`current_stream` (the node hands it one for
the length of the call) and the caller receives them in order, with flow
control: ``send`` waits while the caller has not acknowledged a window of
chunks, so a slow reader holds the handler, not the node's memory. A
:class:`~clstr.Router` route or an entity method written as an async generator
streams what it yields; called without a stream, it answers with the list of
everything it yielded.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

__all__ = ["ChunkSink", "current_stream", "reset", "stream_to", "streaming"]


class ChunkSink(Protocol):
    """Where a streaming handler sends its chunks."""

    async def send(self, data: bytes) -> None:
        """Send one chunk; waits while a window of chunks is unacknowledged.
        Raises ``CancelledError`` in the handler when the caller went away."""
        ...


_current: contextvars.ContextVar[ChunkSink | None] = contextvars.ContextVar(
    "clstr_stream", default=None
)


def current_stream() -> ChunkSink | None:
    """The stream of the request being handled, or ``None`` when its caller
    asked for one reply."""
    return _current.get()


def streaming(sink: ChunkSink | None) -> contextvars.Token[ChunkSink | None]:
    """Make ``sink`` the current stream (for the node); undo with :func:`reset`."""
    return _current.set(sink)


def reset(token: contextvars.Token[ChunkSink | None]) -> None:
    """Undo :func:`streaming`."""
    _current.reset(token)


async def stream_to(items: AsyncIterator[Any], encode: Callable[[Any], bytes]) -> bytes | None:
    """Send each of ``items`` (encoded) to the current stream and return ``None``;
    without a stream, return all of them as one msgpack list. Closes ``items``."""
    sink = _current.get()
    try:
        if sink is None:
            return encode([item async for item in items])
        async for item in items:
            await sink.send(encode(item))
        return None
    except asyncio.CancelledError:
        # Stopped while waiting to send (the caller left, the deadline passed):
        # the generator sees the cancellation at its yield, as a coroutine
        # handler sees it at its await.
        athrow = getattr(items, "athrow", None)
        if athrow is not None:
            with contextlib.suppress(BaseException):
                await athrow(asyncio.CancelledError())
        raise
    finally:
        aclose = getattr(items, "aclose", None)
        if aclose is not None:
            await aclose()
