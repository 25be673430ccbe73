"""What a second implementation relies on: idempotency keys, wrong-shard keys,
oversized replies and queued expiry, each proven on both transports."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import pytest
from prometheus_client import CollectorRegistry

import clstr
from clstr import (
    BadRequestError,
    Client,
    Envelope,
    EnvelopeExpiredError,
    IdempotencyKeyReusedError,
    KeyHandler,
    MemoryNetwork,
    MemoryTransport,
    Node,
    NoHandlerError,
    NotOwnerError,
    PrometheusMetrics,
    RemoteHandlerError,
    ReplyTooLargeError,
    RequestInterruptedError,
    Router,
    Transport,
    WrongShardError,
    shard_for_key,
)
from clstr.codec import decode_reply, encode_request
from clstr.node import ReplyCache
from clstr.node._replies import pack_handoff, unpack_handoff
from clstr.protocol import fingerprint
from clstr.testing import virtual_time

Connect = Callable[[str], Awaitable[Transport]]

NUM_SHARDS = 8


@dataclass
class Add:
    by: int


class Counting:
    """A raw handler that counts its runs per type, and can be held at a gate."""

    def __init__(self) -> None:
        self.runs: dict[str, int] = {}
        self.gate: asyncio.Event | None = None
        self.entered = asyncio.Event()
        self.fail_next = False
        #: Called once when a handler passes the gate (without yielding to the loop).
        self.after_gate: Callable[[], None] | None = None

    async def __call__(self, env: Envelope) -> bytes:
        self.runs[env.type] = self.runs.get(env.type, 0) + 1
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
            after, self.after_gate = self.after_gate, None
            if after is not None:
                after()
        if self.fail_next:
            self.fail_next = False
            raise ValueError("out of stock")
        return b"ran:" + env.data


@pytest.fixture
async def rig(connect: Connect) -> AsyncIterator[tuple[Node, Client, Counting]]:
    handler = Counting()
    node = Node(await connect("node"), handler, num_shards=NUM_SHARDS, node_id="n1")
    await node.start()
    client = Client(await connect("client"), num_shards=NUM_SHARDS, timeout=5)
    try:
        yield node, client, handler
    finally:
        await node.stop()


class TestIdempotencyKeys:
    async def test_a_retry_of_the_same_request_gets_the_first_reply(
        self, rig: tuple[Node, Client, Counting]
    ) -> None:
        """The same id with the same request is answered from the cache: it runs once."""
        _, client, handler = rig
        first = await client.request_key("k", "buy", b"1", request_id="r1")
        again = await client.request_key("k", "buy", b"1", request_id="r1")
        assert first == again == b"ran:1"
        assert handler.runs == {"buy": 1}

    @pytest.mark.parametrize(
        ("key", "msg_type", "data"),
        [("k", "buy", b"2"), ("k", "sell", b"1"), ("other", "buy", b"1")],
        ids=["payload", "type", "key"],
    )
    async def test_an_id_reused_for_another_request_is_refused(
        self, rig: tuple[Node, Client, Counting], key: str, msg_type: str, data: bytes
    ) -> None:
        """An id used again with another payload, type or key gets id_reused, never the
        first request's reply, and the second request does not run."""
        _, client, handler = rig
        await client.request_key("k", "buy", b"1", request_id="r1")
        with pytest.raises(IdempotencyKeyReusedError, match="r1"):
            await client.request_key(key, msg_type, data, request_id="r1")
        assert handler.runs == {"buy": 1}

    async def test_an_id_reused_while_its_request_runs_is_refused(
        self, rig: tuple[Node, Client, Counting]
    ) -> None:
        """A different request under the id of one still running is refused at once;
        the running one is answered as usual."""
        _, client, handler = rig
        handler.gate = asyncio.Event()
        running = asyncio.create_task(client.request_key("k", "buy", b"1", request_id="r1"))
        await handler.entered.wait()
        with pytest.raises(IdempotencyKeyReusedError):
            await client.request_key("k", "buy", b"9", request_id="r1")
        handler.gate.set()
        assert await running == b"ran:1"
        assert handler.runs == {"buy": 1}

    async def test_a_handler_error_is_stored_like_a_reply(
        self, rig: tuple[Node, Client, Counting]
    ) -> None:
        """The outcome of a handler that ran and raised is kept: a retry gets the same
        error without running the handler again."""
        _, client, handler = rig
        handler.fail_next = True
        for _ in range(2):
            with pytest.raises(RemoteHandlerError, match="out of stock"):
                await client.request_key("k", "buy", b"1", request_id="r1")
        assert handler.runs == {"buy": 1}


class TestRefusalsAreNotStored:
    async def test_a_corrected_retry_after_bad_request_runs(self, connect: Connect) -> None:
        """A payload that does not decode is refused (bad_request) without storing it:
        the corrected request under the same id runs."""
        router = Router()
        ran: list[int] = []

        @router.on(Add)
        async def add(msg: Add) -> int:
            ran.append(msg.by)
            return msg.by

        async with Node(await connect("node"), router, num_shards=NUM_SHARDS):
            client = Client(await connect("client"), num_shards=NUM_SHARDS)
            with pytest.raises(BadRequestError):
                await client.request_key("k", "Add", b"\xc1", request_id="r1")
            scoped = client.key("k")
            assert await scoped.call(Add(by=3), int, request_id="r1") == 3
            assert ran == [3]

    async def test_a_retry_after_no_handler_runs_once_the_type_is_known(
        self, connect: Connect
    ) -> None:
        """no_handler ran nothing and is not stored: once the type has a handler, the
        retry under the same id runs."""
        router = Router()
        async with Node(await connect("node"), router, num_shards=NUM_SHARDS):
            client = Client(await connect("client"), num_shards=NUM_SHARDS)
            with pytest.raises(NoHandlerError):
                await client.key("k").call(Add(by=1), int, request_id="r1")

            @router.on(Add)
            async def add(msg: Add) -> int:
                return msg.by * 10

            assert await client.key("k").call(Add(by=1), int, request_id="r1") == 10

    async def test_a_retry_after_key_required_with_the_key_runs(self, connect: Connect) -> None:
        """key_required is not stored: the same id sent again with its key runs."""
        handler = KeyHandler(lambda key: Counting())
        async with Node(await connect("node"), handler, num_shards=NUM_SHARDS):
            client = Client(await connect("client"), num_shards=NUM_SHARDS)
            shard = client.shard_for("k")
            with pytest.raises(clstr.KeyRequiredError):
                await client.request_shard(shard, "buy", b"1", request_id="r1")
            assert await client.request_key("k", "buy", b"1", request_id="r1") == b"ran:1"


class TestQueuedRefusalsAreNotStored:
    """A request refused before its handler ran leaves nothing under its id: the
    retry under the same id runs the handler instead of getting the refusal again."""

    async def test_a_retry_after_expiring_in_the_queue_runs(self, connect: Connect) -> None:
        """A request answered expired while it waited behind its key's running
        message is not stored: its retry under the same id runs."""
        handler = Counting()
        handler.gate = asyncio.Event()
        raw = await connect("raw")
        async with Node(await connect("node"), handler, num_shards=NUM_SHARDS) as node:
            hold = asyncio.create_task(_send(raw, Envelope("hold", key="k")))
            await handler.entered.wait()
            async with virtual_time(autojump=False) as clock:
                late = asyncio.create_task(_send(raw, _late(ttl=1.0)))
                await _until(lambda: node.queued == 1)
                clock.advance(1.5)  # the queue's timer answers it while "hold" runs
                with pytest.raises(EnvelopeExpiredError):
                    decode_reply(await late)
            handler.gate.set()
            decode_reply(await hold)
            assert decode_reply(await _send(raw, _late(ttl=5.0))) == b"ran:1"
            assert handler.runs == {"hold": 1, "late": 1}

    async def test_a_retry_after_expiring_as_a_worker_takes_it_runs(self, connect: Connect) -> None:
        """A request whose deadline passes just before a worker takes it up (before
        the queue's timer could answer it) is refused expired by the worker, not
        stored: its retry under the same id runs."""
        handler = Counting()
        handler.gate = asyncio.Event()
        raw = await connect("raw")
        async with Node(await connect("node"), handler, num_shards=NUM_SHARDS) as node:
            hold = asyncio.create_task(_send(raw, Envelope("hold", key="k")))
            await handler.entered.wait()
            async with virtual_time(autojump=False) as clock:
                late = asyncio.create_task(_send(raw, _late(ttl=1.0)))
                await _until(lambda: node.queued == 1)
                # "hold" moves the clock past the deadline and returns without
                # yielding: its worker takes "late" up in the same loop turn.
                handler.after_gate = lambda: clock.advance(1.5)
                handler.gate.set()
                with pytest.raises(EnvelopeExpiredError):
                    decode_reply(await late)
            decode_reply(await hold)
            assert decode_reply(await _send(raw, _late(ttl=5.0))) == b"ran:1"
            assert handler.runs == {"hold": 1, "late": 1}

    async def test_a_retry_after_an_eviction_runs(self, connect: Connect) -> None:
        """A queued request dropped with not_owner when its shard is released at
        once is not stored: once the shard is served again, its retry under the
        same id runs."""
        handler = Counting()
        handler.gate = asyncio.Event()
        raw = await connect("raw")
        # One worker, busy with a key of another shard: "late" waits in the queue
        # and is dropped by the eviction, not refused by a worker.
        other = next(k for k in (f"o{i}" for i in range(100)) if _shard(k) != _shard("k"))
        node = Node(await connect("node"), handler, num_shards=NUM_SHARDS, max_concurrency=1)
        async with node:
            hold = asyncio.create_task(_send(raw, Envelope("hold", key=other)))
            await handler.entered.wait()
            late = asyncio.create_task(_send(raw, _late()))
            await _until(lambda: node.queued == 1)
            await node.release(_shard("k"), timeout=0)
            with pytest.raises(NotOwnerError, match="moved away"):
                decode_reply(await late)
            await node.acquire(_shard("k"))
            handler.gate.set()
            decode_reply(await hold)
            assert decode_reply(await _send(raw, _late())) == b"ran:1"
            assert handler.runs == {"hold": 1, "late": 1}

    async def test_a_retry_after_an_interrupt_in_the_queue_runs(self, connect: Connect) -> None:
        """A queued request interrupted before its handler ran is not stored: its
        retry under the same id runs."""
        handler = Counting()
        handler.gate = asyncio.Event()
        raw = await connect("raw")
        async with Node(await connect("node"), handler, num_shards=NUM_SHARDS) as node:
            client = Client(await connect("client"), num_shards=NUM_SHARDS)
            hold = asyncio.create_task(_send(raw, Envelope("hold", key="k")))
            await handler.entered.wait()
            late = asyncio.create_task(_send(raw, _late()))
            await _until(lambda: node.queued == 1)
            assert await client.interrupt("r1", key="k") == 1
            with pytest.raises(RequestInterruptedError, match="before its handler ran"):
                decode_reply(await late)
            handler.gate.set()
            decode_reply(await hold)
            assert decode_reply(await _send(raw, _late())) == b"ran:1"
            assert handler.runs == {"hold": 1, "late": 1}


def _late(ttl: float | None = None) -> Envelope:
    """The request under id r1 that waits behind "hold" (same key, same payload)."""
    return Envelope("late", b"1", key="k", id="r1", ttl=ttl)


def _send(transport: Transport, env: Envelope) -> Awaitable[bytes]:
    """Send ``env`` to its key's shard and return the raw reply (10 s transport timeout)."""
    assert env.key is not None
    subject = clstr.shard_subject("clstr", _shard(env.key))
    return transport.request(subject, encode_request(env), 10)


def _shard(key: str) -> int:
    return shard_for_key(key, NUM_SHARDS)


class TestWrongShard:
    async def test_a_key_sent_to_another_shard_is_refused(
        self, rig: tuple[Node, Client, Counting]
    ) -> None:
        """A key that belongs to another shard than its subject's is refused with
        wrong_shard (naming both shards) and runs nothing; keyless messages still run."""
        _, client, handler = rig
        right = shard_for_key("k", NUM_SHARDS)
        wrong = (right + 1) % NUM_SHARDS
        with pytest.raises(WrongShardError, match=f"shard {right}, not {wrong}"):
            await client.request_shard(wrong, "buy", b"1", key="k")
        assert handler.runs == {}
        assert await client.request_shard(wrong, "buy", b"1") == b"ran:1"
        assert await client.request_key("k", "buy", b"1") == b"ran:1"

    async def test_a_client_with_another_shard_count_is_refused(self, connect: Connect) -> None:
        """A client configured with another num_shards than the nodes is told so."""
        async with Node(await connect("node"), Counting(), num_shards=NUM_SHARDS):
            client = Client(await connect("client"), num_shards=NUM_SHARDS // 2)
            key = next(
                k
                for k in (f"k{i}" for i in range(100))
                if shard_for_key(k, NUM_SHARDS // 2) != shard_for_key(k, NUM_SHARDS)
            )
            with pytest.raises(WrongShardError, match="num_shards or seed"):
                await client.request_key(key, "buy")


class TestOversizedReply:
    async def test_a_reply_over_max_payload_is_an_error_at_once(self, connect: Connect) -> None:
        """A reply bigger than the server carries gets reply_too_large (size and limit)
        at once, not the caller's timeout, and the node counts it."""
        registry = CollectorRegistry()
        node_transport = await connect("node")
        limit = node_transport.max_payload

        async def huge(env: Envelope) -> bytes:
            return b"x" * (limit + 1)

        node = Node(
            node_transport, huge, num_shards=NUM_SHARDS, metrics=PrometheusMetrics(registry)
        )
        async with node:
            client = Client(await connect("client"), num_shards=NUM_SHARDS, timeout=30)
            started = asyncio.get_running_loop().time()
            with pytest.raises(ReplyTooLargeError, match=f"over the max_payload of {limit}"):
                await client.request_key("k", "get", request_id="big-1")
            assert asyncio.get_running_loop().time() - started < 10
            assert node.stats.rejected["reply_too_large"] == 1
            rejected = registry.get_sample_value(
                "clstr_cluster_envelopes_rejected_total", {"reason": "reply_too_large"}
            )
            assert rejected == 1
            # The handler ran: its outcome is stored like any other.
            with pytest.raises(ReplyTooLargeError):
                await client.request_key("k", "get", request_id="big-1")
            assert node.stats.rejected["duplicate"] == 1


class TestQueuedExpiry:
    async def test_a_message_expiring_in_the_queue_is_answered_at_its_deadline(
        self, connect: Connect
    ) -> None:
        """A request whose deadline passes while it waits behind its key's running
        message is answered expired at the deadline, not when a worker gets to it,
        and its room in the queue is free again at once."""
        handler = Counting()
        handler.gate = asyncio.Event()
        node = Node(await connect("node"), handler, num_shards=NUM_SHARDS)
        requester = await connect("raw")
        subject = clstr.shard_subject("clstr", shard_for_key("k", NUM_SHARDS))
        async with node:
            first = asyncio.create_task(
                requester.request(subject, encode_request(Envelope("hold", key="k")), 10)
            )
            await handler.entered.wait()
            async with virtual_time(autojump=False) as clock:
                late = Envelope("late", key="k", ttl=1.0)
                second = asyncio.create_task(requester.request(subject, encode_request(late), 10))
                await _until(lambda: node.queued == 1)
                clock.advance(1.5)  # its deadline passes while "hold" still runs
                with pytest.raises(EnvelopeExpiredError):
                    decode_reply(await second)
                assert node.queued == 0
                assert not handler.gate.is_set()
            handler.gate.set()
            decode_reply(await first)
            assert handler.runs == {"hold": 1}

    async def test_a_new_key_left_without_a_worker_is_answered_at_its_deadline(
        self, connect: Connect
    ) -> None:
        """Three new keys in one burst on a node of two workers: the two first hold
        both workers, and the third, which no worker will start before its deadline,
        is answered expired at the deadline, its room in the queue freed."""
        handler = Counting()
        handler.gate = asyncio.Event()
        node = Node(await connect("node"), handler, num_shards=1, max_concurrency=2)
        requester = await connect("raw")
        subject = clstr.shard_subject("clstr", 0)
        async with node:
            burst = [Envelope("hold", key="a"), Envelope("hold", key="b")]
            burst.append(Envelope("late", key="c", ttl=1.0))
            try:
                async with virtual_time(autojump=False) as clock:
                    calls = [
                        asyncio.create_task(requester.request(subject, encode_request(env), 10))
                        for env in burst
                    ]
                    await _until(lambda: node.running == 2 and node.queued == 1)
                    clock.advance(1.5)  # its deadline passes while both workers are held
                    await _until(lambda: calls[2].done(), turns=10_000)
                    with pytest.raises(EnvelopeExpiredError):
                        decode_reply(await calls[2])
                    assert node.queued == 0
            finally:
                handler.gate.set()
            for call in calls[:2]:
                decode_reply(await call)
            assert handler.runs == {"hold": 2}


async def _until(predicate: Callable[[], bool], turns: int = 1_000_000) -> None:
    """Wait until ``predicate`` holds, a loop turn at a time (real I/O goes on; on a
    virtual clock that nobody moves, no time passes), for at most ``turns`` turns."""
    for _ in range(turns):
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition not reached")


class TestMaxPendingZero:
    async def test_zero_takes_only_what_a_free_worker_starts_at_once(self) -> None:
        """With max_pending=0 a message for a busy key is refused overloaded at once,
        while a message another worker can start runs (docs/guide.md)."""
        handler = Counting()
        handler.gate = asyncio.Event()
        network = MemoryNetwork()
        async with Node(
            MemoryTransport(network), handler, num_shards=1, max_pending=0, max_concurrency=2
        ):
            client = Client(MemoryTransport(network), num_shards=1)
            busy = asyncio.create_task(client.request_key("a", "hold"))
            await handler.entered.wait()
            with pytest.raises(clstr.OverloadedError):
                await client.request_key("a", "again")
            other = asyncio.create_task(client.request_key("b", "other"))
            await _until(lambda: handler.runs.get("other") == 1)
            handler.gate.set()
            assert await busy == b"ran:"
            assert await other == b"ran:"


class TestHandoffKeepsFingerprints:
    def test_a_handed_over_reply_keeps_its_requests_fingerprint(self) -> None:
        """Replies carried to a shard's next owner keep the fingerprint of their request,
        so the next owner refuses a reused id just as the first would."""
        old, new = ReplyCache(10, 60.0), ReplyCache(10, 60.0)
        env = Envelope("buy", b"1", shard=3, key="k", id="r1")
        old.put("r1", b"reply", 3, fingerprint(env))
        data = pack_handoff(old, 3, 1 << 20)
        assert data is not None
        assert unpack_handoff(new, 3, data) == 1
        assert new.get("r1") == (b"reply", fingerprint(env))
        other = Envelope("buy", b"2", shard=3, key="k", id="r1")
        assert fingerprint(other) != fingerprint(env)
