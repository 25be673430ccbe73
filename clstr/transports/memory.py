"""In-process transport that behaves like NATS: for tests and local clusters.

Every message is still bytes (the codec runs as it does over NATS), delivery
is asynchronous (scheduled on the event loop, never inline), a queue group
hands each message to one member in turn, a request to a subject nobody
listens on fails at once with :class:`~clstr.NoShardOwnerError`, and a
closed transport fails its pending requests.

Several transports share one :class:`MemoryNetwork`, the way several NATS
connections share one server: ``MemoryTransport()`` makes a network of its
own, ``transport.connect(name)`` returns another transport on the same one.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Final

from ..errors import (
    LimitExceededError,
    NoShardOwnerError,
    RequestTimeoutError,
    TransportClosedError,
)
from .base import ConnectionEvent, MessageCallback, Subscription, Transport

__all__ = ["MemoryNetwork", "MemoryTransport", "DEFAULT_MAX_PAYLOAD"]

#: The default ``max_payload`` of a nats-server, mirrored here.
DEFAULT_MAX_PAYLOAD: Final = 1024 * 1024

_INBOX_PREFIX: Final = "_INBOX."


@dataclass(eq=False)
class _Group:
    """The subscribers of one subject that share a queue group (or one plain one)."""

    members: list[_MemorySubscription] = field(default_factory=list)
    turn: int = 0

    def pick(self) -> _MemorySubscription:
        self.turn = (self.turn + 1) % len(self.members)
        return self.members[self.turn]


class MemoryNetwork:
    """The shared "server" of a set of memory transports."""

    def __init__(self, *, max_payload: int = DEFAULT_MAX_PAYLOAD) -> None:
        self.max_payload = max_payload
        # subject -> queue group name ("" for plain subscribers) -> group
        self._subjects: dict[str, dict[str, _Group]] = {}
        self._plain: dict[str, list[_MemorySubscription]] = {}
        self._inboxes: dict[str, asyncio.Future[bytes]] = {}
        self._ids = itertools.count(1)

    def next_id(self) -> int:
        return next(self._ids)

    def has_interest(self, subject: str) -> bool:
        return subject in self._subjects or subject in self._plain

    def add(self, sub: _MemorySubscription) -> None:
        if sub.queue is None:
            self._plain.setdefault(sub.subject, []).append(sub)
        else:
            groups = self._subjects.setdefault(sub.subject, {})
            groups.setdefault(sub.queue, _Group()).members.append(sub)

    def remove(self, sub: _MemorySubscription) -> None:
        if sub.queue is None:
            plain = self._plain.get(sub.subject, [])
            if sub in plain:
                plain.remove(sub)
            if not plain:
                self._plain.pop(sub.subject, None)
            return
        groups = self._subjects.get(sub.subject, {})
        group = groups.get(sub.queue)
        if group is not None and sub in group.members:
            group.members.remove(sub)
            if not group.members:
                del groups[sub.queue]
        if not groups:
            self._subjects.pop(sub.subject, None)

    def route(self, subject: str, data: bytes, reply: str | None) -> None:
        """Schedule delivery of one message (never inline, like a real server)."""
        loop = asyncio.get_running_loop()
        if subject.startswith(_INBOX_PREFIX):
            future = self._inboxes.get(subject)
            if future is not None:
                loop.call_soon(_resolve, future, data)
            return
        for group in self._subjects.get(subject, {}).values():
            target = group.pick()
            loop.call_soon(target.deliver, data, reply)
        for sub in self._plain.get(subject, ()):
            loop.call_soon(sub.deliver, data, reply)

    def open_inbox(self, inbox: str, future: asyncio.Future[bytes]) -> None:
        self._inboxes[inbox] = future

    def close_inbox(self, inbox: str) -> None:
        self._inboxes.pop(inbox, None)


def _resolve(future: asyncio.Future[bytes], data: bytes) -> None:
    if not future.done():
        future.set_result(data)


class _MemorySubscription(Subscription):
    def __init__(
        self,
        owner: MemoryTransport,
        subject: str,
        callback: MessageCallback,
        queue: str | None,
    ) -> None:
        self.subject = subject
        self.queue = queue
        self._owner = owner
        self._callback = callback
        self.active = True

    def deliver(self, data: bytes, reply: str | None) -> None:
        if self.active:
            self._callback(data, reply)

    async def drain(self) -> None:
        # Delivery is scheduled with call_soon: one loop turn after leaving the
        # network, everything already routed to us has been delivered.
        self._owner.forget(self)
        await asyncio.sleep(0)

    async def unsubscribe(self) -> None:
        self.active = False
        self._owner.forget(self)


class MemoryTransport(Transport):
    """A transport on an in-process :class:`MemoryNetwork`."""

    def __init__(self, network: MemoryNetwork | None = None, *, name: str = "") -> None:
        self.network = network if network is not None else MemoryNetwork()
        self.name = name or f"conn-{self.network.next_id()}"
        self._subs: set[_MemorySubscription] = set()
        self._pending: dict[str, asyncio.Future[bytes]] = {}
        self._closed = False

    def connect(self, name: str = "") -> MemoryTransport:
        """Another transport on the same network (another "connection")."""
        return MemoryTransport(self.network, name=name)

    @property
    def max_payload(self) -> int:
        return self.network.max_payload

    @property
    def closed(self) -> bool:
        return self._closed

    def _check(self, data: bytes) -> None:
        if self._closed:
            raise TransportClosedError(f"memory transport {self.name!r} is closed")
        if len(data) > self.network.max_payload:
            raise LimitExceededError(
                f"message of {len(data)} bytes is over the max_payload of "
                f"{self.network.max_payload} bytes"
            )

    async def request(self, subject: str, data: bytes, timeout: float) -> bytes:
        self._check(data)
        if not self.network.has_interest(subject):
            raise NoShardOwnerError(f"no subscriber on {subject!r}")
        inbox = f"{_INBOX_PREFIX}{self.name}.{self.network.next_id()}"
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._pending[inbox] = future
        self.network.open_inbox(inbox, future)
        try:
            self.network.route(subject, data, inbox)
            async with asyncio.timeout(timeout):
                return await future
        except TimeoutError:
            raise RequestTimeoutError(f"no reply on {subject!r} within {timeout:.3f}s") from None
        finally:
            self.network.close_inbox(inbox)
            self._pending.pop(inbox, None)

    async def publish(self, subject: str, data: bytes) -> None:
        self._check(data)
        self.network.route(subject, data, None)

    async def subscribe(
        self, subject: str, callback: MessageCallback, *, queue: str | None = None
    ) -> Subscription:
        if self._closed:
            raise TransportClosedError(f"memory transport {self.name!r} is closed")
        sub = _MemorySubscription(self, subject, callback, queue)
        self._subs.add(sub)
        self.network.add(sub)
        return sub

    def forget(self, sub: _MemorySubscription) -> None:
        self._subs.discard(sub)
        self.network.remove(sub)

    def subscriptions(self) -> Iterator[str]:
        """The subjects this transport listens on (for tests and debugging)."""
        return (s.subject for s in list(self._subs))

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for sub in list(self._subs):
            await sub.unsubscribe()
        for future in self._pending.values():
            if not future.done():
                future.set_exception(
                    TransportClosedError(f"memory transport {self.name!r} closed during request")
                )
        self._pending.clear()
        self._notify(ConnectionEvent.CLOSED)
