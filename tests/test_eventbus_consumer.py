"""Consumer nodes on the memory transport: one node per bus shard, checkpoints that move
with the shard, fencing tokens that keep a stale consumer from moving a newer one's
checkpoint, and handler failures that never skip events."""

from __future__ import annotations

import asyncio
import dataclasses
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import pytest
from _bus_support import assert_invariant

from clstr import Envelope, MemoryNetwork, MemoryTransport, Node
from clstr.eventbus import (
    BatchConfig,
    BusConfig,
    BusConsumer,
    ConsumerSettings,
    Event,
    EventBus,
    EventFilter,
    MemoryAdapter,
    MemoryCheckpoints,
    Position,
    StoredEvent,
    cluster_shard_of,
)

from _support import eventually

NUM_SHARDS = 8
BUS_SHARDS = 6
FAST = ConsumerSettings(checkpoint_interval=0.05, refresh_interval=0.05, idle_wait=(0.002, 0.02))


async def _noop(env: Envelope) -> bytes:
    return b""


@dataclass
class Recorder:
    """A handler that records which node handled which event."""

    node: str
    seen: list[tuple[str, int, int, int]] = field(default_factory=list)  # node, shard, n, ...
    fail: int = 0

    async def __call__(self, events: Sequence[StoredEvent]) -> None:
        if self.fail:
            self.fail -= 1
            raise RuntimeError("handler failing on purpose")
        for e in events:
            self.seen.append((self.node, e.shard, int(e.payload), e.frame))


@dataclass
class Setup:
    bus: EventBus
    adapter: MemoryAdapter
    checkpoints: MemoryCheckpoints
    network: MemoryNetwork

    def node(self, node_id: str, shards: list[int]) -> Node:
        return Node(
            MemoryTransport(self.network, name=node_id),
            _noop,
            num_shards=NUM_SHARDS,
            node_id=node_id,
            shards=shards,
        )

    def consumer(self, node: Node, recorder: Recorder, **kw: object) -> BusConsumer:
        settings = dataclasses.replace(FAST, **kw)  # type: ignore[arg-type]
        return BusConsumer(
            node,
            "orders",
            recorder,
            log=self.adapter.memory,
            checkpoints=self.checkpoints,
            settings=settings,
        )

    async def produce(self, start: int, n: int) -> None:
        for i in range(start, start + n):
            await self.bus.ingest_wait(Event(f"user-{i % 97}", str(i).encode()))
        await self.bus.flush()


@pytest.fixture
async def setup() -> AsyncIterator[Setup]:
    adapter = MemoryAdapter()
    bus = EventBus(
        BusConfig(
            name="orders",
            shards=BUS_SHARDS,
            adapter=adapter,
            batch=BatchConfig(max_events=32, max_delay_ms=1),
        )
    )
    await bus.start()
    try:
        yield Setup(bus, adapter, MemoryCheckpoints(), MemoryNetwork())
    finally:
        assert_invariant(await bus.shutdown())


def handled(*recorders: Recorder) -> Counter[int]:
    return Counter(n for r in recorders for _, _, n, _ in r.seen)


class TestPlacement:
    async def test_each_bus_shard_is_consumed_by_the_one_owner_of_its_cluster_shard(
        self, setup: Setup
    ) -> None:
        """Two nodes share the cluster shards; every bus shard is handled by the node that
        serves cluster_shard_of(bus shard), and every event exactly once."""
        half = list(range(NUM_SHARDS // 2))
        a = setup.node("a", half)
        b = setup.node("b", list(range(NUM_SHARDS // 2, NUM_SHARDS)))
        ra, rb = Recorder("a"), Recorder("b")
        setup.consumer(a, ra).bind()
        setup.consumer(b, rb).bind()
        async with a, b:
            await setup.produce(0, 600)
            await eventually(lambda: sum(handled(ra, rb).values()) == 600)
        assert set(handled(ra, rb).values()) == {1}
        for node, shard, _, _ in ra.seen + rb.seen:
            owner = "a" if cluster_shard_of("orders", shard, NUM_SHARDS) in half else "b"
            assert node == owner
        assert {shard for _, shard, _, _ in ra.seen + rb.seen} == set(range(BUS_SHARDS))

    async def test_a_consumer_sees_shards_added_later_and_filters(self, setup: Setup) -> None:
        """Shards added to the bus after the consumer started are picked up at the next
        refresh; a filter hands the handler only matching events."""
        node = setup.node("a", list(range(NUM_SHARDS)))
        recorder = Recorder("a")
        setup.consumer(node, recorder, filter=EventFilter(key_prefix="user-1")).bind()
        async with node:
            added = await setup.bus.add_shards(2)
            await setup.produce(0, 300)
            want = {i for i in range(300) if f"user-{i % 97}".startswith("user-1")}
            await eventually(lambda: set(handled(recorder)) == want)
        assert {shard for _, shard, _, _ in recorder.seen} & set(added)


class TestMoves:
    async def test_a_graceful_move_resumes_from_the_checkpoint_with_no_redelivery(
        self, setup: Setup
    ) -> None:
        """A cluster shard released by one node and acquired by another: the first
        checkpoints when stopped, the second resumes there, no event is handled twice."""
        a, b = setup.node("a", list(range(NUM_SHARDS))), setup.node("b", [])
        ra, rb = Recorder("a"), Recorder("b")
        setup.consumer(a, ra).bind()
        setup.consumer(b, rb).bind()
        async with a, b:
            await setup.produce(0, 300)
            await eventually(lambda: sum(handled(ra).values()) == 300)
            for shard in range(NUM_SHARDS):
                await a.release(shard)
                await b.acquire(shard, token=1)
            await setup.produce(300, 300)
            await eventually(lambda: sum(handled(ra, rb).values()) == 600)
        counts = handled(ra, rb)
        assert set(counts.values()) == {1}
        assert all(n >= 300 for n in handled(rb))
        for bus_shard in range(BUS_SHARDS):
            checkpoint = await setup.checkpoints.load("orders", bus_shard)
            assert checkpoint is not None
            assert checkpoint.node == "b"
            assert checkpoint.token == 1


class TestFencing:
    async def test_a_consumer_with_an_older_token_does_not_consume(self, setup: Setup) -> None:
        """A checkpoint written under token 5 stops a consumer holding token 0: it handles
        nothing and leaves the checkpoint as it was."""
        await setup.produce(0, 100)
        for shard in range(BUS_SHARDS):
            await setup.checkpoints.save(
                "orders", shard, Position(1, 0), token=5, node="new", revision=0
            )
        node = setup.node("old", list(range(NUM_SHARDS)))
        recorder = Recorder("old")
        consumer = setup.consumer(node, recorder)
        consumer.bind()
        async with node:
            await eventually(lambda: consumer.stats.stale >= BUS_SHARDS)
        assert recorder.seen == []
        checkpoint = await setup.checkpoints.load("orders", 0)
        assert checkpoint is not None
        assert (checkpoint.node, checkpoint.token) == ("new", 5)

    async def test_a_stale_consumer_stops_when_a_newer_owner_checkpoints(
        self, setup: Setup
    ) -> None:
        """A consumer whose checkpoint write finds a newer owner's token there stops that
        shard instead of overwriting it."""
        node = setup.node("old", [])
        recorder = Recorder("old")
        consumer = setup.consumer(node, recorder)
        consumer.bind()
        async with node:
            for shard in range(NUM_SHARDS):
                await node.acquire(shard, token=3)
            await setup.produce(0, 60)
            await eventually(lambda: len(recorder.seen) == 60)
            await eventually(lambda: consumer.stats.checkpoints >= BUS_SHARDS)
            taken = await setup.checkpoints.load("orders", 0)
            assert taken is not None
            await setup.checkpoints.save(
                "orders", 0, Position(1, 0), token=4, node="new", revision=taken.revision
            )
            await setup.produce(60, 60)
            await eventually(lambda: consumer.stats.stale >= 1)
        checkpoint = await setup.checkpoints.load("orders", 0)
        assert checkpoint is not None
        assert (checkpoint.node, checkpoint.token) == ("new", 4)


class TestHandlerFailures:
    async def test_a_failing_handler_gets_the_same_batch_again(self, setup: Setup) -> None:
        """A handler that raises twice is given the same events again: none is skipped
        or handled twice."""
        node = setup.node("a", list(range(NUM_SHARDS)))
        recorder = Recorder("a", fail=2)
        consumer = setup.consumer(node, recorder)
        consumer.bind()
        async with node:
            await setup.produce(0, 200)
            await eventually(lambda: sum(handled(recorder).values()) == 200, timeout=10)
        assert set(handled(recorder).values()) == {1}
        assert consumer.stats.handler_failures == 2
        assert consumer.stats.handled == 200


async def test_stopping_the_node_ends_the_consumer(setup: Setup) -> None:
    """A node that stops ends its consumer tasks (checkpointed): nothing is left running."""
    node = setup.node("a", list(range(NUM_SHARDS)))
    recorder = Recorder("a")
    setup.consumer(node, recorder).bind()
    async with node:
        await setup.produce(0, 50)
        await eventually(lambda: len(recorder.seen) == 50)
    assert node.bound_tasks == []
    positions = [await setup.checkpoints.load("orders", s) for s in range(BUS_SHARDS)]
    assert all(p is not None for p in positions)
    await asyncio.sleep(0)
