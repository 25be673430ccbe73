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

import msgpack
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
    with_header,
    with_ttl,
)
from clstr.codec import decode_reply, encode_request
from clstr.hashing import owner_of
from clstr.testing import virtual_time
from clstr.transports.base import MessageCallback, Subscription

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


class SpyTransport(Transport):
    """Wraps a transport and records every call that reaches it, so a test can
    say exactly what the client or node above it did (and did not) send."""

    def __init__(self, inner: Transport) -> None:
        self.inner = inner
        #: (method, subject, reply subject given to publish or None)
        self.calls: list[tuple[str, str, str | None]] = []

    @property
    def max_payload(self) -> int:
        return self.inner.max_payload

    async def request(self, subject: str, data: bytes, timeout: float) -> bytes:
        self.calls.append(("request", subject, None))
        return await self.inner.request(subject, data, timeout)

    async def publish(self, subject: str, data: bytes, *, reply: str | None = None) -> None:
        self.calls.append(("publish", subject, reply))
        await self.inner.publish(subject, data, reply=reply)  # type: ignore[call-arg]

    def publish_nowait(self, subject: str, data: bytes) -> None:
        self.calls.append(("publish_nowait", subject, None))
        self.inner.publish_nowait(subject, data)

    async def subscribe(
        self, subject: str, callback: MessageCallback, *, queue: str | None = None
    ) -> Subscription:
        self.calls.append(("subscribe", subject, None))
        return await self.inner.subscribe(subject, callback, queue=queue)

    async def close(self) -> None:
        await self.inner.close()


class Deliveries:
    """Counts the messages a transport's subscriptions handed to their callbacks
    (after each callback returned), so a test can wait for the n-th arrival
    instead of sleeping."""

    def __init__(self, transport: Transport) -> None:
        self.count = 0
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        subscribe = transport.subscribe

        async def counting(
            subject: str, callback: MessageCallback, *, queue: str | None = None
        ) -> Subscription:
            def deliver(data: bytes, reply: str | None) -> None:
                callback(data, reply)
                self.count += 1
                for n, future in self._waiters:
                    if self.count >= n and not future.done():
                        future.set_result(None)

            return await subscribe(subject, deliver, queue=queue)

        transport.subscribe = counting  # type: ignore[method-assign]

    async def wait_for(self, n: int) -> None:
        """Return once ``n`` messages in all have been delivered."""
        if self.count < n:
            future = asyncio.get_running_loop().create_future()
            self._waiters.append((n, future))
            await future


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

    async def test_notify_is_one_publish_and_nothing_comes_back(self, connect: Connect) -> None:
        """notify makes exactly one publish without a reply subject (no request, no
        inbox subscription), and the node sends nothing back for it."""
        seen: list[str] = []

        async def handle(env: Envelope) -> bytes:
            seen.append(env.type)
            return b"reply"

        node_side = SpyTransport(await connect("a"))
        node = Node(node_side, handle, node_id="a", num_shards=NUM_SHARDS)
        await node.start()
        client_side = SpyTransport(await connect("client"))
        client = Client(client_side, num_shards=NUM_SHARDS)
        subject = clstr.shard_subject("clstr", client.shard_for("k"))
        node_side.calls.clear()  # its subscriptions
        try:
            await client.notify_key("k", "ping", b"1")
            assert client_side.calls == [("publish", subject, None)]
            # One key's messages run in order: this request's reply comes after the
            # notification was handled, and is the only thing the node sent.
            assert await client.request_key("k", "after") == b"reply"
            assert seen == ["ping", "after"]
            assert [call[0] for call in client_side.calls] == ["publish", "request"]
            assert [call[0] for call in node_side.calls] == ["publish_nowait"]
        finally:
            await node.stop()


class TestClientDefaults:
    """Client(options=...) reach every envelope, and per-call options override them
    (the Go original dropped its client-wide options)."""

    @staticmethod
    async def serve(connect: Connect) -> tuple[list[Envelope], list[Node]]:
        seen: list[Envelope] = []

        async def record(env: Envelope) -> bytes:
            seen.append(env)
            return b""

        return seen, await start_nodes(connect, ["a"], lambda n: record)

    async def test_default_header_and_ttl_reach_the_handler(self, connect: Connect) -> None:
        """A client-wide header and TTL arrive with requests, scoped calls and
        notifications alike; the TTL (2 s), not the 30 s timeout, is the deadline."""
        seen, nodes = await self.serve(connect)
        client = Client(
            await connect("client"),
            num_shards=NUM_SHARDS,
            timeout=30,
            options=[with_header("tenant", "acme"), with_ttl(2.0)],
        )
        try:
            await client.request_key("k", "raw")
            await client.key("k").request_raw("scoped")
            await client.notify_key("k", "notified")
            await client.request_key("k", "last")  # after the notification (one key: FIFO)
            assert [env.type for env in seen] == ["raw", "scoped", "notified", "last"]
            for env in seen:
                assert env.header("tenant") == "acme", env.type
                assert env.ttl is not None
                assert 1.0 < env.ttl <= 2.0, (env.type, env.ttl)
        finally:
            await stop_all(nodes)

    async def test_default_ttl_bounds_the_wait(self, connect: Connect) -> None:
        """The client-wide TTL is the request's deadline: a stuck handler ends in the
        node's HandlerTimeoutError after about that long, not after the timeout."""

        async def stuck(env: Envelope) -> bytes:
            await asyncio.Event().wait()
            return b""

        nodes = await start_nodes(connect, ["a"], lambda n: stuck)
        client = Client(
            await connect("client"), num_shards=NUM_SHARDS, timeout=10, options=[with_ttl(0.5)]
        )
        loop = asyncio.get_running_loop()
        try:
            started = loop.time()
            with pytest.raises(HandlerTimeoutError):
                await client.request_key("k", "stuck")
            assert loop.time() - started < 5
        finally:
            await stop_all(nodes)

    async def test_per_call_options_override_the_defaults(self, connect: Connect) -> None:
        """Options given to a scoped client override the client's, and per-call ones
        override both; defaults not overridden stay."""
        seen, nodes = await self.serve(connect)
        client = Client(
            await connect("client"),
            num_shards=NUM_SHARDS,
            timeout=30,
            options=[with_header("tenant", "acme"), with_header("region", "eu"), with_ttl(2.0)],
        )
        try:
            await client.request_key(
                "k", "call", options=[with_header("tenant", "other"), with_ttl(5.0)]
            )
            scoped = client.key("k", with_header("tenant", "scoped"))
            await scoped.request_raw("scoped")
            await scoped.request_raw("both", options=[with_header("tenant", "call"), with_ttl(8)])
            got = [(env.type, env.header("tenant"), env.header("region")) for env in seen]
            assert got == [
                ("call", "other", "eu"),
                ("scoped", "scoped", "eu"),
                ("both", "call", "eu"),
            ]
            ttls = [env.ttl or 0.0 for env in seen]
            assert 4.0 < ttls[0] <= 5.0
            assert 1.0 < ttls[1] <= 2.0
            assert 7.0 < ttls[2] <= 8.0
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

    async def test_a_publish_nobody_hears_gets_an_empty_reply(self, connect: Connect) -> None:
        """A publish with a reply subject to a subject nobody subscribes to puts one
        empty message on the reply subject (nats-server's no-responders notice); one
        that is heard does not."""
        listener, sender = await connect("listener"), await connect("sender")
        got: list[bytes] = []
        arrived = asyncio.Event()

        def collect(data: bytes, reply: str | None) -> None:
            got.append(data)
            arrived.set()

        try:
            await listener.subscribe("heard.test", lambda data, reply: None)
            inbox = sender.new_inbox()
            await sender.subscribe(inbox, collect)
            await sender.publish("heard.test", b"x", reply=inbox)
            await sender.publish("nobody.test", b"x", reply=inbox)
            await arrived.wait()
            await sender.publish("heard.test", b"x", reply=inbox)
            await listener.subscribe(
                "last.test", lambda data, reply: sender.publish_nowait(inbox, b"end")
            )
            await sender.publish("last.test", b"x")
            while got[-1] != b"end":
                arrived.clear()
                await arrived.wait()
            assert got == [b"", b"end"]
        finally:
            await listener.close()
            await sender.close()

    async def test_close_fails_pending_requests_at_once(self, connect: Connect) -> None:
        """close() fails a request waiting for its reply with TransportClosedError
        at once, not when its (30 s) timeout runs out."""
        receiver, requester = await connect("receiver"), await connect("requester")
        arrived = asyncio.Event()
        await receiver.subscribe("close.test", lambda data, reply: arrived.set())  # no reply
        call = asyncio.create_task(requester.request("close.test", b"x", 30))
        await arrived.wait()
        closing = asyncio.create_task(requester.close())
        try:
            async with asyncio.timeout(5):
                with pytest.raises(TransportClosedError):
                    await call
        finally:
            await closing


class TestDeadlines:
    async def test_envelope_expired_while_queued_is_refused(self, connect: Connect) -> None:
        """An envelope whose TTL runs out while it waits is refused without running the handler.

        The TTL runs out on a virtual clock moved by hand (real I/O goes on), so
        the test neither waits it out nor depends on how fast the message travels.
        """
        recorder = Recorder(gate=asyncio.Event())
        deliveries: list[Deliveries] = []

        async def watched(name: str) -> Transport:
            transport = await connect(name)
            deliveries.append(Deliveries(transport))
            return transport

        nodes = await start_nodes(watched, ["a"], lambda n: recorder)
        requester = await connect("raw")
        subject = clstr.shard_subject("clstr", clstr.shard_for_key("k", NUM_SHARDS))
        try:
            first = asyncio.create_task(
                requester.request(subject, encode_request(Envelope("hold", key="k")), 5)
            )
            await recorder.entered.wait()
            async with virtual_time(autojump=False) as clock:
                short = Envelope("late", key="k", ttl=1.0)
                second = asyncio.create_task(requester.request(subject, encode_request(short), 5))
                await deliveries[0].wait_for(2)  # queued behind "hold", its deadline set
                assert nodes[0].queued == 1
                clock.advance(2.0)  # its TTL runs out while it waits
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

    async def test_without_a_ttl_an_old_envelope_is_never_stale(self, connect: Connect) -> None:
        """A message without a ttl (absent or 0) runs whatever its ts: here one
        created in 1970, far beyond the skew allowance."""
        recorder = Recorder(node_id="a")
        nodes = await start_nodes(connect, ["a"], lambda n: recorder, clock_skew=1.0)
        requester = await connect("raw")
        subject = clstr.shard_subject("clstr", clstr.shard_for_key("k", NUM_SHARDS))
        try:
            for ttl in ({}, {"ttl": 0}):
                body = {"v": 1, "t": "echo", "d": b"x", "k": "k", "ts": 1000, **ttl}
                raw = await requester.request(subject, msgpack.packb(body, use_bin_type=True), 5)
                assert decode_reply(raw) == b"a:x"
            assert len(recorder.seen) == 2
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
            # 1 s keeps 100 ms of it for the timeout answer's way back: a loop
            # stall shorter than that cannot turn it into the client's own timeout.
            with pytest.raises(HandlerTimeoutError):
                await client.request_key("k", "slow", timeout=1.0)
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
        """A request to a shard nobody serves fails with NoShardOwnerError within a
        round trip (< 0.5 s), not after any part of its 10 s timeout."""
        nodes = await start_nodes(connect, ["a"], lambda n: Recorder(), shards=[0])
        client = Client(await connect("client"), num_shards=NUM_SHARDS, timeout=10)
        try:
            started = time.monotonic()
            with pytest.raises(NoShardOwnerError):
                await client.request_shard(5, "echo")
            assert time.monotonic() - started < 0.5, "no-owner must not wait for the timeout"
        finally:
            await stop_all(nodes)

    async def test_a_stream_nobody_serves_fails_at_once(self, connect: Connect) -> None:
        """A stream to a shard nobody serves fails with NoShardOwnerError within a
        round trip, like a request, not after its 10 s timeout."""
        nodes = await start_nodes(connect, ["a"], lambda n: Recorder(), shards=[0])
        client = Client(await connect("client"), num_shards=NUM_SHARDS, timeout=10)
        try:
            started = time.monotonic()
            with pytest.raises(NoShardOwnerError, match="no node serves"):
                async for _ in client.stream_shard(5, "echo"):
                    pass
            assert time.monotonic() - started < 0.5, "no-owner must not wait for the timeout"
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

    async def test_reserved_header_answered_bad_request(self, connect: Connect) -> None:
        """A raw message carrying an x-clstr- header is answered bad_request and
        its handler never runs."""
        recorder = Recorder()
        nodes = await start_nodes(connect, ["a"], lambda n: recorder)
        raw = await connect("raw")
        body = msgpack.packb({"v": 1, "t": "echo", "h": {"X-Clstr-Owner": "me"}})
        try:
            reply = await raw.request(clstr.shard_subject("clstr", 1), body, 5)
            with pytest.raises(BadRequestError, match="reserved prefix"):
                decode_reply(reply)
            assert recorder.seen == []
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
