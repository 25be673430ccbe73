"""A poll: read every shard from the cursor's positions, merge, filter, cut at the limit.

The log is read directly (one batched JetStream direct get per shard and
round, all shards at once), not through the consumer nodes: a poll needs no
node to be up, costs no hop, and the stream is already the ordered,
random-access record of every shard. Per shard, reads start small (one
frame) and double, so a small poll does not decode thousands of events to
throw them away.
"""

from __future__ import annotations

import asyncio
import heapq
from collections.abc import Iterable
from typing import TYPE_CHECKING, Final

from ..protocol import DEFAULT_PREFIX
from ._event import StoredEvent
from ._log import EventLog, ShardStream
from ._query import START, EventFilter, Ordering, PollRequest, PollResponse, decode_cursor
from ._query import encode_cursor as _encode

if TYPE_CHECKING:
    from ..transports.nats import NatsTransport

__all__ = ["BusReader", "poll"]

# A filtered poll stops after scanning this many events per event asked for
# (and at least _MIN_SCAN), so a filter that matches little cannot make one
# poll read the whole log; has_more then says to go on.
_SCAN_FACTOR: Final = 16
_MIN_SCAN: Final = 65_536
_MAX_FRAMES: Final = 64


async def poll(log: EventLog, bus: str, request: PollRequest) -> PollResponse:
    """Run ``request`` against ``log`` (see the module docstring).

    Raises :class:`~clstr.eventbus.InvalidCursorError` for a cursor that is not
    one of ``bus``'s, and :class:`~clstr.eventbus.ConsumerAdapterError` when the
    log cannot be read.
    """
    positions = decode_cursor(bus, request.cursor)
    if request.shards is not None:
        shards: Iterable[int] = request.shards
    else:
        shards = sorted(set(await log.shards()) | set(positions))
    streams = [ShardStream(log, s, positions.get(s, START)) for s in shards]
    merge = _Merge(streams, request.event_filter, request.limit)
    if request.ordering is Ordering.TIMESTAMP:
        await merge.by_timestamp()
    else:
        await merge.by_sequence()
    for stream in streams:
        positions[stream.shard] = stream.position
    has_more = any(not stream.done for stream in streams)
    return PollResponse(merge.out, _encode(bus, positions), has_more)


class _Merge:
    def __init__(self, streams: list[ShardStream], keep: EventFilter | None, limit: int) -> None:
        self.streams = streams
        self.keep = keep
        self.limit = limit
        self.out: list[StoredEvent] = []
        self.budget = max(limit * _SCAN_FACTOR, _MIN_SCAN)
        self._frames = {s.shard: 1 for s in streams}

    async def _fill(self, streams: list[ShardStream]) -> None:
        async def one(stream: ShardStream) -> None:
            n = self._frames[stream.shard]
            await stream.fill(n)
            self._frames[stream.shard] = min(n * 2, _MAX_FRAMES)

        if len(streams) == 1:
            await one(streams[0])
        elif streams:
            await asyncio.gather(*(one(s) for s in streams))

    def _emit(self, event: StoredEvent) -> None:
        self.budget -= 1
        if self.keep is None or self.keep.matches(event):
            self.out.append(event)

    def _wanted(self) -> bool:
        return len(self.out) < self.limit and self.budget > 0

    async def by_sequence(self) -> None:
        """Each shard in order, one event per shard per round."""
        while self._wanted():
            await self._fill([s for s in self.streams if not s and not s.at_end])
            live = [s for s in self.streams if s]
            if not live:
                return
            # Whole rounds while every live shard has events buffered.
            rounds = min(len(s) for s in live)
            if self.keep is None:
                self._rounds(live, rounds)
                continue
            for _ in range(rounds):
                for stream in live:
                    if not self._wanted():
                        return
                    self._emit(stream.pop())

    def _rounds(self, live: list[ShardStream], rounds: int) -> None:
        """Unfiltered: take whole rounds from every shard at once and interleave them
        (the last round cut where the limit falls, earlier shards first)."""
        wanted = min(self.limit - len(self.out), self.budget)
        full, extra = divmod(min(wanted, rounds * len(live)), len(live))
        takes = [s.take(full + (1 if i < extra else 0)) for i, s in enumerate(live)]
        for group in zip(*takes, strict=False):
            self.out += group
        if extra:
            self.out += [take[full] for take in takes[:extra]]
        self.budget -= full * len(live) + extra

    async def by_timestamp(self) -> None:
        """All shards merged by ingestion time (ties: shard, then position): a k-way
        merge of the shards' sequences by their heads, reading a shard again
        before its next head is compared."""
        await self._fill([s for s in self.streams if not s.at_end])
        heap: list[tuple[int, int, ShardStream]] = [
            (s.peek_timestamp(), s.shard, s) for s in self.streams if s
        ]
        heapq.heapify(heap)
        keep, out, limit = self.keep, self.out, self.limit
        scanned = 0
        while heap and len(out) < limit and scanned < self.budget:
            stream = heap[0][2]
            event = stream.pop()
            scanned += 1
            if keep is None or keep.matches(event):
                out.append(event)
            if not stream and not stream.at_end:
                # Its next event may be older than every other head: read it first.
                await self._fill([stream])
            if stream:
                heapq.heapreplace(heap, (stream.peek_timestamp(), stream.shard, stream))
            else:
                heapq.heappop(heap)
        self.budget -= scanned


class BusReader:
    """Polls a bus from any process: reads its log directly (no node involved).

    ``BusReader.jetstream(transport, "orders")`` reads the bus's JetStream
    stream; ``BusReader(log, bus)`` any :class:`~clstr.eventbus.EventLog`.
    """

    def __init__(self, log: EventLog, bus: str) -> None:
        self.log = log
        self.bus = bus

    @classmethod
    def jetstream(
        cls, transport: NatsTransport, bus: str, *, prefix: str = DEFAULT_PREFIX
    ) -> BusReader:
        """A reader of ``bus``'s stream under ``prefix``."""
        from ._jetstream import JetStreamLog

        return cls(JetStreamLog(transport, bus=bus, prefix=prefix), bus)

    async def poll(self, request: PollRequest | None = None) -> PollResponse:
        """As :meth:`EventBus.poll <clstr.eventbus.EventBus.poll>`."""
        return await poll(self.log, self.bus, request or PollRequest())
