"""Shard-bound tasks run on a node only while it may serve their shard."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from clstr import ConfigurationError, MemoryNetwork, MemoryTransport, Node
from clstr.node import NodeEvent, NodeEventKind, ShardContext
from clstr.testing import virtual_time

from _support import eventually

NUM_SHARDS = 4


async def _noop(env: object) -> bytes:
    return b""


class Probe:
    """A shard-bound task that records what it saw and runs until told to stop."""

    def __init__(self, *, obey: bool = True, fail_first: int = 0) -> None:
        self.started: list[ShardContext] = []
        self.stopped: list[int] = []
        self.obey = obey
        self.fail_first = fail_first
        self.cancelled = 0

    async def __call__(self, ctx: ShardContext) -> None:
        self.started.append(ctx)
        if self.fail_first:
            self.fail_first -= 1
            raise RuntimeError("failing on purpose")
        try:
            if self.obey:
                await ctx.stopping.wait()
            else:
                await asyncio.Event().wait()  # ignores the stop signal
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.stopped.append(ctx.shard)


@pytest.fixture
async def node() -> AsyncIterator[Node]:
    node = Node(MemoryTransport(MemoryNetwork()), _noop, num_shards=NUM_SHARDS, shards=[0, 1])
    await node.start()
    try:
        yield node
    finally:
        await node.stop()


class TestBinding:
    async def test_tasks_run_for_the_served_shards_only(self, node: Node) -> None:
        """A task bound to every shard runs once per shard the node serves; one bound
        to a shard it does not serve does not run."""
        every, elsewhere = Probe(), Probe()
        node.bind("every", every)
        node.bind("elsewhere", elsewhere, shards=[3])
        await eventually(lambda: len(every.started) == 2)
        assert sorted(c.shard for c in every.started) == [0, 1]
        assert {c.node_id for c in every.started} == {node.node_id}
        assert elsewhere.started == []
        assert sorted((c.name, c.shard) for c in node.bound_tasks) == [("every", 0), ("every", 1)]

    async def test_a_name_is_bound_once(self, node: Node) -> None:
        """Binding a name twice is refused with a clear error."""
        node.bind("x", Probe())
        with pytest.raises(ConfigurationError, match="already bound"):
            node.bind("x", Probe())

    async def test_unbind_stops_the_tasks(self, node: Node) -> None:
        """unbind signals the tasks, waits for them, and forgets the binding."""
        probe = Probe()
        node.bind("p", probe, shards=[0])
        await eventually(lambda: len(probe.started) == 1)
        await node.unbind("p")
        assert probe.stopped == [0]
        assert node.bound_tasks == []

    async def test_release_ends_the_shards_task_before_it_returns(self, node: Node) -> None:
        """Releasing a shard ends its task (told to stop, awaited) before release
        returns, so a membership gives the key up only after that."""
        probe = Probe()
        node.bind("p", probe)
        await eventually(lambda: len(probe.started) == 2)
        await node.release(1)
        assert probe.stopped == [1]
        assert [c.shard for c in node.bound_tasks] == [0]

    async def test_stop_ends_every_task(self) -> None:
        """Stopping the node ends every shard-bound task; none is left running."""
        node = Node(MemoryTransport(MemoryNetwork()), _noop, num_shards=NUM_SHARDS)
        probe = Probe()
        node.bind("p", probe)
        async with node:
            await eventually(lambda: len(probe.started) == NUM_SHARDS)
        assert sorted(probe.stopped) == list(range(NUM_SHARDS))

    async def test_a_task_ignoring_the_signal_is_cancelled_after_its_grace(
        self, node: Node
    ) -> None:
        """A task that does not return when told to stop is cancelled after its grace."""
        async with virtual_time() as clock:
            probe = Probe(obey=False)
            node.bind("stubborn", probe, shards=[0], grace=2.0)
            await eventually(lambda: len(probe.started) == 1)
            started = clock.time()
            await node.unbind("stubborn")
            assert clock.time() - started == pytest.approx(2.0, abs=0.05)
            assert probe.cancelled == 1


class TestFencing:
    async def test_fencing_stops_tasks_and_unfencing_starts_them_again(self, node: Node) -> None:
        """A fenced node stops its shard-bound tasks at once; unfenced, it starts them
        again; both moves are node events."""
        events: list[NodeEvent] = []
        node.add_listener(events.append)
        probe = Probe()
        node.bind("p", probe, shards=[0])
        await eventually(lambda: len(probe.started) == 1)
        node.fence("test")
        assert probe.started[0].stopped
        await eventually(lambda: probe.stopped == [0])
        node.unfence()
        await eventually(lambda: len(probe.started) == 2)
        kinds = [e.kind for e in events]
        assert kinds.index(NodeEventKind.FENCED) < kinds.index(NodeEventKind.UNFENCED)
        assert kinds.count(NodeEventKind.TASK_STARTED) == 2
        assert NodeEventKind.TASK_STOPPED in kinds

    async def test_a_lapsed_lease_stops_tasks_until_renewed(self, node: Node) -> None:
        """When the node's lease runs out its tasks stop; a renewed lease starts them."""
        async with virtual_time() as clock:
            probe = Probe()
            node.bind("p", probe, shards=[0])
            await eventually(lambda: len(probe.started) == 1)
            node.set_lease(clock.time() + 1.0)
            await eventually(lambda: probe.stopped == [0], timeout=5)
            assert node.fenced
            node.set_lease(clock.time() + 10.0)
            await eventually(lambda: len(probe.started) == 2)


class TestRestarts:
    async def test_a_failing_task_is_started_again(self, node: Node) -> None:
        """A task that raises while its shard is served starts again after a pause."""
        async with virtual_time():
            probe = Probe(fail_first=2)
            node.bind("p", probe, shards=[0])
            await eventually(lambda: len(probe.started) == 3, timeout=5)
            assert [c.token for c in probe.started] == [0, 0, 0]


class TestEvents:
    async def test_shard_moves_are_node_events(self) -> None:
        """Acquiring and releasing a shard are reported to listeners, in order."""
        node = Node(MemoryTransport(MemoryNetwork()), _noop, num_shards=2, shards=[0])
        events: list[NodeEvent] = []
        node.add_listener(events.append)
        async with node:
            await node.release(0)
        assert [(e.kind, e.shard) for e in events] == [
            (NodeEventKind.SHARD_ACQUIRED, 0),
            (NodeEventKind.SHARD_RELEASED, 0),
        ]
