"""Edge cases of the node found in review: each test failed before its fix.

Memory transport only: they are about the node's own bookkeeping.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from clstr import (
    Client,
    Envelope,
    EnvelopeExpiredError,
    KeyHandler,
    MemoryTransport,
    Node,
    NotOwnerError,
    RetryPolicy,
)
from clstr.codec import decode_reply, encode_request

from _support import eventually

SUBJECT = "clstr.shard.0"


class Slow:
    """A handler that records its runs and waits at a gate."""

    def __init__(self) -> None:
        self.runs: list[bytes] = []
        self.running = 0
        self.gate = asyncio.Event()

    async def __call__(self, env: Envelope) -> bytes:
        self.runs.append(env.data)
        self.running += 1
        try:
            await self.gate.wait()
        finally:
            self.running -= 1
        return b"ok"


class TestHandoff:
    async def test_release_past_its_bound_leaves_nothing_running(self) -> None:
        """After release() times out and cancels, no handler of that shard runs or
        starts: the replacement worker refuses the rest of the lane."""
        handler = Slow()
        transport = MemoryTransport()
        node = Node(transport, handler, num_shards=1, stop_timeout=1)
        await node.start()
        client = Client(transport.connect("c"), num_shards=1, timeout=10)
        calls = [
            asyncio.create_task(client.request_shard(0, "x", b"%d" % i, key="k")) for i in range(3)
        ]
        await eventually(lambda: node.running == 1 and node.queued == 2)
        await node.release(0, timeout=0.05)
        assert handler.running == 0
        assert handler.runs == [b"0"]
        results = await asyncio.gather(*calls, return_exceptions=True)
        assert all(isinstance(r, NotOwnerError) for r in results)
        await node.stop()


class TestIdempotencyEdges:
    async def test_refusal_while_fenced_is_not_cached(self) -> None:
        """A not_owner answer given while fenced is not remembered: the same id
        retried after unfencing runs the handler."""
        calls = 0

        async def handler(env: Envelope) -> bytes:
            nonlocal calls
            calls += 1
            return b"done"

        transport = MemoryTransport()
        node = Node(transport, handler, num_shards=1)
        await node.start()
        raw = transport.connect("c")
        env = Envelope("x", key="k", id="req-1", ttl=5)
        first = asyncio.create_task(raw.request(SUBJECT, encode_request(env), 5))
        # Two loop turns: delivered and queued, its worker created but not started.
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert node.queued == 1
        node.fence("blip")
        with pytest.raises(NotOwnerError):
            decode_reply(await first)
        node.unfence()
        client = Client(raw, num_shards=1, timeout=2, retry=RetryPolicy())
        assert await client.request_shard(0, "x", key="k", request_id="req-1") == b"done"
        assert calls == 1
        await node.stop()

    async def test_expired_copy_does_not_cut_the_run_in_flight(self) -> None:
        """A stale copy of an id that is running is refused alone: later copies still
        join the run, and the handler runs once."""
        handler = Slow()
        transport = MemoryTransport()
        delivered = 0
        arrived = asyncio.Event()
        subscribe = transport.subscribe

        async def counting(subject: str, callback: Any, *, queue: str | None = None) -> Any:
            def deliver(data: bytes, reply: str | None) -> None:
                nonlocal delivered
                callback(data, reply)
                delivered += 1
                if delivered == 3:
                    arrived.set()

            return await subscribe(subject, deliver, queue=queue)

        transport.subscribe = counting  # type: ignore[method-assign]
        node = Node(transport, handler, num_shards=1, clock_skew=1.0)
        await node.start()
        raw = transport.connect("c")

        def send(**kwargs: object) -> asyncio.Task[bytes]:
            env = Envelope("pay", key="k", id="order-7", ttl=5, **kwargs)  # type: ignore[arg-type]
            return asyncio.create_task(raw.request(SUBJECT, encode_request(env), 5))

        first = send()
        await eventually(lambda: handler.running == 1)
        stale = send(created_at=time.time() - 60)
        with pytest.raises(EnvelopeExpiredError):
            decode_reply(await stale)
        later = send()
        await arrived.wait()  # the later copy reached the node and joined the run
        handler.gate.set()
        assert decode_reply(await first) == b"ok"
        assert decode_reply(await later) == b"ok"
        assert handler.runs == [b""]
        await node.stop()


class TestLateDeliveries:
    async def test_message_for_a_released_shard_is_refused(self) -> None:
        """A message the transport still hands over for a shard the node released
        is answered not_owner, not handled."""
        handler = Slow()
        transport = MemoryTransport()
        node = Node(transport, handler, num_shards=2)
        await node.start()
        await node.release(0)
        replies: list[bytes] = []
        raw = transport.connect("c")
        inbox = "replies.test"
        await raw.subscribe(inbox, lambda data, reply: replies.append(data))
        node._intake.on_message(0, encode_request(Envelope("x")), inbox)  # as a late delivery
        await eventually(lambda: bool(replies))
        with pytest.raises(NotOwnerError):
            decode_reply(replies[0])
        assert handler.runs == []
        await node.stop()


class TestKeyHandlerRaces:
    async def test_key_busy_again_is_not_evicted(self) -> None:
        """A key that turns busy while earlier evictions run is skipped, and a key
        evicted twice does not raise."""
        gate = asyncio.Event()
        evicted: list[str] = []

        async def slow_evict(key: str, handler: object) -> None:
            evicted.append(key)
            await gate.wait()

        async def echo(env: Envelope) -> bytes:
            return env.data

        keys = KeyHandler(lambda key: echo, on_evict=slow_evict)
        for key in ("a", "b"):
            await keys(Envelope("e", key=key))
        sweep = asyncio.create_task(keys.evict_all())
        await eventually(lambda: evicted == ["a"])
        keys._entries["b"].busy += 1  # "b" starts handling meanwhile
        second = asyncio.create_task(keys.evict_all())  # a concurrent eviction path
        gate.set()
        await asyncio.gather(sweep, second)
        assert "b" in keys
        assert evicted == ["a"]


class TestWorkers:
    async def test_a_burst_of_quick_handlers_starts_few_workers(self) -> None:
        """Messages delivered in one go whose handlers never wait are run by one or
        two worker tasks, not a task per message; waiting handlers still overlap."""
        started: list[str] = []
        loop = asyncio.get_running_loop()

        def counting(loop: asyncio.AbstractEventLoop, coro: Any) -> asyncio.Task[Any]:
            started.append(coro.__qualname__)
            return asyncio.Task(coro, loop=loop)

        handled = 0
        gate = asyncio.Event()
        waiting = 0

        async def handler(env: Envelope) -> bytes:
            nonlocal handled, waiting
            if env.type == "wait":
                waiting += 1
                await gate.wait()
            handled += 1
            return b""

        transport = MemoryTransport()
        async with Node(transport, handler, num_shards=1, max_concurrency=50):
            sender = transport.connect("c")
            loop.set_task_factory(counting)
            try:
                for i in range(200):
                    sender.publish_nowait(SUBJECT, encode_request(Envelope("quick", key=f"k{i}")))
                await eventually(lambda: handled == 200)
                assert 1 <= started.count("Dispatcher._work") <= 2
                for i in range(10):
                    sender.publish_nowait(SUBJECT, encode_request(Envelope("wait", key=f"w{i}")))
                await eventually(lambda: waiting == 10)  # all ten wait at once
                gate.set()
                await eventually(lambda: handled == 210)
            finally:
                loop.set_task_factory(None)
