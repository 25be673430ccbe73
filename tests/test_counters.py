"""Counters on the memory transport: batches at the node, StrictCounter, LaxCounter
(the crash and churn tests run on a real nats-server in tests/test_counters_nats.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import msgpack
import pytest
import structlog
from prometheus_client import CollectorRegistry

from clstr import (
    Client,
    CounterFlushError,
    CounterFullError,
    CounterRangeError,
    CounterSessionLostError,
    InvalidCounterKeyError,
    LifecycleError,
    MemoryNetwork,
    MemoryTransport,
    NotOwnerError,
    PrometheusMetrics,
    RemoteHandlerError,
    WrongShardError,
)
from clstr.client import BatchItem, send_batch
from clstr.codec import encode_payload
from clstr.counters import (
    CLOCK_SKEW,
    MAX_WRITERS,
    Counter,
    LaxCounter,
    StrictCounter,
    counter_key,
    counter_type,
    serve_counters,
)
from clstr.entities import MemoryStateStore, Sharding
from clstr.errors import BadRequestError
from clstr.hashing import assign_shards, shard_for_key

from _support import eventually

NUM_SHARDS = 8
NODES = ("a", "b", "c")


@dataclass
class Cluster:
    """Three runners serving counters on one memory network, and a client."""

    network: MemoryNetwork
    store: MemoryStateStore
    runners: dict[str, Sharding]
    client: Client

    async def start(self, node_id: str) -> Sharding:
        runner = Sharding(
            MemoryTransport(self.network, name=node_id),
            num_shards=NUM_SHARDS,
            node_id=node_id,
            nodes=NODES,
            store=self.store,
        )
        serve_counters(runner)
        await runner.start()
        self.runners[node_id] = runner
        return runner

    async def stop(self, node_id: str) -> None:
        await self.runners.pop(node_id).shutdown()

    def owner(self, routing_key: str) -> str:
        return assign_shards(list(NODES), NUM_SHARDS)[shard_for_key(routing_key, NUM_SHARDS)]


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    network = MemoryNetwork()
    made = Cluster(
        network,
        MemoryStateStore(),
        {},
        Client(MemoryTransport(network, name="client"), num_shards=NUM_SHARDS, timeout=2.0),
    )
    for node_id in NODES:
        await made.start(node_id)
    try:
        yield made
    finally:
        for node_id in list(made.runners):
            await made.stop(node_id)
        await made.client.close()


def _add(n: int, writer: str = "", q: int = 0, lo: int = 0, t: int = 0) -> bytes:
    return encode_payload({"n": n, "w": writer, "q": q, "lo": lo, "t": t})


async def _record(cluster: Cluster, namespace: str, key: str) -> dict[str, Any]:
    """The saved state of counter ``key``, as the node wrote it."""
    found = await cluster.store.load(counter_type(namespace), key)
    assert found is not None
    state: dict[str, Any] = msgpack.unpackb(found[0].state)
    return state


def _now() -> int:
    return int(time.time() * 1000)


def _later() -> int:
    """An operation's ``t`` as if it were sent once the clock allowance has passed."""
    return _now() + int(CLOCK_SKEW * 1000) + 1000


def _keys_of(cluster: Cluster, node_id: str, count: int, namespace: str = "t") -> list[str]:
    """``count`` counter keys of ``namespace`` whose shard ``node_id`` serves."""
    found = [
        f"k{i}" for i in range(1000) if cluster.owner(counter_key(namespace, f"k{i}")) == node_id
    ]
    return found[:count]


class TestBatches:
    async def test_items_for_many_shards_run_as_messages_and_answer_in_order(
        self, cluster: Cluster
    ) -> None:
        """One batch to a node carries items of several of its shards: each runs as
        its own message (per key, in order), the replies come back in the items'
        order, with the node's id and the shards it serves."""
        keys = _keys_of(cluster, "a", 4)
        items = [BatchItem("clstr.counter.add", counter_key("t", k), _add(1)) for k in keys]
        items += [BatchItem("clstr.counter.add", counter_key("t", keys[0]), _add(10))]
        shard = cluster.client.shard_for(items[0].key)
        reply = await send_batch(cluster.client, shard, items)
        assert [msgpack.unpackb(r) for r in reply.results] == [1, 1, 1, 1, 11]  # type: ignore[arg-type]
        assert reply.node_id == "a"
        assert reply.shards == cluster.runners["a"].nodes["default"].shards
        assert len({cluster.client.shard_for(i.key) for i in items}) > 1

    async def test_items_of_shards_served_elsewhere_are_refused_not_owner(
        self, cluster: Cluster
    ) -> None:
        """An item whose shard the node does not serve is answered not_owner (nothing
        ran); the others of the batch run."""
        mine, other = _keys_of(cluster, "a", 1)[0], _keys_of(cluster, "b", 1)[0]
        items = [
            BatchItem("clstr.counter.add", counter_key("t", mine), _add(1)),
            BatchItem("clstr.counter.add", counter_key("t", other), _add(1)),
        ]
        reply = await send_batch(cluster.client, cluster.client.shard_for(items[0].key), items)
        assert reply.results[0] == msgpack.packb(1)
        assert isinstance(reply.results[1], NotOwnerError)
        assert await StrictCounter(cluster.client, "t").get(other) == 0

    async def test_an_item_with_another_shard_count_is_refused_wrong_shard(
        self, cluster: Cluster
    ) -> None:
        """An item whose sender counts shards differently is refused wrong_shard, as
        a message would be."""
        odd = Client(cluster.client.transport, num_shards=NUM_SHARDS + 1)
        key = next(
            counter_key("t", f"k{i}")
            for i in range(100)
            if odd.shard_for(counter_key("t", f"k{i}"))
            != shard_for_key(counter_key("t", f"k{i}"), 8)
            and odd.shard_for(counter_key("t", f"k{i}")) < NUM_SHARDS
        )
        reply = await send_batch(
            odd, odd.shard_for(key), [BatchItem("clstr.counter.add", key, _add(1))]
        )
        assert isinstance(reply.results[0], WrongShardError)

    async def test_a_malformed_batch_is_refused_whole(self, cluster: Cluster) -> None:
        """A batch whose payload is not a list of items is bad_request, and nothing ran."""
        with pytest.raises(BadRequestError, match="batch"):
            await cluster.client.request_shard(0, "clstr.batch", msgpack.packb([{"t": "x"}]))
        with pytest.raises(BadRequestError, match="cannot be sent in a batch"):
            await cluster.client.request_shard(
                0, "clstr.batch", msgpack.packb([{"t": "clstr.batch", "k": "x", "s": 0}])
            )

    async def test_a_retried_item_id_gets_the_first_reply(self, cluster: Cluster) -> None:
        """Items keep the request-id rules of messages: the same id again gets the
        first reply without running again."""
        key = counter_key("t", _keys_of(cluster, "a", 1)[0])
        item = BatchItem("clstr.counter.add", key, _add(5), request_id="once")
        shard = cluster.client.shard_for(key)
        for _ in range(3):
            reply = await send_batch(cluster.client, shard, [item])
            assert reply.results == [msgpack.packb(5)]


class TestStrict:
    async def test_operations(self, cluster: Cluster) -> None:
        """inc returns the new total, get reads it, set sets, delete returns the old
        value and reads 0 after, clear deletes every key of the namespace only."""
        async with StrictCounter(cluster.client, "orders", store=cluster.store) as orders:
            other = StrictCounter(cluster.client, "other", store=cluster.store)
            assert await orders.inc("sku-1") == 1
            assert await orders.inc("sku-1", 41) == 42
            assert await orders.inc("sku-1", -2) == 40
            assert await orders.get("sku-1") == 40
            assert await orders.get("never") == 0
            await orders.set("sku-2", 7)
            assert await orders.delete("sku-2") == 7
            assert await orders.get("sku-2") == 0
            await other.inc("sku-1", 3)
            await orders.clear()
            assert await orders.get("sku-1") == 0
            assert await other.get("sku-1") == 3
            await other.close()

    async def test_both_counters_satisfy_one_interface(self, cluster: Cluster) -> None:
        """Generic code takes a Counter and works with either kind."""

        async def tally(counter: Counter) -> int:
            await counter.inc("hits", 2)
            await counter.inc("hits")
            return await counter.get("hits")

        async with (
            StrictCounter(cluster.client, "s") as strict,
            LaxCounter(cluster.client, "l") as lax,
        ):
            assert isinstance(strict, Counter)
            assert isinstance(lax, Counter)
            assert await tally(strict) == 3
            assert await tally(lax) == 3

    async def test_names_amounts_and_ranges_are_checked(self, cluster: Cluster) -> None:
        """Bad namespaces and keys, non-int amounts and totals past 64 bits are
        refused with their own errors, and nothing is applied."""
        with pytest.raises(InvalidCounterKeyError):
            StrictCounter(cluster.client, "has space")
        counter = StrictCounter(cluster.client, "n")
        for bad in ("", "x" * 513, "tab\there"):
            with pytest.raises(InvalidCounterKeyError):
                await counter.inc(bad)
        with pytest.raises(CounterRangeError):
            await counter.inc("k", 2**63)
        with pytest.raises(CounterRangeError):
            await counter.inc("k", True)
        await counter.set("k", 2**63 - 1)
        with pytest.raises(CounterRangeError, match="64-bit"):
            await counter.inc("k")
        assert await counter.get("k") == 2**63 - 1
        await counter.close()

    async def test_a_retried_operation_counts_once_however_many_writes_came_between(
        self, cluster: Cluster
    ) -> None:
        """An operation sent again under its writer and number gets its first reply
        and is not applied again, even after hundreds of other writers' writes to
        the key (a window of the key's last replies would have forgotten it)."""
        key = counter_key("t", "hot")
        scoped = cluster.client.key(key)
        first = await scoped.request_raw("clstr.counter.add", _add(5, "w1", 1, 1))
        for i in range(200):
            await scoped.request_raw("clstr.counter.add", _add(1, f"other-{i}", 1, 1))
        again = await scoped.request_raw("clstr.counter.add", _add(5, "w1", 1, 1))
        assert again == first == msgpack.packb(5)
        assert await StrictCounter(cluster.client, "t").get("hot") == 205

    async def test_a_writer_past_an_operation_forgets_its_reply(self, cluster: Cluster) -> None:
        """Once a writer's low mark passes an operation, the record drops its reply
        and a late copy of it is not applied."""
        key = counter_key("t", "k")
        scoped = cluster.client.key(key)
        await scoped.request_raw("clstr.counter.add", _add(1, "w", 1, 1))
        await scoped.request_raw("clstr.counter.add", _add(1, "w", 2, 2))
        record = await cluster.store.load("counter-t", "k")
        assert record is not None
        state = msgpack.unpackb(record[0].state)
        assert state["sessions"]["w"][0] == 2  # the low mark
        assert state["sessions"]["w"][2:] == [2, 2]  # only (q=2, reply 2) is kept
        await scoped.request_raw("clstr.counter.add", _add(1, "w", 1, 1))  # a late copy
        assert await StrictCounter(cluster.client, "t").get("k") == 2

    async def test_reads_write_nothing(self, cluster: Cluster) -> None:
        """get is a read-only entity message: it leaves no record behind."""
        counter = StrictCounter(cluster.client, "r", store=cluster.store)
        assert await counter.get("k") == 0
        assert await cluster.store.ids("counter-r") == []
        await counter.inc("k")
        assert await cluster.store.ids("counter-r") == ["k"]
        await counter.close()


class TestWriterBound:
    async def test_short_lived_counter_objects_write_a_key_as_one_writer(
        self, cluster: Cluster
    ) -> None:
        """2,000 StrictCounter objects, each made for one increment of one key and
        dropped, share one writer session: the key's record holds one session."""
        for _ in range(2000):
            async with StrictCounter(cluster.client, "churn") as counter:
                await counter.inc("hot")
        state = await _record(cluster, "churn", "hot")
        assert state["value"] == 2000
        assert len(state["sessions"]) == 1
        assert len(msgpack.packb(state)) < 100

    async def test_a_key_keeps_at_most_max_writers_sessions(self, cluster: Cluster) -> None:
        """Writers that each write a key once (one process each, say) leave at most
        MAX_WRITERS sessions in its record: the least recently written go."""
        scoped = cluster.client.key(counter_key("many", "hot"))
        writers = MAX_WRITERS + 200
        for i in range(writers):
            # Sent as if after the clock allowance (the test sends them in a burst).
            await scoped.request_raw("clstr.counter.add", _add(1, f"w{i}", 1, 1, _later()))
        state = await _record(cluster, "many", "hot")
        assert state["value"] == writers
        assert len(state["sessions"]) == MAX_WRITERS
        assert "w0" not in state["sessions"]
        assert f"w{writers - 1}" in state["sessions"]
        assert len(msgpack.packb(state)) < 30 * MAX_WRITERS  # about 27 bytes a session

    async def test_a_retry_the_key_may_have_forgotten_is_refused_not_counted_twice(
        self, cluster: Cluster
    ) -> None:
        """A writer's operation is applied and its reply lost; more than MAX_WRITERS
        other writers then write the key, which drops the writer's session: the
        retry (same bytes) is refused with CounterSessionLostError instead of being
        applied again. A remembered writer's next operation is applied; a new
        writer's is refused within the clock allowance of the drop, and applied
        when sent after it."""
        scoped = cluster.client.key(counter_key("lost", "hot"))
        retry = _add(5, "w", 1, 1, _now())
        await scoped.request_raw("clstr.counter.add", retry)
        others = MAX_WRITERS + 10
        for i in range(others):
            await scoped.request_raw("clstr.counter.add", _add(1, f"o{i}", 1, 1, _later()))
        with pytest.raises(RemoteHandlerError) as raised:
            await scoped.request_raw("clstr.counter.add", retry)
        assert raised.value.remote_type == CounterSessionLostError.__name__
        strict = StrictCounter(cluster.client, "lost")
        assert await strict.get("hot") == 5 + others
        await scoped.request_raw("clstr.counter.add", _add(1, f"o{others - 1}", 2, 2, _now()))
        with pytest.raises(RemoteHandlerError, match="CounterSessionLostError"):
            await scoped.request_raw("clstr.counter.add", _add(1, "new", 1, 1, _now()))
        await scoped.request_raw("clstr.counter.add", _add(1, "new", 1, 1, _later()))
        assert await strict.get("hot") == 5 + others + 2

    async def test_a_retry_of_a_shared_writer_still_counts_once(self, cluster: Cluster) -> None:
        """Two counter objects share their writer; an increment whose reply is lost is
        sent again by the client under the same number and counted once, while the
        other object writes the same key meanwhile."""
        key = _keys_of(cluster, "a", 1, "shared")[0]
        one = StrictCounter(cluster.client, "shared")
        two = StrictCounter(cluster.client, "shared")
        assert one.session is two.session
        cluster.network.faults.drop(src="a", dst="client", count=1)
        await two.inc(key, 10)  # its first reply is lost: retried, counted once
        assert cluster.network.faults.dropped == 1
        assert await one.inc(key, 1) == 11
        state = await _record(cluster, "shared", key)
        assert list(state["sessions"]) == [one.session.writer]
        assert await two.get(key) == 11


class TestLax:
    async def test_inc_nowait_sends_nothing_until_the_flush(self, cluster: Cluster) -> None:
        """inc_nowait is a local add: nothing is sent before allowed_lag; then the
        flush delivers the sum, and get reads it."""
        async with LaxCounter(cluster.client, "v", allowed_lag=0.05) as lax:
            for _ in range(100):
                lax.inc_nowait("page")
            assert lax.stats.messages == 0
            assert lax.unflushed() == {"page": 100}
            await _flushed(lax)
            assert await StrictCounter(cluster.client, "v").get("page") == 100
            assert await lax.get("page") == 100

    async def test_one_message_per_owner_per_flush(self, cluster: Cluster) -> None:
        """Once owners are known, a flush of many keys sends one batch per owner."""
        async with LaxCounter(cluster.client, "v") as lax:
            for i in range(50):
                lax.inc_nowait(f"warm-up-{i}")
            await lax.flush()  # learns who serves every shard
            for i in range(300):
                lax.inc_nowait(f"key-{i}")
            before = lax.stats.messages
            await _flushed(lax)
            assert lax.stats.messages - before == len(NODES)
            assert lax.stats.items == 350

    async def test_get_set_delete_order_after_this_process_increments(
        self, cluster: Cluster
    ) -> None:
        """get, set and delete flush the key's deltas first: get includes them, set
        overrides them, delete returns a value that includes them."""
        async with LaxCounter(cluster.client, "o", allowed_lag=10.0) as lax:
            lax.inc_nowait("k", 3)
            assert await lax.get("k") == 3
            lax.inc_nowait("k", 4)
            await lax.set("k", 100)
            lax.inc_nowait("k", 1)
            assert await lax.delete("k") == 101
            lax.inc_nowait("k", 2)
            assert await lax.inc("k") == 3  # estimate: known 0 + unflushed 3
        assert await StrictCounter(cluster.client, "o").get("k") == 3

    async def test_close_flushes_and_stops_the_flusher(self, cluster: Cluster) -> None:
        """close() sends what is left and ends the flusher task; incrementing after
        is refused."""
        lax = LaxCounter(cluster.client, "c", allowed_lag=10.0)
        lax.inc_nowait("k", 9)
        assert lax._flusher is not None
        await lax.close()
        assert lax._flusher is None
        assert await StrictCounter(cluster.client, "c").get("k") == 9
        with pytest.raises(LifecycleError):
            lax.inc_nowait("k")

    async def test_a_failed_flush_keeps_its_deltas_for_the_next(self, cluster: Cluster) -> None:
        """While a key's owner is down its deltas stay (not lost, not doubled); once
        the owner is back the next flush delivers them."""
        key = _keys_of(cluster, "b", 1, "f")[0]
        async with LaxCounter(cluster.client, "f", allowed_lag=0.01, flush_timeout=0.2) as lax:
            await cluster.stop("b")
            lax.inc_nowait(key, 5)
            lax.inc_nowait("elsewhere", 1)
            await asyncio.sleep(0.1)
            assert lax.unflushed().get(key) == 5
            await cluster.start("b")
            await _flushed(lax)
        assert await StrictCounter(cluster.client, "f").get(key) == 5

    async def test_a_delta_waiting_on_one_key_does_not_grow_another_keys_record(
        self, cluster: Cluster
    ) -> None:
        """While one key's delta waits for its owner (down), another key is flushed
        50 times: its record keeps one reply of the writer, not one per flush (the
        low mark sent to a key is the lowest number still open on that key)."""
        stuck, busy = _keys_of(cluster, "b", 1, "low")[0], _keys_of(cluster, "a", 1, "low")[0]
        async with LaxCounter(cluster.client, "low", allowed_lag=0.01, flush_timeout=0.2) as lax:
            await cluster.stop("b")
            lax.inc_nowait(stuck)
            await eventually(lambda: stuck in lax.deltas.items)
            for n in range(1, 51):
                lax.inc_nowait(busy)
                assert await lax.get(busy) == n
            session = (await _record(cluster, "low", busy))["sessions"][lax.strict.session.writer]
            assert len(session) == 4  # [low mark, last write, q, reply]
            await cluster.start("b")
        assert await StrictCounter(cluster.client, "low").get(stuck) == 1

    async def test_a_flush_whose_reply_is_lost_counts_once(self, cluster: Cluster) -> None:
        """The owner applies a flush but its answer is lost (the client times out):
        the next flush sends the deltas again under the same number and the owner
        answers without applying them twice."""
        key = _keys_of(cluster, "a", 1, "d")[0]
        cluster.network.faults.drop(src="a", dst="client", count=1)
        lax = LaxCounter(cluster.client, "d", allowed_lag=0.01, flush_timeout=0.3)
        lax.inc_nowait(key, 7)
        await _flushed(lax)
        assert cluster.network.faults.dropped == 1
        await lax.close()
        assert lax.stats.items >= 2  # sent twice
        assert await StrictCounter(cluster.client, "d").get(key) == 7

    async def test_a_slow_owner_holds_up_only_its_own_keys(self, cluster: Cluster) -> None:
        """While one owner takes a second to answer, the other owners' deltas are
        flushed and acknowledged on time (flush rounds overlap)."""
        slow, fast = _keys_of(cluster, "b", 1, "s")[0], _keys_of(cluster, "a", 1, "s")[0]
        async with LaxCounter(cluster.client, "s", allowed_lag=0.01) as lax:
            lax.inc_nowait(slow)
            lax.inc_nowait(fast)
            await _flushed(lax)  # owners known
            cluster.network.faults.delay(1.0, src="b", dst="client")
            lax.inc_nowait(slow)
            await eventually(lambda: any(i.sent for i in lax.deltas.items.get(slow, ())))
            lax.inc_nowait(fast, 5)  # in a round of its own
            async with asyncio.timeout(0.5):
                while lax.unflushed().get(fast):  # noqa: ASYNC110 - no event for this
                    await asyncio.sleep(0.005)
            assert lax.unflushed() == {slow: 1}
        cluster.network.faults.clear()
        strict = StrictCounter(cluster.client, "s")
        assert (await strict.get(slow), await strict.get(fast)) == (2, 6)

    async def test_duplicated_batches_count_once(self, cluster: Cluster) -> None:
        """Every batch delivered twice by the network still counts once."""
        cluster.network.faults.duplicate(src="client", subject="clstr.shard.*")
        async with LaxCounter(cluster.client, "dup") as lax:
            for i in range(50):
                lax.inc_nowait(f"k{i % 5}", 2)
        cluster.network.faults.clear()
        strict = StrictCounter(cluster.client, "dup")
        assert [await strict.get(f"k{i}") for i in range(5)] == [20] * 5

    async def test_over_the_bound_new_keys_are_refused_with_a_metric_and_a_log(
        self, cluster: Cluster
    ) -> None:
        """With flushes failing, at most max_keys keys are held: an increment of a
        new key raises CounterFullError (counted and logged); held keys still count."""
        for node_id in list(cluster.runners):
            await cluster.stop(node_id)
        registry = CollectorRegistry()
        lax = LaxCounter(
            cluster.client,
            "full",
            max_keys=2,
            allowed_lag=0.01,
            metrics=PrometheusMetrics(registry),
        )
        lax.inc_nowait("a")
        lax.inc_nowait("b")
        with (
            structlog.testing.capture_logs() as logs,
            pytest.raises(CounterFullError, match="max_keys=2"),
        ):
            lax.inc_nowait("c")
        lax.inc_nowait("a", 5)
        assert lax.unflushed() == {"a": 6, "b": 1}
        assert registry.get_sample_value("clstr_counter_refused_total", {"namespace": "full"}) == 1
        assert any(e["event"].startswith("lax counter full") for e in logs)
        with pytest.raises(CounterFlushError, match="2 keys"):
            await lax.close(timeout=0.2)

    async def test_a_counter_closed_while_the_cluster_is_down_says_what_it_lost(
        self, cluster: Cluster
    ) -> None:
        """close() that cannot flush raises CounterFlushError naming the deltas."""
        for node_id in list(cluster.runners):
            await cluster.stop(node_id)
        lax = LaxCounter(cluster.client, "down", allowed_lag=10.0)
        lax.inc_nowait("x", 3)
        with pytest.raises(CounterFlushError, match=r"\+3"):
            await lax.close(timeout=0.2)


async def _flushed(lax: LaxCounter) -> None:
    """Wait (on the flusher's own rounds) until nothing is unacknowledged."""
    async with asyncio.timeout(5):
        while lax.unflushed():  # noqa: ASYNC110 - the flusher has no event for this
            await asyncio.sleep(0.005)
