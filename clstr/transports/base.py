"""The transport seam: a transport moves bytes on subjects, nothing more.

TTL, deadlines, ordering, concurrency limits, retries and error mapping live
in :class:`~clstr.Client` and :class:`~clstr.Node`, once, so the memory and
NATS transports cannot drift apart.
"""

from __future__ import annotations

import abc
import enum
import os
from collections.abc import Callable
from types import TracebackType
from typing import Self

__all__ = ["ConnectionEvent", "ConnectionListener", "MessageCallback", "Subscription", "Transport"]

#: Called once per delivered message with its bytes and its reply subject
#: (``None`` for a publish without reply). It must not block: it runs on the
#: transport's delivery path.
MessageCallback = Callable[[bytes, str | None], None]


class ConnectionEvent(enum.Enum):
    """What happened to a transport's connection to the messaging system."""

    DISCONNECTED = "disconnected"
    RECONNECTED = "reconnected"
    CLOSED = "closed"


#: Called (synchronously, must not block) when the connection changes state.
ConnectionListener = Callable[[ConnectionEvent], None]


class Subscription(abc.ABC):
    """Interest in one subject, as returned by :meth:`Transport.subscribe`."""

    subject: str

    @abc.abstractmethod
    async def drain(self) -> None:
        """Stop receiving new messages and deliver those already received."""

    @abc.abstractmethod
    async def unsubscribe(self) -> None:
        """Stop receiving at once; messages not yet delivered are dropped."""


class Transport(abc.ABC):
    """Moves bytes: request/reply and publish for clients, queue-group
    subscriptions for nodes. Use as an async context manager or call
    :meth:`close`.
    """

    @property
    @abc.abstractmethod
    def max_payload(self) -> int:
        """The largest message body, in bytes, the transport accepts."""

    @abc.abstractmethod
    async def request(self, subject: str, data: bytes, timeout: float) -> bytes:
        """Send ``data`` to one subscriber of ``subject`` and return its reply.

        Raises :class:`~clstr.NoShardOwnerError` at once when nobody listens
        (NATS "no responders"), :class:`~clstr.RequestTimeoutError` when no
        reply comes within ``timeout`` seconds, and
        :class:`~clstr.TransportClosedError` once closed.
        """

    @abc.abstractmethod
    async def publish(self, subject: str, data: bytes, *, reply: str | None = None) -> None:
        """Send ``data`` without waiting for anything (fire and forget); only
        waits while the transport's outgoing buffer is full. ``reply`` sets the
        message's reply subject (a stream's inbox, say). When nobody subscribes
        to ``subject``, the ``reply`` subject gets one empty message instead, as
        nats-server answers a publish that finds no responders."""

    def new_inbox(self) -> str:
        """A subject nobody else uses, to :meth:`subscribe` to for replies that
        come as several messages (a streamed reply)."""
        return f"_INBOX.{os.urandom(12).hex()}"

    @abc.abstractmethod
    def publish_nowait(self, subject: str, data: bytes) -> None:
        """Queue ``data`` for ``subject`` and return at once, never waiting
        (nodes send their replies with it, from the delivery path). Messages
        go out in the order they were queued, with those of :meth:`publish`.
        Raises like :meth:`publish`."""

    @abc.abstractmethod
    async def subscribe(
        self, subject: str, callback: MessageCallback, *, queue: str | None = None
    ) -> Subscription:
        """Deliver messages on ``subject`` to ``callback``.

        Subscribers sharing a ``queue`` group each get a share of the
        messages, every message going to exactly one of them. Returns only
        once the subscription is known to the server, so a message sent after
        it returns reaches the callback.
        """

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop all subscriptions and fail pending requests. Idempotent."""

    def add_listener(self, listener: ConnectionListener) -> None:
        """Call ``listener`` on every connection state change (see :class:`ConnectionEvent`).

        Nodes use it to stop handling at once when the connection drops (a
        stale owner must not answer after reconnecting before it re-checks).
        """
        self._listeners().append(listener)

    def remove_listener(self, listener: ConnectionListener) -> None:
        """Stop calling ``listener``."""
        listeners = self._listeners()
        if listener in listeners:
            listeners.remove(listener)

    def _listeners(self) -> list[ConnectionListener]:
        listeners: list[ConnectionListener] | None = self.__dict__.get("_connection_listeners")
        if listeners is None:
            listeners = self.__dict__["_connection_listeners"] = []
        return listeners

    def _notify(self, event: ConnectionEvent) -> None:
        """Tell every listener about ``event`` (for transport implementations)."""
        for listener in list(self._listeners()):
            listener(event)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
