"""A shard's bounded ring of queued events, with its counters and waiters.

Events of a shard are numbered from 0 in the order the ring accepted them;
``taken`` is the number of the next one to leave the ring (in a batch, or
evicted), so a batch is always a contiguous range ``taken..taken+n-1``.
Every accepted event ends up *resolved* exactly once: dispatched, dropped
(the adapter refused its batch, or shutdown gave up on it) or evicted
(``DROP_OLDEST``). Flush waiters wait for a number of resolved events.
"""

from __future__ import annotations

import asyncio
from collections import deque

from ._config import Backpressure
from ._errors import BackpressureError
from ._event import Event

__all__ = ["ShardRing"]


class ShardRing:
    """The queue of one bus shard (see the module docstring). Not thread-safe: every
    method runs on the bus's event loop."""

    __slots__ = (
        "batch_max",
        "capacity",
        "dispatched",
        "dropped",
        "evicted",
        "flush_waiters",
        "full",
        "live",
        "mode",
        "peak",
        "queue",
        "rejected",
        "room_waiters",
        "shard",
        "stamps",
        "taken",
        "urgent",
        "wake",
    )

    def __init__(self, shard: int, capacity: int, batch_max: int, mode: Backpressure) -> None:
        self.shard = shard
        self.capacity = capacity
        self.batch_max = batch_max
        self.mode = mode
        # The user's events (or raw bytes) as given, and their ingestion times apart:
        # no tuple is built per event on the ingestion path (docs/eventbus.md).
        self.queue: deque[Event | bytes] = deque()
        self.stamps: deque[int] = deque()
        self.taken = 0  # events that left the queue (batched or evicted)
        self.dispatched = 0
        self.dropped = 0  # refused by the adapter, or given up at shutdown
        self.evicted = 0  # DROP_OLDEST
        self.rejected = 0  # refused at ingest: ring full (DROP_NEWEST, BLOCK)
        self.peak = 0  # the most queued events seen since the last reset
        self.urgent = 0  # flush: events up to this number go out without lingering
        self.live = True  # False once the shard is removed or the bus stopped
        self.wake = asyncio.Event()  # the queue is no longer empty
        self.full = asyncio.Event()  # a batch is full, or a flush or stop wants it now
        self.room_waiters: deque[asyncio.Future[None]] = deque()
        self.flush_waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    # -- the producer side (synchronous, on the hot path) ----------------------

    def push(self, item: Event | bytes, stamp: int) -> None:
        """Queue ``item`` ingested at ``stamp``; on a full ring, evict the oldest
        (``DROP_OLDEST``) or raise :class:`BackpressureError`."""
        queue = self.queue
        n = len(queue)
        if n >= self.capacity:
            n = self._overflow()
        queue.append(item)
        self.stamps.append(stamp)
        if n == 0:
            self.wake.set()
        elif n + 1 == self.batch_max:
            self.full.set()

    def _overflow(self) -> int:
        if self.mode is Backpressure.DROP_OLDEST:
            self.queue.popleft()
            self.stamps.popleft()
            self.taken += 1
            self.evicted += 1
            self._resolved_changed()
            return len(self.queue)
        self.rejected += 1
        if self.mode is Backpressure.BLOCK:
            raise BackpressureError(
                f"shard {self.shard} ring is full ({self.capacity} events): under Block, "
                "await bus.ingest_wait(event) to wait for room"
            )
        raise BackpressureError(
            f"shard {self.shard} ring is full ({self.capacity} events); the event was "
            "rejected (DropNewest): retry later, or add shards"
        )

    @property
    def accepted(self) -> int:
        """Events ingested into this shard."""
        return self.taken + len(self.queue)

    @property
    def has_room(self) -> bool:
        """Whether a push would not overflow."""
        return len(self.queue) < self.capacity

    async def wait_room(self) -> None:
        """Wait until a batch left the ring (there may be room again)."""
        waiter = asyncio.get_running_loop().create_future()
        self.room_waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._wake_room(1)  # woken, but cancelled before it could use it: pass it on
            raise

    def _wake_room(self, n: int) -> None:
        waiters = self.room_waiters
        while n > 0 and waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                n -= 1

    # -- the worker side ------------------------------------------------------

    def take(self, limit: int) -> tuple[int, list[Event | bytes], list[int]]:
        """Remove up to ``limit`` events from the front; return the number of the first,
        the events and their stamps. Wakes as many room waiters as events left."""
        queue = self.queue
        n = min(limit, len(queue))
        if len(queue) > self.peak:
            self.peak = len(queue)
        first = self.taken
        popleft, popstamp = queue.popleft, self.stamps.popleft
        items = [popleft() for _ in range(n)]
        stamps = [popstamp() for _ in range(n)]
        self.taken += n
        if self.room_waiters:
            self._wake_room(n)
        return first, items, stamps

    @property
    def lingering_allowed(self) -> bool:
        """Whether the worker may wait for a fuller batch (no flush wants these events)."""
        return self.urgent <= self.taken and len(self.queue) < self.batch_max

    def resolve(self, *, dispatched: int = 0, dropped: int = 0) -> None:
        """Count a batch's outcome and release the flushes it completes."""
        self.dispatched += dispatched
        self.dropped += dropped
        self._resolved_changed()

    @property
    def resolved(self) -> int:
        """Events of this shard whose fate is known (dispatched, dropped or evicted)."""
        return self.dispatched + self.dropped + self.evicted

    def _resolved_changed(self) -> None:
        waiters = self.flush_waiters
        if waiters:
            resolved = self.resolved
            while waiters and waiters[0][0] <= resolved:
                _, waiter = waiters.popleft()
                if not waiter.done():
                    waiter.set_result(None)

    def flush_target(self) -> asyncio.Future[None] | None:
        """A future done once every event accepted so far is resolved (``None`` when
        they already are); the worker stops lingering until then."""
        target = self.accepted
        if self.resolved >= target:
            return None
        waiter = asyncio.get_running_loop().create_future()
        self.flush_waiters.append((target, waiter))
        self.urgent = max(self.urgent, target)
        self.full.set()
        return waiter

    def drop_queued(self) -> int:
        """Drop every queued event (shutdown past its deadline); return how many."""
        n = len(self.queue)
        self.queue.clear()
        self.stamps.clear()
        self.taken += n
        self.resolve(dropped=n)
        return n

    def release_waiters(self) -> None:
        """Wake every room waiter (the shard is gone: they route again)."""
        self._wake_room(len(self.room_waiters))

    def close(self, error: BaseException) -> None:
        """No more pushes: fail the room waiters with ``error``."""
        self.live = False
        while self.room_waiters:
            waiter = self.room_waiters.popleft()
            if not waiter.done():
                waiter.set_exception(error)
