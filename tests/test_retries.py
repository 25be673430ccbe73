"""Retries are safe: the retry policy, request ids as idempotency keys, the reply cache.

Runs on both transports (the ``connect`` fixture).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from clstr import (
    Client,
    ConfigurationError,
    Envelope,
    Node,
    NoShardOwnerError,
    OverloadedError,
    RetryPolicy,
    Transport,
)
from clstr.metrics import NoopMetrics
from clstr.transports.base import MessageCallback, Subscription

Connect = Callable[[str], Awaitable[Transport]]


class Counter:
    """Counts its runs per request id, held at an optional gate."""

    def __init__(self) -> None:
        self.runs: list[str | None] = []
        self.gate: asyncio.Event | None = None
        self.entered = asyncio.Event()

    async def __call__(self, env: Envelope) -> bytes:
        self.runs.append(env.id)
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        return b"%d" % len(self.runs)


class Deliveries:
    """Counts the messages a transport's subscriptions handed to their callbacks
    (after each callback returned): wait for the n-th arrival instead of sleeping."""

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


class SeenErrors(NoopMetrics):
    """Metrics that record retries and transport errors, and signal each retry."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.retries: list[str] = []
        self.retried = asyncio.Event()

    def request_retried(self, message_type: str, reason: str) -> None:
        self.retries.append(reason)
        self.retried.set()

    def transport_error(self, error_type: str) -> None:
        self.errors.append(error_type)


class TestIdempotency:
    async def test_made_up_ids_are_unique_across_clients(self, connect: Connect) -> None:
        """With a retry policy and no request_id, every request of every client gets
        an id of its own (a repeated one would be answered from the reply cache)."""
        counter = Counter()
        node = Node(await connect("a"), counter, num_shards=4)
        await node.start()
        clients = [
            Client(await connect(f"c{i}"), num_shards=4, retry=RetryPolicy()) for i in range(3)
        ]
        try:
            for client in clients:
                for _ in range(20):
                    await client.request_shard(1, "inc")
            assert len(set(counter.runs)) == len(counter.runs) == 60
            assert all(isinstance(i, str) and len(i) <= 128 for i in counter.runs)
        finally:
            await node.stop()

    async def test_retried_id_gets_the_first_reply(self, connect: Connect) -> None:
        """A request id sent twice runs the handler once; the second gets the first reply."""
        counter = Counter()
        node = Node(await connect("a"), counter, num_shards=4)
        await node.start()
        client = Client(await connect("c"), num_shards=4)
        try:
            first = await client.request_shard(1, "inc", request_id="req-1")
            again = await client.request_shard(1, "inc", request_id="req-1")
            other = await client.request_shard(1, "inc", request_id="req-2")
            assert (first, again, other) == (b"1", b"1", b"2")
            assert counter.runs == ["req-1", "req-2"]
        finally:
            await node.stop()

    async def test_duplicate_in_flight_shares_one_run(self, connect: Connect) -> None:
        """A retry arriving while the first copy still runs waits for it: one run, two replies.

        The first copy is held until the node has taken the second, so no reply is
        cached yet: only the in-flight path can answer the second.
        """
        counter = Counter()
        counter.gate = asyncio.Event()
        node_transport = await connect("a")
        deliveries = Deliveries(node_transport)
        node = Node(node_transport, counter, num_shards=4)
        await node.start()
        client = Client(await connect("c"), num_shards=4)
        try:
            first = asyncio.create_task(client.request_shard(2, "inc", request_id="dup"))
            await counter.entered.wait()
            second = asyncio.create_task(client.request_shard(2, "inc", request_id="dup"))
            await deliveries.wait_for(2)  # the node has the duplicate; the first is still held
            assert counter.runs == ["dup"]
            counter.gate.set()
            assert await asyncio.gather(first, second) == [b"1", b"1"]
            assert counter.runs == ["dup"]
        finally:
            await node.stop()

    async def test_requests_without_id_are_not_deduplicated(self, connect: Connect) -> None:
        """Without an id every request runs (no retry policy, no id, no cache)."""
        counter = Counter()
        node = Node(await connect("a"), counter, num_shards=4)
        await node.start()
        client = Client(await connect("c"), num_shards=4)
        try:
            assert [await client.request_shard(0, "inc") for _ in range(3)] == [b"1", b"2", b"3"]
        finally:
            await node.stop()


class TestRetryPolicy:
    async def test_retry_rides_through_no_owner(self, connect: Connect) -> None:
        """With a retry policy, a request sent before any node serves the shard
        succeeds once one does (same id throughout)."""
        seen = SeenErrors()
        client = Client(
            await connect("c"),
            num_shards=4,
            retry=RetryPolicy(initial_backoff=0.005, max_backoff=0.02),
            metrics=seen,
            timeout=10,
        )
        call = asyncio.create_task(client.request_shard(3, "inc"))
        await seen.retried.wait()  # the first attempt found no owner
        assert seen.retries[0] == "no_owner"
        assert seen.errors == []  # retried, not reported as a failure
        counter = Counter()
        node = Node(await connect("a"), counter, num_shards=4)
        await node.start()
        try:
            assert await call == b"1"
            assert len(counter.runs) == 1
            assert counter.runs[0] is not None  # the policy gave the request an id
        finally:
            await node.stop()

    async def test_retry_gives_up_at_the_deadline(self, connect: Connect) -> None:
        """When no owner appears, the retrying request fails with NoShardOwnerError
        at its deadline, not before and not much after."""
        client = Client(
            await connect("c"),
            num_shards=4,
            retry=RetryPolicy(initial_backoff=0.005, max_backoff=0.02),
            timeout=0.3,
        )
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(NoShardOwnerError):
            await client.request_shard(3, "inc")
        assert 0.2 <= loop.time() - started < 2.0

    async def test_max_attempts_bounds_retries(self, connect: Connect) -> None:
        """max_attempts stops retrying after that many attempts."""
        client = Client(
            await connect("c"),
            num_shards=4,
            retry=RetryPolicy(initial_backoff=0.001, max_backoff=0.001, max_attempts=3),
            timeout=30,
        )
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(NoShardOwnerError):
            await client.request_shard(0, "inc")
        assert loop.time() - started < 5

    async def test_overloaded_is_retried(self, connect: Connect) -> None:
        """An overloaded answer is retried until the node has room again."""
        counter = Counter()
        counter.gate = asyncio.Event()
        node = Node(await connect("a"), counter, num_shards=4, max_concurrency=1, max_pending=0)
        await node.start()
        plain = Client(await connect("p"), num_shards=4)
        seen = SeenErrors()
        retrying = Client(
            await connect("r"),
            num_shards=4,
            retry=RetryPolicy(initial_backoff=0.005, max_backoff=0.02),
            metrics=seen,
            timeout=10,
        )
        try:
            busy = asyncio.create_task(plain.request_shard(0, "hold"))
            await counter.entered.wait()
            with pytest.raises(OverloadedError):
                await plain.request_shard(0, "inc")
            waiting = asyncio.create_task(retrying.request_shard(0, "inc"))
            await seen.retried.wait()  # it was answered overloaded, and retries
            assert seen.retries[0] == "overloaded"
            counter.gate.set()
            await busy
            assert await waiting == b"2"
        finally:
            await node.stop()

    async def test_lost_attempt_is_sent_again_and_runs_once(self, connect: Connect) -> None:
        """An attempt with no reply within attempt_timeout is sent again under the same
        id; the node joins it to the run in flight, so the handler runs once."""
        release = asyncio.Event()
        runs: list[str | None] = []

        async def slow_once(env: Envelope) -> bytes:
            runs.append(env.id)
            await release.wait()
            return b"done"

        node = Node(await connect("a"), slow_once, num_shards=4)
        await node.start()
        seen = SeenErrors()
        client = Client(
            await connect("c"),
            num_shards=4,
            retry=RetryPolicy(initial_backoff=0.001, max_backoff=0.002, attempt_timeout=0.1),
            metrics=seen,
            timeout=10,
        )
        try:
            call = asyncio.create_task(client.request_shard(1, "x"))
            await seen.retried.wait()  # the first attempt went unanswered
            assert seen.retries[0] == "request_timeout"
            release.set()
            assert await call == b"done"
            assert len(runs) == 1
        finally:
            await node.stop()

    def test_bad_policy_refused(self) -> None:
        """Nonsense backoff settings raise ConfigurationError."""
        with pytest.raises(ConfigurationError):
            RetryPolicy(initial_backoff=0)
        with pytest.raises(ConfigurationError):
            RetryPolicy(initial_backoff=1, max_backoff=0.5)
        with pytest.raises(ConfigurationError):
            RetryPolicy(max_attempts=0)
        with pytest.raises(ConfigurationError):
            RetryPolicy(attempt_timeout=0)

    def test_backoff_is_jittered_and_bounded(self) -> None:
        """Each pause lies between zero and the exponential bound, capped at max_backoff."""
        policy = RetryPolicy(initial_backoff=0.01, max_backoff=0.1, multiplier=2)
        for attempt in range(10):
            bound = min(0.1, 0.01 * 2**attempt)
            assert all(0 <= policy.backoff(attempt) <= bound for _ in range(50))
