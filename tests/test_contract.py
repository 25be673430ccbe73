"""The contract suite: every behaviour here is proven on both transports.

Each test runs once on the memory transport and once against a real
nats-server (the ``connect`` fixture), with a separate connection per node
and per client, as separate processes would have.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import ClassVar

import pytest

import clstr
from clstr import (
    BadRequestError,
    Client,
    Envelope,
    EnvelopeExpiredError,
    HandlerTimeoutError,
    KeyHandler,
    Node,
    NoShardOwnerError,
    NotOwnerError,
    OverloadedError,
    RemoteHandlerError,
    Router,
    Transport,
    TransportClosedError,
)
from clstr.codec import decode_reply, encode_request
from clstr.hashing import owner_of

from _support import eventually

Connect = Callable[[str], Awaitable[Transport]]

NUM_SHARDS = 16


@dataclass
class Add:
    a: int
    b: int


@dataclass
class WrongAdd:
    """Claims to be an Add but lacks a field."""

    message_type: ClassVar[str] = "Add"
    a: int


@dataclass
class Total:
    value: int
    by: str = ""


@dataclass
class Recorder:
    """A handler that records what ran where, and can be held at a gate."""

    node_id: str = ""
    seen: list[tuple[str, str | None, bytes]] = field(default_factory=list)
    gate: asyncio.Event | None = None
    entered: asyncio.Event = field(default_factory=asyncio.Event)

    async def __call__(self, env: Envelope) -> bytes:
        self.seen.append((env.type, env.key, env.data))
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        if env.type == "fail":
            raise ValueError("boom: " + env.data.decode())
        return self.node_id.encode() + b":" + env.data


async def start_nodes(
    connect: Connect,
    ids: list[str],
    make_handler: Callable[[str], clstr.Handler],
    **kwargs: object,
) -> list[Node]:
    nodes = []
    for node_id in ids:
        node = Node(
            await connect(node_id),
            make_handler(node_id),
            node_id=node_id,
            num_shards=NUM_SHARDS,
            **({} if "shards" in kwargs else {"nodes": ids}),  # type: ignore[arg-type]
            **kwargs,  # type: ignore[arg-type]
        )
        await node.start()
        nodes.append(node)
    return nodes


async def stop_all(nodes: list[Node]) -> None:
    for node in nodes:
        await node.stop()


class TestRouting:
    async def test_key_reaches_its_hrw_owner(self, connect: Connect) -> None:
        """Every key is answered by the node HRW names as its shard's owner."""
        ids = ["a", "b", "c"]
        nodes = await start_nodes(connect, ids, lambda n: Recorder(node_id=n))
        client = Client(await connect("client"), num_shards=NUM_SHARDS)
        try:
            for i in range(60):
                key = f"user-{i}"
                reply = await client.request_key(key, "echo", b"x")
                expected = owner_of(client.shard_for(key), ids)
                assert reply == expected.encode() + b":x"
        finally:
            await stop_all(nodes)

    async def test_node_info_names_node_and_shards(self, connect: Connect) -> None:
        """The built-in node-info request returns the serving node's id and shard list."""
        ids = ["a", "b"]
        nodes = await start_nodes(connect, ids, lambda n: Recorder(node_id=n))
        client = Client(await connect("client"), num_shards=NUM_SHARDS)
        try:
            for shard in range(NUM_SHARDS):
                info = await client.shard(shard).node_info()
                assert info.node_id == owner_of(shard, ids)
                assert shard in info.shards
                assert info.shards == next(n for n in nodes if n.node_id == info.node_id).shards
        finally:
            await stop_all(nodes)

    async def test_queue_group_delivers_each_message_once(self, connect: Connect) -> None:
        """Two nodes serving the same shards share a queue group: each message runs once."""
        recorders = [Recorder(node_id="a"), Recorder(node_id="b")]
        nodes = [
            Node(await connect(r.node_id), r, node_id=r.node_id, num_shards=NUM_SHARDS)
            for r in recorders
        ]
        for node in nodes:
            await node.start()
        client = Client(await connect("client"), num_shards=NUM_SHARDS)
        try:
            await asyncio.gather(*(client.request_shard(3, "echo", b"%d" % i) for i in range(100)))
            assert sum(len(r.seen) for r in recorders) == 100
        finally:
            await stop_all(nodes)


class TestTypedCalls:
    async def test_typed_call_round_trip(self, connect: Connect) -> None:
        """A dataclass request is decoded by the router and its dataclass reply decoded back."""
        router = Router()

        @router.on(Add)
        async def add(msg: Add, env: Envelope) -> Total:
            return Total(msg.a + msg.b, by=env.key or "")

        nodes = await start_nodes(connect, ["a"], lambda n: router)
        client = Client(await connect("client"), num_shards=NUM_SHARDS)
        try:
            total = await client.key("acct-1").call(Add(2, 40), Total)
            assert total == Total(42, by="acct-1")
        finally:
            await stop_all(nodes)

    async def test_payload_that_does_not_fit_is_bad_request(self, connect: Connect) -> None:
        """A payload that does not decode into the route's class is answered bad_request."""
        router = Router()

        @router.on(Add)
        async def add(msg: Add) -> Total:
            return Total(msg.a + msg.b)

        nodes = await start_nodes(connect, ["a"], lambda n: router)
        client = Client(await connect("client"), num_shards=NUM_SHARDS)
        try:
            with pytest.raises(BadRequestError, match="missing field"):
                await client.key("k").call(WrongAdd(1), Total)
        finally:
            await stop_all(nodes)


class TestNotify:
    async def test_notify_returns_before_the_handler_finishes(self, connect: Connect) -> None:
        """notify is fire-and-forget: it returns while the handler is still held at a gate."""
        recorder = Recorder(gate=asyncio.Event())
        nodes = await start_nodes(connect, ["a"], lambda n: recorder)
        client = Client(await connect("client"), num_shards=NUM_SHARDS)
        try:
            await client.notify_key("k", "ping", b"1")
            await recorder.entered.wait()  # it arrived; the handler is still blocked
            assert recorder.seen == [("ping", "k", b"1")]
            recorder.gate.set()  # type: ignore[union-attr]
        finally:
            await stop_all(nodes)


class TestTransport:
    async def test_publish_nowait_keeps_order_with_publish(self, connect: Connect) -> None:
        """Messages queued with publish_nowait and sent with publish arrive in the
        order they were given, and publish_nowait returns without a loop turn."""
        receiver, sender = await connect("receiver"), await connect("sender")
        got: list[bytes] = []
        done = asyncio.Event()

        def collect(data: bytes, reply: str | None) -> None:
            got.append(data)
            if len(got) == 200:
                done.set()

        try:
            await receiver.subscribe("order.test", collect)
            for i in range(100):
                sender.publish_nowait("order.test", b"%d" % (2 * i))
                await sender.publish("order.test", b"%d" % (2 * i + 1))
            await done.wait()
            assert got == [b"%d" % i for i in range(200)]
            await sender.close()
            with pytest.raises(TransportClosedError):
                sender.publish_nowait("order.test", b"late")
        finally:
            await receiver.close()
            await sender.close()


class TestDeadlines:
    async def test_envelope_expired_while_queued_is_refused(self, connect: Connect) -> None:
        """An envelope whose TTL runs out while it waits is refused without running the handler."""
        recorder = Recorder(gate=asyncio.Event())
        nodes = await start_nodes(connect, ["a"], lambda n: recorder)
        requester = await connect("raw")
        subject = clstr.shard_subject("clstr", 0)
        try:
            first = asyncio.create_task(
                requester.request(subject, encode_request(Envelope("hold", key="k")), 5)
            )
            await recorder.entered.wait()
            short = Envelope("late", key="k", ttl=0.05)
            second = asyncio.create_task(requester.request(subject, encode_request(short), 5))
            await eventually(lambda: nodes[0].queued == 1)
            await asyncio.sleep(0.06)  # let the queued envelope's TTL run out
            recorder.gate.set()  # type: ignore[union-attr]
            with pytest.raises(EnvelopeExpiredError):
                decode_reply(await second)
            decode_reply(await first)
            assert [t for t, _, _ in recorder.seen] == ["hold"]
        finally:
            await stop_all(nodes)

    async def test_stale_envelope_beyond_clock_skew_is_refused(self, connect: Connect) -> None:
        """An envelope created longer ago than its TTL plus the skew allowance is dropped."""
        recorder = Recorder()
        nodes = await start_nodes(connect, ["a"], lambda n: recorder, clock_skew=1.0)
        client = Client(await connect("client"), num_shards=NUM_SHARDS)

        def from_the_past(env: Envelope) -> Envelope:
            return Envelope(env.type, env.data, env.shard, env.key, created_at=time.time() - 60)

        try:
            with pytest.raises(EnvelopeExpiredError):
                await client.request_key("k", "echo", b"x", options=[from_the_past])
            assert recorder.seen == []
        finally:
            await stop_all(nodes)

    async def test_node_with_skewed_clock_still_serves(self, connect: Connect) -> None:
        """A node whose clock is 10 s ahead still serves: deadlines count from receipt."""
        nodes = await start_nodes(
            connect, ["a"], lambda n: Recorder(node_id=n), wall_clock=lambda: time.time() + 10
        )
        client = Client(await connect("client"), num_shards=NUM_SHARDS, timeout=1.0)
        try:
            assert await client.request_key("k", "echo", b"x") == b"a:x"
        finally:
            await stop_all(nodes)

    async def test_handler_past_deadline_times_out(self, connect: Connect) -> None:
        """A handler still running at the deadline is cancelled and the caller gets timeout."""
        cancelled = asyncio.Event()

        async def stuck(env: Envelope) -> bytes:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancelled.set()
                raise
            return b""

        nodes = await start_nodes(connect, ["a"], lambda n: stuck)
        client = Client(await connect("client"), num_shards=NUM_SHARDS)
        try:
            with pytest.raises(HandlerTimeoutError):
                await client.request_key("k", "slow", timeout=0.3)
            assert cancelled.is_set()
        finally:
            await stop_all(nodes)


class TestErrors:
    async def test_handler_exception_becomes_remote_error(self, connect: Connect) -> None:
        """A handler's exception reaches the caller with its type and message; the node lives on."""
        nodes = await start_nodes(connect, ["a"], lambda n: Recorder(node_id=n))
        client = Client(await connect("client"), num_shards=NUM_SHARDS)
        try:
            with pytest.raises(RemoteHandlerError) as info:
                await client.request_key("k", "fail", b"bad input")
            assert info.value.remote_type == "ValueError"
            assert info.value.remote_message == "boom: bad input"
            assert await client.request_key("k", "echo", b"ok") == b"a:ok"
        finally:
            await stop_all(nodes)

    async def test_no_owner_fails_at_once(self, connect: Connect) -> None:
        """A request to a shard nobody serves fails with NoShardOwnerError, not a timeout."""
        nodes = await start_nodes(connect, ["a"], lambda n: Recorder(), shards=[0])
        client = Client(await connect("client"), num_shards=NUM_SHARDS, timeout=10)
        try:
            started = time.monotonic()
            with pytest.raises(NoShardOwnerError):
                await client.request_shard(5, "echo")
            assert time.monotonic() - started < 5, "no-owner must not wait for the timeout"
        finally:
            await stop_all(nodes)

    async def test_overloaded_past_max_pending(self, connect: Connect) -> None:
        """With the queue at max_pending, the next message is answered overloaded."""
        recorder = Recorder(gate=asyncio.Event())
        nodes = await start_nodes(
            connect, ["a"], lambda n: recorder, max_concurrency=1, max_pending=2
        )
        client = Client(await connect("client"), num_shards=NUM_SHARDS)
        try:
            held = [asyncio.create_task(client.request_key("k", "echo", b"0"))]
            await recorder.entered.wait()
            held += [
                asyncio.create_task(client.request_key("k", "echo", b"%d" % i)) for i in (1, 2)
            ]
            await eventually(lambda: nodes[0].queued == 2)
            with pytest.raises(OverloadedError):
                await client.request_key("k", "echo", b"3")
            recorder.gate.set()  # type: ignore[union-attr]
            assert await asyncio.gather(*held) == [b":0", b":1", b":2"]
        finally:
            await stop_all(nodes)

    async def test_malformed_bytes_answered_bad_request(self, connect: Connect) -> None:
        """Garbage on a shard subject gets a bad_request reply and the node keeps serving."""
        recorder = Recorder()
        nodes = await start_nodes(connect, ["a"], lambda n: recorder)
        raw = await connect("raw")
        client = Client(await connect("client"), num_shards=NUM_SHARDS)
        try:
            for junk in (b"", b"\xc1", b"\x93\x01\x02\x03", b"\x81\xa1v\x02", b"not msgpack"):
                reply = await raw.request(clstr.shard_subject("clstr", 1), junk, 5)
                with pytest.raises(BadRequestError):
                    decode_reply(reply)
            assert recorder.seen == []
            assert await client.request_shard(1, "echo", b"ok") == b":ok"
        finally:
            await stop_all(nodes)


class TestOrderingAndConcurrency:
    async def test_one_key_runs_in_arrival_order(self, connect: Connect) -> None:
        """1000 messages for one key are handled one at a time in the order sent."""
        order: list[int] = []
        running = 0
        overlap = False

        async def record(env: Envelope) -> bytes:
            nonlocal running, overlap
            running += 1
            overlap = overlap or running > 1
            await asyncio.sleep(0)  # give another message of the key a chance to interleave
            order.append(int(env.data))
            running -= 1
            return b""

        nodes = await start_nodes(connect, ["a"], lambda n: record)
        client = Client(await connect("client"), num_shards=NUM_SHARDS)
        try:
            for i in range(1000):
                await client.notify_key("the-key", "seq", b"%d" % i)
            await client.request_key("the-key", "seq", b"1000")  # after all of them
            assert order == list(range(1001))
            assert not overlap
        finally:
            await stop_all(nodes)

    async def test_different_keys_run_concurrently_up_to_the_limit(self, connect: Connect) -> None:
        """Different keys run at once, never more than max_concurrency at a time."""
        limit = 4
        running = 0
        peak = 0
        full = asyncio.Event()
        release = asyncio.Event()

        async def hold(env: Envelope) -> bytes:
            nonlocal running, peak
            running += 1
            peak = max(peak, running)
            if running == limit:
                full.set()
            await release.wait()
            running -= 1
            return b""

        nodes = await start_nodes(connect, ["a"], lambda n: hold, max_concurrency=limit)
        client = Client(await connect("client"), num_shards=NUM_SHARDS)
        try:
            calls = [asyncio.create_task(client.request_key(f"key-{i}", "hold")) for i in range(10)]
            await full.wait()  # `limit` different keys are running at the same moment
            await eventually(lambda: nodes[0].queued == 10 - limit)
            assert nodes[0].running == limit
            release.set()
            await asyncio.gather(*calls)
            assert peak == limit
        finally:
            await stop_all(nodes)


class TestLifecycle:
    async def test_stop_lets_in_flight_finish(self, connect: Connect) -> None:
        """stop() waits for a running handler, whose caller still gets its reply."""
        recorder = Recorder(node_id="a", gate=asyncio.Event())
        nodes = await start_nodes(connect, ["a"], lambda n: recorder)
        client = Client(await connect("client"), num_shards=NUM_SHARDS)
        call = asyncio.create_task(client.request_key("k", "echo", b"x"))
        await recorder.entered.wait()
        stopping = asyncio.create_task(nodes[0].stop())
        await eventually(lambda: nodes[0].state is clstr.NodeState.STOPPING)
        recorder.gate.set()  # type: ignore[union-attr]
        assert await call == b"a:x"
        await stopping
        assert nodes[0].state is clstr.NodeState.STOPPED
        with pytest.raises(NoShardOwnerError):
            await client.request_key("k", "echo", b"y")

    async def test_stop_bound_cancels_stuck_handlers(self, connect: Connect) -> None:
        """Past its bound, stop() cancels a stuck handler and its caller gets not_owner."""
        recorder = Recorder(gate=asyncio.Event())
        nodes = await start_nodes(connect, ["a"], lambda n: recorder)
        client = Client(await connect("client"), num_shards=NUM_SHARDS)
        call = asyncio.create_task(client.request_key("k", "echo"))
        await recorder.entered.wait()
        await nodes[0].stop(timeout=0.05)
        with pytest.raises(NotOwnerError):
            await call

    async def test_closed_client_refuses_calls(self, connect: Connect) -> None:
        """A closed client raises TransportClosedError instead of sending."""
        client = Client(await connect("client"), num_shards=NUM_SHARDS)
        await client.close()
        with pytest.raises(TransportClosedError):
            await client.request_key("k", "echo")
        with pytest.raises(TransportClosedError):
            await client.notify_key("k", "echo")

    async def test_closed_transport_refuses_calls(self, connect: Connect) -> None:
        """A closed transport raises TransportClosedError for requests and publishes."""
        transport = await connect("t")
        await transport.close()
        with pytest.raises(TransportClosedError):
            await transport.request("clstr.shard.0", b"", 1)
        with pytest.raises(TransportClosedError):
            await transport.publish("clstr.shard.0", b"")

    async def test_key_handler_keeps_state_per_key(self, connect: Connect) -> None:
        """A KeyHandler keeps one entity per key across requests, on the owning node."""

        def counter(key: str) -> clstr.Handler:
            count = 0

            async def handle(env: Envelope) -> bytes:
                nonlocal count
                count += 1
                return b"%s=%d" % (key.encode(), count)

            return handle

        nodes = await start_nodes(connect, ["a", "b"], lambda n: KeyHandler(counter))
        client = Client(await connect("client"), num_shards=NUM_SHARDS)
        try:
            for _ in range(3):
                await client.request_key("x", "inc")
            assert await client.request_key("x", "inc") == b"x=4"
            assert await client.request_key("y", "inc") == b"y=1"
        finally:
            await stop_all(nodes)
