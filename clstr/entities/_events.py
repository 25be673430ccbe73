"""What a :class:`~clstr.entities.Sharding` runner announces: registrations, and
shards and singletons coming and going on this node."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass

__all__ = [
    "EntityRegistered",
    "EventStream",
    "ShardAcquired",
    "ShardReleased",
    "ShardingEvent",
    "SingletonRegistered",
    "SingletonStarted",
    "SingletonStopped",
]


@dataclass(frozen=True, slots=True)
class EntityRegistered:
    """An entity type was registered with this runner."""

    entity_type: str


@dataclass(frozen=True, slots=True)
class SingletonRegistered:
    """A singleton was registered with this runner (it runs wherever its shard is)."""

    name: str


@dataclass(frozen=True, slots=True)
class ShardAcquired:
    """This node now serves ``shard`` of ``group``."""

    group: str
    shard: int


@dataclass(frozen=True, slots=True)
class ShardReleased:
    """This node gave ``shard`` of ``group`` up."""

    group: str
    shard: int


@dataclass(frozen=True, slots=True)
class SingletonStarted:
    """Singleton ``name`` started on this node."""

    name: str


@dataclass(frozen=True, slots=True)
class SingletonStopped:
    """Singleton ``name`` stopped on this node."""

    name: str


ShardingEvent = (
    EntityRegistered
    | SingletonRegistered
    | ShardAcquired
    | ShardReleased
    | SingletonStarted
    | SingletonStopped
)


class EventStream:
    """Fans events out to any number of async iterators.

    Each subscriber gets its own bounded buffer (``maxsize``); a subscriber
    that falls that far behind loses its oldest events (counted in
    :attr:`dropped`) rather than growing memory without bound. Registration
    events are replayed to each new subscriber first, so one that subscribes
    late still learns what is registered.
    """

    def __init__(self, maxsize: int = 1024) -> None:
        self._maxsize = maxsize
        self._subscribers: list[_Subscriber] = []
        self._registered: list[ShardingEvent] = []
        self._closed = False
        #: Events dropped from subscribers that fell behind.
        self.dropped = 0

    def publish(self, event: ShardingEvent) -> None:
        """Hand ``event`` to every subscriber (synchronous, never blocks)."""
        if isinstance(event, EntityRegistered | SingletonRegistered):
            self._registered.append(event)
        for subscriber in self._subscribers:
            self.dropped += subscriber.put(event)

    def subscribe(self) -> AsyncIterator[ShardingEvent]:
        """An async iterator of the events from now on (registrations so far
        first); it ends when the stream is closed."""
        subscriber = _Subscriber(self._maxsize)
        for event in self._registered:
            subscriber.put(event)
        if self._closed:
            subscriber.close()
        else:
            self._subscribers.append(subscriber)
        return self._iterate(subscriber)

    async def _iterate(self, subscriber: _Subscriber) -> AsyncIterator[ShardingEvent]:
        try:
            while True:
                event = await subscriber.get()
                if event is None:
                    return
                yield event
        finally:
            if subscriber in self._subscribers:
                self._subscribers.remove(subscriber)

    def close(self) -> None:
        """End every subscriber's iterator (after the events it still holds)."""
        self._closed = True
        for subscriber in self._subscribers:
            subscriber.close()
        self._subscribers.clear()


class _Subscriber:
    def __init__(self, maxsize: int) -> None:
        self._events: deque[ShardingEvent] = deque()
        self._maxsize = maxsize
        self._ready = asyncio.Event()
        self._closed = False

    def put(self, event: ShardingEvent) -> int:
        """Queue ``event``; return how many old events were dropped for it."""
        dropped = 0
        if len(self._events) >= self._maxsize:
            self._events.popleft()
            dropped = 1
        self._events.append(event)
        self._ready.set()
        return dropped

    def close(self) -> None:
        self._closed = True
        self._ready.set()

    async def get(self) -> ShardingEvent | None:
        while not self._events:
            if self._closed:
                return None
            self._ready.clear()
            await self._ready.wait()
        return self._events.popleft()
