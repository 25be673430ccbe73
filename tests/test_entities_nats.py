"""Entities and singletons on a real nats-server: state in JetStream KV survives
handoffs and owner crashes; a singleton never runs twice at once."""

from __future__ import annotations

import asyncio
import itertools
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import msgpack
import pytest

from clstr import Client, NotOwnerError, RequestError, RetryPolicy
from clstr.entities import Entity, KvStateStore, Record, Sharding, StaleStateError, handles
from clstr.hashing import assign_shards, shard_for_key
from clstr.membership import KvMembership, KvSettings
from clstr.node import ShardContext
from clstr.testing import NatsServer, TcpProxy
from clstr.transports.nats import NatsOptions, NatsTransport

from _support import ScriptNode, eventually

sys.path.insert(0, str(Path(__file__).parent))
from _entity_node import Append, Basket, Items

NODE_SCRIPT = Path(__file__).with_name("_entity_node.py")
NUM_SHARDS = 16
FAST = KvSettings(heartbeat_interval=0.25, heartbeat_ttl=2.0, reconcile_interval=0.25)


@dataclass
class NoteState:
    notes: list[str] = field(default_factory=list)


@dataclass
class Note:
    text: str


@dataclass
class Notes:
    pass


class Notebook(Entity[NoteState]):
    """Saved only when it passivates or its shard moves (save_every=0)."""

    state_type = NoteState
    save_every = 0

    @handles
    async def note(self, msg: Note) -> int:
        self.state.notes.append(msg.text)
        return len(self.state.notes)

    @handles
    async def read(self, msg: Notes) -> list[str]:
        return self.state.notes


@pytest.fixture
async def server() -> AsyncIterator[NatsServer]:
    async with NatsServer(jetstream=True) as srv:
        yield srv


async def _runner(url: str, node_id: str, made: list[NatsTransport]) -> Sharding:
    transport = await NatsTransport.connect(url, NatsOptions(name=node_id, reconnect_time_wait=0.1))
    made.append(transport)
    runner = Sharding(
        transport,
        num_shards=NUM_SHARDS,
        node_id=node_id,
        membership=lambda group: KvMembership(settings=FAST),
        store=KvStateStore(transport),
    )
    runner.register_entity(Notebook)
    return runner


class TestHandoff:
    async def test_state_moves_with_its_shard(self, server: NatsServer) -> None:
        """An entity saved only on passivation keeps its state when its shard moves
        to a joining node: saved before the old owner releases the shard, loaded
        by the new one."""
        made: list[NatsTransport] = []
        a = await _runner(server.url, "a", made)
        b = await _runner(server.url, "b", made)
        try:
            await a.start()
            moving = assign_shards(["a", "b"], NUM_SHARDS)
            ids = [i for i in (f"nb{n}" for n in range(100)) if moving[_shard(i)] == "b"][:3]
            for notebook in ids:
                await a.entity(Notebook, notebook).call(Note("first"), int)
            await b.start()
            await eventually(
                lambda: all(b.has_shard_id(b.get_shard_id(Notebook, i)) for i in ids), 20
            )
            for notebook in ids:
                assert await b.entity(Notebook, notebook).call(Notes(), list[str]) == ["first"]
            assert b.active_entity_count(Notebook) == len(ids)
            assert a.active_entity_count(Notebook) == 0
        finally:
            for runner in (b, a):
                await runner.shutdown()
            for transport in made:
                await transport.close()


def _shard(notebook: str) -> int:
    return shard_for_key(f"Notebook/{notebook}", NUM_SHARDS)


class TestFencing:
    async def test_a_save_at_a_stale_revision_is_refused(self, server: NatsServer) -> None:
        """KvStateStore writes only at the revision the writer loaded: a second
        first write, or a write at a revision another writer has moved past, raises
        StaleStateError and leaves the newer record in the bucket."""
        transport = await NatsTransport.connect(server.url)
        try:
            store = KvStateStore(transport)
            first = await store.save("Basket", "b1", Record(b"one"), 0)
            with pytest.raises(StaleStateError, match="written by another owner"):
                await store.save("Basket", "b1", Record(b"again"), 0)
            second = await store.save("Basket", "b1", Record(b"two"), first)
            assert second > first
            with pytest.raises(StaleStateError, match=f"since revision {first}"):
                await store.save("Basket", "b1", Record(b"stale"), first)
            assert await store.load("Basket", "b1") == (Record(b"two"), second)
        finally:
            await transport.close()

    async def test_a_stale_owner_cannot_overwrite_newer_state(self, server: NatsServer) -> None:
        """An instance whose record another owner rewrote in KV meanwhile gets
        not_owner for its next write (nothing overwritten) and reloads the newer
        state, as on the memory store (tests/test_entities.py)."""
        transport = await NatsTransport.connect(server.url)
        store = KvStateStore(transport)
        try:
            async with Sharding(transport, num_shards=NUM_SHARDS, store=store) as runner:
                runner.register_entity(Basket)
                basket = runner.entity(Basket, "b1")
                assert await basket.call(Append("tea"), int) == 1
                loaded = await store.load("Basket", "b1")
                assert loaded is not None
                newer = Record(msgpack.packb({"items": ["other"]}), [])
                await store.save("Basket", "b1", newer, loaded[1])  # another owner wrote
                with pytest.raises(NotOwnerError, match="written by another owner"):
                    await basket.call(Append("jam"), int)
                assert await basket.call(Items(), list[str]) == ["other"]
                assert await basket.call(Append("jam"), int) == 2
        finally:
            await transport.close()


class TestCrashes:
    async def test_write_through_loses_and_repeats_nothing_across_kills(
        self, server: NatsServer
    ) -> None:
        """Clients append to entities while their owner is SIGKILLed and a new node
        joins: afterwards every acknowledged append is in its entity's state, and
        none is there twice (the state and the replies that produced it are saved
        in one conditional write, so a retry after a crash gets its first reply)."""
        nodes = {n: ScriptNode(NODE_SCRIPT, n) for n in ("n1", "n2", "n3", "n4")}
        transport = await NatsTransport.connect(server.url)
        retry = RetryPolicy(attempt_timeout=1.0, max_backoff=0.2)
        client = Client(transport, num_shards=NUM_SHARDS, timeout=20, retry=retry)
        acked: dict[str, list[str]] = {f"b{i}": [] for i in range(12)}
        failed = 0
        sequence = itertools.count()

        async def writer(basket: str, count: int) -> None:
            nonlocal failed
            for n in range(count):
                item = f"{basket}-{n}"
                try:
                    await client.entity("Basket", basket).call(
                        Append(item), int, request_id=f"{item}-{next(sequence)}"
                    )
                    acked[basket].append(item)
                except RequestError:
                    failed += 1

        try:
            for name in ("n1", "n2", "n3"):
                await nodes[name].start(server.url, name, str(NUM_SHARDS))
            writers = asyncio.gather(*(writer(b, 25) for b in acked))
            await eventually(lambda: sum(map(len, acked.values())) >= 60, 30)
            await nodes["n2"].kill()
            await eventually(lambda: sum(map(len, acked.values())) >= 150, 30)
            await nodes["n4"].start(server.url, "n4", str(NUM_SHARDS))
            await writers
            for basket, items in acked.items():
                stored = await client.entity("Basket", basket).call(Items(), list[str])
                assert len(stored) == len(set(stored)), f"{basket} applied twice: {stored}"
                assert set(items) <= set(stored), f"{basket} lost acknowledged appends"
            assert sum(map(len, acked.values())) + failed == 12 * 25
            print(f"acknowledged {sum(map(len, acked.values()))}, failed {failed}")
        finally:
            await client.close()
            await transport.close()
            for node in nodes.values():
                await node.cleanup()


class TestSingletons:
    async def test_never_two_at_once_and_it_fails_over(self, server: NatsServer) -> None:
        """The node running a singleton is cut off (its connection stalls): it stops
        the singleton when its lease runs out, before another node's membership may
        take the shard, and the singleton starts there. Every run's start and stop
        go to one timeline: no two runs overlap."""
        made: list[NatsTransport] = []
        timeline: list[tuple[str, str, float]] = []
        loop = asyncio.get_running_loop()

        async def beat(ctx: ShardContext) -> None:
            timeline.append(("start", ctx.node_id, loop.time()))
            try:
                await ctx.stopping.wait()
            finally:
                timeline.append(("stop", ctx.node_id, loop.time()))

        host, port = "127.0.0.1", int(server.url.rsplit(":", 1)[1])
        async with TcpProxy(host, port) as proxy_a, TcpProxy(host, port) as proxy_b:
            runners = {
                "a": await _runner(proxy_a.url, "a", made),
                "b": await _runner(proxy_b.url, "b", made),
            }
            proxies = {"a": proxy_a, "b": proxy_b}
            try:
                for runner in runners.values():
                    runner.register_singleton("beat", beat, grace=0.1)
                    await runner.start()
                shard = runners["a"].singleton_shard("beat").shard
                settled = assign_shards(["a", "b"], NUM_SHARDS)[shard]

                def running_on_its_owner() -> bool:
                    return bool(timeline) and timeline[-1][:2] == ("start", settled)

                await eventually(running_on_its_owner, 20)
                base = len(timeline)
                proxies[settled].stall()
                try:
                    await eventually(lambda: len(timeline) == base + 2, 20)
                except TimeoutError:
                    raise AssertionError(f"timeline {timeline}") from None
                moved = timeline[base - 1 :]
                assert [e[0] for e in moved] == ["start", "stop", "start"]
                assert moved[1][1] == settled
                assert moved[2][1] != settled
                assert moved[1][2] < moved[2][2]  # stopped before the next start
                failover = moved[2][2] - moved[1][2]
                print(
                    f"singleton: stopped on the cut-off owner, started elsewhere {failover:.2f} s "
                    "later"
                )
                proxies[settled].resume()
            finally:
                for runner in runners.values():
                    await runner.shutdown()
                for transport in made:
                    await transport.close()
        starts = [t for kind, _, t in timeline if kind == "start"]
        stops = [t for kind, _, t in timeline if kind == "stop"]
        assert all(stop <= start for stop, start in zip(stops, starts[1:], strict=False))


class TestStatus:
    async def test_status_shows_live_entities(self, server: NatsServer) -> None:
        """A node hosting entities reports its live instances per type in $SRV STATS,
        and `clstr status`'s table gets an ENTITIES column."""
        from clstr.observe import ServiceDiscovery, gather_view, render_table

        made: list[NatsTransport] = []
        runner = await _runner(server.url, "a", made)
        try:
            await runner.start()
            await runner.entity(Notebook, "nb1").call(Note("x"), int)
            node = runner.nodes["default"]
            async with ServiceDiscovery(node, node.transport):
                view = await gather_view(made[0], num_shards=NUM_SHARDS, prefix="clstr")
            assert [n.entities for n in view.nodes] == [{"Notebook": 1}]
            assert "ENTITIES" in render_table(view)
        finally:
            await runner.shutdown()
            for transport in made:
                await transport.close()
