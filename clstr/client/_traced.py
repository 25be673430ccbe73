"""The client's traced paths: trace context into an envelope's headers, and a
stream under one span (docs/observability.md, Tracing).

Only a client with a real :class:`~clstr.tracing.Tracing` comes here; the
untraced paths never do.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Callable

from ..codec import Limits, check_limits
from ..envelope import Envelope, _envelope
from ..errors import LimitExceededError
from ..tracing import CallSpan, Tracing

__all__ = ["traced_stream", "with_trace"]


def with_trace(env: Envelope, span: CallSpan, attempt: int, limits: Limits) -> Envelope:
    """``env`` with ``span``'s trace headers for ``attempt`` added (the reserved
    names are clstr's own: no user check). The headers' limits count them: when
    they would break one, ``env`` goes as it is, untraced, and the span says so
    (tracing never makes a call fail)."""
    extra = span.headers(attempt)
    if not extra:
        return env
    headers = {**env.headers, **extra} if env.headers else dict(extra)
    traced = _envelope(
        env.type,
        env.data,
        env.shard,
        env.key,
        headers,
        env.ttl,
        env.created_at,
        env.id,
        env.deadline,
        env.stream,
    )
    try:
        check_limits(traced, limits)
    except LimitExceededError as exc:
        span.event("clstr.trace_context_dropped", {"clstr.reason": str(exc)})
        return env
    return traced


async def traced_stream(
    tracing: Tracing,
    env: Envelope,
    frames: Callable[[bytes], AsyncGenerator[bytes, None]],
    encode: Callable[[Envelope], bytes],
    limits: Limits,
) -> AsyncGenerator[bytes, None]:
    """Yield the chunks of ``frames(<env encoded with its trace context>)`` under
    one ``stream`` span that covers the whole stream; the caller leaving early
    (which interrupts the handler) is the span's ``clstr.interrupt`` event."""
    span = tracing.start_call("stream", env.type, env.shard, env.key)
    error: BaseException | None = None
    chunks = 0
    try:
        async with contextlib.aclosing(frames(encode(with_trace(env, span, 1, limits)))) as stream:
            async for chunk in stream:
                chunks += 1
                yield chunk
    except (GeneratorExit, asyncio.CancelledError) as exc:
        span.event("clstr.interrupt", {"clstr.chunks": chunks})
        error = exc if isinstance(exc, asyncio.CancelledError) else None
        raise
    except BaseException as exc:
        error = exc
        raise
    finally:
        span.end(error)
