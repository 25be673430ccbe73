"""Misbehaving handlers: the node stays responsive, reports timeouts, and stops in bounds.

Four kinds of bad handler: one that never returns, one that ignores
cancellation (catches ``CancelledError`` and goes on), one that raises on
every call, one that blocks the event loop on CPU. Each runs next to a
well-behaved handler for other keys, on both transports (the memory one and
a real nats-server).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest
import pytest_asyncio
import structlog

from clstr import (
    Client,
    DeadlineExceededError,
    Envelope,
    EnvelopeExpiredError,
    HandlerTimeoutError,
    Node,
    NotOwnerError,
    RemoteHandlerError,
    RequestTimeoutError,
    Transport,
)

from _support import eventually

Connect = Callable[[str], Awaitable[Transport]]

NUM_SHARDS = 8
GRACE = 1.0  # clstr.node's cancel grace: how long stop waits for a cancelled handler
CPU_BLOCK = 0.3


@dataclass
class Misbehaving:
    """Behaves according to the message type."""

    stubborn_entered: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    swallowed: int = 0
    calls: int = 0

    async def __call__(self, env: Envelope) -> bytes:
        self.calls += 1
        if env.type == "hang":
            await asyncio.Event().wait()  # never returns, but can be cancelled
        elif env.type == "stubborn":
            self.stubborn_entered.set()
            while not self.release.is_set():
                try:
                    await self.release.wait()
                except asyncio.CancelledError:  # the misbehaviour under test
                    self.swallowed += 1
            return b"finally done"
        elif env.type == "raise":
            raise RuntimeError(f"broken handler, call {self.calls}")
        elif env.type == "cpu":
            time.sleep(CPU_BLOCK)  # noqa: ASYNC251 - the misbehaviour under test
        elif env.type == "cpu_in_thread":
            await asyncio.to_thread(time.sleep, CPU_BLOCK)
        return b"ok"


@dataclass
class Rig:
    handler: Misbehaving
    node: Node
    client: Client

    async def ok(self, key: str = "good", timeout: float = 2.0) -> float:
        """One well-behaved request; its latency in seconds."""
        started = time.perf_counter()
        assert await self.client.request_key(key, "ok", timeout=timeout) == b"ok"
        return time.perf_counter() - started


@pytest_asyncio.fixture
async def rig(connect: Connect) -> AsyncIterator[Rig]:
    """A node (4 concurrent handlers at most) and a client, on each transport."""
    handler = Misbehaving()
    node = Node(
        await connect("node"),
        handler,
        node_id="node",
        num_shards=NUM_SHARDS,
        max_concurrency=4,
        stop_timeout=0.5,
    )
    client = Client(await connect("client"), num_shards=NUM_SHARDS)
    await node.start()
    try:
        yield Rig(handler, node, client)
    finally:
        handler.release.set()  # let a stubborn handler end, so that no task is left
        await node.stop()
        await eventually(lambda: not node._dispatch.workers)


class TestNeverReturns:
    """A handler that never returns is cut off at the deadline."""

    async def test_caller_gets_a_timeout_and_other_keys_are_served(self, rig: Rig) -> None:
        """The hung request ends in HandlerTimeoutError; other keys meanwhile answer fast."""
        hung = asyncio.create_task(rig.client.request_key("stuck", "hang", timeout=0.5))
        latencies = [await rig.ok(f"k{i}") for i in range(20)]
        with pytest.raises(HandlerTimeoutError):
            await hung
        assert max(latencies) < 0.2
        assert rig.node.running == 0

    async def test_hung_handlers_hold_slots_until_their_deadline(self, rig: Rig) -> None:
        """With every slot (max_concurrency) hung, other keys wait for a slot, within limits."""
        hung = [
            asyncio.create_task(rig.client.request_key(f"stuck{i}", "hang", timeout=0.3))
            for i in range(rig.node.max_concurrency)
        ]
        await eventually(lambda: rig.node.running == rig.node.max_concurrency)
        latency = await rig.ok()
        assert 0.2 < latency < 1.0
        for task in hung:
            with pytest.raises(HandlerTimeoutError):
                await task

    async def test_stop_cancels_it_within_stop_timeout(self, rig: Rig) -> None:
        """stop() cancels a hung handler after stop_timeout; its caller gets not_owner."""
        hung = asyncio.create_task(rig.client.request_key("stuck", "hang", timeout=10))
        await eventually(lambda: rig.node.running == 1)
        started = time.monotonic()
        await rig.node.stop()
        assert time.monotonic() - started < rig.node.stop_timeout + 0.5
        with pytest.raises(NotOwnerError):
            await hung


class TestIgnoresCancellation:
    """A handler that swallows CancelledError cannot hang the node's stop."""

    async def test_timeout_still_reaches_the_caller(self, rig: Rig) -> None:
        """The node cannot stop the handler, but the caller's deadline still ends its wait."""
        with pytest.raises(DeadlineExceededError):
            await rig.client.request_key("stubborn", "stubborn", timeout=0.3)
        assert rig.handler.swallowed == 1
        assert (await rig.ok()) < 0.2  # other keys are unaffected

    async def test_same_key_waits_behind_it(self, rig: Rig) -> None:
        """Per-key order holds: the next message for that key waits, and is answered
        expired at its deadline (it never runs)."""
        stubborn = asyncio.create_task(rig.client.request_key("s", "stubborn", timeout=0.2))
        await rig.handler.stubborn_entered.wait()
        with pytest.raises(EnvelopeExpiredError):
            await rig.client.request_key("s", "ok", timeout=0.3)
        with pytest.raises(DeadlineExceededError):
            await stubborn

    async def test_stop_returns_within_its_bound_and_logs_the_handler(self, rig: Rig) -> None:
        """stop() gives up on the stuck handler after the cancel grace and says so; the
        caller, whom the node cannot answer for that handler, gets its own timeout."""
        stubborn = asyncio.create_task(rig.client.request_key("s", "stubborn", timeout=3))
        await rig.handler.stubborn_entered.wait()
        started = time.monotonic()
        with structlog.testing.capture_logs() as logs:
            await rig.node.stop()
        took = time.monotonic() - started
        assert took < rig.node.stop_timeout + 2 * GRACE + 0.5
        assert rig.handler.swallowed >= 1
        assert any("ignored cancellation" in entry["event"] for entry in logs)
        with pytest.raises(RequestTimeoutError):
            await stubborn
        # Once the handler gives in, its task ends: nothing leaks.
        rig.handler.release.set()
        await eventually(lambda: not rig.node._dispatch.workers)


class TestAlwaysRaises:
    """A handler that raises on every call reports each error and breaks nothing."""

    async def test_each_call_reports_the_remote_error(self, rig: Rig) -> None:
        """Every call gets RemoteHandlerError with the remote type and message."""
        for i in range(1, 11):
            with pytest.raises(RemoteHandlerError) as caught:
                await rig.client.request_key(f"r{i % 3}", "raise")
            assert caught.value.remote_type == "RuntimeError"
            assert caught.value.remote_message == f"broken handler, call {i}"
        assert rig.node.stats.errors == 10
        assert rig.node.stats.last_error.startswith("RuntimeError")
        assert (await rig.ok()) < 0.2
        assert rig.node.running == 0
        assert rig.node.queued == 0


class TestBlocksOnCpu:
    """asyncio cannot preempt: a CPU-bound handler stalls the loop; a thread does not."""

    async def test_blocking_handler_stalls_everyone_then_service_resumes(self, rig: Rig) -> None:
        """While the handler holds the loop, nothing else runs; afterwards all is served,
        and the node reports the stall ("event loop blocked", naming the handler)."""
        with structlog.testing.capture_logs() as logs:
            cpu = asyncio.create_task(rig.client.request_key("c", "cpu", timeout=5))
            latency = await rig.ok()  # sent right behind the CPU-bound one
            assert latency >= CPU_BLOCK * 0.9  # it waited for the loop, not for a slot
            assert await cpu == b"ok"
            assert (await rig.ok()) < 0.2
            await eventually(
                lambda: any(e["event"].startswith("event loop blocked") for e in logs), timeout=1.0
            )
        stall = next(e for e in logs if e["event"].startswith("event loop blocked"))
        assert stall["log_level"] == "warning"
        assert stall["last_handler"] == {"type": "cpu", "key": "c"}
        assert CPU_BLOCK - 0.1 <= stall["blocked_for"] < CPU_BLOCK + 0.2, stall

    async def test_work_in_a_thread_keeps_the_node_responsive(self, rig: Rig) -> None:
        """The same work under asyncio.to_thread leaves other keys answering at once."""
        cpu = asyncio.create_task(rig.client.request_key("c", "cpu_in_thread", timeout=5))
        await eventually(lambda: rig.handler.calls == 1)
        latencies = [await rig.ok(f"k{i}") for i in range(10)]
        assert not cpu.done()
        assert max(latencies) < CPU_BLOCK / 3
        assert await cpu == b"ok"


class TestAllAtOnce:
    """Every misbehaviour in flight together: stop still ends in bounds, nothing leaks."""

    async def test_stop_with_every_bad_handler_running(self, rig: Rig) -> None:
        """Hung, stubborn and raising handlers at once: stop returns within its bound, and
        every caller hears back (the stubborn one's by its own deadline)."""
        calls = [
            asyncio.create_task(rig.client.request_key("h", "hang", timeout=3)),
            asyncio.create_task(rig.client.request_key("s", "stubborn", timeout=3)),
            asyncio.create_task(rig.client.request_key("r", "raise", timeout=3)),
        ]
        await rig.handler.stubborn_entered.wait()
        await eventually(lambda: rig.node.running == 2)
        started = time.monotonic()
        await rig.node.stop()
        assert time.monotonic() - started < rig.node.stop_timeout + 2 * GRACE + 0.5
        results = await asyncio.gather(*calls, return_exceptions=True)
        expected = [NotOwnerError, RequestTimeoutError, RemoteHandlerError]
        assert [type(r) for r in results] == expected
        rig.handler.release.set()
        await eventually(lambda: not rig.node._dispatch.workers)
