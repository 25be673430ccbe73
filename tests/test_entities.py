"""Entities: typed, stateful instances per id, on the memory transport (the KV and
crash parts run on a real nats-server in tests/test_entities_nats.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import ClassVar

import pytest
from prometheus_client import CollectorRegistry

from clstr import (
    Client,
    ConfigurationError,
    Envelope,
    IdempotencyKeyReusedError,
    MemoryNetwork,
    MemoryTransport,
    NodeInfo,
    NoHandlerError,
    NotOwnerError,
    PrometheusMetrics,
    RemoteHandlerError,
    RequestInterruptedError,
    decode_payload,
    encode_payload,
)
from clstr.entities import (
    Entity,
    EntityHost,
    EntityRegistered,
    MemoryStateStore,
    Record,
    ShardAcquired,
    ShardId,
    Sharding,
    ShardingEvent,
    ShardReleased,
    SingletonRegistered,
    SingletonStarted,
    SingletonStopped,
    handles,
)
from clstr.hashing import shard_for_key
from clstr.node import FixedShards, ShardContext
from clstr.protocol import entity_key
from clstr.testing import virtual_time

from _support import eventually

NUM_SHARDS = 8


@dataclass
class AddItem:
    item: str


@dataclass
class Checkout:
    pass


@dataclass
class Total:
    count: int
    items: list[str] = field(default_factory=list)


@dataclass
class CartState:
    items: list[str] = field(default_factory=list)


class Cart(Entity[CartState]):
    state_type = CartState
    started: ClassVar[list[tuple[str, list[str]]]] = []
    stopped: ClassVar[list[str]] = []

    async def on_start(self) -> None:
        Cart.started.append((self.id, list(self.state.items)))

    async def on_stop(self) -> None:
        Cart.stopped.append(self.id)

    @handles
    async def add(self, msg: AddItem) -> Total:
        if msg.item == "bomb":
            self.state.items.append(msg.item)  # changed, then fails: rolled back
            raise ValueError("no bombs in carts")
        self.state.items.append(msg.item)
        return Total(len(self.state.items), list(self.state.items))

    @handles(Checkout)
    async def checkout(self, msg: Checkout) -> Total:
        return Total(len(self.state.items), list(self.state.items))


class Counter(Entity[None]):
    """No state type: kept in memory only while live."""

    type_name = "counter"
    max_instances = 2

    def __init__(self, *args: object) -> None:
        super().__init__(*args)  # type: ignore[arg-type]
        self.value = 0

    @handles
    async def bump(self, msg: AddItem) -> int:
        self.value += 1
        return self.value


@pytest.fixture(autouse=True)
def _reset_hooks() -> None:
    Cart.started.clear()
    Cart.stopped.clear()


@pytest.fixture
async def sharding() -> AsyncIterator[Sharding]:
    network = MemoryNetwork()
    runner = Sharding(MemoryTransport(network), num_shards=NUM_SHARDS, store=MemoryStateStore())
    runner.register_entity(Cart)
    runner.register_entity(Counter)
    async with runner:
        yield runner


class TestCalls:
    async def test_typed_call_keeps_state_per_entity(self, sharding: Sharding) -> None:
        """Each entity id has its own state; a typed call returns the typed reply."""
        cart = sharding.entity(Cart, "c1")
        assert await cart.call(AddItem("tea"), Total) == Total(1, ["tea"])
        assert await cart.call(AddItem("jam"), Total) == Total(2, ["tea", "jam"])
        other = sharding.make_client(Cart)("c2")
        assert await other.call(Checkout(), Total) == Total(0, [])
        assert sharding.active_entity_count(Cart) == 2

    async def test_a_plain_client_reaches_entities_by_type_and_id(self, sharding: Sharding) -> None:
        """Client.entity(Cart, id) is the same address as the runner's client."""
        client = Client(sharding.transport, num_shards=NUM_SHARDS)
        await sharding.entity(Cart, "c1").call(AddItem("tea"), Total)
        assert await client.entity(Cart, "c1").call(Checkout(), Total) == Total(1, ["tea"])
        assert await client.entity("Cart", "c1").call(Checkout(), Total) == Total(1, ["tea"])

    async def test_unknown_message_and_type_are_refused(self, sharding: Sharding) -> None:
        """A message type the entity does not handle, or an unregistered entity type,
        is no_handler, naming what is known."""
        with pytest.raises(NoHandlerError, match="known types"):
            await sharding.entity(Cart, "c1").call(Total(1), Total)
        with pytest.raises(NoHandlerError, match="no entity type 'Nope'"):
            await sharding.entity("Nope", "x").call(AddItem("a"), Total)

    async def test_a_failed_message_leaves_the_state_as_stored(self, sharding: Sharding) -> None:
        """A handler that raises after changing the state leaves it as before."""
        cart = sharding.entity(Cart, "c1")
        await cart.call(AddItem("tea"), Total)
        with pytest.raises(RemoteHandlerError, match="no bombs"):
            await cart.call(AddItem("bomb"), Total)
        assert await cart.call(Checkout(), Total) == Total(1, ["tea"])


class TestInterrupts:
    async def test_an_entity_message_is_interrupted_through_the_runner(self) -> None:
        """sharding.interrupt(id, key=...) cancels the message an entity runs: its
        handler sees CancelledError, the caller gets interrupted, and the entity
        goes on serving its next message."""
        entered, cancelled = asyncio.Event(), asyncio.Event()

        class Waiter(Entity[None]):
            @handles
            async def wait(self, msg: Checkout) -> int:
                entered.set()
                try:
                    await asyncio.Event().wait()
                except asyncio.CancelledError:
                    cancelled.set()
                    raise
                return 0

            @handles
            async def add(self, msg: AddItem) -> int:
                return len(msg.item)

        async with Sharding(MemoryTransport(MemoryNetwork()), num_shards=NUM_SHARDS) as runner:
            runner.register_entity(Waiter)
            waiter = runner.entity(Waiter, "w1")
            call = asyncio.create_task(waiter.call(Checkout(), int, request_id="r1"))
            await entered.wait()
            assert await runner.interrupt("r1", key=waiter.key) == 1
            with pytest.raises(RequestInterruptedError):
                await call
            assert cancelled.is_set()
            assert await waiter.call(AddItem("tea"), int) == 3


class TestRunnerMessages:
    async def test_send_and_notify_reach_the_keys_owner(self) -> None:
        """Sharding.send delivers an envelope to its key's owner (the other runner
        here) and returns the reply's payload; Sharding.notify runs the handler
        there without a reply."""
        noted: list[tuple[str, str]] = []
        arrived = asyncio.Event()

        class Where(Entity[None]):
            @handles
            async def where(self, msg: Checkout) -> str:
                return self.context.node_id

            @handles
            async def note(self, msg: AddItem) -> None:
                noted.append((self.context.node_id, msg.item))
                arrived.set()

        network = MemoryNetwork()
        a, b = (
            Sharding(MemoryTransport(network), num_shards=NUM_SHARDS, node_id=n, nodes=["a", "b"])
            for n in ("a", "b")
        )
        for runner in (a, b):
            runner.register_entity(Where)
        async with a, b:
            ids = (f"w{n}" for n in range(100))
            on_b = next(i for i in ids if b.has_shard_id(b.get_shard_id(Where, i)))
            key = entity_key("Where", on_b)
            reply = await a.send(Envelope("Checkout", encode_payload(Checkout()), key=key))
            assert decode_payload(reply, str) == "b"
            await a.notify(Envelope("AddItem", encode_payload(AddItem("tea")), key=key))
            async with asyncio.timeout(5):
                await arrived.wait()
            assert noted == [("b", "tea")]
            assert a.active_entity_count(Where) == 0

    async def test_is_shutdown_flips_after_shutdown(self) -> None:
        """is_shutdown is false before and while the runner serves, true after shutdown."""
        runner = Sharding(MemoryTransport(MemoryNetwork()), num_shards=2)
        assert not runner.is_shutdown()
        async with runner:
            assert not runner.is_shutdown()
        assert runner.is_shutdown()


class TestPlacement:
    async def test_shard_of_an_entity_is_its_keys_shard(self, sharding: Sharding) -> None:
        """get_shard_id is the shard of the key <type>/<id>; has_shard_id says whether
        this runner serves it."""
        shard_id = sharding.get_shard_id(Cart, "c1")
        assert shard_id == ShardId("default", sharding.clients["default"].shard_for("Cart/c1"))
        assert shard_id.shard == sharding.get_shard_id("Cart", "c1").shard
        assert entity_key("Cart", "c1") == "Cart/c1"
        assert sharding.has_shard_id(shard_id)
        assert not sharding.has_shard_id(ShardId("other", 0))

    def test_entity_type_names_cannot_hold_the_separator(self) -> None:
        """An entity type named with '/' is refused (ids may hold anything)."""

        class Bad(Entity[None]):
            type_name = "a/b"

            @handles
            async def any(self, msg: AddItem) -> None:
                return None

        with pytest.raises(ConfigurationError, match="may not contain"):
            EntityHost().register(Bad)


class TestPassivation:
    async def test_idle_entities_passivate_and_come_back_with_their_state(self) -> None:
        """An idle entity passivates (on_stop, state saved) and its next message
        brings it back with the saved state (on_start sees it)."""
        store = MemoryStateStore()

        class IdleCart(Cart):
            type_name = "IdleCart"
            idle_timeout = 10.0

        async with virtual_time():
            runner = Sharding(MemoryTransport(MemoryNetwork()), num_shards=2, store=store)
            runner.register_entity(IdleCart)
            async with runner:
                cart = runner.entity(IdleCart, "c1")
                await cart.call(AddItem("tea"), Total)
                await eventually(lambda: runner.active_entity_count() == 0, timeout=60)
                assert Cart.stopped == ["c1"]
                loaded = await store.load("IdleCart", "c1")
                assert loaded is not None
                assert loaded[0].state
                assert await cart.call(AddItem("jam"), Total) == Total(2, ["tea", "jam"])
                assert Cart.started == [("c1", []), ("c1", ["tea"])]

    async def test_past_max_instances_the_least_recent_passivate(self, sharding: Sharding) -> None:
        """Over max_instances live instances of a type, the least recently used
        passivates (here: the in-memory counter of the first id starts over)."""
        for entity_id in ("a", "b", "c"):
            await sharding.entity(Counter, entity_id).call(AddItem("x"), int)
        assert sharding.active_entity_count(Counter) == 2
        assert await sharding.entity(Counter, "a").call(AddItem("x"), int) == 1


class TestDurability:
    async def test_write_through_saves_before_the_reply(self) -> None:
        """With save_every=1 the state is in the store when the call returns."""
        store = MemoryStateStore()
        async with Sharding(MemoryTransport(MemoryNetwork()), num_shards=2, store=store) as r:
            r.register_entity(Cart)
            await r.entity(Cart, "c1").call(AddItem("tea"), Total, request_id="r1")
            record, revision = await store.load("Cart", "c1") or (None, 0)
            assert record is not None
            assert revision == 1
            assert [rid for rid, _, _ in record.replies] == ["r1"]

    async def test_every_n_messages_saves_in_batches(self) -> None:
        """With save_every=3 the store is written on the third message, not before."""
        store = MemoryStateStore()

        class Batched(Cart):
            type_name = "Batched"
            save_every = 3

        async with Sharding(MemoryTransport(MemoryNetwork()), num_shards=2, store=store) as r:
            r.register_entity(Batched)
            for item in ("a", "b"):
                await r.entity(Batched, "c1").call(AddItem(item), Total)
            assert await store.load("Batched", "c1") is None
            await r.entity(Batched, "c1").call(AddItem("c"), Total)
            assert await store.load("Batched", "c1") is not None

    async def test_a_retry_after_a_crash_gets_the_stored_reply(self) -> None:
        """The replies saved with the state answer a retried request on the next
        owner (here: a new runner on the same store, as after a crash) without
        applying it twice; the id used for another request is refused."""
        store = MemoryStateStore()
        first = Sharding(MemoryTransport(MemoryNetwork()), num_shards=2, store=store)
        first.register_entity(Cart)
        await first.start()
        reply = await first.entity(Cart, "c1").call(AddItem("tea"), Total, request_id="r1")
        # A crash: the node is gone without passivating; its reply cache with it.
        second = Sharding(MemoryTransport(MemoryNetwork()), num_shards=2, store=store)
        second.register_entity(Cart)
        async with second:
            cart = second.entity(Cart, "c1")
            assert await cart.call(AddItem("tea"), Total, request_id="r1") == reply
            assert await cart.call(Checkout(), Total) == Total(1, ["tea"])
            with pytest.raises(IdempotencyKeyReusedError):
                await cart.call(AddItem("jam"), Total, request_id="r1")
        await first.shutdown()

    async def test_a_stale_owner_cannot_overwrite_newer_state(self) -> None:
        """Writes are conditional on the revision loaded: an instance whose state was
        written elsewhere meanwhile gets not_owner (nothing overwritten) and reloads."""
        store = MemoryStateStore()
        async with Sharding(MemoryTransport(MemoryNetwork()), num_shards=2, store=store) as r:
            r.register_entity(Cart)
            cart = r.entity(Cart, "c1")
            await cart.call(AddItem("tea"), Total)
            newer = Record(b"\x81\xa5items\x91\xa5other", [])
            await store.save("Cart", "c1", newer, 1)  # another owner wrote revision 2
            with pytest.raises(NotOwnerError, match="written by another owner"):
                await cart.call(AddItem("jam"), Total)
            assert await cart.call(Checkout(), Total) == Total(1, ["other"])


class FlakyStore(MemoryStateStore):
    """Its next ``fail`` saves raise (JetStream unavailable, say)."""

    def __init__(self) -> None:
        super().__init__()
        self.fail = 0
        self.saves = 0

    async def save(self, entity_type: str, entity_id: str, record: Record, revision: int) -> int:
        self.saves += 1
        if self.fail:
            self.fail -= 1
            raise ConnectionError("the store is unavailable")
        return await super().save(entity_type, entity_id, record, revision)


@dataclass
class Peek:
    pass


class Ledger(Entity[CartState]):
    """A write-through entity with a read-only handler."""

    state_type = CartState

    @handles
    async def add(self, msg: AddItem) -> int:
        self.state.items.append(msg.item)
        return len(self.state.items)

    @handles(readonly=True)
    async def peek(self, msg: Peek) -> list[str]:
        return self.state.items


class TestWrites:
    async def test_a_failed_save_leaves_nothing_of_its_message(self) -> None:
        """A write-through save that fails rolls the instance back to the stored state
        and replies: the retry under the same id runs again and is saved, instead of
        being answered from memory with nothing stored."""
        store = FlakyStore()
        async with Sharding(MemoryTransport(MemoryNetwork()), num_shards=2, store=store) as r:
            r.register_entity(Ledger)
            ledger = r.entity(Ledger, "l1")
            await ledger.call(AddItem("a"), int, request_id="r0")
            store.fail = 1
            with pytest.raises(RemoteHandlerError, match="unavailable"):
                await ledger.call(AddItem("b"), int, request_id="r1")
            assert await ledger.call(Peek(), list[str]) == ["a"]
            assert await ledger.call(AddItem("b"), int, request_id="r1-retry") == 2
            record = await store.load("Ledger", "l1")
            assert record is not None
            assert decode_payload(record[0].state, CartState).items == ["a", "b"]

    async def test_reads_and_unchanged_states_write_nothing(self) -> None:
        """A read-only handler saves nothing and keeps no reply; a message that leaves
        the state as stored writes nothing either."""
        store = FlakyStore()
        async with Sharding(MemoryTransport(MemoryNetwork()), num_shards=2, store=store) as r:
            r.register_entity(Ledger)
            ledger = r.entity(Ledger, "l1")
            await ledger.call(AddItem("a"), int)
            saves = store.saves
            for i in range(3):
                assert await ledger.call(Peek(), list[str], request_id=f"p{i}") == ["a"]
            assert store.saves == saves

    async def test_kept_replies_is_checked_and_zero_keeps_none(self) -> None:
        """kept_replies bounds the replies in the record; 0 keeps none; out of range is
        a configuration error."""

        class Forgetful(Ledger):
            type_name = "Forgetful"
            kept_replies = 0

        class Greedy(Ledger):
            type_name = "Greedy"
            kept_replies = 65

        store = MemoryStateStore()
        async with Sharding(MemoryTransport(MemoryNetwork()), num_shards=2, store=store) as r:
            r.register_entity(Forgetful)
            await r.entity(Forgetful, "f").call(AddItem("a"), int, request_id="r1")
            record = await store.load("Forgetful", "f")
            assert record is not None
            assert record[0].replies == []
            with pytest.raises(ConfigurationError, match="kept_replies"):
                r.register_entity(Greedy)

    async def test_a_family_makes_its_types_on_first_use(self) -> None:
        """register_entity_family serves every type name with its prefix, made by the
        factory on the first message, and announced as a registration; the ids of
        stored records are listed by the store."""
        made: dict[str, type[Ledger]] = {}

        def factory(name: str) -> type[Ledger]:
            return made.setdefault(name, type(name, (Ledger,), {"type_name": name}))

        store = MemoryStateStore()
        async with Sharding(MemoryTransport(MemoryNetwork()), num_shards=2, store=store) as r:
            r.register_entity_family("book-", factory)
            await r.entity("book-a", "x").call(AddItem("1"), int)
            await r.entity("book-a", "y").call(AddItem("1"), int)
            await r.entity("book-b", "x").call(AddItem("1"), int)
            assert sorted(made) == ["book-a", "book-b"]
            assert await store.ids("book-a") == ["x", "y"]
            events = r.registration_events()
            seen = [await anext(events) for _ in range(2)]
            assert seen == [EntityRegistered("book-a"), EntityRegistered("book-b")]
            with pytest.raises(NoHandlerError):
                await r.entity("other", "x").call(AddItem("1"), int)


class TestObservability:
    async def test_counts_in_node_info_and_metrics(self) -> None:
        """Live instances per type show in node info and in the Prometheus gauge."""
        registry = CollectorRegistry()
        runner = Sharding(
            MemoryTransport(MemoryNetwork()),
            num_shards=2,
            store=MemoryStateStore(),
            metrics=PrometheusMetrics(registry),
        )
        runner.register_entity(Cart)
        async with runner:
            await runner.entity(Cart, "c1").call(AddItem("tea"), Total)
            shard = runner.get_shard_id(Cart, "c1").shard
            info = await runner.clients["default"].shard(shard).node_info()
            assert isinstance(info, NodeInfo)
            assert info.entities == {"Cart": 1}
            assert "AddItem" in (info.message_types or [])
            gauge = registry.get_sample_value(
                "clstr_cluster_entities_active",
                {"node_id": runner.node_id, "entity_type": "Cart"},
            )
            assert gauge == 1

    async def test_registration_events_replay_and_follow(self) -> None:
        """A subscriber learns the registrations made before it subscribed, then
        the shards this node acquires."""
        runner = Sharding(MemoryTransport(MemoryNetwork()), num_shards=2)
        runner.register_entity(Counter)
        events = runner.registration_events()
        assert await anext(events) == EntityRegistered("counter")
        async with runner:
            seen = [await anext(events), await anext(events)]
        assert {type(e).__name__ for e in seen} == {"ShardAcquired"}
        assert [e async for e in events if type(e).__name__ == "ShardAcquired"] == []


class TestSingletons:
    async def test_a_singleton_runs_on_exactly_one_node(self) -> None:
        """Of three runners that all register it, the singleton runs on the one that
        serves its shard, and nowhere else."""
        network = MemoryNetwork()
        ids = ["n1", "n2", "n3"]
        running: list[str] = []
        stop = asyncio.Event()

        async def report(ctx: object) -> None:
            running.append(ctx.node_id)  # type: ignore[attr-defined]
            await ctx.stopping.wait()  # type: ignore[attr-defined]

        runners = [
            Sharding(MemoryTransport(network), num_shards=NUM_SHARDS, node_id=n, nodes=ids)
            for n in ids
        ]
        for runner in runners:
            runner.register_singleton("totals", report)
        for runner in runners:
            await runner.start()
        try:
            await eventually(lambda: len(running) == 1)
            owner = [r for r in runners if r.has_shard_id(r.singleton_shard("totals"))]
            assert [r.node_id for r in owner] == running
            # Placed as the entity clstr.singleton/<name> (tests/vectors/entities.json).
            shard = runners[0].singleton_shard("totals").shard
            assert shard == shard_for_key("clstr.singleton/totals", NUM_SHARDS)
        finally:
            stop.set()
            for runner in runners:
                await runner.shutdown()

    async def test_singleton_events_follow_its_shard(self) -> None:
        """A subscriber that comes after the registration still gets
        SingletonRegistered first; the owner announces ShardAcquired and
        SingletonStarted; when the shard moves, the old owner announces
        SingletonStopped then ShardReleased and the new one ShardAcquired and
        SingletonStarted; the new owner's shutdown announces both stops."""
        network = MemoryNetwork()

        async def tick(ctx: ShardContext) -> None:
            await ctx.stopping.wait()

        # a serves every shard, b none, until the test moves the singleton's shard.
        a = Sharding(
            MemoryTransport(network),
            num_shards=NUM_SHARDS,
            node_id="a",
            membership=lambda group: FixedShards(),
        )
        b = Sharding(
            MemoryTransport(network),
            num_shards=NUM_SHARDS,
            node_id="b",
            membership=lambda group: FixedShards([]),
        )
        for runner in (a, b):
            runner.register_singleton("tick", tick, grace=1.0)
        events_a = a.registration_events()
        try:
            await a.start()
            await b.start()
            shard = a.singleton_shard("tick").shard
            started = await _next_events(events_a, NUM_SHARDS + 2)
            assert started[0] == SingletonRegistered("tick")
            assert set(started[1:]) == {
                SingletonStarted("tick"),
                *(ShardAcquired("default", s) for s in range(NUM_SHARDS)),
            }
            assert started.index(SingletonStarted("tick")) > started.index(
                ShardAcquired("default", shard)
            )
            events_b = b.registration_events()
            assert await _next_events(events_b, 1) == [SingletonRegistered("tick")]

            await a.nodes["default"].release(shard)
            await b.nodes["default"].acquire(shard)
            assert await _events_until(events_a, ShardReleased("default", shard)) == [
                SingletonStopped("tick"),
                ShardReleased("default", shard),
            ]
            assert await _events_until(events_b, SingletonStarted("tick")) == [
                ShardAcquired("default", shard),
                SingletonStarted("tick"),
            ]
            await b.shutdown()
            assert [e async for e in events_b] == [
                SingletonStopped("tick"),
                ShardReleased("default", shard),
            ]
        finally:
            for runner in (b, a):
                await runner.shutdown()
        assert SingletonStopped("tick") not in [e async for e in events_a]


async def _next_events(events: AsyncIterator[ShardingEvent], count: int) -> list[ShardingEvent]:
    """The next ``count`` events (failing after 5 s)."""
    async with asyncio.timeout(5):
        return [await anext(events) for _ in range(count)]


async def _events_until(
    events: AsyncIterator[ShardingEvent], last: ShardingEvent
) -> list[ShardingEvent]:
    """The events up to and including ``last`` (failing after 5 s)."""
    seen: list[ShardingEvent] = []
    async with asyncio.timeout(5):
        while not seen or seen[-1] != last:
            seen.append(await anext(events))
    return seen


class TestSnowflakes:
    async def test_runners_issue_unique_ordered_ids(self) -> None:
        """Two runners of one cluster issue ids with different machine ids; one
        runner's ids increase; none is issued before start or after shutdown."""
        from clstr import LifecycleError, parse_snowflake

        network = MemoryNetwork()
        a = Sharding(MemoryTransport(network), num_shards=2, node_id="a", nodes=["a", "b"])
        b = Sharding(MemoryTransport(network), num_shards=2, node_id="b", nodes=["a", "b"])
        with pytest.raises(LifecycleError):
            a.snowflake()
        async with a, b:
            ids_a = [a.snowflake() for _ in range(1000)]
            ids_b = [b.snowflake() for _ in range(1000)]
        assert ids_a == sorted(set(ids_a))
        assert not set(ids_a) & set(ids_b)
        assert parse_snowflake(ids_a[0]).machine_id != parse_snowflake(ids_b[0]).machine_id
        with pytest.raises(LifecycleError):
            a.snowflake()
