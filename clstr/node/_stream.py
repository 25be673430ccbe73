"""Streamed replies, as a node sends them (docs/protocol.md, Streams).

A request with ``s`` (a window, > 0) and a reply subject gets frames on that
subject instead of one reply: a header (``n`` 0, naming the subject and token
its caller acknowledges with), chunks ``n`` 1, 2, ..., and an end or an error
frame. The caller acknowledges the chunks it has consumed (``{t, n}``) or
cancels (``{t, c: true}``) on the node's ack subject; the node never has more
than a window of chunks unacknowledged, so :meth:`StreamWriter.send` waits
(and with it the handler) while the caller reads slowly.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from typing import Any, Final

import msgpack
import structlog

from ..codec import WIRE_VERSION
from ..envelope import Envelope
from ..errors import ReplyTooLargeError
from ..transports.base import Subscription, Transport

__all__ = ["StreamWriter", "Streams"]

# Bytes a chunk frame adds to its data (msgpack map, keys, sequence number).
_FRAME_OVERHEAD: Final = 32


def _pack(frame: dict[str, Any]) -> bytes:
    packed: bytes = msgpack.packb(frame, use_bin_type=True)
    return packed


class StreamWriter:
    """One streamed reply: frames to its caller's inbox, under the caller's credit."""

    def __init__(
        self,
        transport: Transport,
        inbox: str,
        window: int,
        token: str,
        cancel: Callable[[], None],
    ) -> None:
        self._transport = transport
        self._inbox = inbox
        self.window = window
        self.token = token
        self._cancel = cancel
        self.sent = 0
        self.acked = 0
        self._credit = asyncio.Event()
        self.cancelled = False

    async def send(self, data: bytes) -> None:
        """Send one chunk; wait while ``window`` chunks are unacknowledged."""
        while self.sent - self.acked >= self.window:
            self._credit.clear()
            await self._credit.wait()
        limit = self._transport.max_payload
        if len(data) + _FRAME_OVERHEAD > limit:
            raise ReplyTooLargeError(
                f"a chunk of {len(data)} bytes is over the max_payload of {limit} bytes; "
                "send smaller chunks"
            )
        self.sent += 1
        frame = {"v": WIRE_VERSION, "ok": True, "n": self.sent, "d": bytes(data)}
        self._transport.publish_nowait(self._inbox, _pack(frame))

    def header(self, ack_subject: str) -> None:
        """Tell the caller where to acknowledge (frame 0)."""
        frame = {"v": WIRE_VERSION, "ok": True, "n": 0, "a": ack_subject, "t": self.token}
        self._transport.publish_nowait(self._inbox, _pack(frame))

    def finish(self, reply: bytes | None, data: bytes) -> None:
        """End the stream after the handler: ``reply`` is the one-reply body the
        node would have sent (an error's frame carries it; ``data``, what a raw
        handler returned, goes out as a last chunk)."""
        if self.cancelled:
            return
        try:
            body = msgpack.unpackb(reply, raw=False) if reply else {"ok": True}
            if body.get("ok") is True:
                if data:
                    self.sent += 1
                    last = {"v": WIRE_VERSION, "ok": True, "n": self.sent, "d": data}
                    self._transport.publish_nowait(self._inbox, _pack(last))
                frame: dict[str, Any] = {"v": WIRE_VERSION, "ok": True, "end": True}
            else:
                frame = {"v": WIRE_VERSION, "ok": False, "e": body.get("e")}
            frame["n"] = self.sent + 1
            self._transport.publish_nowait(self._inbox, _pack(frame))
        except Exception as exc:  # the caller may be gone: nothing waits on this
            structlog.get_logger("clstr.node").debug("cannot end stream", error=repr(exc))

    def acked_upto(self, n: int) -> None:
        if n > self.acked:
            self.acked = min(n, self.sent)
            self._credit.set()

    def cancel(self) -> None:
        """The caller stopped reading: stop the handler."""
        if not self.cancelled:
            self.cancelled = True
            self._cancel()


class Streams:
    """The streamed replies a node sends now, and the one subject their callers
    acknowledge on (subscribed when the first stream opens)."""

    def __init__(self, transport: Transport) -> None:
        self._transport = transport
        self._subject: str | None = None
        self._subscription: Subscription | None = None
        self._writers: dict[str, StreamWriter] = {}
        self._tokens = itertools.count(1)
        self._log = structlog.get_logger("clstr.node")

    async def open(self, env: Envelope, inbox: str, cancel: Callable[[], None]) -> StreamWriter:
        """A writer for ``env``'s streamed reply to ``inbox``; ``cancel`` stops its
        handler when the caller cancels."""
        if self._subscription is None:
            subject = self._transport.new_inbox()
            self._subscription = await self._transport.subscribe(subject, self._on_ack)
            self._subject = subject
        assert self._subject is not None
        token = str(next(self._tokens))
        writer = StreamWriter(self._transport, inbox, env.stream, token, cancel)
        self._writers[token] = writer
        writer.header(self._subject)
        return writer

    def close_stream(self, writer: StreamWriter) -> None:
        """Forget ``writer`` (its handler is done)."""
        self._writers.pop(writer.token, None)

    def _on_ack(self, data: bytes, reply: str | None) -> None:
        try:
            ack = msgpack.unpackb(data, raw=False, max_str_len=64, max_bin_len=0)
            writer = self._writers.get(str(ack["t"]))
            if writer is None:
                return
            if ack.get("c") is True:
                writer.cancel()
            elif isinstance(ack.get("n"), int):
                writer.acked_upto(ack["n"])
        except Exception as exc:
            self._log.debug("ignoring malformed stream ack", error=repr(exc))

    async def close(self) -> None:
        """Stop listening for acks (the node stops)."""
        for writer in list(self._writers.values()):
            writer.cancel()
        self._writers.clear()
        if self._subscription is not None:
            subscription, self._subscription = self._subscription, None
            await subscription.unsubscribe()
