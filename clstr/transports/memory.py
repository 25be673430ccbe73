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
import enum
import itertools
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Final, NamedTuple

from .._clock import Timeouts, expire
from ..errors import (
    ConfigurationError,
    LimitExceededError,
    NoShardOwnerError,
    RequestTimeoutError,
    TransportClosedError,
)
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


# -- faults -------------------------------------------------------------------


def subject_matches(pattern: str, subject: str) -> bool:
    """Whether ``subject`` matches the NATS-style ``pattern``.

    ``*`` matches one token, a final ``>`` one or more tokens.
    """
    if pattern == subject:
        return True
    want = pattern.split(".")
    have = subject.split(".")
    for i, token in enumerate(want):
        if token == ">" and i == len(want) - 1:
            return len(have) > i
        if i >= len(have) or (token != "*" and token != have[i]):
            return False
    return len(want) == len(have)


class FaultKind(enum.Enum):
    """What a :class:`FaultRule` does to the messages it matches."""

    DROP = "drop"
    DELAY = "delay"
    DUPLICATE = "duplicate"


@dataclass(eq=False, kw_only=True)
class FaultRule:
    """One fault applied to matching messages; made by :class:`Faults`' methods.

    A message matches when its sender is ``src`` (any when ``None``), its
    receiver is ``dst`` (any when ``None``; the receiver of a reply is the
    requester), and its subject matches ``subject`` (NATS wildcards; any
    when ``None``). A match applies with ``probability`` (drawn from the
    network's seeded random generator) and at most ``count`` times (``None``:
    no limit). ``matched`` counts the times it applied.
    """

    kind: FaultKind
    src: str | None = None
    dst: str | None = None
    subject: str | None = None
    probability: float = 1.0
    count: int | None = None
    delay: float = 0.0
    jitter: float = 0.0
    copies: int = 1
    matched: int = 0
    _faults: Faults | None = field(default=None, repr=False)

    def matches(self, src: str, dst: str, subject: str) -> bool:
        """Whether a message from ``src`` to ``dst`` on ``subject`` is concerned."""
        return (
            (self.src is None or self.src == src)
            and (self.dst is None or self.dst == dst)
            and (self.subject is None or subject_matches(self.subject, subject))
        )

    @property
    def exhausted(self) -> bool:
        """Whether the rule applied ``count`` times already."""
        return self.count is not None and self.matched >= self.count

    def remove(self) -> None:
        """Stop applying this rule."""
        if self._faults is not None:
            self._faults.remove(self)


@dataclass(eq=False)
class Partition:
    """A split of the network into groups of transport names that cannot
    reach each other; made by :meth:`Faults.partition`."""

    groups: list[frozenset[str]]
    _faults: Faults | None = field(default=None, repr=False)

    def separates(self, a: str, b: str) -> bool:
        """Whether ``a`` and ``b`` are in different groups."""
        ga = next((i for i, g in enumerate(self.groups) if a in g), None)
        gb = next((i for i, g in enumerate(self.groups) if b in g), None)
        return ga is not None and gb is not None and ga != gb

    def heal(self) -> None:
        """Remove this partition."""
        if self._faults is not None:
            self._faults.heal(self)


@dataclass(frozen=True, slots=True)
class _Decision:
    drop: bool = False
    delay: float = 0.0
    copies: int = 0


_DELIVER: Final = _Decision()


class Faults:
    """Faults on command for one :class:`MemoryNetwork` (``network.faults``).

    Rules are matched in the order they were added; a drop wins over
    everything, delays add up, duplicates add up. A partition hides the
    subscribers on the other side: a queue group picks only among members the
    sender can reach, and a request nobody reachable listens to fails at once
    with :class:`~clstr.NoShardOwnerError`, as it would for a node cut off
    from its NATS server. Everything is deterministic for a given ``seed``.
    """

    def __init__(self, *, seed: int = 0) -> None:
        self._rules: list[FaultRule] = []
        self._partitions: list[Partition] = []
        self._random = random.Random(seed)
        self.dropped = 0
        self.delayed = 0
        self.duplicated = 0

    @property
    def active(self) -> bool:
        """Whether any rule or partition is in force."""
        return bool(self._rules or self._partitions)

    @property
    def rules(self) -> list[FaultRule]:
        """The rules in force, in the order they apply."""
        return list(self._rules)

    def seed(self, seed: int) -> None:
        """Restart the random generator that draws rule probabilities."""
        self._random.seed(seed)

    def _add(self, rule: FaultRule) -> FaultRule:
        if not 0.0 <= rule.probability <= 1.0:
            raise ConfigurationError(f"probability must be in [0, 1], got {rule.probability!r}")
        if rule.count is not None and rule.count < 0:
            raise ConfigurationError(f"count must be >= 0 or None, got {rule.count!r}")
        rule._faults = self
        self._rules.append(rule)
        return rule

    def drop(
        self,
        *,
        src: str | None = None,
        dst: str | None = None,
        subject: str | None = None,
        probability: float = 1.0,
        count: int | None = None,
    ) -> FaultRule:
        """Lose matching messages (a lost request or a lost reply: the requester
        times out)."""
        return self._add(
            FaultRule(
                kind=FaultKind.DROP,
                src=src,
                dst=dst,
                subject=subject,
                probability=probability,
                count=count,
            )
        )

    def delay(
        self,
        seconds: float,
        *,
        jitter: float = 0.0,
        src: str | None = None,
        dst: str | None = None,
        subject: str | None = None,
        probability: float = 1.0,
        count: int | None = None,
    ) -> FaultRule:
        """Deliver matching messages ``seconds`` later (plus a uniform random
        ``0..jitter``), on the loop's clock; messages may overtake each other."""
        if seconds < 0 or jitter < 0:
            raise ConfigurationError("delay seconds and jitter must be >= 0")
        return self._add(
            FaultRule(
                kind=FaultKind.DELAY,
                src=src,
                dst=dst,
                subject=subject,
                probability=probability,
                count=count,
                delay=seconds,
                jitter=jitter,
            )
        )

    def duplicate(
        self,
        *,
        copies: int = 1,
        src: str | None = None,
        dst: str | None = None,
        subject: str | None = None,
        probability: float = 1.0,
        count: int | None = None,
    ) -> FaultRule:
        """Deliver matching messages ``1 + copies`` times to the same receiver
        (a redelivery): handlers must tolerate it, e.g. with request ids."""
        if copies < 1:
            raise ConfigurationError(f"copies must be >= 1, got {copies!r}")
        return self._add(
            FaultRule(
                kind=FaultKind.DUPLICATE,
                src=src,
                dst=dst,
                subject=subject,
                probability=probability,
                count=count,
                copies=copies,
            )
        )

    def partition(self, *groups: Iterable[str]) -> Partition:
        """Split the network: transports named in different ``groups`` cannot reach
        each other (both ways) until :meth:`heal`. Names in no group are not concerned."""
        frozen = [frozenset(g) for g in groups]
        if len(frozen) < 2:
            raise ConfigurationError("a partition needs at least two groups of names")
        seen: set[str] = set()
        for group in frozen:
            if group & seen:
                raise ConfigurationError(f"names in several groups: {sorted(group & seen)}")
            seen |= group
        part = Partition(frozen, self)
        self._partitions.append(part)
        return part

    def isolate(self, name: str, *, others: Iterable[str]) -> Partition:
        """Cut ``name`` off from every transport in ``others``."""
        return self.partition([name], [o for o in others if o != name])

    def heal(self, partition: Partition | None = None) -> None:
        """Remove ``partition``, or every partition."""
        if partition is None:
            self._partitions.clear()
        elif partition in self._partitions:
            self._partitions.remove(partition)

    def remove(self, rule: FaultRule) -> None:
        """Stop applying ``rule``."""
        if rule in self._rules:
            self._rules.remove(rule)

    def clear(self) -> None:
        """Remove every rule and partition (counters are kept)."""
        self._rules.clear()
        self._partitions.clear()

    def reachable(self, src: str, dst: str) -> bool:
        """Whether no partition separates ``src`` from ``dst``."""
        return not any(p.separates(src, dst) for p in self._partitions)

    def decide(self, src: str, dst: str, subject: str) -> _Decision:
        """What happens to one message from ``src`` to ``dst`` on ``subject``."""
        if not self._rules:
            return _DELIVER
        drop = False
        delay = 0.0
        copies = 0
        for rule in list(self._rules):
            if rule.exhausted or not rule.matches(src, dst, subject):
                continue
            if rule.probability < 1.0 and self._random.random() >= rule.probability:
                continue
            rule.matched += 1
            if rule.kind is FaultKind.DROP:
                drop = True
            elif rule.kind is FaultKind.DELAY:
                extra = self._random.uniform(0.0, rule.jitter) if rule.jitter else 0.0
                delay += rule.delay + extra
            else:
                copies += rule.copies
        if drop:
            self.dropped += 1
            return _Decision(drop=True)
        if delay:
            self.delayed += 1
        if copies:
            self.duplicated += 1
        return _Decision(delay=delay, copies=copies)


# -- the network --------------------------------------------------------------


@dataclass(eq=False)
class _Group:
    """The subscribers of one subject that share a queue group (or one plain one)."""

    members: list[_MemorySubscription] = field(default_factory=list)
    turn: int = 0

    def pick(self, sender: str, faults: Faults) -> _MemorySubscription | None:
        members = self.members
        if not faults.active:
            self.turn = (self.turn + 1) % len(members)
            return members[self.turn]
        for _ in range(len(members)):
            self.turn = (self.turn + 1) % len(members)
            candidate = members[self.turn]
            if faults.reachable(sender, candidate.owner_name):
                return candidate
        return None


class _Inbox(NamedTuple):
    owner: str
    future: asyncio.Future[bytes]


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
        self._inboxes: dict[str, _Inbox] = {}
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
        if subject.startswith(_INBOX_PREFIX):
            inbox = self._inboxes.get(subject)
            if inbox is None:
                return
            if not faults.active:
                # Resolving wakes the requester on a later turn anyway (future
                # callbacks go through call_soon): no extra hop needed.
                _resolve(inbox.future, data)
                return
            if not faults.reachable(sender, inbox.owner):
                faults.dropped += 1
                return
            decision = faults.decide(sender, inbox.owner, subject)
            # A reply resolves its request once: copies change nothing.
            if not decision.drop:
                _schedule(inbox.future.get_loop(), decision.delay, _resolve, inbox.future, data)
            return
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
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bytes] = loop.create_future()
        # A shared timer for the future, not asyncio.timeout(): a fraction of the
        # cost. (A transport may outlive one loop, as in tests: its timers may not.)
        timeouts = self._timeouts
        if timeouts is None or timeouts.loop is not loop:
            timeouts = self._timeouts = Timeouts(loop, expire)
        slot = timeouts.add(loop.time() + timeout, future)
        self._pending[inbox] = future
        inboxes = network._inboxes
        inboxes[inbox] = _Inbox(self.name, future)
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
        """Send ``data`` without waiting; ``reply`` sets a reply subject."""
        self._check(data)
        self.network.route(subject, data, reply, self.name)

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
