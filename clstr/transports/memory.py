"""In-process transport that behaves like NATS: for tests and local clusters.

Every message is still bytes (the codec runs as it does over NATS), delivery
is asynchronous (scheduled on the event loop, never inline), a queue group
hands each message to one member in turn, a request to a subject nobody
listens on fails at once with :class:`~clstr.NoShardOwnerError`, and a
closed transport fails its pending requests.

Several transports share one :class:`MemoryNetwork`, the way several NATS
connections share one server: ``MemoryTransport()`` makes a network of its
own, ``transport.connect(name)`` (or ``network.connect(name)``) returns
another transport on the same one.

Faults on command: ``network.faults`` (a :class:`Faults`) drops, delays,
duplicates and partitions messages between named transports, so a test can
put its own handlers through lost requests, lost replies, late and repeated
deliveries and split networks, deterministically and in one process. Delays
are timers on the event loop's clock, so under
:class:`clstr.testing.VirtualClock` they take no real time.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Final

from .._clock import Timeouts, expire
from ..errors import (
    LimitExceededError,
    NoShardOwnerError,
    RequestTimeoutError,
    TransportClosedError,
)
from ._faults import FaultKind, FaultRule, Faults, Partition
from ._faults import subject_matches as subject_matches
from .base import ConnectionEvent, MessageCallback, Subscription, Transport

__all__ = [
    "DEFAULT_MAX_PAYLOAD",
    "FaultKind",
    "FaultRule",
    "Faults",
    "MemoryNetwork",
    "MemoryTransport",
    "Partition",
]

#: The default ``max_payload`` of a nats-server, mirrored here.
DEFAULT_MAX_PAYLOAD: Final = 1024 * 1024

_INBOX_PREFIX: Final = "_INBOX."


# -- the network --------------------------------------------------------------


@dataclass(eq=False)
class _Group:
    """The subscribers of one subject that share a queue group (or one plain one)."""

    members: list[_MemorySubscription] = field(default_factory=list)
    turn: int = 0

    def pick(self, sender: str, faults: Faults) -> _MemorySubscription | None:
        members = self.members
        if not (faults._rules or faults._partitions):  # (not faults.active: per message)
            self.turn = (self.turn + 1) % len(members)
            return members[self.turn]
        for _ in range(len(members)):
            self.turn = (self.turn + 1) % len(members)
            candidate = members[self.turn]
            if faults.reachable(sender, candidate.owner_name):
                return candidate
        return None


class MemoryNetwork:
    """The shared "server" of a set of memory transports.

    ``faults`` injects drops, delays, duplicates and partitions (see
    :class:`Faults`); ``seed`` seeds its random generator.
    """

    def __init__(self, *, max_payload: int = DEFAULT_MAX_PAYLOAD, seed: int = 0) -> None:
        self.max_payload = max_payload
        self.faults = Faults(seed=seed)
        # subject -> queue group name ("" for plain subscribers) -> group
        self._subjects: dict[str, dict[str, _Group]] = {}
        self._plain: dict[str, list[_MemorySubscription]] = {}
        # A pending request's inbox -> the transport that waits on it.
        self._inboxes: dict[str, MemoryTransport] = {}
        self._ids = itertools.count(1)

    def connect(self, name: str = "") -> MemoryTransport:
        """A new transport (a "connection") on this network, named ``name``."""
        return MemoryTransport(self, name=name)

    def next_id(self) -> int:
        """A number never returned before on this network (names connections and
        request inboxes)."""
        return next(self._ids)

    def has_interest(self, subject: str, sender: str = "") -> bool:
        """Whether a message from ``sender`` on ``subject`` reaches any subscriber."""
        faults = self.faults
        if not faults._partitions:
            return subject in self._subjects or subject in self._plain
        subs = [m for g in self._subjects.get(subject, {}).values() for m in g.members]
        subs.extend(self._plain.get(subject, ()))
        return any(faults.reachable(sender, s.owner_name) for s in subs)

    def add(self, sub: _MemorySubscription) -> None:
        """Route the subject's messages to ``sub`` from now on: all of them for a
        plain subscription, a share of them (one member of the group each) for
        one with a queue group."""
        if sub.queue is None:
            self._plain.setdefault(sub.subject, []).append(sub)
        else:
            groups = self._subjects.setdefault(sub.subject, {})
            groups.setdefault(sub.queue, _Group()).members.append(sub)

    def remove(self, sub: _MemorySubscription) -> None:
        """Route nothing more to ``sub`` (deliveries already scheduled may still
        reach it); removing one that is not there does nothing."""
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

    def route(self, subject: str, data: bytes, reply: str | None, sender: str = "") -> None:
        """Schedule delivery of one message (never inline, like a real server)."""
        faults = self.faults
        requester = self._inboxes.get(subject)
        if requester is not None:  # a reply
            future = requester._pending.get(subject)
            if future is None:
                return
            if not (faults._rules or faults._partitions):  # (not faults.active)
                # Resolving wakes the requester on a later turn anyway (future
                # callbacks go through call_soon): no extra hop needed.
                _resolve(future, data)
                return
            if not faults.reachable(sender, requester.name):
                faults.dropped += 1
                return
            decision = faults.decide(sender, requester.name, subject)
            # A reply resolves its request once: copies change nothing.
            if not decision.drop:
                _schedule(future.get_loop(), decision.delay, _resolve, future, data)
            return
        if subject.startswith(_INBOX_PREFIX):
            return  # a request's inbox, the request done: nobody listens any more
        for group in self._subjects.get(subject, {}).values():
            target = group.pick(sender, faults)
            if target is not None:
                self._send(sender, target, subject, data, reply)
        for sub in self._plain.get(subject, ()):
            if not faults._partitions or faults.reachable(sender, sub.owner_name):
                self._send(sender, sub, subject, data, reply)

    def _send(
        self,
        sender: str,
        target: _MemorySubscription,
        subject: str,
        data: bytes,
        reply: str | None,
    ) -> None:
        if not self.faults._rules:
            target.loop.call_soon(target.deliver, data, reply)
            return
        decision = self.faults.decide(sender, target.owner_name, subject)
        if decision.drop:
            return
        for _ in range(1 + decision.copies):
            _schedule(target.loop, decision.delay, target.deliver, data, reply)


def _schedule(loop: asyncio.AbstractEventLoop, delay: float, fn: object, *args: object) -> None:
    if delay > 0:
        loop.call_later(delay, fn, *args)  # type: ignore[arg-type]
    else:
        loop.call_soon(fn, *args)  # type: ignore[arg-type]


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
        self.owner_name = owner.name
        self._owner = owner
        self._callback = callback
        self.active = True
        self.loop = asyncio.get_running_loop()  # where its callback runs

    def deliver(self, data: bytes, reply: str | None) -> None:
        if self.active:
            self._callback(data, reply)

    async def drain(self) -> None:
        # Delivery is scheduled with call_soon: one loop turn after leaving the
        # network, everything already routed to us has been delivered.
        self._owner.forget(self)
        await asyncio.sleep(0)
        # Like a drained NATS subscription: nothing arrives any more (a delayed
        # or duplicated delivery from the fault injector included).
        self.active = False

    async def unsubscribe(self) -> None:
        self.active = False
        self._owner.forget(self)


class MemoryTransport(Transport):
    """A transport on an in-process :class:`MemoryNetwork`.

    ``name`` identifies the transport to :attr:`MemoryNetwork.faults`
    (give each node and client its own).
    """

    def __init__(self, network: MemoryNetwork | None = None, *, name: str = "") -> None:
        self.network = network if network is not None else MemoryNetwork()
        self.name = name or f"conn-{self.network.next_id()}"
        self._inbox_prefix = f"{_INBOX_PREFIX}{self.name}."
        self._subs: set[_MemorySubscription] = set()
        self._pending: dict[str, asyncio.Future[bytes]] = {}
        self._timeouts: Timeouts[asyncio.Future[bytes]] | None = None
        self._closed = False

    def connect(self, name: str = "") -> MemoryTransport:
        """Another transport on the same network (another "connection")."""
        return MemoryTransport(self.network, name=name)

    @property
    def max_payload(self) -> int:
        return self.network.max_payload

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called: every send and subscribe then raises
        :class:`~clstr.TransportClosedError`."""
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
        network = self.network
        if not network.has_interest(subject, self.name):
            raise NoShardOwnerError(f"no subscriber on {subject!r}")
        inbox = self._inbox_prefix + str(next(network._ids))
        # A shared timer for the future, not asyncio.timeout(): a fraction of the
        # cost. A transport may outlive one loop, as in tests (its timers may
        # not), but the loop of its last request, while it runs, is the one
        # running now (one thread): no asyncio.get_running_loop() per request
        # (on 3.11 a getpid() system call each).
        timeouts = self._timeouts
        if timeouts is None or not timeouts.loop.is_running():
            timeouts = self._timeouts = Timeouts(asyncio.get_running_loop(), expire)
        loop = timeouts.loop
        future: asyncio.Future[bytes] = loop.create_future()
        slot = timeouts.add(loop.time() + timeout, future)
        self._pending[inbox] = future
        inboxes = network._inboxes
        inboxes[inbox] = self
        try:
            network.route(subject, data, inbox, self.name)
            return await future
        except TimeoutError:
            raise RequestTimeoutError(f"no reply on {subject!r} within {timeout:.3f}s") from None
        finally:
            timeouts.discard(slot, future)
            inboxes.pop(inbox, None)
            self._pending.pop(inbox, None)

    async def publish(self, subject: str, data: bytes, *, reply: str | None = None) -> None:
        """Send ``data`` without waiting; ``reply`` sets a reply subject (which gets
        an empty message when nobody subscribes to ``subject``, as from NATS)."""
        self._check(data)
        network = self.network
        if reply is not None and not network.has_interest(subject, self.name):
            network.route(reply, b"", None)  # nats-server's "no responders"
            return
        network.route(subject, data, reply, self.name)

    def publish_nowait(self, subject: str, data: bytes) -> None:
        self._check(data)
        self.network.route(subject, data, None, self.name)

    def new_inbox(self) -> str:
        # Not the request-inbox prefix: those are routed to a request's future.
        return f"_STREAM.{self.name}.{self.network.next_id()}"

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
        """Drop ``sub`` from this transport and from the network: no new message
        is routed to it (used by its drain and unsubscribe). Idempotent."""
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
