"""Receiving a streamed reply (docs/protocol.md, Streams).

The caller subscribes to an inbox of its own, sends the request with it as the
reply subject, and reads frames in order: the header (where to acknowledge),
chunks, and an end or error frame. It acknowledges every half window of
chunks it has *consumed*, so the node sends on while the caller keeps up and
waits (its handler with it) when the caller reads slowly. Leaving early
(``break``, an exception, cancellation, the deadline) cancels the stream on
the node and drops the subscription.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncGenerator, Callable
from typing import Any

import msgpack

from .._clock import monotonic
from ..codec import Limits, encode_request
from ..envelope import Envelope
from ..errors import BadRequestError, NoShardOwnerError, RequestTimeoutError, error_for_code
from ..protocol import INTERRUPT_TYPE, fingerprint
from ..transports.base import Transport

__all__ = ["interrupt_request", "receive_stream"]


def _pack(value: dict[str, Any]) -> bytes:
    packed: bytes = msgpack.packb(value, use_bin_type=True)
    return packed


async def receive_stream(
    transport: Transport,
    subject: str,
    body: bytes,
    *,
    window: int,
    budget: float,
    limits: Limits,
    abandon: Callable[[], None],
) -> AsyncGenerator[bytes, None]:
    """Send the request ``body`` (which asks for a stream of ``window``) to
    ``subject`` and yield the chunks' payloads until the end frame; raise the
    error of an error frame, or :class:`RequestTimeoutError` when ``budget``
    seconds pass. ``abandon`` is called (to interrupt the handler) when the
    caller leaves before the node told it where to cancel."""
    frames: deque[bytes] = deque()
    arrived = asyncio.Event()

    def on_frame(data: bytes, reply: str | None) -> None:
        frames.append(data)
        arrived.set()

    inbox = transport.new_inbox()
    subscription = await transport.subscribe(inbox, on_frame)
    deadline = monotonic() + budget
    ack: tuple[str, str] | None = None  # (subject, token) to acknowledge on
    expected = consumed = acked = 0
    done = False
    try:
        await transport.publish(subject, body, reply=inbox)
        while True:
            while not frames:
                left = deadline - monotonic()
                if left <= 0:
                    raise RequestTimeoutError(
                        f"stream on {subject!r} did not end within {budget:.3f}s"
                    )
                arrived.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(left):
                        await arrived.wait()
            data = frames.popleft()
            if not data:  # the transport's "no responders": frames are never empty
                raise NoShardOwnerError(f"no node serves {subject!r} (nobody subscribes to it)")
            frame = _decode(data, limits)
            n = frame.get("n")
            if n is None:  # a node that answered with one reply: one chunk
                done = True
                yield _payload(frame)
                return
            if n != expected:
                raise BadRequestError(f"stream frame {n} arrived, {expected} was expected")
            expected += 1
            if n == 0:
                ack = (str(frame["a"]), str(frame["t"]))
                continue
            if frame.get("ok") is not True or frame.get("end") is True:
                done = True
                _payload(frame)  # raises the error frame's error
                return
            yield _payload(frame)
            consumed += 1
            if ack is not None and consumed - acked >= max(1, window // 2):
                transport.publish_nowait(ack[0], _pack({"t": ack[1], "n": consumed}))
                acked = consumed
    finally:
        if not done:
            if ack is not None:
                with contextlib.suppress(Exception):
                    transport.publish_nowait(ack[0], _pack({"t": ack[1], "c": True}))
            else:
                abandon()
        await subscription.unsubscribe()


def _decode(data: bytes, limits: Limits) -> dict[str, Any]:
    if len(data) > limits.max_message_bytes:
        raise BadRequestError(f"stream frame of {len(data)} bytes is over the limit")
    try:
        frame = msgpack.unpackb(data, raw=False)
    except Exception as exc:
        raise BadRequestError(f"stream frame is not valid msgpack: {exc}") from exc
    if not isinstance(frame, dict) or frame.get("v") != 1:
        raise BadRequestError(f"stream frame is not a v1 map: {frame!r:.80}")
    return frame


def _payload(frame: dict[str, Any]) -> bytes:
    """A frame's payload, or the error its error frame carries."""
    if frame.get("ok") is True:
        data = frame.get("d", b"")
        if not isinstance(data, bytes):
            raise BadRequestError("stream frame field 'd' must be bin")
        return data
    err = frame.get("e")
    if not isinstance(err, dict):
        raise BadRequestError("stream error frame has no error map (field 'e')")
    code, type_name, msg = (str(err.get(k, "")) for k in ("code", "type", "msg"))
    raise error_for_code(code, type_name, msg)


def interrupt_request(env: Envelope, stamp: float | None) -> bytes:
    """The body of an interrupt of ``env`` (docs/protocol.md, Interrupts): by its
    id, or by its fingerprint and ``ts`` (``stamp``, else its creation time)
    when it has none."""
    if env.id is not None:
        target: dict[str, Any] = {"id": env.id}
    else:
        ts = int((env.created_at if stamp is None else stamp) * 1000)
        target = {"fp": fingerprint(env), "ts": ts}
    message = Envelope(INTERRUPT_TYPE, _pack(target), env.shard, env.key)
    return encode_request(message)
