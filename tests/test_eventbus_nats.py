"""The event bus on a real nats-server: the JetStream adapter (stream, dedupe of retried
batches, the producer nonce across restarts), polls from another client, what the bus
does when JetStream refuses a frame for good and when the server is slow under the
dropping backpressure modes, the NATS subjects adapter, and checkpoints in JetStream KV."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest
from _bus_support import assert_invariant

from clstr import ConfigurationError
from clstr.eventbus import (
    Backpressure,
    BackpressureError,
    BatchConfig,
    BusConfig,
    BusReader,
    CheckpointConflictError,
    DispatchRetry,
    Event,
    EventBus,
    JetStreamAdapter,
    KvCheckpoints,
    NatsSubjectsAdapter,
    Ordering,
    PollRequest,
    Position,
    StoredEvent,
    TransientAdapterError,
    decode_frame,
    stream_name,
)
from clstr.eventbus._event import Record
from clstr.testing import NatsServer, TcpProxy
from clstr.transports.nats import NatsTransport


@pytest.fixture
async def transport(clstr_nats_server: NatsServer) -> AsyncIterator[NatsTransport]:
    transport = await NatsTransport.connect(clstr_nats_server.url)
    try:
        yield transport
    finally:
        await transport.close()


def bus_config(name: str, adapter: JetStreamAdapter, **kw: object) -> BusConfig:
    settings: dict[str, object] = {"batch": BatchConfig(max_events=50, max_delay_ms=1), **kw}
    return BusConfig(name=name, shards=4, adapter=adapter, **settings)  # type: ignore[arg-type]


async def poll_all(reader: EventBus | BusReader, limit: int = 250) -> list[StoredEvent]:
    events: list[StoredEvent] = []
    request = PollRequest(limit=limit)
    while True:
        response = await reader.poll(request)
        events += response.events
        request = request.from_cursor(response.cursor)
        if not response.has_more:
            return events


class LostAcks(JetStreamAdapter):
    """Publishes each batch, then reports its first attempt as failed (an ack lost in
    transit): the dispatch loop sends the very same frames again."""

    def __init__(self, transport: NatsTransport) -> None:
        super().__init__(transport)
        self.tried: set[tuple[int, int]] = set()

    async def send(self, shard: int, first: int, records: Sequence[Record]) -> None:
        await super().send(shard, first, records)
        if (shard, first) not in self.tried:
            self.tried.add((shard, first))
            raise TransientAdapterError("ack lost (injected after the publish)")


class TestJetStream:
    async def test_events_reach_one_subject_per_shard_and_poll_back_from_another_client(
        self, transport: NatsTransport, clstr_nats_server: NatsServer
    ) -> None:
        """2000 events go to the bus's stream, one subject per shard; a reader on its own
        connection polls them all back with cursors, in key order."""
        bus = EventBus(bus_config("orders", JetStreamAdapter(transport)))
        await bus.start()
        for i in range(2000):
            await bus.ingest_wait(Event(f"user-{i % 50}", str(i).encode(), "order"))
        stats = await bus.shutdown()
        assert_invariant(stats)
        assert stats.events_dispatched == 2000
        info = await transport.nc.jetstream().stream_info(
            stream_name("clstr", "orders"), subjects_filter=">"
        )
        assert sorted(info.state.subjects) == [f"clstr.bus.orders.{s}" for s in range(4)]
        async with await NatsTransport.connect(clstr_nats_server.url) as other:
            reader = BusReader.jetstream(other, "orders")
            events = await poll_all(reader)
            by_time = await reader.poll(PollRequest(limit=2000, ordering=Ordering.TIMESTAMP))
        assert sorted(int(e.payload) for e in events) == list(range(2000))
        assert [int(e.payload) for e in by_time.events] == list(range(2000))
        for key in {e.key for e in events}:
            numbers = [int(e.payload) for e in events if e.key == key]
            assert numbers == sorted(numbers)

    async def test_a_retried_batch_is_stored_once(self, transport: NatsTransport) -> None:
        """Every batch is published, reported failed, and published again with the same
        message ids: JetStream keeps one copy of each (acked as duplicates)."""
        adapter = LostAcks(transport)
        retry = DispatchRetry(initial_backoff=0.001)
        bus = EventBus(bus_config("dedupe", adapter, retry=retry))
        await bus.start()
        for i in range(500):
            await bus.ingest_wait(Event(f"k{i % 7}", str(i).encode()))
        stats = await bus.shutdown()
        assert_invariant(stats)
        assert stats.retries == stats.batches_dispatched == len(adapter.tried)
        assert adapter.duplicates == len(adapter.tried)
        events = await poll_all(bus)
        assert sorted(int(e.payload) for e in events) == list(range(500))

    async def test_a_restarted_producer_never_reuses_message_ids(
        self, transport: NatsTransport, tmp_path: Path
    ) -> None:
        """Two runs of a producer with the same nonce file write the same events: the
        second run's epoch is higher, so its frames are new ids and JetStream keeps all
        of them; a second live bus on the same file is refused."""
        nonce = tmp_path / "producer.nonce"
        for run in (1, 2):
            bus = EventBus(
                bus_config("restart", JetStreamAdapter(transport), producer_nonce_path=nonce)
            )
            await bus.start()
            if run == 2:
                twin = EventBus(
                    bus_config("restart", JetStreamAdapter(transport), producer_nonce_path=nonce)
                )
                with pytest.raises(ConfigurationError, match="in use"):
                    await twin.start()
            for i in range(100):
                bus.ingest(Event(f"k{i % 5}", str(i).encode()))
            assert_invariant(await bus.shutdown())
        state = json.loads(nonce.read_text())
        assert state["epoch"] == 2
        events = await poll_all(bus)
        assert len(events) == 200

    async def test_a_deleted_stream_is_created_again(self, transport: NatsTransport) -> None:
        """When the stream is deleted under a running bus, the next batch finds no stream,
        the adapter creates it again, and the retried batch is stored there."""
        adapter = JetStreamAdapter(transport)
        bus = EventBus(bus_config("recreate", adapter, retry=DispatchRetry(initial_backoff=0.01)))
        await bus.start()
        bus.ingest(Event("k", b"0"))
        await bus.flush()
        await transport.nc.jetstream().delete_stream(adapter.stream)
        for i in range(1, 11):
            bus.ingest(Event("k", str(i).encode()))
        async with asyncio.timeout(10):
            await bus.flush()
        stats = await bus.shutdown()
        assert_invariant(stats)
        assert (stats.events_dispatched, stats.events_dropped) == (11, 0)
        assert stats.retries >= 1
        assert [int(e.payload) for e in await poll_all(bus)] == list(range(1, 11))

    async def test_an_unreachable_stream_is_a_consumer_adapter_error(
        self, clstr_nats_server: NatsServer
    ) -> None:
        """A reader whose connection is closed fails its poll with ConsumerAdapterError."""
        from clstr.eventbus import ConsumerAdapterError

        other = await NatsTransport.connect(clstr_nats_server.url)
        reader = BusReader.jetstream(other, "orders")
        await other.close()
        with pytest.raises(ConsumerAdapterError):
            await reader.poll(PollRequest(shards=[0]))


class TestFailures:
    async def test_a_frame_over_the_streams_max_msg_size_is_dropped_and_counted(
        self, transport: NatsTransport
    ) -> None:
        """The stream's max_msg_size is narrowed under a running bus: JetStream refuses
        a larger frame for good (error 10054), so its batch is dropped at once, not
        retried, and counted in events_dropped and batches_dropped without making the
        shutdown lossy; a small batch after it is stored."""
        adapter = JetStreamAdapter(transport)
        bus = EventBus(bus_config("narrow", adapter, retry=DispatchRetry(initial_backoff=0.01)))
        await bus.start()
        try:
            js = transport.nc.jetstream()
            config = (await js.stream_info(adapter.stream)).config
            config.max_msg_size = 512
            await js.update_stream(config)
            bus.ingest(Event("k", b"x" * 2000, "big"))
            async with asyncio.timeout(10):
                await bus.flush()
            bus.ingest(Event("k", b"small", "small"))
            async with asyncio.timeout(10):
                await bus.flush()
        finally:
            stats = await bus.shutdown(timeout=5)
        assert_invariant(stats)
        assert (stats.events_dispatched, stats.events_dropped) == (1, 1)
        assert (stats.batches_dispatched, stats.batches_dropped, stats.retries) == (1, 1, 0)
        assert not stats.shutdown_was_lossy
        assert [e.payload for e in await poll_all(bus)] == [b"small"]

    @pytest.mark.parametrize("mode", [Backpressure.DROP_OLDEST, Backpressure.DROP_NEWEST])
    async def test_a_slow_server_under_dropping_backpressure_keeps_the_invariant(
        self, transport: NatsTransport, clstr_nats_server: NatsServer, mode: Backpressure
    ) -> None:
        """Through a proxy adding 50 ms each way, 3000 events offered at once overflow
        rings of 64: DropOldest evicts (dropped), DropNewest refuses (rejected, never
        ingested). Throughout and after shutdown dispatched + dropped + queued +
        in_flight == ingested, and the stream holds exactly the dispatched events,
        each key's in order."""
        name = f"slow-{mode.name.lower().replace('_', '-')}"
        offered, refused = 3000, 0
        server = clstr_nats_server
        async with TcpProxy(server.host, server.port, delay=0.05) as proxy:
            slow = await NatsTransport.connect(proxy.url)
            batch = BatchConfig(max_events=16, max_delay_ms=1)
            config = bus_config(
                name, JetStreamAdapter(slow), ring_capacity=64, backpressure=mode, batch=batch
            )
            bus = EventBus(config)
            await bus.start()
            try:
                for i in range(offered):
                    try:
                        bus.ingest(Event(f"k{i % 10}", str(i).encode()))
                    except BackpressureError:
                        refused += 1
                    if i % 50 == 0:
                        assert bus.stats().invariant_holds, bus.stats()
                        await asyncio.sleep(0)  # the workers take batches meanwhile
                during = bus.stats()
                assert during.invariant_holds, during
                assert during.events_in_flight + during.events_queued > 0
                async with asyncio.timeout(30):
                    await bus.flush()
            finally:
                stats = await bus.shutdown(timeout=5)
                await slow.close()
        assert_invariant(stats)
        assert not stats.shutdown_was_lossy
        assert stats.events_ingested + stats.events_rejected == offered
        if mode is Backpressure.DROP_OLDEST:
            assert (refused, stats.events_rejected) == (0, 0)
            assert stats.events_dropped > 0
        else:
            assert refused == stats.events_rejected == stats.rejected["backpressure"] > 0
            assert stats.events_dropped == 0
        events = await poll_all(BusReader.jetstream(transport, name))
        assert len(events) == stats.events_dispatched
        for key in {e.key for e in events}:
            numbers = [int(e.payload) for e in events if e.key == key]
            assert numbers == sorted(numbers)


class TestNatsSubjects:
    async def test_frames_go_to_one_subject_per_shard(self, transport: NatsTransport) -> None:
        """A subscriber to <prefix>.bus.<bus>.* gets every event in frames it can decode;
        flush returns once the server has them."""
        received: list[tuple[str, list[object]]] = []
        got_all = asyncio.Event()

        def on_frame(data: bytes, reply: str | None) -> None:
            msg_id, records = decode_frame(data)
            received.append((msg_id, records))
            if sum(len(r) for _, r in received) == 300:
                got_all.set()

        sub = await transport.subscribe("clstr.bus.clicks.*", on_frame)
        bus = EventBus(BusConfig(name="clicks", shards=3, adapter=NatsSubjectsAdapter(transport)))
        await bus.start()
        for i in range(300):
            bus.ingest(Event(f"k{i}", str(i).encode()))
        await bus.flush()
        async with asyncio.timeout(5):
            await got_all.wait()
        await sub.unsubscribe()
        stats = await bus.shutdown()
        assert_invariant(stats)
        payloads = sorted(int(r[2]) for _, records in received for r in records)  # type: ignore[index]
        assert payloads == list(range(300))
        assert all(msg_id.count(".") == 3 for msg_id, _ in received)


class TestKvCheckpoints:
    async def test_checkpoints_are_compare_and_set(self, transport: NatsTransport) -> None:
        """A first write creates, a write over the current revision succeeds, and a write
        over an old revision (or a second create) is a conflict."""
        store = await KvCheckpoints.open(transport)
        assert await store.load("b", 0) is None
        first = await store.save("b", 0, Position(3, 1), token=7, node="n1", revision=0)
        with pytest.raises(CheckpointConflictError):
            await store.save("b", 0, Position(4, 0), token=7, node="n2", revision=0)
        second = await store.save("b", 0, Position(5, 0), token=8, node="n2", revision=first)
        with pytest.raises(CheckpointConflictError):
            await store.save("b", 0, Position(6, 0), token=7, node="n1", revision=first)
        loaded = await store.load("b", 0)
        assert loaded is not None
        assert (loaded.position, loaded.token, loaded.node, loaded.revision) == (
            Position(5, 0),
            8,
            "n2",
            second,
        )
