"""Persisted messages and stored replies on a real nats-server: a request written to
JetStream is handled by its shard's owner (at least once, deduplicated by request
id), its reply is stored, and any process reads it back."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import pytest

from clstr import (
    Client,
    ClstrError,
    ConfigurationError,
    Node,
    RemoteHandlerError,
    RequestTimeoutError,
    Router,
    decode_payload,
    encode_payload,
)
from clstr.entities import Entity, Sharding, handles
from clstr.envelope import Envelope
from clstr.hashing import shard_for_key
from clstr.membership import KvMembership, KvSettings
from clstr.persist import (
    MSG_ID_HEADER,
    PersistedClient,
    PersistedConsumers,
    PersistSettings,
    ReplyStore,
    StoredReply,
    consumer_name,
    new_request_id,
    persist_subject,
    reply_bucket,
    serve_persisted,
    stream_name,
)
from clstr.protocol import entity_key
from clstr.testing import NatsServer
from clstr.transports.jetstream import open_bucket
from clstr.transports.memory import MemoryNetwork, MemoryTransport
from clstr.transports.nats import NatsTransport

from _support import eventually

NUM_SHARDS = 8
FAST = KvSettings(heartbeat_interval=0.25, heartbeat_ttl=2.0, reconcile_interval=0.25)


@dataclass
class Job:
    n: int
    fail: bool = False


@dataclass
class Done:
    n: int
    node: str


class Worker:
    """A router that records every job it ran, in order, and can hold one back."""

    def __init__(self, node_id: str) -> None:
        self.node_id = node_id
        self.ran: list[tuple[str | None, int]] = []
        self.hold: asyncio.Event | None = None
        self.router = Router()
        self.router.register(Job, self.run)

    async def run(self, job: Job, env: Envelope) -> Done:
        self.ran.append((env.key, job.n))
        if self.hold is not None and job.n < 0:
            await self.hold.wait()
        if job.fail:
            raise ValueError(f"job {job.n} failed")
        return Done(job.n, self.node_id)


class Rig:
    """Nodes, clients and connections of one test, in a cluster (prefix) of its own."""

    def __init__(self, server: NatsServer) -> None:
        self.url = server.url
        self.prefix = f"t{uuid.uuid4().hex[:8]}"
        self.transports: list[NatsTransport] = []
        self.nodes: list[Node] = []

    async def connect(self) -> NatsTransport:
        transport = await NatsTransport.connect(self.url)
        self.transports.append(transport)
        return transport

    async def client(self, settings: PersistSettings | None = None) -> PersistedClient:
        client = Client(await self.connect(), num_shards=NUM_SHARDS, prefix=self.prefix)
        return PersistedClient(client, settings=settings)

    async def node(
        self,
        worker: Worker,
        settings: PersistSettings | None = None,
        **options: Any,
    ) -> tuple[Node, PersistedConsumers]:
        node = Node(
            await self.connect(),
            worker.router,
            num_shards=NUM_SHARDS,
            node_id=worker.node_id,
            prefix=self.prefix,
            **options,
        )
        consumers = serve_persisted(node, settings)
        self.nodes.append(node)
        await node.start()
        return node, consumers

    async def close(self) -> None:
        for node in self.nodes:
            await node.stop()
        for transport in self.transports:
            await transport.close()


@pytest.fixture
async def rig(clstr_nats_server: NatsServer) -> AsyncIterator[Rig]:
    made = Rig(clstr_nats_server)
    try:
        yield made
    finally:
        await made.close()


class TestStoredReplies:
    async def test_a_persisted_request_is_answered_and_its_reply_stored(self, rig: Rig) -> None:
        """send returns a request id; the owner handles the message and stores the
        reply, which replies_for and await_reply return, typed or as bytes."""
        worker = Worker("n1")
        await rig.node(worker)
        persisted = await rig.client()
        rid = await persisted.send(Job(7), key="order-7")
        assert await persisted.await_reply(rid, Done, timeout=10) == Done(7, "n1")
        assert await persisted.replies_for(rid, Done) == [Done(7, "n1")]
        assert len(await persisted.replies_for(rid)) == 1
        assert worker.ran == [("order-7", 7)]

    async def test_a_caller_that_left_gets_the_reply_from_a_fresh_client(self, rig: Rig) -> None:
        """A message sent while no node runs waits in the stream; its sender disconnects;
        a fresh client awaiting the reply (a watch: nothing is stored yet) gets it once
        a node has started and handled the message."""
        sender = await rig.client()
        rid = await sender.send(Job(1), key="k")
        assert await sender.replies_for(rid) == []
        await sender.client.transport.close()
        fresh = await rig.client()
        waiting = asyncio.create_task(fresh.await_reply(rid, Done, timeout=20))
        js = rig.transports[-1].nc.jetstream()
        bucket_stream = f"KV_{reply_bucket(rig.prefix)}"
        async with asyncio.timeout(10):  # the watch (a consumer of the bucket) is set up
            while (await js.stream_info(bucket_stream)).state.consumer_count < 1:  # noqa: ASYNC110 - server state, no event
                await asyncio.sleep(0.01)
        assert not waiting.done()
        await rig.node(Worker("late"))
        assert await waiting == Done(1, "late")

    async def test_a_handler_error_is_stored_and_raised(self, rig: Rig) -> None:
        """A handler that raised is an outcome: stored, and raised by await_reply and
        replies_for as RemoteHandlerError; the handler does not run again."""
        worker = Worker("n1")
        await rig.node(worker)
        persisted = await rig.client()
        rid = await persisted.send(Job(3, fail=True), key="k")
        with pytest.raises(RemoteHandlerError, match="job 3 failed"):
            await persisted.await_reply(rid, timeout=10)
        with pytest.raises(RemoteHandlerError):
            await persisted.replies_for(rid)
        assert worker.ran == [("k", 3)]

    async def test_await_reply_times_out_while_nothing_is_stored(self, rig: Rig) -> None:
        """Without an owner nothing is stored: await_reply raises RequestTimeoutError at
        its timeout, and the message is still pending."""
        persisted = await rig.client()
        rid = await persisted.send(Job(1), key="k")
        with pytest.raises(RequestTimeoutError, match="may still be pending"):
            await persisted.await_reply(rid, timeout=0.3)

    async def test_the_memory_transport_is_refused_with_a_reason(self) -> None:
        """Persisted messages need JetStream: on the memory transport the client says so."""
        transport = MemoryTransport(MemoryNetwork())
        with pytest.raises(ClstrError, match="needs a NatsTransport with JetStream"):
            PersistedClient(Client(transport, num_shards=NUM_SHARDS))
        await transport.close()


class TestReplyStore:
    @pytest.mark.parametrize("direct", [True, False])
    async def test_get_many_finds_the_stored_replies(self, rig: Rig, direct: bool) -> None:
        """get_many returns the replies stored for the ids that have one (ids that are no
        valid KV key included): in one batched direct get, or one get each on a bucket
        made without direct gets."""
        transport = await rig.connect()
        if not direct:
            await open_bucket(transport.nc.jetstream(), reply_bucket(rig.prefix), replicas=1)
        store = ReplyStore(transport, prefix=rig.prefix)
        for rid in ("a", "b", "c d/ü"):
            assert await store.put(StoredReply(rid, bytes(16), rid.encode()))
        assert not await store.put(StoredReply("a", bytes(16), b"second"))
        found = await store.get_many(["a", "missing", "c d/ü"])
        assert {rid: r.body for rid, r in found.items()} == {"a": b"a", "c d/ü": "c d/ü".encode()}
        assert await store.get_many(["missing"]) == {}


class TestOnce:
    async def test_an_id_published_twice_is_stored_and_handled_once(self, rig: Rig) -> None:
        """Sending the same request id twice within the duplicate window stores one
        message (Nats-Msg-Id) and runs the handler once."""
        worker = Worker("n1")
        persisted = await rig.client()
        first = await persisted.send(Job(5), key="k", request_id="job-5")
        again = await persisted.send(Job(5), key="k", request_id="job-5")
        assert first == again == "job-5"
        js = rig.transports[0].nc.jetstream()
        assert (await js.stream_info(stream_name(rig.prefix))).state.messages == 1
        await rig.node(worker)
        assert await persisted.await_reply("job-5", Done, timeout=10) == Done(5, "n1")
        assert worker.ran == [("k", 5)]

    async def test_a_message_whose_reply_is_stored_is_skipped(self, rig: Rig) -> None:
        """A message for an id already answered (here: published again under another
        Nats-Msg-Id, as after the duplicate window) is acknowledged without running
        the handler, and the stored reply stands."""
        worker = Worker("n1")
        _, consumers = await rig.node(worker)
        persisted = await rig.client()
        rid = await persisted.send(Job(9), key="k")
        assert await persisted.await_reply(rid, Done, timeout=10) == Done(9, "n1")
        shard = shard_for_key("k", NUM_SHARDS)
        _, body = persisted.client.build_request(
            shard, "Job", encode_payload(Job(9)), key="k", request_id=rid
        )
        js = rig.transports[0].nc.jetstream()
        await js.publish(persist_subject(rig.prefix, shard), body, headers={MSG_ID_HEADER: "x"})
        await eventually(lambda: consumers.stats.duplicates == 1, 10)
        assert worker.ran == [("k", 9)]
        assert await persisted.replies_for(rid, Done) == [Done(9, "n1")]

    @pytest.mark.parametrize("batch", [64, 4])
    async def test_one_keys_messages_run_in_stream_order(self, rig: Rig, batch: int) -> None:
        """Messages of one key are handled one after the other in the order they were
        persisted; other keys interleave (also when a key's messages span fetches)."""
        persisted = await rig.client()
        ids = [await persisted.send(Job(n), key=f"k{n % 3}") for n in range(30)]
        worker = Worker("n1")
        await rig.node(worker, PersistSettings(batch=batch))
        for rid in ids:
            await persisted.await_reply(rid, timeout=10)
        for key in ("k0", "k1", "k2"):
            ran = [n for k, n in worker.ran if k == key]
            assert ran == sorted(ran)
            assert len(ran) == 10


def same_shard_keys(count: int) -> list[str]:
    """``count`` keys of one shard."""
    keys = [f"key-{n}" for n in range(200)]
    shard = shard_for_key(keys[0], NUM_SHARDS)
    return [k for k in keys if shard_for_key(k, NUM_SHARDS) == shard][:count]


class TestLongJobs:
    async def test_a_running_job_does_not_hold_back_other_keys_of_its_shard(self, rig: Rig) -> None:
        """While a job on key a runs, a job on key b of the same shard is answered, and
        a's next job waits for a's running one (per-key order)."""
        worker = Worker("n1")
        worker.hold = asyncio.Event()
        await rig.node(worker)
        persisted = await rig.client()
        a, b = same_shard_keys(2)
        held = await persisted.send(Job(-1), key=a)
        await eventually(lambda: worker.ran == [(a, -1)], 10)
        later = await persisted.send(Job(2), key=a)
        other = await persisted.send(Job(3), key=b)
        assert await persisted.await_reply(other, Done, timeout=8) == Done(3, "n1")
        assert worker.ran == [(a, -1), (b, 3)]
        assert await persisted.replies_for(later) == []
        worker.hold.set()
        assert await persisted.await_reply(later, Done, timeout=10) == Done(2, "n1")
        assert await persisted.await_reply(held, Done, timeout=10) == Done(-1, "n1")
        assert worker.ran == [(a, -1), (b, 3), (a, 2)]

    async def test_keys_run_on_while_one_key_fills_the_batch(self, rig: Rig) -> None:
        """With batch 4, key a's messages queued behind its held job take at most the
        batch: messages of other keys published after them are still answered."""
        worker = Worker("n1")
        worker.hold = asyncio.Event()
        await rig.node(worker, PersistSettings(batch=4))
        persisted = await rig.client()
        a, *others = same_shard_keys(4)
        held = await persisted.send(Job(-1), key=a)
        await eventually(lambda: worker.ran == [(a, -1)], 10)
        queued = [await persisted.send(Job(n), key=a) for n in range(2)]
        rest = [await persisted.send(Job(10 + n), key=k) for n, k in enumerate(others)]
        for rid in rest:
            await persisted.await_reply(rid, timeout=8)
        worker.hold.set()
        for rid in [held, *queued]:
            await persisted.await_reply(rid, timeout=10)
        assert [n for k, n in worker.ran if k == a] == [-1, 0, 1]

    async def test_a_job_longer_than_ack_wait_is_not_delivered_or_run_again(self, rig: Rig) -> None:
        """A job running for three times ack_wait, and a job of its key queued behind it,
        are kept from redelivery by in-progress acks: each runs once (the node keeps
        no replies, so a second delivery would run again), none is delivered twice."""
        worker = Worker("n1")
        worker.hold = asyncio.Event()
        settings = PersistSettings(ack_wait=1.0)
        _, consumers = await rig.node(worker, settings, reply_cache_size=0)
        persisted = await rig.client()
        a, b = same_shard_keys(2)
        held = await persisted.send(Job(-1), key=a)
        await eventually(lambda: worker.ran == [(a, -1)], 10)
        queued = await persisted.send(Job(1), key=a)
        # Lets ack_wait pass three times while the job runs: the time is what is tested.
        await asyncio.sleep(3 * settings.ack_wait)
        other = await persisted.send(Job(2), key=b)
        await persisted.await_reply(other, timeout=8)
        worker.hold.set()
        await persisted.await_reply(held, timeout=10)
        await persisted.await_reply(queued, timeout=10)
        assert consumers.stats.redelivered == 0
        assert sorted(worker.ran) == sorted([(a, -1), (a, 1), (b, 2)])

    async def test_a_poll_while_a_job_runs_neither_reruns_nor_strands_it(self, rig: Rig) -> None:
        """poll() makes the consumer anew while a job runs: its message, delivered again,
        is not run twice (the node keeps no replies), and is acknowledged once the job
        ends (the stream is empty at once, not after ack_wait)."""
        worker = Worker("n1")
        worker.hold = asyncio.Event()
        _, consumers = await rig.node(worker, reply_cache_size=0)
        persisted = await rig.client()
        held = await persisted.send(Job(-1), key="a")
        await eventually(lambda: worker.ran == [("a", -1)], 10)
        consumers.poll()
        await eventually(lambda: consumers.stats.redelivered == 1, 10)
        worker.hold.set()
        await persisted.await_reply(held, timeout=10)
        js = rig.transports[0].nc.jetstream()

        async def pending() -> int:
            return int((await js.stream_info(stream_name(rig.prefix))).state.messages)

        async with asyncio.timeout(5):
            while await pending():  # noqa: ASYNC110 - server state, no event
                await asyncio.sleep(0.01)
        assert worker.ran == [("a", -1)]


class TestPollAndMoves:
    async def test_poll_storage_cuts_a_retry_pause_short(self, rig: Rig) -> None:
        """A message refused overloaded waits out a long retry pause; poll() has it
        asked again at once."""
        worker = Worker("n1")
        worker.hold = asyncio.Event()
        settings = PersistSettings(retry_pause=60.0)
        _, consumers = await rig.node(worker, settings, max_concurrency=1, max_pending=0)
        persisted = await rig.client()
        held = await persisted.send(Job(-1), key="a")
        await eventually(lambda: worker.ran == [("a", -1)], 10)
        refused = await persisted.send(Job(2), key="b")
        await eventually(lambda: consumers.stats.retries >= 1, 10)
        worker.hold.set()
        await persisted.await_reply(held, timeout=10)
        assert await persisted.replies_for(refused) == []
        consumers.poll()
        assert await persisted.await_reply(refused, Done, timeout=5) == Done(2, "n1")

    async def test_consumption_moves_with_the_shard(self, rig: Rig) -> None:
        """A second node joins: the shards it takes are consumed there from then on,
        through the same per-shard durable consumers (one per shard, none per node)."""
        a, b = Worker("a"), Worker("b")
        membership: Callable[[], Any] = lambda: KvMembership(settings=FAST)  # noqa: E731
        node_a, _ = await rig.node(a, membership=membership())
        persisted = await rig.client()
        keys = [f"key-{n}" for n in range(24)]
        before = [await persisted.send(Job(n), key=k) for n, k in enumerate(keys)]
        for rid in before:
            assert (await persisted.await_reply(rid, Done, timeout=10)).node == "a"
        node_b, _ = await rig.node(b, membership=membership())
        await eventually(lambda: bool(node_b.shards) and len(node_a.shards) < NUM_SHARDS, 20)
        await eventually(
            lambda: (
                set(node_a.shards).isdisjoint(node_b.shards)
                and len(node_a.shards) + len(node_b.shards) == NUM_SHARDS
            ),
            20,
        )
        after = [await persisted.send(Job(n), key=k) for n, k in enumerate(keys)]
        for rid, key in zip(after, keys, strict=True):
            reply = await persisted.await_reply(rid, Done, timeout=10)
            owner = "b" if shard_for_key(key, NUM_SHARDS) in node_b.shards else "a"
            assert reply.node == owner, key
        js = rig.transports[0].nc.jetstream()
        names = {c.name for c in await js.consumers_info(stream_name(rig.prefix))}
        assert names == {consumer_name(rig.prefix, s) for s in range(NUM_SHARDS)}


class Jobs(Entity[None]):
    """An entity that answers jobs with the node that ran them."""

    @handles
    async def run(self, job: Job) -> Done:
        return Done(job.n, self.context.node_id)


class TestRunner:
    async def test_the_sharding_runner_sends_persisted_and_reads_replies(self, rig: Rig) -> None:
        """Sharding.send(envelope, persisted=True) returns a snowflake request id; the
        runner's own node consumes it; replies_for and await_reply return the payload;
        poll_storage wakes the consumers without harm."""
        transport = await rig.connect()
        runner = Sharding(
            transport,
            num_shards=NUM_SHARDS,
            node_id="runner",
            prefix=rig.prefix,
            persist=PersistSettings(),
        )
        runner.register_entity(Jobs)
        async with runner:
            shard = runner.get_shard_id(Jobs, "j1").shard
            env = Envelope("Job", encode_payload(Job(4)), shard, key=entity_key("Jobs", "j1"))
            rid = await runner.send(env, persisted=True)
            assert rid.isdigit()
            runner.poll_storage()
            reply = await runner.await_reply(rid, timeout=10)
            assert decode_payload(reply, Done) == Done(4, "runner")
            assert await runner.replies_for(rid) == [reply]


class TestSettingsAndIds:
    @pytest.mark.parametrize(
        ("options", "named"),
        [
            ({"batch": 0}, "batch"),
            ({"retry_pause": 0}, "retry_pause"),
            ({"reply_max_age": float("inf")}, "reply_max_age"),
            ({"replicas": 7}, "replicas"),
            ({"message_max_age": 60, "duplicate_window": 120}, "duplicate_window"),
        ],
    )
    def test_settings_out_of_range_are_refused_by_name(
        self, options: dict[str, Any], named: str
    ) -> None:
        """A setting out of range raises ConfigurationError naming it."""
        with pytest.raises(ConfigurationError, match=named):
            PersistSettings(**options)

    def test_request_ids_are_distinct_signed_64_bit_integers(self) -> None:
        """Request ids are decimal integers below 2**63, all different."""
        ids = [new_request_id() for _ in range(10_000)]
        assert len(set(ids)) == len(ids)
        assert all(0 <= int(i) < 2**63 for i in ids)
