"""Rescaling the event bus without losing or reordering events, and the scaling rule."""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict

import pytest
from _bus_support import ScriptedAdapter, assert_invariant, shard_of

from clstr import ConfigurationError
from clstr.eventbus import (
    Backpressure,
    BackpressureError,
    BatchConfig,
    BusConfig,
    Event,
    EventBus,
    MemoryAdapter,
    PollRequest,
    ScalingAction,
    ScalingPolicy,
    ScalingSignals,
    ShuttingDownError,
    StoredEvent,
    UnroutedError,
)
from clstr.eventbus._query import MAX_POLL_LIMIT
from clstr.eventbus._routing import TABLE_MASK, plan
from clstr.eventbus._scaling import suggest

from _support import eventually


def config(adapter: MemoryAdapter, shards: int = 1, **kw: object) -> BusConfig:
    settings: dict[str, object] = {
        "batch": BatchConfig(max_events=8, max_delay_ms=0),
        "ring_capacity": 64,
        **kw,
    }
    return BusConfig(name="s", shards=shards, adapter=adapter, **settings)  # type: ignore[arg-type]


async def every_event(bus: EventBus) -> list[StoredEvent]:
    """Every stored event, polled page by page (the producer's count has no bound)."""
    events: list[StoredEvent] = []
    cursor = None
    while True:
        page = await bus.poll(PollRequest(limit=MAX_POLL_LIMIT, cursor=cursor))
        events += page.events
        if not page.has_more:
            return events
        cursor = page.cursor


def moving_keys(bus: EventBus, old: list[int], new: list[int]) -> tuple[str, str]:
    """A key whose bucket changes owner from ``old`` to ``new`` shards, and one that stays."""
    before, after = plan(old, ""), plan(new, "")
    moving = staying = None
    for i in range(1000):
        key = f"key-{i}"
        bucket = bus.hash_key(key) & TABLE_MASK
        if before[bucket] != after[bucket]:
            moving = moving or key
        else:
            staying = staying or key
    assert moving
    assert staying
    return moving, staying


class TestRescale:
    async def test_no_event_is_lost_and_each_key_stays_in_order(self) -> None:
        """While 40 keys are ingested without pause, two shards are added and one
        removed: every event is stored once, and each key's events are stored in
        ingestion order (the log's order), across shards."""
        adapter = MemoryAdapter()
        bus = EventBus(config(adapter, shards=2))
        await bus.start()
        produced = 0
        done = asyncio.Event()

        async def produce() -> None:
            nonlocal produced
            while not done.is_set():
                await bus.ingest_wait(Event(f"k{produced % 40}", str(produced).encode()))
                produced += 1
                if produced % 50 == 0:
                    await asyncio.sleep(0)

        producer = asyncio.create_task(produce())
        await eventually(lambda: produced > 500)
        assert await bus.add_shards(2) == [2, 3]
        await eventually(lambda: produced > 1500)
        await bus.remove_shards([0])
        await eventually(lambda: produced > 2500)
        done.set()
        await producer
        stats = await bus.shutdown()
        assert_invariant(stats)
        assert stats.events_dropped == 0
        assert stats.retired_shards == (0,)
        assert sorted(s.shard for s in stats.shards) == [1, 2, 3]
        events = await every_event(bus)
        assert sorted(int(e.payload) for e in events) == list(range(produced))
        by_key = defaultdict(list)
        for e in sorted(events, key=lambda e: (e.frame, e.offset)):
            by_key[e.key].append(int(e.payload))
        moved = 0
        for key, numbers in by_key.items():
            assert numbers == sorted(numbers), key
            moved += len({e.shard for e in events if e.key == key}) > 1
        assert moved > 0  # some keys did change shards

    async def test_a_moving_key_is_unrouted_until_its_old_shard_flushed(self) -> None:
        """While the old shard still holds a moving key's events, ingest refuses the key
        with UnroutedError (other keys go on), ingest_wait waits, and once the old shard
        flushed the key lands on its new shard."""
        adapter = ScriptedAdapter(open_gate=False)
        bus = EventBus(config(adapter, shards=1))
        await bus.start()
        moving, staying = moving_keys(bus, [0], [0, 1])
        bus.ingest(Event(moving, b"before"))
        await adapter.entered.wait()
        adding = asyncio.create_task(bus.add_shards(1))
        await eventually(lambda: not bus.rescaler._settled.is_set())
        with pytest.raises(UnroutedError):
            bus.ingest(Event(moving, b"refused"))
        bus.ingest(Event(staying, b"flows"))
        waiting = asyncio.create_task(bus.ingest_wait(Event(moving, b"after")))
        await asyncio.sleep(0.01)
        assert not waiting.done()
        assert not adding.done()
        adapter.gate.set()
        assert await adding == [1]
        await waiting
        assert shard_of(bus, moving) == 1
        stats = await bus.shutdown()
        assert_invariant(stats)
        assert stats.rejected["unrouted"] == 1
        events = (await bus.poll(PollRequest(limit=100))).events
        assert [(e.shard, e.payload) for e in events if e.key == moving] == [
            (0, b"before"),
            (1, b"after"),
        ]

    async def test_removing_a_shard_dispatches_its_queue_first(self) -> None:
        """A removed shard's queued events are dispatched before it goes; its counters
        stay in the totals and its id is never reused."""
        adapter = ScriptedAdapter(open_gate=False)
        bus = EventBus(config(adapter, shards=3))
        await bus.start()
        for i in range(60):
            bus.ingest(Event(f"k{i}", str(i).encode()))
        await adapter.entered.wait()
        removing = asyncio.create_task(bus.remove_shards([1]))
        await asyncio.sleep(0.01)
        assert not removing.done()
        adapter.gate.set()
        await removing
        assert await bus.add_shards(1) == [3]
        stats = await bus.shutdown()
        assert_invariant(stats)
        assert (stats.events_dispatched, stats.retired_shards) == (60, (1,))
        events = (await bus.poll(PollRequest(limit=100))).events
        assert sorted(int(e.payload) for e in events) == list(range(60))

    async def test_shutdown_during_a_rescale(self) -> None:
        """A shutdown that starts while a rescale waits for its barrier ends the rescale
        with ShuttingDownError and loses nothing; no worker is left behind."""
        adapter = ScriptedAdapter(open_gate=False)
        bus = EventBus(config(adapter, shards=1))
        await bus.start()
        bus.ingest(Event("k", b"0"))
        await adapter.entered.wait()
        adding = asyncio.create_task(bus.add_shards(1))
        await eventually(lambda: not bus.rescaler._settled.is_set())
        stopping = asyncio.create_task(bus.shutdown())
        await asyncio.sleep(0)
        adapter.gate.set()
        stats = await stopping
        with pytest.raises(ShuttingDownError):
            await adding
        assert_invariant(stats)
        assert (stats.events_dispatched, stats.shutdown_was_lossy) == (1, False)

    async def test_rescale_requests_are_checked(self) -> None:
        """Unknown shards, removing every shard and adding zero are refused."""
        async with EventBus(config(MemoryAdapter(), shards=2)) as bus:
            with pytest.raises(ConfigurationError, match="no shard"):
                await bus.remove_shards([7])
            with pytest.raises(ConfigurationError, match="no shard"):
                await bus.remove_shards([0, 1])
            with pytest.raises(ConfigurationError):
                await bus.add_shards(0)
            assert_invariant(await bus.shutdown())


class TestScalingRule:
    async def test_a_filling_ring_suggests_adding_shards(self) -> None:
        """Rings 7/8 full with the adapter stuck: suggest adding half as many shards again."""
        adapter = ScriptedAdapter(open_gate=False)
        bus = EventBus(config(adapter, shards=2, ring_capacity=8))
        await bus.start()
        for i in range(200):
            with contextlib.suppress(BackpressureError):
                bus.ingest(Event(f"k{i}", b"x"))
        advice = bus.suggest_scaling()
        assert (advice.action, advice.shards, advice.target) == (ScalingAction.ADD, 1, 3)
        assert "full" in advice.reason
        assert advice.signals.peak_fill == 1.0
        adapter.gate.set()
        assert_invariant(await bus.shutdown())

    async def test_rejections_count_as_drops(self) -> None:
        """DropNewest rejections make the drop rate, which alone suggests adding."""
        adapter = ScriptedAdapter(open_gate=False)
        bus = EventBus(config(adapter, ring_capacity=4, backpressure=Backpressure.DROP_NEWEST))
        await bus.start()
        bus.suggest_scaling()  # start a fresh window
        for i in range(10):
            with contextlib.suppress(BackpressureError):
                bus.ingest(Event("k", str(i).encode()))
        advice = bus.suggest_scaling()
        assert advice.action is ScalingAction.ADD
        assert advice.signals.drop_rate > 0.4
        assert "dropped" in advice.reason
        adapter.gate.set()
        assert_invariant(await bus.shutdown())

    async def test_an_idle_bus_with_traffic_suggests_removing_one(self) -> None:
        """Batches went out fast and rings stayed empty: remove one shard; with no batch
        in the window (no evidence), or at min_shards, hold."""
        bus = EventBus(config(MemoryAdapter(), shards=3, scaling=ScalingPolicy(min_shards=2)))
        await bus.start()
        assert bus.suggest_scaling().action is ScalingAction.HOLD
        bus.ingest(Event("k", b"x"))
        await bus.flush()
        advice = bus.suggest_scaling()
        assert (advice.action, advice.target) == (ScalingAction.REMOVE, 2)
        await bus.remove_shards([2])
        bus.ingest(Event("k", b"x"))
        await bus.flush()
        assert bus.suggest_scaling().action is ScalingAction.HOLD
        assert_invariant(await bus.shutdown())

    def test_latency_counts_only_with_events_queued(self) -> None:
        """Slow batches suggest adding only while rings hold events, and never past
        max_shards."""
        policy = ScalingPolicy(max_shards=4, target_latency_ms=100)
        slow_busy = ScalingSignals(5.0, 0.3, 0.0, 400.0, 10)
        slow_idle = ScalingSignals(5.0, 0.0, 0.0, 400.0, 10)
        assert suggest(policy, 2, slow_busy).action is ScalingAction.ADD
        assert suggest(policy, 2, slow_idle).action is ScalingAction.HOLD
        capped = suggest(policy, 4, slow_busy)
        assert capped.action is ScalingAction.HOLD
        assert "max_shards" in capped.reason

    async def test_auto_scaling_applies_the_rule(self) -> None:
        """With auto on, a bus whose ring fills adds a shard by itself."""
        adapter = ScriptedAdapter(open_gate=False)
        policy = ScalingPolicy(auto=True, interval=0.02, cooldown=0, max_shards=2)
        bus = EventBus(config(adapter, ring_capacity=8, scaling=policy))
        await bus.start()
        for i in range(8):
            bus.ingest(Event(f"k{i}", b"x"))
        await eventually(lambda: len(bus.rings) == 2)
        adapter.gate.set()
        await eventually(lambda: bus.rescaler._settled.is_set())
        stats = await bus.shutdown()
        assert_invariant(stats)
        assert [s.shard for s in stats.shards] == [0, 1]
