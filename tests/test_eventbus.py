"""The event bus on its own (memory and no-op adapters): ingestion, backpressure under
slow and failing adapters, flush, shutdown, and the stats invariant."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator

import pytest
from _bus_support import ScriptedAdapter, assert_invariant, shard_of

from clstr import LifecycleError
from clstr.eventbus import (
    Backpressure,
    BackpressureError,
    BatchConfig,
    BusConfig,
    DispatchRetry,
    Event,
    EventBus,
    EventSerializationError,
    MemoryAdapter,
    NoopAdapter,
    PollRequest,
    SampledError,
    ShuttingDownError,
)

FAST_RETRY = DispatchRetry(initial_backoff=0.001, max_backoff=0.01)


def one_shard(
    adapter: MemoryAdapter, mode: Backpressure = Backpressure.BLOCK, **kw: object
) -> BusConfig:
    """One shard of 8 slots, batches of 4 sent at once: every count below is exact."""
    settings: dict[str, object] = {"retry": FAST_RETRY, **kw}
    return BusConfig(
        name="t",
        shards=1,
        ring_capacity=8,
        batch=BatchConfig(max_events=4, max_delay_ms=0),
        backpressure=mode,
        adapter=adapter,
        **settings,  # type: ignore[arg-type]
    )


def ev(i: int, key: str = "k") -> Event:
    return Event(key, str(i).encode(), "n")


async def stored(bus: EventBus) -> list[int]:
    """The payload numbers the adapter's log holds, in order."""
    response = await bus.poll(PollRequest(limit=100_000))
    return [int(e.payload) for e in response.events]


@pytest.fixture
async def memory_bus() -> AsyncIterator[EventBus]:
    bus = EventBus(BusConfig(name="t", shards=4, adapter=MemoryAdapter()))
    await bus.start()
    try:
        yield bus
    finally:
        assert_invariant(await bus.shutdown())


class TestIngest:
    async def test_ingest_is_a_plain_call_that_queues_on_the_keys_shard(
        self, memory_bus: EventBus
    ) -> None:
        """ingest returns None at once (not a coroutine), and a key's events all land on
        one shard, in order."""
        assert not inspect.iscoroutinefunction(memory_bus.ingest)
        for i in range(50):
            assert memory_bus.ingest(ev(i, f"user-{i % 5}")) is None  # type: ignore[func-returns-value]
        await memory_bus.flush()
        response = await memory_bus.poll(PollRequest(limit=1000))
        by_key: dict[str, list[tuple[int, int]]] = {}
        for e in response.events:
            by_key.setdefault(str(e.key), []).append((e.shard, int(e.payload)))
        assert len(by_key) == 5
        for key, seen in by_key.items():
            assert {shard for shard, _ in seen} == {shard_of(memory_bus, key)}
            assert [n for _, n in seen] == sorted(n for _, n in seen)

    async def test_ingest_raw_takes_bytes_and_a_precomputed_hash(
        self, memory_bus: EventBus
    ) -> None:
        """ingest_raw stores the bytes as they are (no key, no type) on the shard its hash
        names: hash_key(key) puts it with that key's events."""
        memory_bus.ingest(ev(1, "alice"))
        memory_bus.ingest_raw(b"raw", hash=memory_bus.hash_key("alice"))
        memory_bus.ingest_raw(b"unhashed")
        await memory_bus.flush()
        events = (await memory_bus.poll(PollRequest(limit=10))).events
        raw = next(e for e in events if e.payload == b"raw")
        assert (raw.key, raw.type) == (None, "")
        assert raw.shard == shard_of(memory_bus, "alice")
        assert any(e.payload == b"unhashed" for e in events)

    async def test_bad_events_are_refused_with_serialisation_errors(
        self, memory_bus: EventBus
    ) -> None:
        """A payload that is not bytes, a key that is not str/bytes, headers that are not
        str to str, or an event over the adapter's limit is refused and counted."""
        bad = [
            Event("k", "text"),  # type: ignore[arg-type]
            Event(7, b"x"),  # type: ignore[arg-type]
            Event("k", b"x", "t", {"a": 1}),  # type: ignore[dict-item]
            Event("k", b"x" * (2 * 1024 * 1024)),
            Event("k" * 5000, b"x"),
            ("not", "an", "event"),
        ]
        for event in bad:
            with pytest.raises(EventSerializationError):
                memory_bus.ingest(event)  # type: ignore[arg-type]
        with pytest.raises(EventSerializationError):
            memory_bus.ingest_raw("text")  # type: ignore[arg-type]
        memory_bus.ingest(Event("k", bytearray(b"ok"), "t", {"h": "v"}))  # type: ignore[arg-type]
        stats = memory_bus.stats()
        assert stats.rejected["invalid"] == 7
        assert stats.events_ingested == 1

    async def test_before_start_and_after_shutdown(self) -> None:
        """Before start ingest raises LifecycleError; after shutdown ShuttingDownError;
        both are counted as rejected, never as ingested."""
        bus = EventBus(BusConfig(name="t"))
        with pytest.raises(LifecycleError, match="not started"):
            bus.ingest(ev(0))
        await bus.start()
        bus.ingest(ev(1))
        stats = await bus.shutdown()
        with pytest.raises(ShuttingDownError):
            bus.ingest(ev(2))
        with pytest.raises(ShuttingDownError):
            await bus.ingest_wait(ev(3))
        stats = bus.stats()
        assert (stats.events_ingested, stats.events_dispatched) == (1, 1)
        assert stats.rejected["not_started"] == 1
        assert stats.rejected["shutting_down"] == 2
        assert_invariant(stats)

    async def test_sampling_keeps_or_refuses_whole_keys(self) -> None:
        """With sample_rate 0.5 about half the keys are refused with SampledError, and a
        key is always treated the same way."""
        bus = EventBus(BusConfig(name="t", sample_rate=0.5))
        await bus.start()
        kept: dict[str, bool] = {}
        for round_ in range(2):
            for i in range(400):
                key = f"user-{i}"
                try:
                    bus.ingest(ev(i, key))
                    outcome = True
                except SampledError:
                    outcome = False
                assert kept.setdefault(key, outcome) is outcome, (round_, key)
        share = sum(kept.values()) / len(kept)
        assert 0.4 < share < 0.6
        stats = await bus.shutdown()
        assert stats.rejected["sampled"] == 2 * sum(not k for k in kept.values())
        assert_invariant(stats)


class TestBackpressure:
    @pytest.mark.parametrize("mode", list(Backpressure))
    @pytest.mark.parametrize("failure", ["slow", "transient", "fatal"])
    async def test_invariant_under_each_mode(self, mode: Backpressure, failure: str) -> None:
        """With a batch of 4 held at a slow adapter and 20 more events offered to a ring
        of 8: DropOldest evicts the 12 oldest queued, DropNewest refuses the last 12,
        Block refuses them from ingest and lets ingest_wait wait; a transient failure is
        retried, a fatal one drops its batch at once; dispatched + dropped == ingested."""
        adapter = ScriptedAdapter(open_gate=False)
        if failure == "transient":
            adapter.transient = 3
        elif failure == "fatal":
            adapter.fatal_first = {(0, 0)}
        bus = EventBus(one_shard(adapter, mode))
        await bus.start()
        for i in range(4):
            bus.ingest(ev(i))
        await adapter.entered.wait()  # events 0-3 are in flight
        refused = []
        for i in range(4, 24):
            try:
                bus.ingest(ev(i))
            except BackpressureError:
                refused.append(i)
        waiting = []
        if mode is Backpressure.BLOCK:
            waiting = [asyncio.create_task(bus.ingest_wait(ev(i))) for i in refused]
            await asyncio.sleep(0)
            assert not any(t.done() for t in waiting)
        adapter.gate.set()
        await asyncio.gather(*waiting)
        stats = await bus.shutdown()
        assert_invariant(stats)
        lost_to_fatal = 4 if failure == "fatal" else 0
        if mode is Backpressure.DROP_OLDEST:
            assert refused == []
            assert stats.events_ingested == 24
            assert stats.events_dropped == 12 + lost_to_fatal
            assert await stored(bus) == [*range(lost_to_fatal, 4), *range(16, 24)]
        elif mode is Backpressure.DROP_NEWEST:
            assert refused == list(range(12, 24))
            assert stats.events_ingested == 12
            assert stats.rejected["backpressure"] == 12
            assert stats.events_dropped == lost_to_fatal
            assert await stored(bus) == list(range(lost_to_fatal, 12))
        else:
            assert refused == list(range(12, 24))
            assert stats.events_ingested == 24
            assert stats.events_dropped == lost_to_fatal
            assert await stored(bus) == list(range(lost_to_fatal, 24))
        assert stats.retries == (3 if failure == "transient" else 0)
        assert stats.batches_dropped == (1 if failure == "fatal" else 0)
        assert not stats.shutdown_was_lossy

    async def test_a_batch_out_of_attempts_is_dropped(self) -> None:
        """With max_attempts=2 a batch that keeps failing transiently is tried twice and
        then dropped (counted)."""
        adapter = ScriptedAdapter(transient=100)
        config = one_shard(adapter, retry=DispatchRetry(initial_backoff=0.001, max_attempts=2))
        bus = EventBus(config)
        await bus.start()
        for i in range(3):
            bus.ingest(ev(i))
        await bus.flush()
        stats = await bus.shutdown()
        assert (adapter.attempts, stats.retries, stats.events_dropped) == (2, 1, 3)
        assert_invariant(stats)

    async def test_a_retried_batch_is_stored_once(self) -> None:
        """A batch whose ack is lost after it was stored is sent again with the same
        message ids, and the log's dedupe keeps one copy."""
        adapter = ScriptedAdapter(transient=2, after_store=True)
        bus = EventBus(one_shard(adapter))
        await bus.start()
        for i in range(4):
            bus.ingest(ev(i))
        stats = await bus.shutdown()
        assert_invariant(stats)
        assert stats.retries == 2
        assert adapter.memory.duplicates == 2
        assert await stored(bus) == [0, 1, 2, 3]


class TestFlushAndShutdown:
    async def test_flush_sends_at_once_and_waits_for_the_adapter(self) -> None:
        """flush does not wait for a batch to fill or linger (max_delay 60 s): it returns
        once every event ingested before it was dispatched."""
        bus = EventBus(
            BusConfig(name="t", adapter=MemoryAdapter(), batch=BatchConfig(max_delay_ms=60_000))
        )
        await bus.start()
        for i in range(3):
            bus.ingest(ev(i, f"k{i}"))
        async with asyncio.timeout(5):
            await bus.flush()
        assert bus.stats().events_dispatched == 3
        assert_invariant(await bus.shutdown())

    async def test_shutdown_with_events_in_flight_is_not_lossy(self) -> None:
        """Events queued and in flight when shutdown starts are all dispatched once the
        adapter moves: shutdown_was_lossy stays False."""
        adapter = ScriptedAdapter(open_gate=False)
        bus = EventBus(one_shard(adapter))
        await bus.start()
        for i in range(8):
            bus.ingest(ev(i))
        await adapter.entered.wait()
        stopping = asyncio.create_task(bus.shutdown())
        await asyncio.sleep(0)
        assert not stopping.done()
        adapter.gate.set()
        stats = await stopping
        assert_invariant(stats)
        assert (stats.events_dispatched, stats.shutdown_was_lossy) == (8, False)

    async def test_shutdown_past_its_deadline_drops_and_says_so(self) -> None:
        """An adapter that never returns: shutdown gives up at its deadline, counts the
        queued and the in-flight events as dropped, and sets shutdown_was_lossy."""
        adapter = ScriptedAdapter(open_gate=False)
        bus = EventBus(one_shard(adapter))
        await bus.start()
        for i in range(7):
            bus.ingest(ev(i))
        await adapter.entered.wait()
        stats = await bus.shutdown(timeout=0.05)
        assert_invariant(stats)
        assert (stats.events_dropped, stats.events_dispatched) == (7, 0)
        assert stats.shutdown_was_lossy

    async def test_drops_before_shutdown_do_not_make_it_lossy(self) -> None:
        """A batch dropped by a fatal error before shutdown counts as dropped, but the
        shutdown itself lost nothing: shutdown_was_lossy is False."""
        adapter = ScriptedAdapter(fatal_first=[(0, 0)])
        bus = EventBus(one_shard(adapter))
        await bus.start()
        for i in range(4):
            bus.ingest(ev(i))
        await bus.flush()
        for i in range(4, 6):
            bus.ingest(ev(i))
        stats = await bus.shutdown()
        assert_invariant(stats)
        assert (stats.events_dropped, stats.events_dispatched) == (4, 2)
        assert not stats.shutdown_was_lossy

    async def test_shutdown_lets_waiting_ingests_in(self) -> None:
        """Under Block, an ingest_wait already waiting for room when shutdown starts gets
        in once the ring drains, and is dispatched; the shutdown is not lossy."""
        adapter = ScriptedAdapter(open_gate=False)
        bus = EventBus(one_shard(adapter))
        await bus.start()
        for i in range(4):
            bus.ingest(ev(i))
        await adapter.entered.wait()
        for i in range(4, 12):
            bus.ingest(ev(i))
        waiter = asyncio.create_task(bus.ingest_wait(ev(12)))
        await asyncio.sleep(0)
        stopping = asyncio.create_task(bus.shutdown())
        await asyncio.sleep(0)
        with pytest.raises(ShuttingDownError):
            bus.ingest(ev(13))  # a new one is refused meanwhile
        adapter.gate.set()
        await waiter
        stats = await stopping
        assert_invariant(stats)
        assert (stats.events_dispatched, stats.shutdown_was_lossy) == (13, False)
        assert await stored(bus) == list(range(13))

    async def test_a_waiting_ingest_is_refused_at_the_deadline(self) -> None:
        """An ingest_wait still waiting at the shutdown deadline gets ShuttingDownError
        (it was never ingested), and what was queued is dropped: lossy."""
        adapter = ScriptedAdapter(open_gate=False)
        bus = EventBus(one_shard(adapter))
        await bus.start()
        for i in range(4):
            bus.ingest(ev(i))
        await adapter.entered.wait()
        for i in range(4, 12):
            bus.ingest(ev(i))
        waiter = asyncio.create_task(bus.ingest_wait(ev(12)))
        await asyncio.sleep(0)
        stats = await bus.shutdown(timeout=0.05)
        with pytest.raises(ShuttingDownError):
            await waiter
        assert_invariant(stats)
        assert stats.events_ingested == 12
        assert stats.rejected["shutting_down"] == 1
        assert stats.shutdown_was_lossy

    async def test_shutdown_is_idempotent_and_the_noop_adapter_counts_dispatched(self) -> None:
        """The default adapter takes everything; shutting down twice returns the same
        final stats."""
        bus = EventBus(BusConfig(name="t", adapter=NoopAdapter()))
        async with bus:
            for i in range(1000):
                bus.ingest(ev(i, f"k{i}"))
        first = await bus.shutdown()
        assert first == await bus.shutdown()
        assert (first.events_dispatched, first.events_dropped) == (1000, 0)
        assert_invariant(first)
