"""Polling the event bus (memory log): merged shards, cursors, filters, and their errors."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator

import msgpack
import pytest
from _bus_support import assert_invariant

from clstr import ConfigurationError
from clstr.eventbus import (
    BatchConfig,
    BusConfig,
    BusReader,
    ConsumerAdapterError,
    Event,
    EventBus,
    EventFilter,
    InvalidCursorError,
    InvalidFilterError,
    MemoryAdapter,
    MemoryLog,
    Ordering,
    PollRequest,
    StoredEvent,
)

KEYS = [f"user-{i}" for i in range(12)]
N = 600


@pytest.fixture
async def bus() -> AsyncIterator[EventBus]:
    """A bus of 4 shards whose 600 events (12 keys, 3 types) are in its log, in batches of
    at most 16 events: many frames per shard."""
    bus = EventBus(
        BusConfig(
            name="p",
            shards=4,
            adapter=MemoryAdapter(),
            batch=BatchConfig(max_events=16, max_delay_ms=0),
        )
    )
    await bus.start()
    for i in range(N):
        await bus.ingest_wait(Event(KEYS[i % len(KEYS)], str(i).encode(), f"t{i % 3}"))
    await bus.flush()
    try:
        yield bus
    finally:
        assert_invariant(await bus.shutdown())


async def drain(bus: EventBus | BusReader, request: PollRequest) -> tuple[list[StoredEvent], int]:
    """Poll with each response's cursor until has_more is False; return the events and
    how many polls it took."""
    events: list[StoredEvent] = []
    polls = 0
    while True:
        response = await bus.poll(request)
        polls += 1
        events += response.events
        assert len(response.events) <= request.limit
        request = request.from_cursor(response.cursor)
        if not response.has_more:
            return events, polls


class TestMerging:
    @pytest.mark.parametrize("ordering", list(Ordering))
    async def test_resuming_from_cursors_gives_every_event_once(
        self, bus: EventBus, ordering: Ordering
    ) -> None:
        """Polling 37 at a time, each from the previous cursor, returns every event exactly
        once with no gap, each shard in its order, and each key in ingestion order."""
        events, polls = await drain(bus, PollRequest(limit=37, ordering=ordering))
        assert polls == -(-N // 37)
        assert sorted(int(e.payload) for e in events) == list(range(N))
        for shard in range(4):
            positions = [e.position for e in events if e.shard == shard]
            assert positions == sorted(positions)
        for key in KEYS:
            numbers = [int(e.payload) for e in events if e.key == key]
            assert numbers == sorted(numbers)

    async def test_sequence_ordering_interleaves_the_shards(self, bus: EventBus) -> None:
        """A Sequence poll takes one event from each shard in turn."""
        response = await bus.poll(PollRequest(limit=8))
        assert [e.shard for e in response.events] == [0, 1, 2, 3, 0, 1, 2, 3]

    async def test_timestamp_ordering_merges_by_ingestion_time(self, bus: EventBus) -> None:
        """A Timestamp poll returns the events sorted by their ingestion timestamps."""
        response = await bus.poll(PollRequest(limit=300, ordering=Ordering.TIMESTAMP))
        stamps = [e.timestamp_ns for e in response.events]
        assert stamps == sorted(stamps)
        assert [int(e.payload) for e in response.events] == list(range(300))

    async def test_new_events_come_after_the_cursor(self, bus: EventBus) -> None:
        """Events ingested after a poll drained the log come in the next poll from its
        cursor, and only they."""
        _, _ = await drain(bus, PollRequest(limit=1000))
        response = await bus.poll(PollRequest(limit=1000))
        assert not response.has_more
        bus.ingest(Event("late", b"late"))
        await bus.flush()
        after = await bus.poll(PollRequest(limit=1000, cursor=response.cursor))
        assert [e.payload for e in after.events] == [b"late"]

    async def test_a_shard_subset_keeps_the_other_shards_positions(self, bus: EventBus) -> None:
        """Polling shards [1] moves only shard 1's position; the cursor still holds where
        the other shards were."""
        first = await bus.poll(PollRequest(limit=40))
        only_one, _ = await drain(bus, PollRequest(limit=50, shards=[1], cursor=first.cursor))
        assert {e.shard for e in only_one} == {1}
        rest = await bus.poll(PollRequest(limit=1000, cursor=first.cursor, shards=[0, 2, 3]))
        seen = {int(e.payload) for e in (*first.events, *only_one, *rest.events)}
        assert seen == set(range(N))

    async def test_a_reader_polls_the_log_without_the_bus(self, bus: EventBus) -> None:
        """BusReader polls any log by itself and accepts the bus's cursors."""
        reader = BusReader(bus.adapter.log, "p")  # type: ignore[arg-type]
        first = await bus.poll(PollRequest(limit=100))
        rest, _ = await drain(reader, PollRequest(limit=100, cursor=first.cursor))
        assert len(first.events) + len(rest) == N

    async def test_batches_over_the_frame_limit_are_split(self) -> None:
        """A batch larger than the adapter's frame limit goes out as several frames, and
        the events read back whole and in order."""
        adapter = MemoryAdapter(max_frame_bytes=2048)
        bus = EventBus(BusConfig(name="p", shards=1, adapter=adapter))
        await bus.start()
        for i in range(100):
            bus.ingest(Event("k", bytes([i]) * 300))
        stats = await bus.shutdown()
        assert_invariant(stats)
        assert adapter.memory.frame_count(0) > 10
        response = await bus.poll(PollRequest(limit=1000))
        assert [e.payload[0] for e in response.events] == list(range(100))


class TestFilters:
    async def test_filters_keep_matching_events_and_move_the_cursor(self, bus: EventBus) -> None:
        """A filter on type and key prefix returns only matching events, and its cursor
        moves past the skipped ones too."""
        request = PollRequest(limit=1000, filter="type=t1 key^=user-1")
        response = await bus.poll(request)
        assert response.events
        assert all(e.type == "t1" and str(e.key).startswith("user-1") for e in response.events)
        expected = [i for i in range(N) if i % 3 == 1 and KEYS[i % len(KEYS)].startswith("user-1")]
        assert sorted(int(e.payload) for e in response.events) == expected
        again = await bus.poll(request.from_cursor(response.cursor))
        assert (again.events, again.has_more) == ([], False)

    async def test_filter_objects_and_text_agree(self, bus: EventBus) -> None:
        """EventFilter(keys=..., types=...) and its text form select the same events."""
        text = await bus.poll(PollRequest(limit=1000, filter="key=user-2,user-3 type=t0"))
        obj = await bus.poll(
            PollRequest(
                limit=1000,
                filter=EventFilter(keys=frozenset({"user-2", "user-3"}), types=frozenset({"t0"})),
            )
        )
        assert text.events == obj.events
        assert text.events

    @pytest.mark.parametrize(
        "make",
        [
            lambda: EventFilter(types=frozenset()),
            lambda: EventFilter(types="t1"),  # type: ignore[arg-type]
            lambda: EventFilter(keys=frozenset({3})),  # type: ignore[arg-type]
            lambda: EventFilter(key_prefix=""),
            lambda: EventFilter.parse("colour=red"),
            lambda: EventFilter.parse("type"),
            lambda: EventFilter.parse(""),
            lambda: PollRequest(filter=42),  # type: ignore[arg-type]
            lambda: PollRequest(filter="key^=a key^=b"),
        ],
    )
    def test_invalid_filters_get_their_error(self, make: object) -> None:
        """An empty set, a value of the wrong type, an unknown field or a clause that does
        not parse raises InvalidFilterError."""
        with pytest.raises(InvalidFilterError):
            make()  # type: ignore[operator]


def _cursor(body: object) -> str:
    return base64.urlsafe_b64encode(msgpack.packb(body)).rstrip(b"=").decode()


class TestErrors:
    @pytest.mark.parametrize(
        "cursor",
        [
            "not a cursor!",
            "AAAA",
            _cursor([1, "p", [[0, 1]]]),
            _cursor([1, "p", [[0, 0, 0]]]),
            _cursor([1, "p", [[-1, 1, 0]]]),
            _cursor([1, "p", [[0, 1, 0], [0, 2, 0]]]),
            _cursor([2, "p", []]),
            _cursor([1, "p", {"0": 1}]),
            _cursor([1, "other-bus", []]),
            _cursor({"v": 1}),
            12,
        ],
    )
    async def test_invalid_cursors_get_their_error(self, bus: EventBus, cursor: object) -> None:
        """Garbage, a truncated or hand-made cursor, another bus's cursor: InvalidCursorError."""
        with pytest.raises(InvalidCursorError):
            await bus.poll(PollRequest(cursor=cursor))  # type: ignore[arg-type]

    async def test_a_truncated_real_cursor_is_refused(self, bus: EventBus) -> None:
        """A real cursor cut short is refused, not read as another position."""
        cursor = (await bus.poll(PollRequest(limit=10))).cursor
        with pytest.raises(InvalidCursorError):
            await bus.poll(PollRequest(cursor=cursor[:-3]))

    def test_requests_are_checked(self) -> None:
        """A limit out of range or a negative shard is refused when the request is built."""
        for bad in (
            lambda: PollRequest(limit=0),
            lambda: PollRequest(limit=10**6),
            lambda: PollRequest(shards=[-1]),
        ):
            with pytest.raises(ConfigurationError):
                bad()

    async def test_a_bus_without_a_log_cannot_be_polled(self) -> None:
        """The no-op adapter keeps nothing: poll says so with ConsumerAdapterError."""
        async with EventBus(BusConfig(name="p")) as bus:
            with pytest.raises(ConsumerAdapterError, match="keeps no events"):
                await bus.poll()
            assert_invariant(await bus.shutdown())

    async def test_an_empty_log_polls_empty(self) -> None:
        """A log with nothing in it gives no events, has_more False, and a usable cursor."""
        reader = BusReader(MemoryLog(), "p")
        response = await reader.poll()
        assert (response.events, response.has_more) == ([], False)
        assert (await reader.poll(PollRequest(cursor=response.cursor))).events == []
